"""Pretraining data: tokenise once, pack into fixed-length blocks, build the T5 / Llama objectives.

- The corpus is tokenised with `datasets.map(num_proc=...)` and written once as one token stream
  (`uint16` when the vocabulary fits, else `uint32`) with EOS between documents, memory-mapped like
  Baby-Llama2-Chinese's `.bin`. A restart reuses it when the files and tokenizer are unchanged.
- Llama: consecutive blocks of `block_size` tokens from that stream; no padding anywhere.
- T5 span corruption (the real T5 objective): blocks of raw tokens are noised with spans replaced by
  sentinels, sized so the encoder input is exactly `max_source_length`. The noise of block i depends
  only on (seed, i), so an interrupted run resumes with identical examples.
- T5 text-to-text pairs: `prompt` / `response` columns (ChatLM-mini-Chinese's pretraining format).
- Objectives can be mixed by weight with a deterministic per-index choice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from utils.data.sources import split_files
from utils.errors import UserError
from utils.io import write_json_atomic

logger = logging.getLogger(__name__)

_LOADERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
_MAP_BATCH = 128  # documents per tokenisation batch


def load_text_files(paths: Sequence[str], split: str, columns: Sequence[str], field: str = "train_files"):
    """A `datasets.Dataset` of the given files (corpus directories resolve to their `{split}` shards); errors
    name `field`, the flag that gave them."""
    import datasets

    files = split_files(list(paths), split, field)
    kinds = {_LOADERS.get(p.suffix.lower()) for p in files}
    if None in kinds or len(kinds) != 1:
        raise UserError("the files must all be .parquet, all .jsonl/.json, or all .txt",
                        path=", ".join(map(str, files)), field=field,
                        fix="convert them to one format (prepare_data.py writes parquet)")
    data = datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise UserError(f"missing column(s) {', '.join(missing)}; the files have: {', '.join(data.column_names)}",
                        path=str(files[0]), field=missing[0],
                        fix="pass files with these columns (prepare_data.py writes 'text')")
    return data, files


def _fingerprint(files: Sequence[Path], tokenizer, extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    return digest.hexdigest()[:16]


class TokenStream:
    """All documents' tokens, EOS after each, in one memory-mapped file."""

    def __init__(self, path: Path):
        meta = json.loads(path.with_suffix(".json").read_text())
        self.path, self.meta = path, meta
        self.tokens = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def chars_per_token(self) -> float:
        return self.meta["chars"] / max(self.meta["tokens"], 1)

    @classmethod
    def build(cls, paths: Sequence[str], split: str, tokenizer, cache_dir: Path, num_proc: int) -> TokenStream:
        """Tokenise `paths` into `cache_dir/{split}-<fingerprint>.bin`, or reuse that file if present."""
        data, files = load_text_files(paths, split, ["text"])
        key = _fingerprint(files, tokenizer, split)
        path = cache_dir / f"{split}-tokens-{key}.bin"
        if path.exists() and path.with_suffix(".json").exists():
            logger.info("reusing tokenised %s data %s", split, path)
            return cls(path)
        eos = tokenizer.eos_token_id
        dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
        backend = tokenizer.backend_tokenizer

        def tokenize(batch):  # each document's ids as a small NumPy array, not a list of Python ints
            encodings = backend.encode_batch(batch["text"], add_special_tokens=False)
            return {"ids": [np.append(np.asarray(e.ids, dtype=dtype), dtype(eos)) for e in encodings],
                    "chars": [len(t) for t in batch["text"]]}

        # Small batches: a zhwiki article is thousands of tokens, and a batch's ids are held in memory twice
        # (the encodings and the Arrow rows) before they are written to the map's cache file.
        tokenized = data.map(tokenize, batched=True, batch_size=_MAP_BATCH, writer_batch_size=_MAP_BATCH,
                             num_proc=num_proc if num_proc > 1 else None, remove_columns=data.column_names,
                             desc=f"tokenize {split}")
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tokens = chars = 0
        with open(tmp, "wb") as handle:
            for batch in tokenized.with_format("arrow").iter(batch_size=_MAP_BATCH):
                flat = pc.list_flatten(batch.column("ids")).to_numpy().astype(dtype, copy=False)
                handle.write(flat.tobytes())
                tokens += len(flat)
                chars += int(pc.sum(batch.column("chars")).as_py() or 0)
        os.replace(tmp, path)
        write_json_atomic(path.with_suffix(".json"), {"dtype": np.dtype(dtype).name, "tokens": tokens,
                                                      "chars": chars, "documents": len(tokenized),
                                                      "files": [str(f) for f in files]})
        logger.info("tokenised %s: %s documents, %s tokens (%.2f characters per token) -> %s", split,
                    f"{len(tokenized):,}", f"{tokens:,}", chars / max(tokens, 1), path)
        return cls(path)


