"""Input discovery and streaming readers for the corpus pipeline.

Accepted inputs (several may be mixed; directories are searched recursively):
- MediaWiki `pages-articles` dumps, `.xml` or `.xml.bz2` -> articles still to be extracted (`WikiPage`);
- wikiextractor output, `<doc id=... title=...>` text or `--json` lines, in files such as `AA/wiki_00`;
- `.jsonl` / `.json` (JSON lines or one JSON array) and `.parquet` with a text column;
- plain `.txt`, one document per block of lines separated by a blank line (or one per line).

Every reader yields `(record, position)` pairs, `position` being how many bytes of the file have been
consumed, which drives the progress bar's ETA.
"""

from __future__ import annotations

import bz2
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from utils.data.wiki import WikiPage, is_mediawiki_dump, read_dump
from utils.errors import UserError

_DOC_HEADER = re.compile(r'<doc id="([^"]*)"(?: url="[^"]*")?(?: title="([^"]*)")?[^>]*>')
TXT_SPLITS = ("blank_line", "line")


@dataclass
class Document:
    """Plain text with whatever provenance the source had."""

    text: str
    title: str | None = None
    id: str | None = None


def discover_inputs(paths: list[str]) -> list[Path]:
    """Expand directories into their files (sorted, hidden files skipped); refuse missing paths."""
    if not paths:
        raise UserError("no input given", field="input", fix="pass one or more files or directories to --input")
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not any(
                part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise UserError("the input directory holds no files", path=name, field="input",
                                fix="point --input at a dump, wikiextractor output or text files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError("no such file or directory", path=name, field="input",
                            fix="check the path; download the dump from "
                                "https://dumps.wikimedia.org/zhwiki/latest/zhwiki-latest-pages-articles.xml.bz2")
    return files


def detect_format(path: Path) -> str:
    """One of: dump, parquet, json, doc, txt."""
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() == ".parquet":
        return "parquet"
    if suffixes.endswith((".xml", ".xml.bz2")) or path.suffix.lower() == ".bz2":
        return "dump"
    head = _head_text(path)
    stripped = head.lstrip("\ufeff \r\n\t")
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


def read_records(path: Path, text_column: str = "text",
                 txt_split: str = "blank_line") -> Iterator[tuple[WikiPage | Document, int]]:
    """Stream one input file as `(record, bytes consumed)` pairs."""
    kind = detect_format(path)
    if kind == "dump":
        if not is_mediawiki_dump(path):
            raise UserError("not a MediaWiki XML dump (no <mediawiki> root element)", path=str(path),
                            line=1, fix="pass a 'pages-articles' dump as downloaded from "
                                        "https://dumps.wikimedia.org/zhwiki/latest/")
        raw = open(path, "rb")
        with raw:
            for page in read_dump(path, raw):
                yield page, raw.tell()
    elif kind == "parquet":
        yield from _read_parquet(path, text_column)
    else:
        reader = {"json": _read_json, "doc": _read_doc, "txt": _read_txt}[kind]
        with open(path, "rb") as raw:
            stream = io.TextIOWrapper(raw, encoding="utf-8")
            try:
                for record in reader(path, stream, text_column, txt_split):
                    yield record, raw.tell()
            except UnicodeDecodeError as err:
                raise UserError(f"not UTF-8 text ({err.reason})", path=str(path),
                                fix="convert the file to UTF-8") from None


def _read_json(path: Path, stream: io.TextIOWrapper, text_column: str, _split: str) -> Iterator[Document]:
    first = stream.read(1)
    while first and first in "\ufeff \r\n\t":
        first = stream.read(1)
    if first == "[":
        try:
            rows = json.loads(first + stream.read())
        except json.JSONDecodeError as err:
            raise UserError(f"not valid JSON: {err.msg}", path=str(path), line=err.lineno,
                            fix="fix the JSON, or write one JSON object per line (.jsonl)") from None
        for index, row in enumerate(rows):
            yield _row_document(row, path, None, text_column, index)
        return
    for line_no, line in enumerate(_prepend(first, stream), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"not valid JSON: {err.msg} (column {err.colno})", path=str(path),
                            line=line_no, fix="each line of a .jsonl file must be one JSON object; "
                                              "fix or remove that line") from None
        yield _row_document(row, path, line_no, text_column, line_no - 1)


def _prepend(first: str, stream: io.TextIOWrapper) -> Iterator[str]:
    line = stream.readline()
    yield first + line
    yield from stream


def _row_document(row: object, path: Path, line: int | None, text_column: str, index: int) -> Document:
    if not isinstance(row, dict):
        raise UserError("a row is not a JSON object", path=str(path), line=line,
                        fix=f"write objects such as {{\"{text_column}\": \"...\"}}")
    text = row.get(text_column)
    if not isinstance(text, str):
        problem = "missing text column" if text_column not in row else "the text column is not a string"
        keys = ", ".join(map(str, row)) or "none"
        where = f"row {index}" if line is None else None
        raise UserError(f"{problem}{f' ({where})' if where else ''}; the row has: {keys}", path=str(path),
                        line=line, field=text_column,
                        fix="pass --text_column with the name of the column that holds the text")
    title, doc_id = row.get("title"), row.get("id")
    return Document(text, None if title is None else str(title), None if doc_id is None else str(doc_id))


def _read_doc(path: Path, stream: io.TextIOWrapper, _column: str, _split: str) -> Iterator[Document]:
    """wikiextractor's default output: `<doc id=.. url=.. title=..>`, the title line, text, `</doc>`."""
    header, lines = None, []
    for line_no, line in enumerate(stream, start=1):
        if header is None:
            found = _DOC_HEADER.match(line.strip())
            if found:
                header, lines = found, []
            elif line.strip():
                raise UserError("text outside a <doc> element", path=str(path), line=line_no,
                                fix="pass wikiextractor output unchanged, or use a .txt file")
        elif line.strip() == "</doc>":
            doc_id, title = header.group(1), header.group(2)
            if lines and title and lines[0].strip() == title:
                lines = lines[1:]  # wikiextractor repeats the title as the first line
            yield Document("".join(lines).strip(), title, doc_id)
            header = None
        else:
            lines.append(line)
    if header is not None:
        raise UserError("the file ends inside a <doc> element (truncated)", path=str(path),
                        fix="re-run wikiextractor or pass the complete file")


def _read_txt(path: Path, stream: io.TextIOWrapper, _column: str, split: str) -> Iterator[Document]:
    if split == "line":
        for line in stream:
            if line.strip():
                yield Document(line.strip())
        return
    block: list[str] = []
    for line in stream:
        if line.strip():
            block.append(line)
        elif block:
            yield Document("".join(block).strip())
            block = []
    if block:
        yield Document("".join(block).strip())


def _read_parquet(path: Path, text_column: str) -> Iterator[tuple[Document, int]]:
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(f"not a readable parquet file ({err})", path=str(path),
                        fix="re-create the file, or pass it as .jsonl") from None
    names = parquet.schema_arrow.names
    if text_column not in names:
        raise UserError(f"missing text column; the file has: {', '.join(names)}", path=str(path),
                        field=text_column, fix="pass --text_column with the name of the text column")
    columns = [c for c in (text_column, "title", "id") if c in names]
    size, total_rows, done = os.path.getsize(path), max(parquet.metadata.num_rows, 1), 0
    for batch in parquet.iter_batches(columns=columns, batch_size=1024):
        data = batch.to_pydict()
        for i, text in enumerate(data[text_column]):
            done += 1
            if text is None:
                continue
            title = data.get("title", [None] * len(data[text_column]))[i]
            doc_id = data.get("id", [None] * len(data[text_column]))[i]
            yield Document(str(text), title, None if doc_id is None else str(doc_id)), size * done // total_rows


def split_files(paths: list[str], split: str) -> list[Path]:
    """Files of one split: in a `prepare_data.py` output directory its `{split}-*.parquet` shards,
    otherwise every file given (directories expanded)."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        shards = sorted(path.glob(f"{split}-*.parquet")) if path.is_dir() else []
        if shards:
            files.extend(shards)
        elif path.is_dir() and sorted(path.glob("*-*-of-*.parquet")):
            continue  # a corpus directory without this split
        else:
            files.extend(discover_inputs([name]))
    return files
