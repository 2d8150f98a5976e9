"""Shared helpers of the benchmarks in bench/: real text from ../shared, the synthetic mixed corpus built
from it, peak-RSS measurement of a child process, machine/library description, and docs/BENCHMARKS.md.

Not run directly; every benchmark imports it (`from bench.common import ...`: the benchmarks run as modules
from the repository root, `.venv/bin/python -m bench.<script>`). The real data is read at run time through
ZHLM_SHARED_DATA / ZHLM_SHARED_ANCHORS (defaults `../shared/data`, `../shared/anchors` next to the
repository) and never copied into the repository; working files go to bench/_work/ (git-ignored).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import random
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from utils.data.sources import read_records
from utils.io import write_text_atomic

REPO = Path(__file__).resolve().parent.parent

WORK = REPO / "bench" / "_work"
BENCHMARKS_MD = REPO / "docs" / "BENCHMARKS.md"
PYTHON = sys.executable
MB = 1e6  # benchmark sizes are decimal megabytes of UTF-8 text

WIKI_JSONL = "zhwiki_text/jastfkjg_wiki_00.jsonl"
WIKI_DOC = "zhwiki_text/xxcqc250_wiki_00.txt"
WIKI_XML = "zhwiki_xml/zhwiki-test-pages.xml"
CHATLM_SFT = "sft/chatlm_mini_chinese"


# ----------------------------------------------------------------------------------------------- output

def log(message: str) -> None:
    """Progress line with a timestamp, flushed at once (the benchmarks run for minutes)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def markdown_table(headers: list[str], rows: Iterable[Iterable[object]]) -> str:
    """A GitHub markdown table; numbers are expected to be formatted by the caller."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_description() -> str:
    """Cores, RAM and CPU model of this machine (from /proc), plus the OS and Python."""
    cpu = "unknown CPU"
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram_kb = 0
    with open("/proc/meminfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                ram_kb = int(line.split()[1])
                break
    cores = len(os.sched_getaffinity(0))
    return (f"{cores} cores, {ram_kb / 2**20:.1f} GiB RAM, CPU `{cpu}`, no GPU used; "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def library_versions(packages: Iterable[str]) -> str:
    versions = []
    for name in packages:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return ", ".join(versions)


def write_section(script: str, title: str, packages: Iterable[str], body: str, argv: list[str] | None = None,
                  date: str | None = None, machine: str | None = None, libraries: str | None = None,
                  markdown: Path | None = None, python: str = ".venv/bin/python") -> Path:
    """Replace (or append) this script's section of docs/BENCHMARKS.md (or `markdown`: a smoke test's scratch
    file), keeping the other sections.

    The section starts with the exact command (`<python> -m bench.<script> <argv>`, run from the repository
    root), the machine, the date and the library versions, then `body` (tables and interpretation). Sections
    are delimited by HTML comments naming the script. `argv` / `date` (default: this run's `sys.argv[1:]` and
    now) name the measuring run when a section is re-rendered later from saved results; `machine` /
    `libraries` (default: this machine, the versions installed here) describe a run made on another machine
    (the lent GPU), `python` how the command was run there.
    """
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join([python, "-m", f"bench.{script.removesuffix('.py')}", *map(shlex.quote, argv)])
    date = date or utc_now()
    section = "\n".join([
        f"## {title}", "",
        f"- Command: `{command}`",
        f"- Machine: {machine or machine_description()}",
        f"- Date: {date}",
        f"- Libraries: {libraries or library_versions(packages)}", "",
        body.strip(), ""])
    begin, end = f"<!-- section: {script} -->", f"<!-- end: {script} -->"
    block = f"{begin}\n{section}{end}\n"
    markdown = markdown or BENCHMARKS_MD
    text = markdown.read_text(encoding="utf-8") if markdown.exists() else (
        "# Benchmarks\n\nResults of the scripts in `bench/` (`make bench`), one section per script; each "
        "script rewrites only its own section. Data: the real public text in `../shared/data` "
        "(`ZHLM_SHARED_DATA`), read at run time.\n\n")
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    write_text_atomic(markdown, text)
    return markdown


def cpu_seconds(own: bool = True) -> float:
    """CPU seconds (user + system) of this process, unless `own` is False, and of its reaped children with
    theirs (a pool's workers, a script's own worker processes)."""
    usage = [resource.getrusage(resource.RUSAGE_CHILDREN)] + [resource.getrusage(resource.RUSAGE_SELF)] * own
    return sum(u.ru_utime + u.ru_stime for u in usage)


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"


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
    started = time.perf_counter()
    info = build_parquet_corpus(path, mixed_documents(texts, spec), int(size_mb * MB), key)
    log(f"corpus {path.name}: {info.documents:,} documents, {info.chars:,} characters, {info.mb:.1f} MB "
        f"({time.perf_counter() - started:.1f} s)")
    return info


# ------------------------------------------------------------------------------ measured child process

# Runs in a small, freshly exec'd Python so that the measured command's ru_maxrss is its own peak. (On
# Linux, exec records the high-water RSS of the memory image it replaces into the new process's
# maxrss; spawning straight from a large benchmark process with vfork/posix_spawn would report the
# parent's peak instead.) wait4 returns the maximum of the child's peak and its waited-for
# descendants' peaks (not their sum).
_LAUNCHER = r"""
import json, os, sys, time
result_path, log_path, *command = sys.argv[1:]
fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
start = time.perf_counter()
pid = os.posix_spawn(command[0], command, os.environ,
                     file_actions=[(os.POSIX_SPAWN_DUP2, fd, 1), (os.POSIX_SPAWN_DUP2, fd, 2)])
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(result_path, "w") as handle:
    json.dump({"returncode": os.waitstatus_to_exitcode(status), "wall_s": wall, "maxrss_kb": usage.ru_maxrss,
               "cpu_s": usage.ru_utime + usage.ru_stime}, handle)
"""


@dataclass(frozen=True)
class Measured:
    returncode: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float  # decimal MB (1e6 bytes), like the corpus sizes
    log_path: Path

    @property
    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def run_measured(command: list[str], log_path: Path, check: bool = True) -> Measured:
    """Run `command` (argv; the first element an absolute path) from the repository root with its
    output in `log_path`; return its wall time, CPU time and peak RSS (its own, via wait4)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(suffix=".json", dir=WORK, delete=False) as handle:
        result_path = Path(handle.name)
    try:
        subprocess.run([PYTHON, "-S", "-c", _LAUNCHER, str(result_path), str(log_path), *command],
                       cwd=REPO, check=True)
        result = json.loads(result_path.read_text())
    finally:
        result_path.unlink(missing_ok=True)
    measured = Measured(result["returncode"], result["wall_s"], result["cpu_s"],
                        result["maxrss_kb"] * 1024 / MB, log_path)
    if check and measured.returncode != 0:
        tail = "\n".join(measured.log_text.splitlines()[-20:])
        raise RuntimeError(f"{shlex.join(command)} exited {measured.returncode} (log {log_path}):\n{tail}")
    return measured


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
