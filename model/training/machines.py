"""One run on several machines (`accelerate launch --num_machines N`), with or without a shared filesystem.

Every process of a run takes the same decisions from files: whether the output directory holds this run,
whether the run has finished, which checkpoint it resumes from. On one machine all processes read the same
files; on machines that do not share the output directory each reads its own copy, and a decision one machine
takes alone either hangs the others in their next collective or trains on silently wrong (machine 0 resuming
at step 72 while machine 1 starts at step 0). So:

- `settle_storage` finds out once per run, with a probe file, whether the machines see one output directory.
  When they do not, every machine keeps a full copy of the run: HF's `--save_on_each_node`, turned on for the
  user. When they do, it is turned off (two machines would write the same files at once).
- `share_files` completes each machine's copy of a checkpoint before it is renamed into place. HF and
  DeepSpeed write some files on the global main process only (DeepSpeed's `latest` and model states) and some
  on the machine of the rank they belong to (each rank's RNG state and ZeRO optimizer shard), and a resume
  reads them all (DeepSpeed's loader reads every rank's shard). The missing files travel between the machines'
  first processes over a gloo group, so each machine ends up holding the same complete checkpoint.
- `one_outcome` runs a check on every process and gives all of them one outcome: the value they agree on, or
  one error raised on every process, naming the machines (never one machine refusing while the others wait
  for it in a collective until the timeout). The checks of the output directory and the step a run resumes
  from go through it.

Machine i is the machine launched with `--machine_rank i`: torchrun numbers the processes of machine i after
those of machines 0..i-1, and a machine's first process has local rank 0.
"""

from __future__ import annotations

import bisect
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from utils.errors import UserError

logger = logging.getLogger(__name__)

T = TypeVar("T")
CHUNK_BYTES = 64 * 2**20  # files travel in pieces of this size (one piece in memory at a time)
PROBE_PREFIX = ".storage-probe-"
# Files up to this size that several machines wrote (records such as trainer_state.json) travel from the first.
RECORD_BYTES = 2**20


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass(frozen=True)
class Machines:
    """Where the processes of a run are: `machine[r]` is the machine of global rank r, `leaders[m]` the global
    rank of machine m's first process, `hosts[m]` its host name."""

    machine: tuple[int, ...]
    leaders: tuple[int, ...]
    hosts: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.leaders)

    def label(self, machine: int) -> str:
        return f"machine {machine} ({self.hosts[machine]})"

    @property
    def this(self) -> int:
        return self.machine[dist.get_rank()] if distributed() else 0

    @property
    def is_leader(self) -> bool:
        return not distributed() or dist.get_rank() in self.leaders


_groups: dict[str, Any] = {}


def _world_group():
    """A gloo group of every process (the default group itself when it is gloo): objects and files travel on
    the CPU whatever the training backend is. Created by the first collective of this module, on every rank."""
    if "world" not in _groups:
        _groups["world"] = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _groups["world"]


def gather(value: Any) -> list:
    """`value` of every process, by global rank (`[value]` without a process group)."""
    if not distributed():
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=_world_group())
    return out


def machines() -> Machines:
    """The machines of this run (one, without a process group). Collective on its first call."""
    if "machines" in _groups:
        return _groups["machines"]
    entries = gather((int(os.environ.get("LOCAL_RANK", "0")), socket.gethostname()))
    leaders = tuple(rank for rank, (local, _) in enumerate(entries) if local == 0)
    layout = Machines(machine=tuple(max(bisect.bisect_right(leaders, rank) - 1, 0) for rank in range(len(entries))),
                      leaders=leaders, hosts=tuple(entries[rank][1] for rank in leaders))
    if distributed() and layout.count > 1:
        # new_group is collective over every rank, members or not; created here, in the same order everywhere
        _groups["leaders"] = dist.new_group(ranks=list(leaders), backend="gloo")
    _groups["machines"] = layout
    return layout


def _problem(err: UserError) -> tuple:
    return err.problem, err.path, err.line, err.field, err.fix


