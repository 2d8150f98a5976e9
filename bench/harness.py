"""The benchmarks' harness: run a stage, measure it, and render its section of docs/BENCHMARKS.md.

A stage is a command in a process of its own (`run_command`: wall and CPU time and the command's own peak RSS, the
whole process tree sampled on request; stopped with ctrl+c, or killed at a time limit) or work in this process
(`timed`, `fastest`: wall and CPU time). Either gives a `Measured`. `write_section` renders a script's section with
the exact command (`.venv/bin/python -m bench.<script> ...`), the machine, the date and the library versions, then
its tables (`markdown_table`) and their reading.

The benchmarks run as modules from the repository root (`.venv/bin/python -m bench.bench_dedup`), so the toolkit
and bench/ import as packages. This module imports only the standard library and utils.io at the top: the GPU check
runs it on a machine without the project's virtualenv.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from utils.io import cpu_model, write_text_atomic

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "bench" / "_work"  # working files (git-ignored)
BENCHMARKS_MD = REPO / "docs" / "BENCHMARKS.md"
PYTHON = sys.executable
MB = 1e6  # benchmark sizes and memory are decimal megabytes

T = TypeVar("T")


def log(message: str) -> None:
    """Progress line with a timestamp, flushed at once (the benchmarks run for minutes)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def recorded_run(argv: list[str] | None) -> dict:
    """What a results file keeps of the run that measured it, for `write_section(argv=..., date=...)` when the
    section is rendered again later: its arguments (the command line's when `main` got none) and the date."""
    return {"argv": list(sys.argv[1:] if argv is None else argv), "date": utc_now()}


# ------------------------------------------------------------------------------------------------ measuring

@dataclass
class Measured:
    """What running one stage measured."""

    wall_s: float = 0.0
    cpu_s: float = math.nan  # user + system: the command and the descendants it waited for, or this process's
    peak_rss_mb: float = math.nan  # the command's own peak (wait4); in this process: the process's peak so far
    load: float = 0.0  # 1-minute load average when it started (the machine is shared: wall times follow it)
    returncode: int | None = 0  # None: killed at its time limit
    log_path: Path | None = None  # a command's output
    tree: dict[str, float] = field(default_factory=dict)  # `run_command(sample_tree=True)`: the sampled tree

    @property
    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def figures(self) -> dict[str, float]:
        """The numbers, for a results file."""
        return {"wall_s": self.wall_s, "cpu_s": self.cpu_s, "peak_rss_mb": self.peak_rss_mb, "load": self.load,
                **self.tree}


def other_work(loads: list[float]) -> bool:
    """Whether other work shared the machine while a benchmark's arms ran, from the 1-minute load averages taken at
    their starts: the benchmark's own threads (one per core) keep it up to the core count, so a load above that
    (half a process of margin) is someone else's, and absolute rates then fall while side-by-side ratios hold."""
    return max(loads) >= len(os.sched_getaffinity(0)) + 0.5


def cpu_seconds(own: bool = True) -> float:
    """CPU seconds (user + system) of this process, unless `own` is False, and of its reaped children with
    theirs (a pool's workers, a script's own worker processes)."""
    usage = [resource.getrusage(resource.RUSAGE_CHILDREN)] + [resource.getrusage(resource.RUSAGE_SELF)] * own
    return sum(u.ru_utime + u.ru_stime for u in usage)


@contextlib.contextmanager
def timed() -> Iterator[Measured]:
    """Measure the block as a stage run in this process; the figures are filled in when it ends."""
    measured = Measured(load=os.getloadavg()[0])
    wall, cpu = time.perf_counter(), cpu_seconds()
    try:
        yield measured
    finally:
        measured.wall_s, measured.cpu_s = time.perf_counter() - wall, cpu_seconds() - cpu
        measured.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def fastest(work: Callable[[], T], repeats: int = 1) -> tuple[Measured, T]:
    """Run `work()` `repeats` times in this process: the fastest run's figures (on a shared machine the others
    waited for cores) and the last run's result."""
    runs = []
    for _ in range(repeats):
        with timed() as measured:
            result = work()
        runs.append(measured)
    return min(runs, key=lambda m: m.wall_s), result


