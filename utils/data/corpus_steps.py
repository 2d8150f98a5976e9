"""The corpus stage as datatrove pipeline steps, for corpora past one machine (`prepare_data.py --executor
local|slurm|ray`; `utils/data/executors.py` runs them). Same cleaning, signatures, near-duplicate decisions and
shards as the built-in path (`utils/data/corpus.py`), whose code every step calls:

1. `CleanAndSign` (N tasks): read a share of the inputs, extract, OpenCC, normalise, filter, decontaminate and
   sign each document (`process_batch`); write the cleaned documents, their MinHash signatures and each LSH
   band's values in datatrove's sorted bucket files.
2. `BandBuckets` (a task per band or fewer): datatrove's `MinhashDedupBuckets`: the pairs of documents that share
   a band's values, merged from every task's sorted bucket file.
3. `KeepFirst` (1 task): the documents in some pair are put in input order and run through the built-in path's
   own `NearDuplicateIndex`, which keeps the first of each group above the Jaccard threshold (datatrove itself
   would drop every document sharing a band, unchecked). A document in no pair shares no band with any other,
   so it is kept and cannot change another decision: the result is exactly the built-in path's. Then every
   kept document gets its place in the shuffled output (`shuffled_places`, `ShardLayout`), as there.
4. `WritePieces` (N tasks): each task sends its kept documents to the output shards they belong to.
5. `GatherShards` (N tasks): each output shard is put together in place order (the built-in path's shards,
   the same rows in the same order).
6. `Finish` (1 task): `stats.json` and `config.yaml`, the output folder swapped into place, the
   intermediate files removed.

Every path is a folder all tasks see (a shared filesystem on a cluster). Task order is input order: a task
reads every `tasks`-th file, or, with fewer files than tasks, every `tasks`-th record of each file (each task
then reads the whole file and cleans its share); a document's key (file number, record number) fixes its place
in input order whichever task read it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
from datatrove.utils.hashing import HashConfig

from utils.data.corpus import (
    SCHEMA,
    STAGING_CHARS,
    CleaningArguments,
    CorpusSettings,
    DedupArguments,
    InputArguments,
    OutputArguments,
    ShardLayout,
    StepStats,
    append_to_shard,
    close_shard,
    nothing_left,
    open_shard,
    process_batch,
    shuffled_places,
    write_report,
)
from utils.data.dedup import NearDuplicateIndex, lsh_bands
from utils.data.sources import read_records
from utils.data.wiki import WikiPage
from utils.errors import UserError
from utils.io import replace_dir, write_json_atomic

logger = logging.getLogger(__name__)

_BATCH = 64  # records cleaned and signed together (as the built-in path's work units)
_ROWS = 4096  # cleaned documents per row group of a task's documents file
_RECORD_BITS = 40  # a key is file number << 40 | record number
# The intermediate folders of the work directory, removed by Finish; `logs/` (datatrove's) stays.
INTERMEDIATE = ("docs", "meta", "signatures", "buckets", "dups", "places", "pieces", "shards", "staged", "stats")
META = np.dtype([("key", "<u8"), ("bytes", "<i8"), ("chars", "<i8")])


def band_config(dedup: DedupArguments, seed: int) -> MinhashConfig:
    """datatrove's view of the built-in LSH bands: as many buckets as bands, the rows of each as its hashes,
    32-bit (rensa's signature values)."""
    bands = lsh_bands(dedup.dedup_threshold, dedup.num_perm)
    return MinhashConfig(n_grams=dedup.shingle_size, num_buckets=bands, hashes_per_bucket=dedup.num_perm // bands,
                         seed=seed, hash_config=HashConfig(precision=32))


def task_share(num_files: int, rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """The (file number, stride, offset) a task reads: every `world_size`-th file, or with fewer files than
    tasks, records offset, offset + stride ... of every file."""
    if num_files >= world_size:
        return [(index, 1, 0) for index in range(rank, num_files, world_size)]
    return [(index, world_size, rank) for index in range(num_files)]


class CorpusStep(PipelineStep):
    """A step of the corpus stage: its work directory, and datatrove's statistics under the step's name."""

    type = "🀄 - CORPUS"

    def __init__(self, work_dir: str):
        super().__init__()
        self.work = Path(work_dir)

    def path(self, *parts: str) -> Path:
        path = self.work.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def recording_errors(self, rank: int) -> Iterator[None]:
        """Record a `UserError` (bad input) in the work directory, where the command finds it when an executor
        that keeps task errors to its logs (Ray) reports only that the task failed."""
        try:
            yield
        except UserError as err:
            write_json_atomic(self.path("errors", f"{self.name.replace(' ', '_')}-{rank:05d}.json"),
                              {"problem": err.problem, "path": err.path, "line": err.line, "field": err.field,
                               "fix": err.fix})
            raise


class CleanAndSign(CorpusStep):
    """Step 1: read this task's share, clean and sign every document (the built-in `process_batch`)."""

    name = "clean and sign"

    def __init__(self, work_dir: str, files: list[str], inputs: InputArguments, settings: CorpusSettings,
                 bands: MinhashConfig | None):
        super().__init__(work_dir)
        self.files, self.inputs, self.settings, self.bands = files, inputs, settings, bands

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        with self.recording_errors(rank):
            self._clean_and_sign(rank, world_size)

    def _clean_and_sign(self, rank: int, world_size: int) -> None:
        stats, started = StepStats(), time.perf_counter()
        rows: dict[str, list] = {name: [] for name in SCHEMA.names}
        meta, signatures, buffered = [], [], 0
        with pq.ParquetWriter(self.path("docs", f"{rank:05d}.parquet"), SCHEMA) as writer:
            for batch, keys in self._batches(rank, world_size, stats):
                with self.track_time():
                    kept, batch_stats = process_batch(batch, self.settings)
                stats.merge(batch_stats)
                for position, text, title, doc_id, source, signature in kept:
                    for name, value in zip(SCHEMA.names, (text, title, doc_id, source)):
                        rows[name].append(value)
                    meta.append((keys[position], len(text.encode("utf-8")), len(text)))
                    buffered += len(text)
                    if signature is not None:
                        signatures.append(signature)
                self.stat_update("documents", value=len(batch))
                self.stat_update("kept", value=len(kept))
                if len(rows["text"]) >= _ROWS or buffered >= STAGING_CHARS:  # as the builtin path stages
                    writer.write_table(pa.table(rows, schema=SCHEMA))
                    rows, buffered = {name: [] for name in SCHEMA.names}, 0
            if rows["text"]:
                writer.write_table(pa.table(rows, schema=SCHEMA))
        np.save(self.path("meta", f"{rank:05d}.npy"), np.array(meta, dtype=META))
        if self.bands is not None:
            matrix = np.stack(signatures) if signatures else np.empty((0, self.settings.num_perm), np.uint32)
            np.save(self.path("signatures", f"{rank:05d}.npy"), matrix)
            self._write_buckets(matrix, rank)
        stats.table["read"]["seconds"] = time.perf_counter() - started - sum(
            row["seconds"] for step, row in stats.table.items() if step != "read")
        write_json_atomic(self.path("stats", f"sign-{rank:05d}.json"), stats.as_dict())
        logger.info("task %d: %s of %s documents kept", rank, f"{len(meta):,}", f"{stats.table['read']['docs_in']:,}")

    def _batches(self, rank: int, world_size: int, stats: StepStats) -> Iterator[tuple[list, list[int]]]:
        batch, keys = [], []
        for file_index, stride, offset in task_share(len(self.files), rank, world_size):
            path = Path(self.files[file_index])
            logger.info("task %d reads %s%s", rank, path, f" (records {offset}, {offset} + {stride} ...)"
                        if stride > 1 else "")
            for record_index, (record, _) in enumerate(read_records(path, self.inputs.text_column,
                                                                    self.inputs.txt_split)):
                if record_index % stride != offset:
                    continue
                chars = sum(map(len, record.lines)) if isinstance(record, WikiPage) else len(record.text)
                stats.record("read", chars, chars, 0.0)
                batch.append((record, path.name))
                keys.append(file_index << _RECORD_BITS | record_index)
                if len(batch) == _BATCH:
                    yield batch, keys
                    batch, keys = [], []
        if batch:
            yield batch, keys

    def _write_buckets(self, matrix: np.ndarray, rank: int) -> None:
        """Each band's values and document number, sorted, in datatrove's bucket file format. (datatrove's reader
        stops at a first value of 2^32 - 1, its end marker: a minimum over a document's shingle hashes is that
        with odds of 2^-32.)"""
        rows = self.bands.hashes_per_bucket
        dtype = np.dtype([(f"field{i + 1}", "<u4") for i in range(rows)] + [(f"field{rows + 1}", "<u4")])
        for band in range(self.bands.num_buckets):
            records = np.empty(len(matrix), dtype=dtype)
            for i in range(rows):
                records[f"field{i + 1}"] = matrix[:, band * rows + i]
            records[f"field{rows + 1}"] = np.arange(len(matrix), dtype=np.uint32)
            records.sort(order=dtype.names)
            self.path("buckets", f"bucket_{band:03d}", f"{rank:05d}.minhash.sig").write_bytes(records.tobytes())


class BandBuckets(MinhashDedupBuckets):
    """Step 2: datatrove's bucket step, also with fewer tasks than bands (a task then takes bands rank,
    rank + tasks ...; datatrove's own needs a multiple of the number of bands). One task merges a band's sorted
    files from every cleaning task: 2.3 CPU µs a document (measured on 800,000 from 4 files), ~1.3 min a band
    at 33 M documents."""

    def __init__(self, work_dir: str, bands: MinhashConfig):
        super().__init__(str(Path(work_dir) / "buckets"), str(Path(work_dir) / "dups"), config=bands)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        bands = self.config.num_buckets
        if world_size % bands == 0:
            return super().run(data, rank, world_size)
        for band in range(rank, bands, world_size):
            super().run(data, band, bands)


class KeepFirst(CorpusStep):
    """Step 3 (one task): the built-in near-duplicate decisions on the documents that share a band, then every
    kept document's place in the shuffled output."""

    name = "keep first"

    def __init__(self, work_dir: str, inputs: InputArguments, dedup: DedupArguments, outputs: OutputArguments,
                 sign_tasks: int):
        super().__init__(work_dir)
        self.inputs, self.dedup, self.outputs, self.sign_tasks = inputs, dedup, outputs, sign_tasks

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        assert world_size == 1, "KeepFirst runs as one task"
        with self.recording_errors(rank):
            self._keep_first()

    def _keep_first(self) -> None:
        started = time.perf_counter()
        metas = [np.load(self.work / "meta" / f"{task:05d}.npy") for task in range(self.sign_tasks)]
        offsets = np.cumsum([0] + [len(meta) for meta in metas])
        meta = np.concatenate(metas)
        order = np.argsort(meta["key"], kind="stable")  # document numbers (task by task) in input order
        kept = np.ones(len(meta), dtype=bool)
        stats = StepStats()
        if self.dedup.dedup:
            with self.track_time():
                candidates = self._candidates(offsets)
                position = np.empty(len(meta), dtype=np.int64)
                position[order] = np.arange(len(meta))
                candidates = candidates[np.argsort(position[candidates])]
                index = NearDuplicateIndex(self.dedup.dedup_threshold, self.dedup.num_perm, self.outputs.seed)
                for start in range(0, len(candidates), _ROWS):
                    chunk = candidates[start:start + _ROWS]
                    kept[chunk] = index.add_batch(self._signatures(chunk, offsets))
            dropped = int((~kept).sum())
            stats.add_totals("dedup", len(meta), int(meta["chars"].sum()), len(meta) - dropped,
                             int(meta["chars"][kept].sum()), time.perf_counter() - started)
            if dropped:
                stats.dropped["near_duplicate"] += dropped
            self.stat_update("candidates", value=len(candidates))
            self.stat_update("near_duplicates", value=dropped)
            logger.info("%s documents share an LSH band with another; %s of them are near-duplicates",
                        f"{len(candidates):,}", f"{dropped:,}")
        in_order = order[kept[order]]
        if not len(in_order):
            raise nothing_left(self.inputs)
        places, num_val = shuffled_places(len(in_order), self.outputs)
        place = np.full(len(meta), -1, dtype=np.int64)
        place[in_order] = places
        is_val = kept & (place < num_val)
        split_bytes = {"validation": int(meta["bytes"][is_val].sum()),
                       "train": int(meta["bytes"][kept & ~is_val].sum())}
        layout = ShardLayout.plan(len(in_order), num_val, split_bytes, self.outputs.shard_size_mb)
        for task in range(self.sign_tasks):
            np.save(self.path("places", f"{task:05d}.npy"), place[offsets[task]:offsets[task + 1]])
        write_json_atomic(self.path("places", "layout.json"), {"num_docs": layout.num_docs,
                                                                "num_val": layout.num_val,
                                                                "num_shards": layout.num_shards})
        write_json_atomic(self.path("stats", "dedup.json"), stats.as_dict())

    def _candidates(self, offsets: np.ndarray) -> np.ndarray:
        """The documents (numbered task by task) in some pair that `BandBuckets` found."""
        pairs = [np.fromfile(path, dtype="<u4").reshape(-1, 4) for path in sorted((self.work / "dups").glob("*.dups"))]
        pairs = np.concatenate(pairs) if pairs else np.empty((0, 4), dtype=np.uint32)
        ends = np.concatenate([offsets[pairs[:, 0]] + pairs[:, 1], offsets[pairs[:, 2]] + pairs[:, 3]])
        return np.unique(ends.astype(np.int64))

    def _signatures(self, documents: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        tasks = np.searchsorted(offsets, documents, side="right") - 1
        rows = np.empty((len(documents), self.dedup.num_perm), dtype=np.uint32)
        for task in np.unique(tasks):
            matrix = np.load(self.work / "signatures" / f"{task:05d}.npy", mmap_mode="r")
            mine = tasks == task
            rows[mine] = matrix[documents[mine] - offsets[task]]
        return rows


def load_layout(work: Path) -> ShardLayout:
    saved = json.loads((work / "places" / "layout.json").read_text(encoding="utf-8"))
    return ShardLayout(saved["num_docs"], saved["num_val"], saved["num_shards"])


class WritePieces(CorpusStep):
    """Step 4: a task's kept documents, each with its place, into a piece of the shard the place falls in."""

    name = "write pieces"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        layout = load_layout(self.work)
        place = np.load(self.work / "places" / f"{rank:05d}.npy")
        writers: dict[int, pq.ParquetWriter] = {}
        schema = SCHEMA.append(pa.field("place", pa.uint32()))
        docs = pq.ParquetFile(self.work / "docs" / f"{rank:05d}.parquet")
        offset = 0
        with self.track_time():
            for group in range(docs.num_row_groups):
                table = docs.read_row_group(group)
                places = place[offset:offset + table.num_rows]
                offset += table.num_rows
                keep = np.flatnonzero(places >= 0)
                table = table.take(keep).append_column("place", pa.array(places[keep].astype(np.uint32)))
                shards = layout.shard_of(places[keep])
                for shard in np.unique(shards):
                    if shard not in writers:
                        writers[shard] = pq.ParquetWriter(self.path("pieces", f"{shard:05d}", f"{rank:05d}.parquet"),
                                                          schema)
                    writers[shard].write_table(table.take(np.flatnonzero(shards == shard)))
                self.stat_update("documents", value=len(keep))
        for writer in writers.values():
            writer.close()


class GatherShards(CorpusStep):
    """Step 5: every `world_size`-th output shard, its pieces put in place order."""

    name = "gather shards"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        layout = load_layout(self.work)
        started = time.perf_counter()
        staged = self.path("staged", "x").parent
        for shard in range(rank, sum(layout.num_shards.values()), world_size):
            pieces = sorted((self.work / "pieces" / f"{shard:05d}").glob("*.parquet"))
            if not pieces:  # a shard of no places (more shards than documents): not written, as built in
                continue
            table = pa.concat_tables([pq.read_table(piece) for piece in pieces])
            table = table.take(pc.sort_indices(table.column("place"))).drop_columns(["place"])
            current, done = open_shard(staged, layout, shard), []
            append_to_shard(current, table)
            close_shard(current, done)
            write_json_atomic(self.path("shards", f"{shard:05d}.json"),
                              {**done[0], "seconds": time.perf_counter() - started})
            started = time.perf_counter()
            self.stat_update("shards")


class Finish(CorpusStep):
    """Step 6 (one task): statistics, the resolved config, and the output folder swapped into place."""

    name = "finish"

    def __init__(self, work_dir: str, files: list[str], configs: tuple[InputArguments, CleaningArguments,
                                                                          DedupArguments, OutputArguments],
                 destination: str):
        super().__init__(work_dir)
        self.files, self.configs, self.destination = files, configs, Path(destination)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        stats = StepStats()
        for path in sorted((self.work / "stats").glob("*.json")):
            stats.merge(StepStats.from_dict(json.loads(path.read_text(encoding="utf-8"))))
        shards = [json.loads(path.read_text(encoding="utf-8"))
                  for path in sorted((self.work / "shards").glob("*.json"))]
        seconds = sum(shard.pop("seconds") for shard in shards)
        staged = self.work / "staged"
        write_report(staged, stats, [Path(file) for file in self.files], shards, seconds)
        from utils.config import save_config  # it imports transformers (0.4 s): only in the one task that needs it

        save_config(staged, *self.configs)
        self.destination.parent.mkdir(parents=True, exist_ok=True)
        replace_dir(staged, self.destination)
        for name in INTERMEDIATE:
            shutil.rmtree(self.work / name, ignore_errors=True)
        (self.work / "run.yaml").unlink(missing_ok=True)  # a finished run: the next one starts over
        logger.info("wrote %s", self.destination)
