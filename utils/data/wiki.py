"""Reading MediaWiki `pages-articles` dumps (.xml or .xml.bz2) and extracting plain text with wikiextractor.

The dump is streamed line by line (bz2 decompressed on the fly), so memory stays flat for a full
zhwiki dump. Download the dump from the Wikimedia dumps site:

    https://dumps.wikimedia.org/zhwiki/latest/zhwiki-latest-pages-articles.xml.bz2

Text extraction is wikiextractor's own `Extractor.clean_text`, run page by page in worker processes by
the corpus pipeline. Templates are removed rather than expanded (expanding needs a full first pass over
the dump); what removal leaves behind, such as empty brackets, is cleaned by `utils.data.text.normalize_text`.
"""

from __future__ import annotations

import bz2
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import indexed_bzip2
import wikiextractor.WikiExtractor as wikiextractor_main
from wikiextractor.extract import Extractor

from utils.data.text import resolve_conversion_markup
from utils.errors import UserError

_NAMESPACE = re.compile(r'<namespace key="(-?\d+)"[^>]*?(?:/>|>([^<]*)</namespace>)')
_SNIFF_BYTES = 4096


@dataclass
class WikiPage:
    """One article (namespace 0, not a redirect) as raw wikitext lines."""

    id: str
    revid: str
    title: str
    lines: list[str]
    urlbase: str
    template_prefix: str
    known_namespaces: frozenset[str]


def is_mediawiki_dump(path: str | Path) -> bool:
    """True when the file starts like a MediaWiki XML export (plain or bz2-compressed)."""
    head = _read_head(Path(path))
    return "<mediawiki" in head


def _read_head(path: Path) -> str:
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rb") as handle:
            return handle.read(_SNIFF_BYTES).decode("utf-8", errors="replace")
    except (OSError, EOFError) as err:
        raise UserError(f"cannot read the file: {err}", path=str(path),
                        fix="check that the file is complete (re-download it) and readable") from None


class _CheckedLines:
    """Iterates over the dump's lines, remembering whether the root closed so truncation is detected.

    A `.bz2` dump is decompressed by indexed_bzip2 (the same bytes as Python's bz2, 15% faster on one thread,
    and able to decompress one stream's blocks on several threads): bz2 is the one step of the corpus stage
    that the main process runs for all the workers, so it must keep ahead of them.
    """

    def __init__(self, path: Path, raw: BinaryIO, threads: int = 1):
        self.path, self.raw, self.threads = path, raw, threads
        self.line_no = 0
        self.closed_root = False

    def __iter__(self) -> Iterator[str]:
        compressed = self.path.suffix == ".bz2"
        binary = indexed_bzip2.open(self.raw, parallelization=self.threads) if compressed else self.raw
        try:
            with io.TextIOWrapper(binary, encoding="utf-8") as handle:
                for line in handle:
                    self.line_no += 1
                    if "</mediawiki>" in line:
                        self.closed_root = True
                    yield line
        except UnicodeDecodeError as err:
            raise UserError(f"not UTF-8 text ({err.reason})", path=str(self.path), line=self.line_no + 1,
                            fix="pass a MediaWiki XML export as downloaded, without re-encoding") from None
        except (EOFError, RuntimeError, ValueError):
            if not compressed:
                raise
            raise UserError("the compressed file ends early or is damaged (truncated .bz2)", path=str(self.path),
                            line=self.line_no,
                            fix="download the dump again and check its size / sha1 against the "
                                "dumps site") from None
        except OSError as err:
            raise UserError(f"cannot read the file: {err}", path=str(self.path), line=self.line_no,
                            fix="check that the file is a complete .xml or .xml.bz2 dump") from None


def read_dump(path: str | Path, raw: BinaryIO, threads: int = 1) -> Iterator[WikiPage]:
    """Yield the articles of the dump open as `raw` in file order; refuse a file that is not a dump.

    `raw` is the file opened in binary mode; its `tell()` says how far the (compressed) file was read.
    `threads`: decompression threads for a `.bz2` dump.
    """
    path = Path(path)
    lines = _CheckedLines(path, raw, threads)
    stream = iter(lines)
    urlbase, template_prefix, known = "", "", {"Template"}
    saw_root = saw_siteinfo = False
    for line in stream:
        if "<mediawiki" in line:
            saw_root = True
        if not saw_root and lines.line_no > 50:
            break
        for key, name in _NAMESPACE.findall(line):
            if name:
                known.add(name)
                if key == "10":
                    template_prefix = name + ":"
        base = re.search(r"<base>([^<]*)</base>", line)
        if base:
            urlbase = base.group(1).rsplit("/", 1)[0]
        if "</siteinfo>" in line:
            saw_siteinfo = True
            break
    if not (saw_root and saw_siteinfo):
        raise UserError("not a MediaWiki XML dump (no <mediawiki> root with a <siteinfo> header)",
                        path=str(path), line=lines.line_no,
                        fix="pass a 'pages-articles' dump (.xml or .xml.bz2) as downloaded from "
                            "https://dumps.wikimedia.org/zhwiki/latest/, or wikiextractor output")
    # wikiextractor's page collector reads the template namespace from a module global that its own
    # command line sets from <siteinfo>; set it the same way.
    wikiextractor_main.templateNamespace = template_prefix[:-1] or "Template"
    namespaces = frozenset(known)
    for page_id, revid, title, page_lines in wikiextractor_main.collect_pages(stream):
        yield WikiPage(page_id, revid, title, page_lines, urlbase, template_prefix, namespaces)
    if not lines.closed_root:
        raise UserError("the XML ends early: no closing </mediawiki> tag (truncated file)",
                        path=str(path), line=lines.line_no,
                        fix="download the dump again; a partial dump cannot be used")


def extract_text(page: WikiPage) -> str:
    """Plain text of one article: conversion markup resolved, then wikiextractor's clean-up."""
    wikitext = resolve_conversion_markup("".join(page.lines))
    extractor = Extractor(page.id, page.revid, page.urlbase, page.title, [],
                          templatePrefix=page.template_prefix, knownNamespaces=set(page.known_namespaces))
    paragraphs = extractor.clean_text(wikitext, expand_templates=False, html_safe=False)
    return "\n".join(paragraphs)
