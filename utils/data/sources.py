"""Input discovery and the one reader per file format, for the corpus pipeline and conversation data.

Accepted inputs (several may be mixed; directories are searched recursively):
- MediaWiki `pages-articles` dumps, `.xml` or `.xml.bz2` -> articles still to be extracted (`WikiPage`);
- wikiextractor output, `<doc id=... title=...>` text or `--json` lines, in files such as `AA/wiki_00`;
- `.jsonl` / `.json` (JSON lines or one JSON array of objects, streamed: WuDao) and `.parquet` with a text
  column: a string, or a list of strings (chinese-poetry's `paragraphs`), several columns joined, or a field
  inside an object column (`a.b`), see `read_records`;
- plain `.txt`, one document per block of lines separated by a blank line (or one per line);
- `.csv` with a header line (conversation data only, through `read_rows`).

Every reader yields `(row, Location)` pairs: the `Location` names the file and the line (text formats) or
row (JSON arrays, parquet) for error messages, and how many bytes of the file have been consumed, which
drives the progress bar's ETA. `read_records` turns them into documents, `read_rows` gives table rows.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import pyarrow.parquet as pq

from utils.data.wiki import WikiPage, is_mediawiki_dump, read_dump
from utils.errors import UserError

logger = logging.getLogger(__name__)
_DOC_HEADER = re.compile(r'<doc id="([^"]*)"(?: url="[^"]*")?(?: title="([^"]*)")?[^>]*>')
_LEADING_SPACE = "\ufeff \r\n\t"
TxtSplit = Literal["blank_line", "line"]


@dataclass
class Document:
    """Plain text with whatever provenance the source had."""

    text: str
    title: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class Location:
    """Where a row came from, for error messages: a file (or hub dataset) and its line, or its row number;
    `consumed` is how many bytes of the file had been read when the row was, for progress bars."""

    path: str
    line: int | None = None
    row: int | None = None
    consumed: int = 0

    def error(self, problem: str, field: str | None = None, fix: str | None = None) -> UserError:
        if self.row is not None:
            problem = f"row {self.row}: {problem}"
        return UserError(problem, path=self.path, line=self.line, field=field, fix=fix)


# Records the toolkit itself writes beside data (the resolved config, corpus statistics, generate_rejected.py's
# progress): a folder given as input is read for its data files only, never these.
TOOLKIT_RECORDS = frozenset({"config.yaml", "stats.json", "run.json", "tokenizer_report.json"})
PROGRESS_SUFFIX = ".progress.json"
# The same data saved in two formats side by side (a.parquet and a.jsonl): read once, in this order of preference.
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")


def discover_inputs(paths: list[str], field: str = "input") -> list[Path]:
    """Expand directories into their data files (sorted; hidden files and the toolkit's own records skipped; one
    file of a name saved in several formats, see `DATA_SUFFIXES`); refuse missing paths, naming `field`, the flag
    that gave them (prepare_data.py's --input by default). Files named one by one are taken as they are."""
    if not paths:
        raise UserError("no input given", field=field, fix=f"pass one or more files or directories to --{field}")
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = _one_format_each(sorted(p for p in path.rglob("*") if p.is_file() and not is_record(p) and not any(
                part.startswith(".") for part in p.relative_to(path).parts)))
            if not found:
                raise UserError("the input directory holds no data files", path=name, field=field,
                                fix="point --input at a dump, wikiextractor output or text files" if field == "input"
                                else f"point --{field} at files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError("no such file or directory", path=name, field=field,
                            fix="check the path; download the dump from https://dumps.wikimedia.org/zhwiki/latest/"
                                "zhwiki-latest-pages-articles.xml.bz2" if field == "input" else "check the path")
    return files


def is_record(path: Path) -> bool:
    """Whether `path` is one of the toolkit's own records rather than data (`TOOLKIT_RECORDS`, progress files)."""
    return path.name in TOOLKIT_RECORDS or path.name.endswith(PROGRESS_SUFFIX)


def _one_format_each(files: list[Path]) -> list[Path]:
    """`files` less the copies of one data set in another format: of `a.parquet` and `a.jsonl` in one folder,
    `a.parquet` (the first of `DATA_SUFFIXES`) is read and the other is named in a warning."""
    chosen: dict[Path, Path] = {}
    for file in files:
        suffix = file.suffix.lower()
        if suffix not in DATA_SUFFIXES:
            chosen[file] = file
            continue
        key = file.with_suffix("")
        if key in chosen:
            kept, skipped = sorted((chosen[key], file), key=lambda f: DATA_SUFFIXES.index(f.suffix.lower()))
            logger.warning("%s and %s hold one data set in two formats: reading %s only", kept.name,
                           skipped.name, kept)
            chosen[key] = kept
        else:
            chosen[key] = file
    return sorted(chosen.values())


def file_format(path: Path) -> str:
    """The format of a corpus input file, from its name and first bytes: dump, parquet, json, doc or txt."""
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() == ".parquet":
        return "parquet"
    if suffixes.endswith((".xml", ".xml.bz2")) or path.suffix.lower() == ".bz2":
        return "dump"
    head = _head_text(path)
    stripped = head.lstrip(_LEADING_SPACE)
    if "<mediawiki" in head[:2048]:
        return "dump"
    if stripped.startswith("<doc "):
        return "doc"
    if path.suffix.lower() in (".jsonl", ".json") or stripped.startswith(("{", "[")):
        return "json"
    return "txt"


def _head_text(path: Path) -> str:
    with open(path, "rb") as handle:
        return handle.read(4096).decode("utf-8", errors="replace")


def text_columns(spec: str | Sequence[str]) -> tuple[str, ...]:
    """The column names of a `--text_column` value: one name, several separated by commas, or a list;
    `a.b` names the field `b` inside the object in column `a`."""
    names = [spec] if isinstance(spec, str) else list(spec)
    columns = tuple(part.strip() for name in names for part in str(name).split(",") if part.strip())
    if not columns:
        raise UserError("no text column named", field="text_column",
                        fix="pass --text_column with the name of the column that holds the text")
    return columns


def read_records(path: Path, text_column: str | Sequence[str] = "text", txt_split: str = "blank_line",
                 decompress_threads: int = 1) -> Iterator[tuple[WikiPage | Document, Location]]:
    """Stream one corpus input file as `(article or document, location)` pairs, by its `file_format`
    (`decompress_threads`: threads decompressing a `.xml.bz2` dump).

    In JSON and parquet rows the text is the `text_column` value (see `text_columns`): a string, or a list
    of strings joined by newlines; several columns are joined by newlines in the order given. A row whose
    text columns are all null (or empty lists) holds no document and is skipped; any other value is refused.
    """
    kind = file_format(path)
    if kind == "dump":
        yield from read_dump_pages(path, decompress_threads)
    elif kind == "doc":
        yield from read_wikiextractor_docs(path)
    elif kind == "txt":
        yield from read_txt_documents(path, txt_split)
    else:
        columns = text_columns(text_column)
        rows = read_parquet_rows(path, columns) if kind == "parquet" else read_json_rows(path)
        for row, location in rows:
            document = _row_document(row, location, columns)
            if document is not None:
                yield document, location


def read_rows(path: Path) -> Iterator[tuple[object, Location]]:
    """The rows of a data file, by its suffix: `.parquet`, `.csv`, anything else JSON lines or a JSON array."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from read_parquet_rows(path)
    elif suffix == ".csv":
        yield from read_csv_rows(path)
    else:
        yield from read_json_rows(path)


@contextmanager
def _utf8_text(path: Path, newline: str | None = None) -> Iterator[tuple[io.TextIOWrapper, BinaryIO]]:
    """The file as UTF-8 text (a byte-order mark skipped) and its byte stream, whose `tell()` is the bytes
    consumed; text that is not UTF-8 is refused."""
    with open(path, "rb") as raw:
        try:
            yield io.TextIOWrapper(raw, encoding="utf-8-sig", newline=newline), raw
        except UnicodeDecodeError as err:
            raise UserError(f"not UTF-8 text ({err.reason})", path=str(path),
                            fix="convert the file to UTF-8") from None


def read_json_rows(path: Path) -> Iterator[tuple[object, Location]]:
    """JSON lines (`line` = line number, blank lines skipped), or one JSON array (`row` = index, `line` = the
    line its element starts on), streamed element by element so that a multi-GB array (WuDao) is never held
    whole in memory."""
    with _utf8_text(path) as (stream, raw):
        first, lines_before = stream.read(1), 0
        while first and first in _LEADING_SPACE:  # counted, so that line numbers stay the file's
            lines_before += first == "\n"
            first = stream.read(1)
        if first == "[":
            for index, (row, line) in enumerate(_json_array(path, stream, lines_before + 1)):
                yield row, Location(str(path), line=line, row=index, consumed=raw.tell())
            return
        for line_no, line in enumerate(_prepend(first, stream), start=lines_before + 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\n"))  # so that an error's column is on this line
            except json.JSONDecodeError as err:
                raise UserError(f"not valid JSON: {err.msg} (column {err.colno})", path=str(path),
                                line=line_no, fix="each line of a .jsonl file must be one JSON object; "
                                                  "fix or remove that line") from None
            yield row, Location(str(path), line=line_no, consumed=raw.tell())


_JSON_SPACE = " \t\r\n"
_JSON_CHUNK = 1 << 20
_JSON_NUMBER = "0123456789.eE+-"


def _json_array(path: Path, stream: io.TextIOWrapper, line: int) -> Iterator[tuple[object, int]]:
    """The elements of the JSON array whose '[' was just read from `stream` (on line `line`), each with the
    line it starts on. Reads about 1 MB at a time; an element longer than the buffer is decoded once the
    buffer holds it whole (the buffer grows geometrically, so re-tries cost about twice the element)."""
    decoder, buffer, pos, scanned, eof = json.JSONDecoder(), "", 0, 0, False
    expect_value, first = True, True  # after '[' or ',' a value comes (or, right after '[', the ']')

    def line_at(at: int) -> int:  # positions only move forward within one buffer
        nonlocal line, scanned
        line += buffer.count("\n", scanned, at)
        scanned = at
        return line

    def refill() -> None:  # drop what was consumed and append the next chunk
        nonlocal buffer, pos, scanned, eof
        line_at(pos)
        more = stream.read(max(_JSON_CHUNK, len(buffer) - pos))
        buffer, pos, scanned, eof = buffer[pos:] + more, 0, 0, not more

    def fail(problem: str, at: int) -> UserError:
        return UserError(f"not valid JSON: {problem}", path=str(path), line=line_at(at),
                         fix="fix the JSON, or write one JSON object per line (.jsonl)")

    while True:
        while True:  # skip whitespace, reading more when the buffer runs out
            while pos < len(buffer) and buffer[pos] in _JSON_SPACE:
                pos += 1
            if pos < len(buffer) or eof:
                break
            refill()
        if pos == len(buffer):
            raise fail("the file ends inside the array (no closing ']')", pos)
        char = buffer[pos]
        if char == "]" and (first or not expect_value):
            pos += 1
            while True:
                rest = buffer[pos:].lstrip(_JSON_SPACE)
                if rest:
                    raise fail("extra data after the array's closing ']'", len(buffer) - len(rest))
                if eof:
                    return
                refill()
        if not expect_value:
            if char != ",":
                raise fail("expecting ',' or ']' between the array's elements", pos)
            pos, expect_value = pos + 1, True
            continue
        try:
            value, end = decoder.raw_decode(buffer, pos)
            if (not eof and type(value) in (int, float)  # a number may go on in the next chunk
                    and not buffer[end:end + 64].lstrip(_JSON_NUMBER)):
                refill()
                continue
        except json.JSONDecodeError as err:
            # An element cut by the end of the buffer fails near that end (or inside an unterminated string):
            # read on. Anything else is a real error, reported without reading the rest of the file.
            truncated = err.pos >= len(buffer) - 64 or err.msg.startswith("Unterminated string")
            if truncated and not eof:
                refill()
                continue
            raise fail(err.msg, err.pos) from None
        yield value, line_at(pos)
        pos, expect_value, first = end, False, False
        if pos > _JSON_CHUNK:  # keep the buffer about one chunk long
            line_at(pos)
            buffer, pos, scanned = buffer[pos:], 0, 0


def _prepend(first: str, stream: io.TextIOWrapper) -> Iterator[str]:
    yield first + stream.readline()
    yield from stream


def read_parquet_rows(path: Path, text_columns: Sequence[str] | None = None) -> Iterator[tuple[dict, Location]]:
    """Every row of a parquet file as a dict (`row` = index). With `text_columns`, only the document columns
    (those, `title`, `id`) are read, and a file without one of the text columns is refused."""
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(f"not a readable parquet file ({err})", path=str(path),
                        fix="re-create the file, or pass it as .jsonl") from None
    columns = None
    if text_columns is not None:
        names = parquet.schema_arrow.names
        wanted = []
        for column in text_columns:
            top = column if column in names else column.split(".", 1)[0]
            if top not in names:
                raise UserError(f"missing text column; the file has: {', '.join(names)}", path=str(path),
                                field=column, fix="pass --text_column with the name of the text column")
            wanted.append(top)
        columns = list(dict.fromkeys([*wanted, *(c for c in ("title", "id") if c in names)]))
    size, total_rows, index = os.path.getsize(path), max(parquet.metadata.num_rows, 1), 0
    for batch in parquet.iter_batches(columns=columns, batch_size=1024):
        for row in batch.to_pylist():
            index += 1
            yield row, Location(str(path), row=index - 1, consumed=size * index // total_rows)


def read_csv_rows(path: Path) -> Iterator[tuple[dict, Location]]:
    """Every row of a CSV file with a header line, as a dict (`line` = the line the row ends on)."""
    with _utf8_text(path, newline="") as (stream, raw):
        reader = csv.DictReader(stream)
        for row in reader:
            yield row, Location(str(path), line=reader.line_num, consumed=raw.tell())


def read_dump_pages(path: Path, decompress_threads: int = 1) -> Iterator[tuple[WikiPage, Location]]:
    """The articles of a MediaWiki `pages-articles` dump (`.xml` or `.xml.bz2`)."""
    if not is_mediawiki_dump(path):
        raise UserError("not a MediaWiki XML dump (no <mediawiki> root element)", path=str(path),
                        line=1, fix="pass a 'pages-articles' dump as downloaded from "
                                    "https://dumps.wikimedia.org/zhwiki/latest/")
    with open(path, "rb") as raw:
        for page in read_dump(path, raw, decompress_threads):
            yield page, Location(str(path), consumed=raw.tell())


def read_wikiextractor_docs(path: Path) -> Iterator[tuple[Document, Location]]:
    """wikiextractor's default output: `<doc id=.. url=.. title=..>`, the title line, text, `</doc>`
    (`line` = the `<doc>` line)."""
    with _utf8_text(path) as (stream, raw):
        header, start, lines = None, 0, []
        for line_no, line in enumerate(stream, start=1):
            if header is None:
                found = _DOC_HEADER.match(line.strip())
                if found:
                    header, start, lines = found, line_no, []
                elif line.strip():
                    raise UserError("text outside a <doc> element", path=str(path), line=line_no,
                                    fix="pass wikiextractor output unchanged, or use a .txt file")
            elif line.strip() == "</doc>":
                doc_id, title = header.group(1), header.group(2)
                if lines and title and lines[0].strip() == title:
                    lines = lines[1:]  # wikiextractor repeats the title as the first line
                yield Document("".join(lines).strip(), title, doc_id), Location(str(path), line=start,
                                                                                consumed=raw.tell())
                header = None
            else:
                lines.append(line)
        if header is not None:
            raise UserError("the file ends inside a <doc> element (truncated)", path=str(path),
                            fix="re-run wikiextractor or pass the complete file")


def read_txt_documents(path: Path, split: str = "blank_line") -> Iterator[tuple[Document, Location]]:
    """Plain text: one document per block of lines separated by a blank line, or (`split="line"`) per
    non-empty line (`line` = the document's first line)."""
    with _utf8_text(path) as (stream, raw):
        block, start = [], 0
        for line_no, line in enumerate(stream, start=1):
            if line.strip():
                start = start if block else line_no
                block.append(line)
                if split != "line":
                    continue
            if block:
                yield Document("".join(block).strip()), Location(str(path), line=start, consumed=raw.tell())
                block = []
        if block:
            yield Document("".join(block).strip()), Location(str(path), line=start, consumed=raw.tell())


_MISSING = object()
_COLUMN_FIX = ("pass --text_column with the column that holds the text: one name, several joined by commas "
               "(title,paragraphs), or a nested field (data.text)")


def _row_document(row: object, location: Location, columns: Sequence[str]) -> Document | None:
    """The document of one JSON / parquet row: its text columns joined by newlines (None when all are
    null); a row that is not an object, a missing column or a value that is not text is refused."""
    if not isinstance(row, dict):
        raise location.error("a row is not a JSON object",
                             fix=f"write objects such as {{\"{columns[0]}\": \"...\"}}")
    parts = []
    for column in columns:
        value = _field(row, column)
        if value is _MISSING:
            keys = ", ".join(map(str, row)) or "none"
            raise location.error(f"missing text column; the row has: {keys}", field=column, fix=_COLUMN_FIX)
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            value = "\n".join(value) if value else None
        elif value is not None and not isinstance(value, str):
            raise location.error(f"the text column holds {_describe(value, column)}, not a string or a list of strings",
                                 field=column, fix=_COLUMN_FIX)
        if value is not None:
            parts.append(value)
    if not parts:
        return None  # a null cell holds no document
    title, doc_id = row.get("title"), row.get("id")
    if isinstance(title, list):  # a title kept as a list of lines
        title = " ".join(map(str, title))
    return Document("\n".join(parts), None if title is None else str(title), None if doc_id is None else str(doc_id))


def _field(row: dict, column: str) -> object:
    """`row[column]`, or for `a.b` (when no column has that literal name) `row["a"]["b"]`, and where `row["a"]`
    is a list of objects, the list of each one's `b` (`paragraphs.text`); `_MISSING` if absent."""
    if column in row:
        return row[column]
    value: object = row
    for part in column.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and all(isinstance(item, dict) and part in item for item in value):
            value = [item[part] for item in value]
        else:
            return _MISSING
    return value


def _describe(value: object, column: str) -> str:
    """What `value`, found in `column`, is, for an error; an object names a field that `_field` reads."""
    if isinstance(value, list):
        kinds = sorted({_describe(item, column) for item in value if not isinstance(item, str)})
        return f"a list containing {', '.join(kinds)}"
    if isinstance(value, dict):
        inside = f"; name a field inside it as {column}.{next(iter(value))}" if value else ""
        return f"an object (with {', '.join(map(str, value)) or 'no keys'}{inside})"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    return f"a {type(value).__name__}"


def split_files(paths: list[str], split: str, field: str = "input") -> list[Path]:
    """Files of one split: in a `prepare_data.py` output directory its `{split}-*.parquet` shards,
    otherwise every file given (directories expanded; `field` as in `discover_inputs`)."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        shards = sorted(path.glob(f"{split}-*.parquet")) if path.is_dir() else []
        if shards:
            files.extend(shards)
        elif path.is_dir() and sorted(path.glob("*-*-of-*.parquet")):
            continue  # a corpus directory without this split
        else:
            files.extend(discover_inputs([name], field))
    return files
