"""The command boundary of every stage script: `run_main(main)` runs a stage's `main(argv)` as a command.

A `UserError`, and the system refusing a file (permission denied, a read-only filesystem, a full disk),
become one message and exit status 2; ctrl+c that reaches it (a second one in training, or one in the final
evaluation and save) one line and status 130: everything on disk is complete, and the same command goes on
from it. A multi-process run's process group is ended before exit.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from utils.errors import UserError, environment_error


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a stage's `main` as a command: user errors, and the system refusing a file (permission denied, a
    read-only filesystem, a full disk), become one clear message and exit status 2."""
    try:
        main(argv)
    except (UserError, OSError) as err:
        user_error = err if isinstance(err, UserError) else environment_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: what was saved is complete; run the same command again to go on", file=sys.stderr)
        sys.exit(130)
    finally:
        end_distributed()


def end_distributed() -> None:
    """Destroy the process group of a multi-process run before the interpreter exits: left to the exit
    handlers, gloo's threads can abort the shutdown ("terminate called without an active exception"), and
    a run that finished and saved its model would exit with a failure."""
    dist = sys.modules.get("torch.distributed")  # never import torch for a stage that did not
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