# Runs the command from a small, freshly exec'd Python, so that the command's ru_maxrss is its own peak. (On Linux,
# exec records the high-water RSS of the memory image it replaces into the new process's maxrss; spawning straight
# from a large benchmark process would report the parent's peak instead.) wait4 returns the maximum of the command's
# peak and its waited-for descendants' peaks (not their sum). The launcher leads the command's process group and
# outlives a ctrl+c sent to the group (a handler, unlike SIG_IGN, is not inherited across exec).
_LAUNCHER = r"""
import json, os, signal, sys, time
result_path, log_path, *command = sys.argv[1:]
signal.signal(signal.SIGINT, lambda *_: None)
fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
start = time.perf_counter()
pid = os.posix_spawnp(command[0], command, os.environ,
                      file_actions=[(os.POSIX_SPAWN_DUP2, fd, 1), (os.POSIX_SPAWN_DUP2, fd, 2)])
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(result_path, "w") as handle:
    json.dump({"returncode": os.waitstatus_to_exitcode(status), "wall_s": wall, "maxrss_kb": usage.ru_maxrss,
               "cpu_s": usage.ru_utime + usage.ru_stime}, handle)
"""


def run_command(command: list[str], log_path: Path, *, env: dict[str, str] | None = None,
                timeout_s: float | None = None, interrupt_when: str | None = None, sample_tree: bool = False,
                watch: Path | None = None, check: bool = True) -> Measured:
    """Run `command` (argv) from the repository root in a process group of its own, its output in `log_path`, with
    `env` on top of this process's environment; measure wall, CPU and its own peak RSS.

    `interrupt_when`: a regular expression; once the log matches it, SIGINT the group, as ctrl+c does. `timeout_s`:
    kill the group after that many seconds (returncode None). `sample_tree`: also sample the whole process tree every
    0.2 s (`TreeSampler`), and with `watch` the peak growth of that folder. `check`: raise, with the log's tail,
    unless the command exited 0.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handle, result_name = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    result_path = Path(result_name)
    sampler = TreeSampler(watch) if sample_tree else None
    load, interrupt = os.getloadavg()[0], interrupt_when and re.compile(interrupt_when)
    started = time.perf_counter()
    process = subprocess.Popen([PYTHON, "-S", "-c", _LAUNCHER, str(result_path), str(log_path), *command], cwd=REPO,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    try:
        while process.poll() is None:
            if timeout_s is not None and time.perf_counter() - started > timeout_s:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                break
            if interrupt and log_path.exists() and interrupt.search(log_path.read_text(errors="replace")):
                os.killpg(process.pid, signal.SIGINT)
                interrupt = None
            if sampler is not None:
                sampler.sample(process.pid)
            time.sleep(0.05)
        result = json.loads(result_path.read_text()) if result_path.stat().st_size else None
    except BaseException:  # ctrl+c here, or an error: the command must not outlive the benchmark
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        raise
    finally:
        result_path.unlink(missing_ok=True)
    if result is None:  # killed at its time limit, launcher and all
        measured = Measured(time.perf_counter() - started, load=load, returncode=None, log_path=log_path)
    else:
        measured = Measured(result["wall_s"], result["cpu_s"], result["maxrss_kb"] * 1024 / MB, load,
                            result["returncode"], log_path)
    if sampler is not None:
        measured.tree = sampler.figures()
    if check and measured.returncode != 0:
        tail = "\n".join(measured.log_text.splitlines()[-20:])
        ended = f"ran past {timeout_s} s" if measured.returncode is None else f"exited {measured.returncode}"
        raise RuntimeError(f"{shlex.join(command)} {ended} (log {log_path}):\n{tail}")
    return measured


# Processes of a Ray instance that are not workers (its daemons), left out of the peak memory per worker.
RAY_DAEMONS = ("gcs_server", "raylet", "dashboard", "monitor.py", "log_monitor", "runtime_env", "client.server",
               "ray start")


class TreeSampler:
    """Peaks of a command's whole process tree, sampled: RSS summed over the tree, of the command's main process
    alone and of the largest other process that is not a Ray daemon (a worker); PSS every second (pages shared
    after fork counted once; smaps is slower to read); with `watch`, that folder's growth every 2 s; and the sum
    of every process's last sampled CPU time, for processes never reaped here (Ray's)."""

    def __init__(self, watch: Path | None = None):
        self.watch = watch
        self.disk_before = folder_bytes(watch) if watch is not None else 0
        self.peaks = dict.fromkeys(("tree", "main", "pss", "pss_anon", "worker", "disk"), 0)
        self.cpu_by_pid: dict[int, float] = {}
        self.last_pss = self.last_disk = 0.0

    def sample(self, launcher_pid: int) -> None:
        import psutil  # not on the GPU machine, which never samples

        now = time.perf_counter()
        try:
            launcher = psutil.Process(launcher_pid)
            main = launcher.children()
            procs = main[:1] + [p for p in launcher.children(recursive=True) if p not in main[:1]]
            rss = [p.memory_info().rss for p in procs]
            if procs:
                self._peak("tree", sum(rss))
                self._peak("main", rss[0])
            for proc, size in zip(procs[1:], rss[1:]):
                times = proc.cpu_times()
                self.cpu_by_pid[proc.pid] = times.user + times.system
                if not any(name in " ".join(proc.cmdline()) for name in RAY_DAEMONS):
                    self._peak("worker", size)
            if now - self.last_pss > 1:
                pss = [_pss(p.pid) for p in procs]
                self._peak("pss", sum(total for total, _ in pss))
                self._peak("pss_anon", sum(anon for _, anon in pss))
                self.last_pss = now
        except (psutil.Error, OSError):  # a process that ended while it was being read
            pass
        if self.watch is not None and now - self.last_disk > 2:
            self._peak("disk", folder_bytes(self.watch) - self.disk_before)
            self.last_disk = now

    def _peak(self, name: str, value: float) -> None:
        self.peaks[name] = max(self.peaks[name], value)

    def figures(self) -> dict[str, float]:
        return {**{f"peak_{name}_mb": value / MB for name, value in self.peaks.items()},
                "cpu_sampled_s": sum(self.cpu_by_pid.values())}


def _pss(pid: int) -> tuple[int, int]:
    """A process's PSS and the anonymous part of it, in bytes (smaps_rollup): the rest is file pages mapped in,
    such as memory-mapped Arrow files, which the kernel can drop and read again."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            if name in ("Pss", "Pss_Anon"):
                values[name] = int(rest.split()[0]) * 1024
    return values.get("Pss", 0), values.get("Pss_Anon", 0)


