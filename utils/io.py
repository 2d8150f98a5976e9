"""Atomic writes: outputs appear complete or not at all, and what was there before survives failures."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from utils.errors import UserError


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `output_dir`; on success it replaces `output_dir` in one rename.

    On any error (or ctrl+c) the temporary directory is removed and an existing `output_dir` is left
    exactly as it was.
    """
    final = Path(output_dir)
    check_output_dir(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o777 & ~_umask())
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