def one_outcome(compute: Callable[[], T], what: str, describe: Callable[[T], str] = str,
                fix: str | None = None) -> T:
    """`compute()` on every process, and one outcome for all of them: its value, when every process computed
    one that `describe` renders alike (a checkpoint's step, not its path, which differs between machines);
    else one `UserError` on every process, naming each machine's `what` (`describe`d) with `fix`. A
    `UserError` that `compute` raised on some process is raised on all: as it is on the processes that
    raised it, naming the machine on the others."""
    try:
        value, problem = compute(), None
    except UserError as err:
        if not distributed():
            raise
        value, problem = None, err
    if not distributed():
        return value
    layout = machines()
    outcomes = gather((None, _problem(problem)) if problem is not None else (describe(value), None))
    failed = [(rank, found) for rank, (_, found) in enumerate(outcomes) if found is not None]
    if problem is not None:
        raise problem
    if failed:
        rank, (text, path, line, field, remedy) = failed[0]
        raise UserError(f"{layout.label(layout.machine[rank])} refused: {text}", path=path, line=line, field=field,
                        fix=remedy)
    labels = [label for label, _ in outcomes]
    if len(set(labels)) > 1:
        seen: dict[int, str] = {}
        for rank, label in enumerate(labels):
            seen.setdefault(layout.machine[rank], label)
        raise UserError(f"the machines disagree on {what}: "
                        + "; ".join(f"{layout.label(m)}: {label}" for m, label in sorted(seen.items())), fix=fix)
    return value


def _nearest_existing(directory: Path) -> Path:
    path = directory.absolute()
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def settle_storage(args, directory: str | Path) -> None:
    """On a run over several machines, find out whether they share `directory` (the output directory) and set
    `args.save_on_each_node` to match: on when each machine has its own, off when they share one. Refused
    when some machines share it and others do not. Collective; nothing to do on one machine."""
    layout = machines()
    if layout.count < 2:
        return
    probe = _nearest_existing(Path(directory)) / f"{PROBE_PREFIX}{gather(uuid.uuid4().hex)[0]}"
    created = None
    if dist.get_rank() == 0:
        try:
            probe.touch()
        except OSError as err:
            created = f"cannot write in {probe.parent}: {err.strerror or err}"
    created = gather(created)[0]  # also a barrier: machine 0 wrote the probe before anyone looks for it
    seen = gather(probe.exists() if layout.is_leader else None)
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    if created is not None:
        raise UserError(created, path=str(directory), field="output_dir", fix="choose a writable --output_dir")
    sharing = [seen[rank] for rank in layout.leaders]
    if not all(sharing) and any(sharing[1:]):
        raise UserError("some machines share the output directory and others do not: "
                        + "; ".join(f"{layout.label(m)}: {'shared' if shared else 'its own'}"
                                    for m, shared in enumerate(sharing)),
                        path=str(directory), field="output_dir",
                        fix="give every machine the output directory on one shared filesystem, or each its own")
    if all(sharing):
        if args.save_on_each_node:
            logger.warning("--save_on_each_node turned off: the %d machines share %s, where one copy is saved (two "
                           "machines writing the same files would corrupt them)", layout.count, directory)
        args.save_on_each_node = False
    else:
        if not args.save_on_each_node:
            logger.info("the %d machines do not share %s: each keeps a complete copy of every checkpoint and of the "
                        "final model (--save_on_each_node)", layout.count, directory)
        args.save_on_each_node = True


def _listing(directory: Path) -> dict[str, int]:
    return {path.relative_to(directory).as_posix(): path.stat().st_size
            for path in sorted(directory.rglob("*")) if path.is_file()} if directory.is_dir() else {}


def share_files(directory: str | Path, args) -> None:
    """Give every machine the files any machine wrote under `directory` (a staged checkpoint or final model),
    so each holds the whole of it, the same bytes: a file travels from the first machine that holds it to the
    others when some lack it, and so do the small records several machines write each for itself (their
    trainer state, with their own timings); large files written everywhere are the same data (a replicated
    optimizer state) and stay. Collective; nothing to do on one machine or with one shared output directory."""
    layout = machines()
    if layout.count < 2 or not args.save_on_each_node:
        return
    directory = Path(directory)
    listings = gather(_listing(directory) if layout.is_leader else None)
    held = [listings[rank] for rank in layout.leaders]
    travel = []
    for name in sorted(set().union(*held)):
        holders = [machine for machine, files in enumerate(held) if name in files]
        if len(holders) < layout.count or held[holders[0]][name] <= RECORD_BYTES:
            travel.append((name, holders[0], held[holders[0]][name]))
    if not travel or not layout.is_leader:
        return
    for name, owner, size in travel:
        path = directory / name
        if layout.this == owner:
            handle = open(path, "rb")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "wb")
        with handle:
            for start in range(0, size, CHUNK_BYTES):
                length = min(CHUNK_BYTES, size - start)
                piece = torch.frombuffer(bytearray(handle.read(length)), dtype=torch.uint8) \
                    if layout.this == owner else torch.empty(length, dtype=torch.uint8)
                dist.broadcast(piece, src=layout.leaders[owner], group=_groups["leaders"])
                if layout.this != owner:
                    handle.write(piece.numpy().tobytes())
    logger.info("%s: %d files (%.1f MB) copied between the %d machines", directory.name, len(travel),
                sum(size for _, _, size in travel) / 1e6, layout.count)
