"""The corpus pipeline: inputs -> wikiextractor -> OpenCC t2s -> normalise -> filter -> MinHash dedup ->
shuffled parquet shards with `text` (and `title`, `id`, `source` where known).

Workers (one per core) extract, convert, normalise, filter and sign documents; the main process reads
the inputs, keeps the near-duplicate index and writes. At most `2 x num_proc` batches are in flight,
so memory stays bounded however large the input is. Results are consumed in input order, so a run is
deterministic for a given seed whatever the number of workers.
"""

from __future__ import annotations

import collections
import logging
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from utils.data.decontaminate import Decontaminator
from utils.data.dedup import NearDuplicateIndex, minhash_signatures
from utils.data.sources import (
    TxtSplit,
    Document,
    discover_inputs,
    file_format,
    read_records,
    text_columns,
)
from utils.data.text import QualityFilter, normalize_text, to_simplified, visible_codes
from utils.data.wiki import WikiPage, extract_text
from utils.errors import UserError
from utils.io import write_json_atomic

logger = logging.getLogger(__name__)

STEPS = ("read", "extract", "t2s", "normalize", "filter", "decontam", "minhash", "dedup", "write")
STAGING_CHARS = 4_000_000  # kept text buffered before it is staged (the documents can be books)
_BUCKET_BYTES = 16_000_000  # text per shuffle bucket: write_shards holds about 5x this in memory at once
_WORKERS_PER_BZ2_THREAD = 2
_MAX_BUCKETS = 512  # open bucket files at once (under the usual 1,024 file limit); past 8 GB buckets grow
SCHEMA = pa.schema([("text", pa.string()), ("title", pa.string()), ("id", pa.string()),
                    ("source", pa.string())])


@dataclass
class InputArguments:
    input: list[str] = field(default_factory=list, metadata={
        "help": "Input files or directories: zhwiki pages-articles dumps (.xml/.xml.bz2), wikiextractor "
                "output (<doc> or --json), .jsonl/.json/.parquet with a text column, or .txt. "
                "Several inputs are merged into one corpus."})
    text_column: list[str] = field(default_factory=lambda: ["text"], metadata={
        "help": "Column holding the text in .jsonl/.json/.parquet: a string, or a list of strings (joined by "
                "newlines). Several columns (`--text_column title paragraphs`, or `title,paragraphs`) are "
                "joined by newlines; `a.b` is the field b inside an object column a."})
    txt_split: TxtSplit = field(default="blank_line", metadata={
        "help": "How .txt files are cut into documents: 'blank_line' (blocks separated by an empty line) or "
                "'line' (one document per line)."})
    max_docs: int = field(default=-1, metadata={
        "help": "Stop after this many input documents (for quick trials); -1 = all."})

    def __post_init__(self):
        self.text_column = list(text_columns(self.text_column))


@dataclass
class CleaningArguments:
    opencc_config: str = field(default="t2s", metadata={
        "help": "OpenCC profile for traditional->simplified conversion (t2s, tw2sp, hk2s ...); 'none' = keep."})
    min_chars: int = field(default=50, metadata={"help": "Drop documents shorter than this (characters)."})
    max_chars: int = field(default=0, metadata={"help": "Drop documents longer than this (characters); 0 = no limit."})
    min_cjk_ratio: float = field(default=0.3, metadata={
        "help": "Drop documents whose share of Chinese characters among non-space characters is below this "
                "(0-1); 0 = keep all."})
    decontaminate: list[str] = field(default_factory=list, metadata={
        "help": "Evaluation sets to keep out of the corpus: folders of C-Eval / CMMLU CSVs, or csv / jsonl / json / "
                "parquet files with a 'question' column (and options A-D or a 'choices' list). A document sharing "
                "a --decontaminate_ngram-character n-gram with a question or option is dropped; empty = off."})
    decontaminate_ngram: int = field(default=13, metadata={
        "help": "Characters of the n-grams --decontaminate compares (after normalisation, whitespace removed)."})

    def __post_init__(self):
        if not 0 <= self.min_cjk_ratio <= 1:
            raise ValueError(f"--min_cjk_ratio must be between 0 and 1, not {self.min_cjk_ratio}")
        if self.max_chars and self.max_chars < self.min_chars:
            raise ValueError(f"--max_chars ({self.max_chars}) is below --min_chars ({self.min_chars})")
        if self.decontaminate_ngram < 8:
            raise ValueError(f"--decontaminate_ngram must be at least 8 characters (shorter n-grams match common "
                             f"phrases), not {self.decontaminate_ngram}")


