"""Logging set-up shared by every stage: one format, main process only, quiet libraries."""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def is_main_process() -> bool:
    """True on the process that logs and saves (rank 0 under torchrun / accelerate, or no launcher)."""
    return int(os.environ.get("RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0


def setup_logging(level: int = logging.INFO) -> None:
    """Log at `level` on the main process and only warnings elsewhere; align HF libraries with it."""
    if not is_main_process():
        level = logging.WARNING
    logging.basicConfig(format=FORMAT, datefmt="%H:%M:%S", level=level, force=True)
    torch = sys.modules.get("torch")  # the training stages import it; the others need not pay for it here
    if torch is not None and not torch.cuda.is_available():
        # DeepSpeed, imported by accelerate on the first unwrap, warns "Setting accelerator to CPU" on every CPU
        # run when it has to detect the accelerator itself; without CUDA the toolkit trains on the CPU anyway
        # (model/training/arguments.py RunArguments)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity(max(level, logging.WARNING))
    datasets.utils.logging.set_verbosity(max(level, logging.WARNING))
    if not sys.stderr.isatty():
        # a log file or a pipe: tqdm redraws a bar with carriage returns, which there glue it to the log lines;
        # the trainer's progress line (model/training/callbacks.py) logs the progress instead
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