def checked_index(index: int, length: int) -> int:
    """Python's sequence contract for a map-style dataset: negative indices count from the end, and an index
    past the end raises IndexError (code that iterates a dataset, HF's length measuring among it, stops on it)."""
    index = int(index)
    if not -length <= index < length:
        raise IndexError(f"index {index} out of range for {length} examples")
    return index % length


class FixedLengthExamples(Dataset):
    """Examples that all have one length (`example_length`, `num_blocks` of them): `lengths` is known without
    loading any, so length grouping can mix them with pairs cheaply."""

    num_blocks: int
    example_length: int

    def __len__(self) -> int:
        return self.num_blocks

    @property
    def lengths(self) -> np.ndarray:
        return np.full(self.num_blocks, self.example_length, dtype=np.int64)


class PackedBlocks(FixedLengthExamples):
    """Causal LM examples: block i is tokens [i*L, (i+1)*L) of the stream; labels = inputs."""

    def __init__(self, stream: TokenStream, block_size: int):
        self.stream, self.block_size, self.example_length = stream, block_size, block_size
        self.num_blocks = len(stream) // block_size
        if self.num_blocks == 0:
            raise UserError(f"the data holds {len(stream)} tokens, less than one block of {block_size}",
                            path=str(stream.path), field="block_size", fix="pass more text or a smaller --block_size")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = checked_index(index, self.num_blocks) * self.block_size
        ids = torch.from_numpy(self.stream.tokens[start:start + self.block_size].astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}


def span_corruption_lengths(inputs_length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """Raw tokens per example and target length such that the noised input is `inputs_length` long
    (T5's `compute_input_and_target_lengths`, EOS included)."""

    def lengths(tokens: int) -> tuple[int, int]:
        noise = int(round(tokens * noise_density))
        spans = int(round(noise / mean_span))
        return tokens - noise + spans + 1, noise + spans + 1

    tokens = inputs_length
    while lengths(tokens + 1)[0] <= inputs_length:
        tokens += 1
    return tokens, lengths(tokens)[1]


def random_spans_noise_mask(length: int, noise_density: float, mean_span: float,
                            rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of noise positions: about `noise_density * length` tokens in spans averaging
    `mean_span`, alternating with non-noise spans, starting with non-noise (T5's algorithm)."""
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span)), 1)

    def segment(items: int) -> np.ndarray:
        first = np.arange(items - 1) < (num_spans - 1)
        rng.shuffle(first)
        segment_id = np.cumsum(np.concatenate([[0], first]))
        return np.bincount(segment_id, minlength=num_spans)

    lengths = np.stack([segment(length - num_noise), segment(num_noise)], axis=1).reshape(-1)
    starts = np.zeros(length, dtype=np.int64)
    starts[np.cumsum(lengths)[:-1]] = 1
    return np.cumsum(starts) % 2 == 1


def corrupt_spans(tokens: np.ndarray, mask: np.ndarray, sentinels: Sequence[int], eos: int) -> tuple[list, list]:
    """Inputs keep non-noise tokens with one sentinel per noise span; targets list each span after its
    sentinel. Both end with EOS."""
    inputs, targets, span = [], [], -1
    previous = False
    for token, noise in zip(tokens.tolist(), mask.tolist()):
        if noise:
            if not previous:
                span += 1
                inputs.append(sentinels[span])
                targets.append(sentinels[span])
            targets.append(token)
        else:
            inputs.append(token)
        previous = noise
    return inputs + [eos], targets + [eos]