@dataclass
class DedupArguments:
    dedup: bool = field(default=True, metadata={"help": "Remove near-duplicate documents with MinHash LSH."})
    dedup_threshold: float = field(default=0.7, metadata={
        "help": "Estimated Jaccard similarity of shingle sets above which a document is a duplicate (0-1)."})
    shingle_size: int = field(default=3, metadata={"help": "Characters per shingle (n-gram) for MinHash."})
    num_perm: int = field(default=128, metadata={"help": "MinHash permutations (signature length)."})

    def __post_init__(self):
        if not 0 < self.dedup_threshold < 1:
            raise ValueError(f"--dedup_threshold must be between 0 and 1, not {self.dedup_threshold}")
        if self.shingle_size < 1 or self.num_perm < 16:
            raise ValueError("--shingle_size must be >= 1 and --num_perm >= 16")


@dataclass
class OutputArguments:
    output_dir: str = field(default="data/corpus", metadata={"help": "Where the parquet shards and stats go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing output directory."})
    shard_size_mb: float = field(default=256.0, metadata={"help": "Target size of one shard (MB of UTF-8 text)."})
    validation_ratio: float = field(default=0.005, metadata={
        "help": "Share of documents held out as validation-*.parquet (at least one when > 0); 0 = none."})
    seed: int = field(default=42, metadata={"help": "Seed for the shuffle, the split and MinHash."})
    num_proc: int = field(default=max(1, os.cpu_count() or 1), metadata={
        "help": "Worker processes; 1 = everything in this process."})
    batch_size: int = field(default=64, metadata={"help": "Documents per work unit sent to a worker."})

    def __post_init__(self):
        if not 0 <= self.validation_ratio < 1:
            raise ValueError(f"--validation_ratio must be in [0, 1), not {self.validation_ratio}")
        if self.shard_size_mb <= 0 or self.num_proc < 1 or self.batch_size < 1:
            raise ValueError("--shard_size_mb, --num_proc and --batch_size must be positive")


class StepStats:
    """Documents and characters in/out and seconds spent, per pipeline step."""

    FIELDS = ("docs_in", "chars_in", "docs_out", "chars_out", "seconds")

    def __init__(self):
        self.table = {step: dict.fromkeys(self.FIELDS, 0) for step in STEPS}
        self.dropped: collections.Counter[str] = collections.Counter()
        self.contaminated: collections.Counter[str] = collections.Counter()  # documents per evaluation set

    def record(self, step: str, chars_in: int, chars_out: int | None, seconds: float) -> None:
        row = self.table[step]
        row["docs_in"] += 1
        row["chars_in"] += chars_in
        if chars_out is not None:
            row["docs_out"] += 1
            row["chars_out"] += chars_out
        row["seconds"] += seconds

    def add_totals(self, step: str, docs_in: int, chars_in: int, docs_out: int, chars_out: int,
                   seconds: float) -> None:
        """`record` for many documents at once (a step that counted them in bulk)."""
        row = self.table[step]
        for key, value in zip(self.FIELDS, (docs_in, chars_in, docs_out, chars_out, seconds)):
            row[key] += value

    def merge(self, other: StepStats) -> None:
        for step, row in other.table.items():
            for key, value in row.items():
                self.table[step][key] += value
        self.dropped.update(other.dropped)
        self.contaminated.update(other.contaminated)

    def as_dict(self) -> dict:
        steps = {step: {k: (round(v, 3) if k == "seconds" else v) for k, v in row.items()}
                 for step, row in self.table.items()}
        return {"steps": steps, "dropped": dict(self.dropped), "decontaminated": dict(self.contaminated)}

    @classmethod
    def from_dict(cls, data: dict) -> StepStats:
        """The statistics `as_dict` saved (a datatrove task's, merged by the last step)."""
        stats = cls()
        for step, row in data["steps"].items():
            stats.table[step].update(row)
        stats.dropped.update(data["dropped"])
        stats.contaminated.update(data["decontaminated"])
        return stats

    def format_table(self) -> str:
        header = f"{'step':<10}{'docs in':>12}{'docs out':>12}{'chars in':>16}{'chars out':>16}{'seconds':>10}"
        lines = [header, "-" * len(header)]
        for step, row in self.table.items():
            lines.append(f"{step:<10}{row['docs_in']:>12,}{row['docs_out']:>12,}{row['chars_in']:>16,}"
                         f"{row['chars_out']:>16,}{row['seconds']:>10.1f}")
        if self.dropped:
            lines.append("dropped: " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.dropped.items())))
        if self.contaminated:
            lines.append("decontaminated (documents sharing an n-gram with each evaluation set): "
                         + ", ".join(f"{k} {v:,}" for k, v in sorted(self.contaminated.items())))
        return "\n".join(lines)


