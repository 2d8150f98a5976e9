"""BM25 over a local folder of Chinese documents: the retriever of retrieval-augmented chat (rag_chat.py).

    retriever = Retriever.from_paths(["notes/"], max_passage_chars=200)
    for passage, score in retriever.search("长城有多长？", k=3):
        print(passage.where, score, passage.text)

Documents are read as the corpus stage reads its inputs (`utils.data.sources`: text files one block of lines
a document, JSON lines, parquet, wikiextractor output) and cut into passages of at most `max_passage_chars`
characters at sentence ends. Chinese has no spaces between words, so both passages and questions are
segmented into words with jieba's search mode (a long word and the shorter words inside it: 中华人民共和国 also
yields 中华, 人民, 共和国), and ranked with Okapi BM25 (rank_bm25, the retriever LangChain's BM25Retriever
wraps). Tokens without a letter, digit or CJK character (punctuation, spaces) are not words, nor are the
function and question words of `STOP_WORDS` (的, 是, 有, 什么, 多少, ...).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jieba
from rank_bm25 import BM25Okapi

from utils.data.sources import discover_inputs, read_records
from utils.errors import UserError

jieba.setLogLevel(logging.WARNING)  # its dictionary loading would print two lines on every run
_SENTENCE_END = re.compile(r"(?<=[。！？；!?;\n])")
_WORD = re.compile(r"[\w\u3400-\u9fff]")
# Function words and question words: in nearly every question and passage, they would rank a passage for its
# grammar rather than its subject (有 in 长城有多长 matching every passage that says 有).
STOP_WORDS = frozenset({
    "的", "地", "得", "了", "着", "过", "是", "在", "有", "和", "与", "及", "或", "也", "就", "都", "而", "并", "但",
    "又", "还", "把", "被", "让", "给", "对", "从", "向", "到", "为", "以", "于", "之", "其", "这", "那", "这个",
    "那个", "这些", "那些", "一", "一个", "个", "些", "吗", "呢", "吧", "啊", "呀", "么", "什么", "怎么", "怎样",
    "怎么样", "如何", "为什么", "为何", "多少", "几", "哪", "哪里", "哪个", "哪些", "谁", "请问", "我", "你",
    "他", "她", "它", "我们", "你们", "他们", "它们",
})


@dataclass(frozen=True)
class Passage:
    text: str
    path: str
    line: int | None = None

    @property
    def where(self) -> str:
        """`file:line` (or the file alone), as the answer's sources list it."""
        return self.path if self.line is None else f"{self.path}:{self.line}"


def split_passages(text: str, max_chars: int) -> list[str]:
    """`text` in pieces of at most `max_chars` characters, cut after sentence ends (。！？； and line breaks); a
    sentence longer than `max_chars` is cut where the limit falls. Every character of `text` is in one piece, in
    order, but the blank space at the pieces' edges."""
    pieces: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(text):
        if len(current) + len(sentence) > max_chars and current.strip():
            pieces.append(current.strip())
            current = ""
        current += sentence
        while len(current) > max_chars:
            pieces.append(current[:max_chars].strip())
            current = current[max_chars:]
    pieces.append(current.strip())
    return [piece for piece in pieces if piece]


def words(text: str) -> list[str]:
    """The words BM25 counts: jieba's search-mode segmentation, lower-cased, without punctuation, spaces and
    `STOP_WORDS`."""
    return [word for word in (piece.lower() for piece in jieba.lcut_for_search(text))
            if _WORD.search(word) and word not in STOP_WORDS]


class Retriever:
    """Okapi BM25 over passages; `search` returns the best `k` with a positive score, best first."""

    def __init__(self, passages: Sequence[Passage]):
        if not passages:
            raise ValueError("a retriever needs at least one passage")
        self.passages = list(passages)
        self.index = BM25Okapi([words(passage.text) for passage in self.passages])

    @classmethod
    def from_paths(cls, paths: Sequence[str], max_passage_chars: int = 200, field: str = "docs") -> Retriever:
        """Read every document under `paths` (files or folders, as `discover_inputs` finds them) into passages;
        a folder without text is refused, naming `field`, the flag that gave it."""
        passages = [Passage(piece, location.path, location.line)
                    for path in discover_inputs(list(paths), field=field)
                    for document, location in read_records(Path(path))
                    for piece in split_passages(document.text, max_passage_chars)]
        if not passages:
            raise UserError("the documents hold no text", path=", ".join(paths), field=field,
                            fix="point --docs at UTF-8 text files (one passage per block of lines), JSON lines "
                                "with a `text` field, or parquet files")
        return cls(passages)

    def search(self, query: str, k: int) -> list[tuple[Passage, float]]:
        scores = self.index.get_scores(words(query))
        best = sorted(range(len(self.passages)), key=lambda i: (-scores[i], i))[:k]
        return [(self.passages[i], float(scores[i])) for i in best if scores[i] > 0]
