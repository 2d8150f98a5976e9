"""Near-duplicate detection with MinHash LSH (rensa) over character n-gram shingles.

Shingles are overlapping character n-grams of the text with whitespace removed, so word order matters:
two documents made of the same characters in a different order share few n-grams and are both kept.
(ChatLM-mini-Chinese hashed each document's *set of characters*, which cannot tell those apart.)
Signatures are computed where the text is (worker processes); the index lives in one process.
"""

from __future__ import annotations

import re

import rensa

_WHITESPACE = re.compile(r"\s+")


def shingles(text: str, size: int) -> list[str]:
    """Overlapping character n-grams of `text` without whitespace (the whole text if shorter)."""
    compact = _WHITESPACE.sub("", text)
    if len(compact) <= size:
        return [compact]
    return [compact[i:i + size] for i in range(len(compact) - size + 1)]


def minhash_signature(text: str, shingle_size: int, num_perm: int, seed: int) -> rensa.RMinHash:
    signature = rensa.RMinHash(num_perm=num_perm, seed=seed)
    signature.update(shingles(text, shingle_size))
    return signature


class NearDuplicateIndex:
    """Streaming index: `add` keeps the first of each group of documents above the Jaccard threshold."""

    def __init__(self, threshold: float = 0.7, num_perm: int = 128, seed: int = 42):
        self._index = rensa.RMinHashDeduplicator(threshold=threshold, num_perm=num_perm, use_lsh=True,
                                                 seed=seed)

    def add(self, key: str, signature: rensa.RMinHash) -> bool:
        """Index `signature` under `key`; False (and not indexed) when it near-duplicates a kept one."""
        return self._index.add(key, signature)

    def __len__(self) -> int:
        return self._index.len()