@dataclass(frozen=True)
class CorpusSettings:
    """What cleaning and signing a document needs, sent once to every worker (a process, or a datatrove task)."""

    opencc_config: str
    quality: QualityFilter
    decontaminator: Decontaminator | None
    dedup: bool
    shingle_size: int
    num_perm: int
    seed: int


def corpus_settings(cleaning: CleaningArguments, dedup: DedupArguments, seed: int) -> CorpusSettings:
    """The settings of one run; reads the evaluation sets of `--decontaminate` (refused here when unusable)."""
    decontaminator = None
    if cleaning.decontaminate:
        decontaminator = Decontaminator.from_paths(cleaning.decontaminate, cleaning.decontaminate_ngram,
                                                   cleaning.opencc_config)
        logger.info("decontamination against %s", decontaminator.describe())
    return CorpusSettings(cleaning.opencc_config,
                          QualityFilter(cleaning.min_chars, cleaning.max_chars, cleaning.min_cjk_ratio),
                          decontaminator, dedup.dedup, dedup.shingle_size, dedup.num_perm, seed)


_settings: CorpusSettings | None = None


def _init_worker(settings: CorpusSettings) -> None:
    global _settings
    _settings = settings


def _timed(stats: StepStats, step: str, func, text: str) -> str:
    start = time.perf_counter()
    out = func(text)
    stats.record(step, len(text), len(out) if out else None, time.perf_counter() - start)
    return out


def clean_document(record: WikiPage | Document, settings: CorpusSettings,
                   stats: StepStats) -> tuple[str, np.ndarray | None] | None:
    """Run one record through extract -> t2s -> normalise -> filter -> decontaminate; None when it is dropped,
    else the text and, when decontamination computed them, its code points (MinHash reuses them)."""
    if isinstance(record, WikiPage):
        start = time.perf_counter()
        text = extract_text(record)
        stats.record("extract", sum(map(len, record.lines)), len(text) if text.strip() else None,
                     time.perf_counter() - start)
        if not text.strip():
            stats.dropped["empty_after_extract"] += 1
            return None
    else:
        text = record.text
    if settings.opencc_config != "none":
        text = _timed(stats, "t2s", lambda t: to_simplified(t, settings.opencc_config), text)
    text = _timed(stats, "normalize", normalize_text, text)
    start = time.perf_counter()
    reason = settings.quality.check(text)
    stats.record("filter", len(text), None if reason else len(text), time.perf_counter() - start)
    if reason:
        stats.dropped[reason] += 1
        return None
    codes = None
    if settings.decontaminator is not None:
        start = time.perf_counter()
        codes = visible_codes(text)
        hits = settings.decontaminator.matches(text, codes)
        stats.record("decontam", len(text), None if hits else len(text), time.perf_counter() - start)
        if hits:
            stats.dropped["contaminated"] += 1
            stats.contaminated.update(hits)
            return None
    return text, codes


def process_batch(batch: list[tuple[WikiPage | Document, str]],
                  settings: CorpusSettings) -> tuple[list[tuple], StepStats]:
    """Clean and sign a batch of (record, source name): the kept documents as (position in the batch, text,
    title, id, source, MinHash signature or None), and the batch's statistics."""
    stats, kept = StepStats(), []
    for position, (record, source) in enumerate(batch):
        cleaned = clean_document(record, settings, stats)
        if cleaned is None:
            continue
        title = record.title
        if title and settings.opencc_config != "none":
            title = to_simplified(title, settings.opencc_config)
        kept.append((position, cleaned[0], title, record.id, source, cleaned[1]))
    if settings.dedup and kept:
        start = time.perf_counter()
        signatures = minhash_signatures([item[1] for item in kept], settings.shingle_size, settings.num_perm,
                                        settings.seed, [item[5] for item in kept])
        seconds = (time.perf_counter() - start) / len(kept)
        for item in kept:
            stats.record("minhash", len(item[1]), len(item[1]), seconds)
        return [(*item[:5], signature) for item, signature in zip(kept, signatures)], stats
    return [(*item[:5], None) for item in kept], stats


