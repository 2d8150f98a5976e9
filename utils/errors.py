"""One kind of user-facing error, raised where the problem is found and reported once by `utils.cli.run_main`."""

from __future__ import annotations

import errno
import logging

logger = logging.getLogger(__name__)

# What the system refuses, not what the code gets wrong: reported like a user error, naming the file.
_PERMISSION = "make it writable (or readable, for an input), or choose another location"
ENVIRONMENT_ERRNOS = {errno.EACCES: _PERMISSION, errno.EPERM: _PERMISSION,
                      errno.EROFS: "choose a location on a writable filesystem",
                      errno.ENOSPC: "free some disk space, or choose a location on another disk",
                      errno.EDQUOT: "free some space within your disk quota, or choose another location",
                      errno.ENOTDIR: "a file stands where a folder must be: choose another path"}


class UserError(Exception):
    """A problem with the user's input or configuration that the user can fix.

    The message names where the problem is (file, line, field) and says how to fix it. `run_main`
    prints it without a traceback and exits with status 2.
    """

    def __init__(self, problem: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None, fix: str | None = None):
        self.problem, self.path, self.line, self.field, self.fix = problem, path, line, field, fix
        super().__init__(self.render())

    def __reduce__(self):
        # picklable (keyword-only arguments), so an error raised in a worker process or a datatrove task
        # reaches the command boundary as itself
        return _rebuild, (self.problem, self.path, self.line, self.field, self.fix)

    def render(self) -> str:
        where = ""
        if self.path is not None:
            where = str(self.path) + (f", line {self.line}" if self.line is not None else "")
        if self.field is not None:
            where += (", " if where else "") + f"field '{self.field}'"
        message = f"{where}: {self.problem}" if where else self.problem
        return message + (f"\n  fix: {self.fix}" if self.fix else "")


def _rebuild(problem: str, path: str | None, line: int | None, field: str | None, fix: str | None) -> UserError:
    return UserError(problem, path=path, line=line, field=field, fix=fix)


def environment_error(err: OSError, path: str | None = None, field: str | None = None) -> UserError | None:
    """`err` as a `UserError` naming `path` (default: the file `err` names) when the system refused (a
    permission, a read-only filesystem, a full disk: `ENVIRONMENT_ERRNOS`); None for any other error."""
    if err.errno not in ENVIRONMENT_ERRNOS:
        return None
    path = path if path is not None else err.filename
    return UserError(err.strerror or str(err), path=None if path is None else str(path), field=field,
                     fix=ENVIRONMENT_ERRNOS[err.errno])