class SpanCorruptionBlocks(FixedLengthExamples):
    """T5 span corruption over consecutive raw blocks of the token stream."""

    def __init__(self, stream: TokenStream, tokenizer, max_source_length: int, noise_density: float,
                 mean_span: float, seed: int):
        self.stream, self.seed, self.max_source_length = stream, seed, max_source_length
        self.example_length = max_source_length  # encoder inputs are exactly this long
        self.noise_density, self.mean_span = noise_density, mean_span
        self.raw_length, self.target_length = span_corruption_lengths(max_source_length, noise_density, mean_span)
        self.num_blocks = len(stream) // self.raw_length
        needed = int(round(int(round(self.raw_length * noise_density)) / mean_span))
        self.sentinels = [tokenizer.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(needed + 1)]
        if tokenizer.unk_token_id in self.sentinels or None in self.sentinels:
            raise UserError(f"the tokenizer lacks the {needed + 1} sentinel tokens <extra_id_N> span "
                            "corruption needs", field="tokenizer_name_or_path",
                            fix="train the tokenizer with --num_sentinels 100 (the default)")
        self.eos = tokenizer.eos_token_id
        if self.num_blocks == 0:
            raise UserError(f"the data holds {len(stream)} tokens, less than one example of {self.raw_length}",
                            path=str(stream.path), field="max_source_length",
                            fix="pass more text or a smaller --max_source_length")

    @staticmethod
    def target_len(data) -> int:
        """Target length for the data arguments' span corruption settings."""
        return span_corruption_lengths(data.max_source_length, data.noise_density, data.mean_noise_span_length)[1]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = checked_index(index, self.num_blocks)
        start = index * self.raw_length
        tokens = self.stream.tokens[start:start + self.raw_length].astype(np.int64)
        rng = np.random.default_rng([self.seed, index])
        mask = random_spans_noise_mask(self.raw_length, self.noise_density, self.mean_span, rng)
        inputs, targets = corrupt_spans(tokens, mask, self.sentinels, self.eos)
        return {"input_ids": inputs, "labels": targets}  # lists: DataCollatorForSeq2Seq pads them


class TextToTextPairs(Dataset):
    """`prompt` -> `response` examples, truncated to the configured lengths, EOS appended."""

    def __init__(self, paths: Sequence[str], split: str, tokenizer, max_source_length: int,
                 max_target_length: int, num_proc: int):
        data, _ = load_text_files(paths, split, ["prompt", "response"])
        eos = tokenizer.eos_token_id

        backend = tokenizer.backend_tokenizer

        def tokenize(batch):
            prompts = [e.ids for e in backend.encode_batch(batch["prompt"], add_special_tokens=False)]
            responses = [e.ids for e in backend.encode_batch(batch["response"], add_special_tokens=False)]
            inputs = [p[:max_source_length - 1] + [eos] for p in prompts]
            labels = [r[:max_target_length - 1] + [eos] for r in responses]
            return {"input_ids": inputs, "labels": labels, "chars": [len(r) for r in batch["response"]],
                    "length": [max(len(i), len(t)) for i, t in zip(inputs, labels)]}

        self.data = data.map(tokenize, batched=True, num_proc=num_proc if num_proc > 1 else None,
                             remove_columns=data.column_names, desc=f"tokenize {split} pairs")
        tokens = sum(len(x) - 1 for x in self.data["labels"])
        self.chars_per_token = sum(self.data["chars"]) / max(tokens, 1)
        # the longer side of each pair, for batches of similar lengths (`--train_sampling_strategy group_by_length`)
        self.lengths = np.asarray(self.data["length"], dtype=np.int64)
        self.data = self.data.select_columns(["input_ids", "labels"])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.data[int(index)]


class WeightedMix(Dataset):
    """A deterministic mixture: example i comes from source s with probability weight[s].

    The length is chosen so the most over-represented source is used about once per epoch.
    """

    def __init__(self, sources: Sequence[Dataset], weights: Sequence[float], seed: int):
        total = float(sum(weights))
        self.sources, self.weights = list(sources), [w / total for w in weights]
        self.length = int(min(len(s) / w for s, w in zip(self.sources, self.weights) if w > 0))
        rng = np.random.default_rng(seed)
        self.choice = rng.choice(len(self.sources), size=self.length, p=self.weights)
        self.offsets = np.zeros(self.length, dtype=np.int64)
        counters = [0] * len(self.sources)
        for i, source in enumerate(self.choice):
            self.offsets[i] = counters[source] % len(self.sources[source])
            counters[source] += 1

    def __len__(self) -> int:
        return self.length

    @property
    def lengths(self) -> np.ndarray | None:
        """Example lengths when every source knows its own (see `TextToTextPairs.lengths`)."""
        if not all(hasattr(s, "lengths") for s in self.sources):
            return None
        out = np.empty(self.length, dtype=np.int64)
        for source_id, source in enumerate(self.sources):
            chosen = self.choice == source_id
            out[chosen] = source.lengths[self.offsets[chosen]]
        return out

    def __getitem__(self, index: int):
        index = checked_index(index, self.length)
        return self.sources[self.choice[index]][int(self.offsets[index])]