def _process_batch(batch: list[tuple[WikiPage | Document, str]]) -> tuple[list[tuple], StepStats]:
    return process_batch(batch, _settings)


def _batches(files: list[Path], inputs: InputArguments, stats: StepStats, progress: tqdm,
             num_proc: int) -> Iterator[list[tuple[WikiPage | Document, str]]]:
    batch, count, done_bytes = [], 0, 0
    size = 64
    # The main process reads for every worker: per GB of XML ~50 s of bz2 on one thread (bench_corpus.py) and
    # ~15 s of XML lines, staging and dedup, while a worker cleans ~4-5 MB/s. One bz2 thread per 2 workers
    # keeps the reader ahead up to ~8-12 processes (an estimate from those rates: measured only up to 2).
    threads = max(1, num_proc // _WORKERS_PER_BZ2_THREAD)
    for path in files:
        start = time.perf_counter()
        logger.info("reading %s (%s)", path, file_format(path))
        for record, location in read_records(path, inputs.text_column, inputs.txt_split, threads):
            chars = sum(map(len, record.lines)) if isinstance(record, WikiPage) else len(record.text)
            stats.record("read", chars, chars, 0.0)
            batch.append((record, path.name))
            count += 1
            if len(batch) >= size or count == inputs.max_docs:
                stats.table["read"]["seconds"] += time.perf_counter() - start
                progress.n = done_bytes + location.consumed
                progress.refresh()
                yield batch
                batch, start = [], time.perf_counter()
            if count == inputs.max_docs:
                return
        stats.table["read"]["seconds"] += time.perf_counter() - start
        done_bytes += path.stat().st_size
    if batch:
        yield batch


def _run_workers(files, inputs, outputs, settings, stats) -> Iterator[list[tuple]]:
    """Yield the kept documents of each batch in input order, processed by `num_proc` workers with bounded
    in-flight work."""
    total = sum(p.stat().st_size for p in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="prepare", dynamic_ncols=True) as progress:
        batches = _batches(files, inputs, stats, progress, outputs.num_proc)
        if outputs.num_proc == 1:
            _init_worker(settings)
            for batch in batches:
                kept, batch_stats = _process_batch(batch)
                stats.merge(batch_stats)
                yield kept
            return
        context = multiprocessing.get_context("fork")
        with context.Pool(outputs.num_proc, initializer=_init_worker, initargs=(settings,)) as pool:
            pending: collections.deque = collections.deque()
            for batch in batches:
                pending.append(pool.apply_async(_process_batch, (batch,)))
                while len(pending) >= 2 * outputs.num_proc:
                    yield from _collect(pending.popleft(), stats)
            while pending:
                yield from _collect(pending.popleft(), stats)


def _collect(result, stats: StepStats) -> Iterator[list[tuple]]:
    kept, batch_stats = result.get()
    stats.merge(batch_stats)
    yield kept


def prepare_corpus(inputs: InputArguments, cleaning: CleaningArguments, dedup: DedupArguments,
                   outputs: OutputArguments, workdir: Path) -> dict:
    """Run the pipeline, writing shards, `stats.json` into `workdir` (the caller renames it into place)."""
    files = discover_inputs(inputs.input)
    settings = corpus_settings(cleaning, dedup, outputs.seed)
    stats = StepStats()
    index = NearDuplicateIndex(dedup.dedup_threshold, dedup.num_perm, outputs.seed) if dedup.dedup else None
    staging = workdir / "_staging.parquet"
    rows: dict[str, list] = {name: [] for name in SCHEMA.names}
    kept_docs = buffered = 0
    with pq.ParquetWriter(staging, SCHEMA) as writer:
        for batch in _run_workers(files, inputs, outputs, settings, stats):
            if index is not None and batch:
                start = time.perf_counter()
                unique = index.add_batch(np.stack([item[5] for item in batch]))
                seconds = (time.perf_counter() - start) / len(batch)
                for (_, text, *_), keep in zip(batch, unique):
                    stats.record("dedup", len(text), len(text) if keep else None, seconds)
                if False in unique:
                    stats.dropped["near_duplicate"] += unique.count(False)
                batch = [item for item, keep in zip(batch, unique) if keep]
            for _, text, title, doc_id, source, _ in batch:
                for name, value in zip(SCHEMA.names, (text, title, doc_id, source)):
                    rows[name].append(value)
                kept_docs += 1
                buffered += len(text)
                if len(rows["text"]) >= 4096 or buffered >= STAGING_CHARS:  # bounded in documents and text
                    writer.write_table(pa.table(rows, schema=SCHEMA))
                    rows, buffered = {name: [] for name in SCHEMA.names}, 0
        if rows["text"]:
            writer.write_table(pa.table(rows, schema=SCHEMA))
    if kept_docs == 0:
        raise nothing_left(inputs)
    start = time.perf_counter()
    shards = write_shards(staging, workdir, outputs)
    staging.unlink()
    return write_report(workdir, stats, files, shards, time.perf_counter() - start)


def nothing_left(inputs: InputArguments) -> UserError:
    return UserError("no document is left after cleaning and filtering", path=", ".join(map(str, inputs.input)),
                     field="input", fix="check that the input holds Chinese text; lower --min_chars / "
                                        "--min_cjk_ratio or check --text_column")


def write_report(workdir: Path, stats: StepStats, files: list[Path], shards: list[dict], write_seconds: float) -> dict:
    """Record the write step, write `stats.json` into `workdir` and log the statistics table; the report."""
    documents, characters = sum(s["documents"] for s in shards), sum(s["chars"] for s in shards)
    stats.add_totals("write", documents, characters, documents, characters, write_seconds)
    report = {**stats.as_dict(), "inputs": [str(p) for p in files],
              "shards": sorted(shards, key=lambda shard: (shard["split"] != "validation", shard["file"])),
              "documents": documents, "characters": characters}
    write_json_atomic(workdir / "stats.json", report)
    logger.info("corpus statistics\n%s", stats.format_table())
    return report


def shuffled_places(num_docs: int, outputs: OutputArguments) -> tuple[np.ndarray, int]:
    """Every kept document's place in the shuffled order (by its position in input order; 4 bytes each), and the
    number of validation documents: the first `validation_ratio` of the places (at least one when > 0)."""
    num_val = 0
    if outputs.validation_ratio > 0 and num_docs > 1:
        num_val = max(1, round(num_docs * outputs.validation_ratio))
    return np.random.default_rng(outputs.seed).permutation(num_docs).astype(np.uint32), num_val


@dataclass(frozen=True)
class ShardLayout:
    """Which places of the shuffled order each output shard holds: validation shards first, then train shards,
    each a contiguous run of places; shards of a split hold equal numbers of documents (the first ones one
    more), as many as `shard_size_mb` of text asks."""

    num_docs: int
    num_val: int
    num_shards: dict[str, int]  # split -> shards

    @classmethod
    def plan(cls, num_docs: int, num_val: int, split_bytes: dict[str, int], shard_size_mb: float) -> ShardLayout:
        counts = {"validation": num_val, "train": num_docs - num_val}
        return cls(num_docs, num_val, {split: max(1, math.ceil(split_bytes[split] / (shard_size_mb * 1e6)))
                                       if counts[split] else 0 for split in counts})

    @property
    def splits(self) -> list[str]:
        """The split of each shard, by shard number."""
        return ["validation"] * self.num_shards["validation"] + ["train"] * self.num_shards["train"]

    @property
    def starts(self) -> np.ndarray:
        """The first place of each shard, and the number of places at the end."""
        bounds = [0]
        for split, first, count in (("validation", 0, self.num_val), ("train", self.num_val,
                                                                       self.num_docs - self.num_val)):
            size, extra = divmod(count, max(self.num_shards[split], 1))
            bounds += [first + (i + 1) * size + min(i + 1, extra) for i in range(self.num_shards[split])]
        return np.array(bounds, dtype=np.int64)

    def shard_of(self, places: np.ndarray) -> np.ndarray:
        """The shard number of each place."""
        return np.searchsorted(self.starts, places, side="right") - 1

    def file(self, shard: int) -> str:
        split = self.splits[shard]
        index = shard - (self.num_shards["validation"] if split == "train" else 0)
        return f"{split}-{index:05d}-of-{self.num_shards[split]:05d}.parquet"


def write_shards(staging: Path, workdir: Path, outputs: OutputArguments) -> list[dict]:
    """Shuffle the staged documents and write `train-*` / `validation-*` parquet shards, in bounded memory.

    A seeded permutation gives every document its place in the shuffled order (`shuffled_places`).
    One pass spreads the documents over buckets of about `_BUCKET_BYTES` of text, bucket b holding a
    contiguous range of places; then each bucket in turn is read, put in order and cut into the shards
    (`ShardLayout`). Memory: one bucket and one batch, whatever the corpus size up to `_MAX_BUCKETS` buckets
    (8 GB of text; beyond, buckets grow with the corpus); disk: the corpus once more, for a while.
    """
    staged = pq.ParquetFile(staging)
    num_docs = staged.metadata.num_rows
    text_bytes = sum(staged.metadata.row_group(i).column(0).total_uncompressed_size
                     for i in range(staged.metadata.num_row_groups))
    places, num_val = shuffled_places(num_docs, outputs)
    num_buckets = max(1, min(num_docs, _MAX_BUCKETS, math.ceil(text_bytes / _BUCKET_BYTES)))
    bucket_dir = workdir / "_buckets"
    bucket_dir.mkdir()
    bucket_schema = SCHEMA.append(pa.field("place", pa.uint32()))
    writers = [pa.ipc.new_file(bucket_dir / f"{b:05d}.arrow", bucket_schema) for b in range(num_buckets)]
    split_bytes = {"validation": 0, "train": 0}
    offset = 0
    # One staged row group at a time (at most 4,096 documents / 4 M characters): `iter_batches` would read
    # ahead over the whole file, so its memory grew with the corpus (500 MB for a 144 MB staging file).
    for group in range(staged.num_row_groups):
        table = staged.read_row_group(group)
        group_places = places[offset:offset + table.num_rows]
        offset += table.num_rows
        lengths = pc.binary_length(table.column("text")).to_numpy(zero_copy_only=False)
        is_val = group_places < num_val
        split_bytes["validation"] += int(lengths[is_val].sum())
        split_bytes["train"] += int(lengths[~is_val].sum())
        buckets = group_places.astype(np.int64) * num_buckets // num_docs
        table = table.append_column("place", pa.array(group_places))
        for b in np.unique(buckets):
            writers[b].write_table(table.take(np.flatnonzero(buckets == b)))
        del table
        pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed memory for reuse otherwise
    for writer in writers:
        writer.close()
    layout = ShardLayout.plan(num_docs, num_val, split_bytes, outputs.shard_size_mb)
    starts = layout.starts
    shards: list[dict] = []
    current: dict = {}  # the shard being written: its number, file, writer, documents, characters
    for b in range(num_buckets):
        with pa.memory_map(str(bucket_dir / f"{b:05d}.arrow")) as source:
            table = pa.ipc.open_file(source).read_all()
        table = table.take(pc.sort_indices(table.column("place")))
        place = table.column("place").to_numpy()
        start = 0
        while start < len(place):
            shard = int(layout.shard_of(place[start]))
            stop = int(np.searchsorted(place, starts[shard + 1]))
            if current.get("shard") != shard:
                close_shard(current, shards)
                current = open_shard(workdir, layout, shard)
            append_to_shard(current, table.slice(start, stop - start).drop_columns(["place"]))
            start = stop
        del table, place
        pa.default_memory_pool().release_unused()
        (bucket_dir / f"{b:05d}.arrow").unlink()
    close_shard(current, shards)
    shutil.rmtree(bucket_dir, ignore_errors=True)
    return shards


def open_shard(folder: Path, layout: ShardLayout, shard: int) -> dict:
    """A shard being written: its number, file name, split, writer, documents and characters so far."""
    name = layout.file(shard)
    return {"shard": shard, "file": name, "split": layout.splits[shard], "documents": 0, "chars": 0,
            "writer": pq.ParquetWriter(folder / name, SCHEMA)}


def append_to_shard(current: dict, part: pa.Table) -> None:
    current["writer"].write_table(part)
    current["documents"] += part.num_rows
    current["chars"] += int(pc.sum(pc.utf8_length(part.column("text"))).as_py() or 0)


def close_shard(current: dict, shards: list[dict]) -> None:
    """Close the shard's file and add its record (file, split, documents, chars) to `shards`."""
    if current:
        current.pop("writer").close()
        current.pop("shard")
        shards.append(current)