def folder_bytes(path: Path) -> int:
    """Bytes of the files under `path` (files removed meanwhile are skipped)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


# ---------------------------------------------------------------------------------------------- rendering

def markdown_table(headers: list[str], rows: Iterable[Iterable[object]]) -> str:
    """A GitHub markdown table; numbers are expected to be formatted by the caller."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_int(value: float) -> str:
    return f"{value:,.0f}"


def machine_description() -> str:
    """Cores, RAM and CPU model of this machine (from /proc), plus the OS and Python."""
    cpu = cpu_model()
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
    """Replace (or append) the section of bench/`script` (`bench_dedup.py`) in docs/BENCHMARKS.md (or `markdown`: a
    smoke test's scratch file), keeping the other sections.

    The section starts with the exact command (`<python> -m bench.<module> <argv>`, run from the repository root),
    the machine, the date and the library versions, then `body` (tables and interpretation). Sections are delimited
    by HTML comments naming the script. `argv` / `date` (default: this run's `sys.argv[1:]` and now) name the
    measuring run when a section is re-rendered later from saved results (`recorded_run`); `machine` / `libraries`
    (default: this machine, the versions installed here) describe a run made on another machine (the lent GPU),
    `python` how the command was run there.
    """
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join([python, "-m", f"bench.{script.removesuffix('.py')}", *map(shlex.quote, argv)])
    section = "\n".join([
        f"## {title}", "",
        f"- Command: `{command}`",
        f"- Machine: {machine or machine_description()}",
        f"- Date: {date or utc_now()}",
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
    log(f"wrote the {script} section of {markdown}")
    return markdown
