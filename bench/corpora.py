"""The benchmarks' data: the real text of ../shared (zhwiki articles, ChatLM-mini-Chinese pairs), the synthetic
mixed corpus built from it, and chinese-poetry (fetched with npm).

The real data is read at run time through ZHLM_SHARED_DATA / ZHLM_SHARED_ANCHORS (defaults `../shared/data`,
`../shared/anchors` next to the repository) and never copied into the repository; working files go to bench/_work/
(git-ignored).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.harness import MB, REPO, WORK, log, timed
from utils.data.sources import read_records

WIKI_JSONL = "zhwiki_text/jastfkjg_wiki_00.jsonl"
WIKI_DOC = "zhwiki_text/xxcqc250_wiki_00.txt"
WIKI_XML = "zhwiki_xml/zhwiki-test-pages.xml"
CHATLM_SFT = "sft/chatlm_mini_chinese"


# -------------------------------------------------------------------------------------------- real data

def shared_path(name: str, env: str = "ZHLM_SHARED_DATA") -> Path:
    """A path under the shared real data (ZHLM_SHARED_DATA) or reference tokenizers (ZHLM_SHARED_ANCHORS)."""
    default = REPO.parent / "shared" / ("data" if env == "ZHLM_SHARED_DATA" else "anchors")
    path = Path(os.environ.get(env) or default) / name
    if not path.exists():
        sys.exit(f"error: {path} not found; set {env} to the shared data directory")
    return path


@dataclass(frozen=True)
class RealText:
    source: str
    id: str | None
    title: str | None
    text: str


def load_real_texts() -> list[RealText]:
    """The real Chinese text the benchmarks are built from: the zhwiki articles of
    zhwiki_text/jastfkjg_wiki_00.jsonl and zhwiki_text/xxcqc250_wiki_00.txt (read with the toolkit's
    own readers) and prompt + response of each row of sft/chatlm_mini_chinese/*.parquet."""
    texts = []
    for name in (WIKI_JSONL, WIKI_DOC):
        path = shared_path(name)
        texts += [RealText(path.name, record.id, record.title, record.text)
                  for record, _ in read_records(path)]
    for path in sorted(shared_path(CHATLM_SFT).glob("*.parquet")):
        table = pq.read_table(path, columns=["prompt", "response"]).to_pydict()
        texts += [RealText(path.name, f"{path.stem}:{i}", None, f"{prompt}\n{response}")
                  for i, (prompt, response) in enumerate(zip(table["prompt"], table["response"]))]
    return texts


# ------------------------------------------------------------------------------------ synthetic corpus

@dataclass(frozen=True)
class MixSpec:
    """How synthetic documents are cut from the real text (see `mixed_documents`)."""

    seed: int = 1234
    slice_chars: tuple[int, int] = (2, 32)
    slices_per_doc: tuple[int, int] = (16, 96)


def mixed_documents(texts: list[str], spec: MixSpec = MixSpec()) -> Iterator[str]:
    """Endless, seeded stream of synthetic documents, each the concatenation of `slices_per_doc` slices
    of the real text, every slice `slice_chars` long and cut at a uniformly random position.

    Cutting at random positions and gluing slices end to end makes new pre-tokens at every junction
    (the tail of one run of Han characters joined to the head of another), so the number of distinct
    pre-tokens keeps growing with the corpus, as in a real large corpus, instead of a few MB of text
    repeated verbatim (whose pre-token table would stop growing and understate the trainer's memory).
    Local statistics (characters, words, punctuation, scripts) stay those of the real text.
    """
    pool = "\n".join(texts)
    rng = random.Random(spec.seed)
    low, high = spec.slice_chars
    while True:
        pieces = []
        for _ in range(rng.randint(*spec.slices_per_doc)):
            length = rng.randint(low, high)
            start = rng.randrange(len(pool) - length)
            pieces.append(pool[start:start + length])
        yield "".join(pieces).strip()


@dataclass(frozen=True)
class CorpusInfo:
    path: Path
    documents: int
    chars: int
    bytes: int

    @property
    def mb(self) -> float:
        return self.bytes / MB


def build_parquet_corpus(path: Path, documents: Iterator[str], target_bytes: int, key: str) -> CorpusInfo:
    """Write documents from `documents` into a parquet file with a `text` column until `target_bytes` of
    UTF-8 text; reuse the file when it was built with the same `key` (recorded in its metadata)."""
    if path.exists():
        meta = pq.read_schema(path).metadata or {}
        if meta.get(b"bench_key") == key.encode():
            info = json.loads(meta[b"bench_info"])
            return CorpusInfo(path, info["documents"], info["chars"], info["bytes"])
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = chars = size = 0
    batch: list[str] = []
    tmp = path.with_suffix(".tmp")
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(tmp, schema) as writer:
        while size < target_bytes:
            text = next(documents)
            batch.append(text)
            docs, chars, size = docs + 1, chars + len(text), size + len(text.encode("utf-8"))
            if len(batch) == 4096:
                writer.write_table(pa.table({"text": batch}, schema=schema))
                batch = []
        if batch:
            writer.write_table(pa.table({"text": batch}, schema=schema))
    info = {"documents": docs, "chars": chars, "bytes": size}
    # Re-write the footer metadata: read back lazily (memory-mapped) and attach the key.
    table = pq.read_table(tmp, memory_map=True)
    table = table.replace_schema_metadata({"bench_key": key, "bench_info": json.dumps(info)})
    pq.write_table(table, path)
    tmp.unlink()
    return CorpusInfo(path, docs, chars, size)


def build_mixed_corpus(size_mb: float, texts: list[str], spec: MixSpec = MixSpec(), name: str = "mixed") -> CorpusInfo:
    """`bench/_work/{name}_{size}MB.parquet`: the first `size_mb` MB of `mixed_documents(texts, spec)`.
    Corpora of different sizes with the same spec are prefixes of one another."""
    path = WORK / f"{name}_{size_mb:g}MB.parquet"
    key = json.dumps({"spec": [spec.seed, spec.slice_chars, spec.slices_per_doc], "mb": size_mb,
                      "pool_chars": sum(map(len, texts)), "pool_docs": len(texts)})
    with timed() as built:
        info = build_parquet_corpus(path, mixed_documents(texts, spec), int(size_mb * MB), key)
    log(f"corpus {path.name}: {info.documents:,} documents, {info.chars:,} characters, {info.mb:.1f} MB "
        f"({built.wall_s:.1f} s)")
    return info


# --------------------------------------------------------------------------------------- chinese-poetry

POETRY_PACKAGE = "chinese-poetry@2.0.1"  # MIT licence, ~85 MB packed: Tang and Song poems, ci, in traditional


def poetry_package() -> Path:
    """The unpacked npm package `chinese-poetry` (bench/_work/chinese-poetry/package), fetched with
    `npm pack` on first use and kept out of the repository."""
    folder = WORK / "chinese-poetry"
    package = folder / "package"
    if not (package / "dist").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        log(f"npm pack {POETRY_PACKAGE} into {folder}")
        packed = subprocess.run(["npm", "pack", POETRY_PACKAGE], cwd=folder, check=True, capture_output=True,
                                text=True).stdout.split()[-1]
        subprocess.run(["tar", "xzf", packed], cwd=folder, check=True)
    return package
