"""Evaluation-set decontamination: training documents that share a long character n-gram with a question or an
answer option of an evaluation set (C-Eval, CMMLU, or any csv / jsonl / json / parquet of questions) are dropped.

    python prepare_data.py --input ... --decontaminate path/to/ceval path/to/cmmlu

Question and option texts go through the corpus's own clean-up (OpenCC profile, `normalize_text`) and lose their
whitespace, as documents have before they are checked, so a question copied into a web page in traditional
characters or with other spacing still matches. Every n-gram (13 characters by default: longer than the
stock phrases of exam questions such as "下列说法中，不正确的是", short enough to catch a question quoted in part)
is hashed to 64 bits; one evaluation set is a sorted array of those hashes (8 bytes per n-gram, about 10 MB for
C-Eval + CMMLU with their test splits), shared by the worker processes. A document is probed cheaply first:
the hashes of its (n - 3)-character windows at every 4th position (a shared n-gram always contains one of them)
go through a bit filter (~32 bits per anchor window, small enough for the CPU's caches) and a binary search in
the sorted anchor windows; only the rare document with a hit is checked on every n-gram. The result is exactly
that of checking every n-gram, at a third of the cost. Texts shorter than the n-gram (most options, such as
"胸" or "稳定战略") cannot match anything and are skipped, so common words never remove a document.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from utils.data.sources import Location, discover_inputs, read_rows
from utils.data.text import (
    normalize_text,
    strided_ngram_hashes,
    to_simplified,
    visible_codes,
    window_hashes,
)
from utils.errors import UserError

_QUESTION_FIELDS = ("question", "query", "problem", "prompt")  # case-insensitive
_OPTION_FIELDS = tuple("abcdefgh")  # C-Eval / CMMLU answer options: columns A, B, C, D
_OPTION_LISTS = ("choices", "options")  # MMLU-style lists of options (strings)
_FORMATS = (".csv", ".jsonl", ".json", ".parquet")
# A bit filter in front of the sorted arrays, ~32 bits per n-gram (2^20 to 2^30 bits: 128 KB to 128 MB), so most
# windows stop there after one look-up in memory small enough to stay in the CPU's caches.
_MIN_FILTER_BITS, _MAX_FILTER_BITS = 20, 30
_STRIDE = 4  # a document is probed with the (ngram - 3)-character windows at every 4th position
_NONE = np.empty(0, dtype=np.uint64)


class Decontaminator:
    """The n-grams of some evaluation sets; `matches` names the sets a document shares an n-gram with."""

    def __init__(self, sets: dict[str, np.ndarray], ngram: int, anchors: np.ndarray | None = None):
        """`sets`: each evaluation set's `ngram`-character hashes; `anchors`: the hashes of every shorter
        window (`ngram - _STRIDE + 1` characters) of all their texts, which a document is probed with."""
        self.sets = {name: np.unique(hashes) for name, hashes in sets.items()}
        self.ngram = ngram
        self.anchor = ngram - _STRIDE + 1
        self.anchors = np.unique(anchors) if anchors is not None else np.empty(0, dtype=np.uint64)
        bits = min(_MAX_FILTER_BITS, max(_MIN_FILTER_BITS, (32 * len(self.anchors) - 1).bit_length()))
        self._shift = np.uint64(64 - bits)
        taken = np.zeros(1 << bits, dtype=bool)
        taken[self.anchors >> self._shift] = True
        self._filter = np.packbits(taken, bitorder="little")

    @classmethod
    def from_paths(cls, paths: list[str], ngram: int, opencc_config: str) -> Decontaminator:
        """One evaluation set per path (a folder such as C-Eval's, or one file), named after it."""
        sets: dict[str, np.ndarray] = {}
        anchors = []
        for name in paths:
            path = Path(name)
            label = path.name if path.is_dir() else path.stem
            while label in sets:
                label += "'"
            texts = [visible_codes(_clean(text, opencc_config)) for file in _eval_files(path)
                     for text in question_texts(file)]
            codes = [points for points in texts if len(points) >= ngram]  # shorter texts cannot match
            if not codes:  # it would decontaminate nothing, silently
                raise UserError("the evaluation set holds no questions" if not texts else
                                f"none of its {len(texts):,} question and option texts has {ngram} characters, so "
                                "none can match", path=name, field="decontaminate",
                                fix="pass the folder of C-Eval's / CMMLU's CSV files (question rows with A-D options)"
                                if not texts else "lower --decontaminate_ngram, or pass a set with longer questions")
            sets[label] = np.concatenate([window_hashes(points, ngram) for points in codes] or [_NONE])
            anchors.append(np.concatenate([window_hashes(points, ngram - _STRIDE + 1) for points in codes] or [_NONE]))
        return cls(sets, ngram, np.concatenate(anchors))

    def matches(self, text: str, codes: np.ndarray | None = None) -> list[str]:
        """The evaluation sets sharing at least one n-gram with `text` (normalised already; `codes`, its
        `visible_codes`, where the caller has them already).

        A shared n-gram at position p holds the shorter anchor window that starts at the multiple of _STRIDE
        among p ... p + _STRIDE - 1, so probing those windows alone (a bit filter, then the sorted anchors)
        misses none; the few documents with a probe hit are then checked on every n-gram, exactly."""
        codes = visible_codes(text) if codes is None else codes
        probes = strided_ngram_hashes(codes, self.anchor, _STRIDE)
        slots = probes >> self._shift
        passed = np.flatnonzero((self._filter[slots >> np.uint64(3)] >> (slots & np.uint64(7)).astype(np.uint8)) & 1)
        if not len(passed):
            return []
        hits = passed[_found(probes[passed], self.anchors)] * _STRIDE  # where the anchors start
        if not len(hits) or len(codes) < self.ngram:
            return []
        hashes = window_hashes(codes, self.ngram)  # the n-grams holding a hit anchor start 0-3 characters before it
        starts = np.unique(np.clip(hits[:, None] - np.arange(_STRIDE), 0, len(hashes) - 1))
        return [name for name, known in self.sets.items() if _found(hashes[starts], known).any()]

    def describe(self) -> str:
        return ", ".join(f"{name} {len(hashes):,} {self.ngram}-grams" for name, hashes in self.sets.items())


def _found(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """For each of `values`, whether it is in the sorted array `known`."""
    if not len(known):
        return np.zeros(len(values), dtype=bool)
    return known[np.minimum(np.searchsorted(known, values), len(known) - 1)] == values


def _clean(text: str, opencc_config: str) -> str:
    return normalize_text(text if opencc_config == "none" else to_simplified(text, opencc_config))


def _eval_files(path: Path) -> list[Path]:
    """The question files of an evaluation set: a file as given, or a folder's csv / jsonl / parquet files and
    its .json files that hold an array (C-Eval's subject_mapping.json, an object, is not a question file)."""
    if not path.exists():
        raise UserError("no such file or directory", path=str(path), field="decontaminate",
                        fix="pass the folder of an evaluation set (C-Eval's or CMMLU's CSVs) or a file of questions")
    if not path.is_dir():
        return [path]
    try:
        found = discover_inputs([str(path)])
    except UserError:  # an empty folder: refused below, naming --decontaminate rather than --input
        found = []
    files = [file for file in found if file.suffix.lower() in _FORMATS
             and (file.suffix.lower() != ".json" or _starts_array(file))]
    if not files:
        raise UserError("the evaluation-set folder holds no .csv, .jsonl, .json or .parquet file",
                        path=str(path), field="decontaminate",
                        fix="pass the folder of C-Eval's / CMMLU's CSV files, or files of questions")
    return files


def _starts_array(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \r\n\t").startswith("[")


def question_texts(path: Path) -> Iterator[str]:
    """The question and option texts of every row of one file; a file whose rows have neither is refused."""
    for row, location in read_rows(path):
        texts = _row_texts(row, location)
        if texts is None:
            keys = ", ".join(map(str, row)) if isinstance(row, dict) else type(row).__name__
            raise location.error(f"no question column; the row has: {keys}", field="decontaminate",
                                 fix="give each row a 'question' column (and option columns A, B, C, D, or a "
                                     "'choices' list), as C-Eval and CMMLU do")
        yield from texts


def _row_texts(row: object, location: Location) -> list[str] | None:
    if not isinstance(row, dict):
        return None
    texts, found = [], False
    for key, value in row.items():
        name = str(key).strip().lower()
        if name in _QUESTION_FIELDS:
            found = True
        elif name not in _OPTION_FIELDS and name not in _OPTION_LISTS:
            continue
        values = value if isinstance(value, list) else [value]
        texts += [str(item) for item in values if isinstance(item, (str, int, float)) and str(item).strip()]
    return texts if found else None
