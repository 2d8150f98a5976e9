"""Near-duplicate detection with MinHash LSH over character n-gram shingles (signatures by rensa).

Shingles are overlapping character n-grams of the text with whitespace removed, so word order matters:
two documents made of the same characters in a different order share few n-grams and are both kept.
(ChatLM-mini-Chinese hashed each document's *set of characters*, which cannot tell those apart.)
Signatures are computed where the text is (worker processes); the index lives in one process.

The index is compact because it grows with every document kept (a full zhwiki dump keeps ~1.3 M): per
document, its signature's low 16 bits (2 bytes per permutation: 256 bytes at 128; a chance collision of
1/65,536 per permutation barely moves the Jaccard estimate) and one 12-byte entry (64-bit band hash, 32-bit
document number) per LSH band not already taken, in sorted NumPy arrays; recent entries wait in a small
dict and are merged in batches. About 450 bytes of arrays per kept document at the defaults (16 bands of 8
rows; ~730 bytes of RSS with the merge's transient copies), against ~2-3 KB in rensa's own deduplicator, which keeps full signatures and a bucket vector per band.
A band hash seen before keeps its first document only: a later document sharing that band with a second
kept one is still found through its other bands.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import rensa

from utils.data.text import visible_codes, window_hashes

_SIGNATURE_CHUNK = 65536  # signatures are stored in blocks of this many documents (no copy on growth)


def minhash_signatures(texts: Sequence[str], shingle_size: int, num_perm: int, seed: int,
                       codes: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
    """The MinHash signatures of the texts' shingle sets, one row of `num_perm` 32-bit values per text, in one
    call to rensa over the flat buffer of every text's shingle hashes. Shingles are the overlapping character
    n-grams without whitespace (the whole text if shorter), hashed by one vectorised rolling hash, no Python
    string per shingle; `codes`, each text's `visible_codes` where the caller has them already (None where not)."""
    codes = codes if codes is not None else [None] * len(texts)
    hashes = [window_hashes(visible_codes(text) if points is None else points, shingle_size, whole_if_shorter=True)
              for text, points in zip(texts, codes)]
    offsets = np.zeros(len(hashes) + 1, dtype=np.uint64)
    np.cumsum([len(h) for h in hashes], out=offsets[1:])
    flat = np.concatenate(hashes) if hashes else np.empty(0, dtype=np.uint64)
    matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, num_perm, seed)
    return np.asarray(matrix.to_rows(), dtype=np.uint32).reshape(len(texts), num_perm)


def minhash_signature(text: str, shingle_size: int, num_perm: int, seed: int) -> np.ndarray:
    """The MinHash signature (`num_perm` 32-bit values) of one text's shingles."""
    return minhash_signatures([text], shingle_size, num_perm, seed)[0]


def lsh_bands(threshold: float, num_perm: int) -> int:
    """Bands for a threshold (rensa's choice: more, shorter bands for lower thresholds), dividing num_perm."""
    bands = 4 if threshold >= 0.9 else 8 if threshold >= 0.8 else 16 if threshold >= 0.7 else 32 \
        if threshold >= 0.5 else max(1, num_perm // 2)
    return next(b for b in range(min(bands, num_perm), 0, -1) if num_perm % b == 0)


class NearDuplicateIndex:
    """Streaming index: `add` keeps the first of each group of documents above the Jaccard threshold."""

    def __init__(self, threshold: float = 0.7, num_perm: int = 128, seed: int = 42):
        self.threshold, self.num_perm = threshold, num_perm
        self.bands = lsh_bands(threshold, num_perm)
        rng = np.random.default_rng(seed)
        self._multipliers = rng.integers(1, 1 << 63, size=num_perm // self.bands, dtype=np.uint64) | np.uint64(1)
        self._salts = rng.integers(0, 1 << 63, size=self.bands, dtype=np.uint64)
        self._keys = np.empty(0, dtype=np.uint64)  # sorted band hashes
        self._owners = np.empty(0, dtype=np.uint32)  # the document each band hash points to
        self._recent: dict[int, int] = {}  # band hash -> document, not yet merged into the arrays
        self._signatures: list[np.ndarray] = []
        self._count = 0

    def add(self, signature: np.ndarray) -> bool:
        """Index `signature`; False (and not indexed) when it near-duplicates a kept document."""
        return self.add_batch(signature[None, :])[0]

    def add_batch(self, signatures: np.ndarray) -> list[bool]:
        """`add` for each row of `signatures` in order (band hashes and array look-ups vectorised over the
        batch; a row may be a near-duplicate of an earlier row of the same batch)."""
        count = len(signatures)
        rows = signatures.reshape(count, self.bands, -1).astype(np.uint64)
        keys = (rows * self._multipliers).sum(axis=2, dtype=np.uint64) ^ self._salts  # modulo 2^64
        compact = (signatures & 0xFFFF).astype(np.uint16)
        known = np.zeros(keys.shape, dtype=bool)
        owners = np.zeros(keys.shape, dtype=np.int64)
        if len(self._keys):
            where = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
            known = self._keys[where] == keys
            owners = np.where(known, self._owners[where], -1)
        kept = []
        for doc_keys, doc_known, doc_owners, doc_compact in zip(keys.tolist(), known, owners, compact):
            candidates = {owner for owner in map(self._recent.get, doc_keys) if owner is not None}
            candidates.update(doc_owners[doc_known].tolist())
            if any(np.count_nonzero(self._signature(owner) == doc_compact) >= self.threshold * self.num_perm
                   for owner in candidates):
                kept.append(False)
                continue
            document = self._count
            if document % _SIGNATURE_CHUNK == 0:
                self._signatures.append(np.empty((_SIGNATURE_CHUNK, self.num_perm), dtype=np.uint16))
            self._signatures[-1][document % _SIGNATURE_CHUNK] = doc_compact
            self._count += 1
            for key, seen in zip(doc_keys, doc_known.tolist()):
                if not seen:
                    self._recent.setdefault(key, document)
            kept.append(True)
        if len(self._recent) >= max(1 << 17, len(self._keys) // 32):
            self._merge()
        return kept

    def _signature(self, document: int) -> np.ndarray:
        return self._signatures[document // _SIGNATURE_CHUNK][document % _SIGNATURE_CHUNK]

    def _merge(self) -> None:
        keys = np.fromiter(self._recent.keys(), dtype=np.uint64, count=len(self._recent))
        owners = np.fromiter(self._recent.values(), dtype=np.uint32, count=len(self._recent))
        order = np.argsort(keys)
        where = np.searchsorted(self._keys, keys[order])
        self._keys = np.insert(self._keys, where, keys[order])
        self._owners = np.insert(self._owners, where, owners[order])
        self._recent.clear()

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Memory held by the index's arrays (the recent-entries dict not counted: at most ~1/32 of them)."""
        return (self._keys.nbytes + self._owners.nbytes + sum(s.nbytes for s in self._signatures)
                + 100 * len(self._recent))
