"""Atomic writes: outputs appear complete or not at all, and what was there before survives failures.

Temporary names carry their owner, `.NAME.HOST-PID.XXXXXXXX.tmp` beside `NAME`, so the next write of
`NAME` removes what a killed run (`kill -9`, a crash) left behind, and never a live run's. Outputs get the
modes a plain write gets (0644 / 0755 under umask 022), whatever the writer or `mkdtemp` chose. Also
`cpu_model`, the machine's CPU as model cards and benchmark tables name it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from utils.errors import UserError, environment_error


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory, then rename."""
    with atomic_output_file(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_output_file(path: str | os.PathLike, field: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that wants a file name (a GGUF writer); on
    success it becomes `path` in one rename, on any error it is removed and `path` is left as it was.
    With `field`, failing to write (permission denied, disk full) is a `UserError` naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, name = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as err:
        refused = field and environment_error(err, path=str(path), field=field)
        if not refused:
            raise
        raise refused from err
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        refused = field and isinstance(err, OSError) and environment_error(err, path=str(path), field=field)
        if not refused:
            raise
        raise refused from err


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: object) -> None:
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to replace a non-empty output directory unless the user asked for it."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UserError("the output path exists and is not a directory", path=str(path),
                        field="output_dir", fix="choose another --output_dir")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError("the output directory already exists and is not empty", path=str(path),
                        field="output_dir",
                        fix="pass --overwrite_output_dir to replace it, or choose another --output_dir")


def check_writable(path: str | os.PathLike, field: str) -> None:
    """Refuse an output location that cannot be written, before any work is done: the nearest existing
    directory at or above `path` (its folder, when `path` is an existing file) must be writable. Reports
    a read-only or immutable location (root included) and a regular file standing where a folder must be."""
    path = Path(path).absolute()
    existing = path.parent if path.is_file() else path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write here: {existing} is a file, not a folder", path=str(path), field=field,
                        fix=f"choose another --{field}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write here: {existing} is not writable (permissions or a read-only "
                        "filesystem)", path=str(path), field=field,
                        fix=f"choose another --{field}, or make {existing} writable")


def check_output_file(path: str | os.PathLike, field: str, overwrite: bool | None = None) -> None:
    """Refuse, before any work, an output file that is a folder, or that cannot be written; and one that exists
    when `overwrite` is False (None: an existing file is the caller's to resume)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"is a folder; --{field} names the file to write", path=str(path), field=field,
                        fix=f"name a file, not a folder (a new file inside {path}, for example)")
    if overwrite is False and path.exists():
        raise UserError("already exists", path=str(path), field=field,
                        fix=f"pass --overwrite to replace it, or choose another --{field}")
    check_writable(path, field)


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `output_dir`; on success it replaces `output_dir` in one rename.

    On any error (or ctrl+c) the temporary directory is removed and an existing `output_dir` is left
    exactly as it was. Failing to write (permission denied, read-only, disk full) is a `UserError`
    naming `output_dir`.
    """
    final = Path(output_dir)
    try:
        remove_stale_temporaries(final)  # first: it may put back an output a killed swap moved aside
        check_output_dir(final, overwrite)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(final), suffix=".tmp", dir=final.parent))
    except OSError as err:
        refused = environment_error(err, path=str(final), field="output_dir")
        if refused is None:
            raise
        raise refused from err
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        # an error inside the hidden temporary folder (or none named: a full disk) is about `output_dir`
        refused = isinstance(err, OSError) and (err.filename is None or _inside(err.filename, tmp)) \
            and environment_error(err, path=str(final), field="output_dir")
        if not refused:
            raise
        raise refused from err


def replace_dir(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the complete folder `staged` in place of `final` (plain modes, see `honour_umask`): a folder already
    there is moved aside, the new one renamed in (both renames on one filesystem), and the old one removed."""
    staged, final = Path(staged), Path(final)
    honour_umask(staged)
    old = None
    if final.exists():
        old = final.with_name(f"{_temporary_prefix(final)}old")
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def honour_umask(directory: str | os.PathLike) -> None:
    """Give everything under `directory` the mode a plain write gets (0644 files, 0755 folders under umask
    022): safetensors writes `model.safetensors` 0600 and `mkdtemp` makes its folder 0700."""
    mask = _umask()
    for root, _, files in os.walk(directory):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, (0o777 if os.stat(path).st_mode & 0o111 else 0o666) & ~mask)


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Remove the temporaries of `path` (see the module docstring) whose owner on this host has died. A
    killed swap (the old output moved aside, the new one not yet in place) is undone first."""
    path = Path(path)
    owned = re.compile(rf"\.{re.escape(path.name)}\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)\."
                       r"(?:(?P<old>old)|[a-z0-9_]+\.tmp)")
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        found = owned.fullmatch(entry.name)
        if not found or found["host"] != _host() or _alive(int(found["pid"])):
            continue
        if found["old"] and not os.path.lexists(path):
            os.replace(entry, path)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{_host()}-{os.getpid()}."


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _inside(filename: object, folder: Path) -> bool:
    return isinstance(filename, (str, os.PathLike)) and \
        Path(os.path.abspath(filename)).is_relative_to(folder.absolute())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
