"""Trainer callbacks shared by every stage: ctrl+c / SIGTERM as "finish the step, save, stop" (`GracefulStop`),
the one-line progress log with tokens/s, MFU and ETA (`ProgressLine`), the torch.compile report, and HF's
progress bar drawn on terminals only."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import torch
from torch._dynamo import convert_frame
from torch._dynamo.utils import counters
from tqdm.auto import tqdm
from transformers import ProgressCallback, TrainerCallback

logger = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per GPU, by a substring of torch.cuda.get_device_name().
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A800": 312e12, "H800": 989e12,
              "L40S": 362e12, "L40": 181e12, "A10": 125e12, "4090": 165e12, "3090": 71e12,
              "L4": 121e12, "V100": 125e12, "T4": 65e12}


class GracefulStop(TrainerCallback):
    """Turn SIGINT / SIGTERM into "finish this optimizer step, save a checkpoint, stop"."""

    def __init__(self):
        self.requested = False
        self.stopped_at: int | None = None
        self._previous = {}

    def install(self) -> None:
        self._pid = os.getpid()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            return  # a dataloader worker forked with this handler: ctrl+c reaches the whole process group
        if self.requested:  # a second ctrl+c stops at once
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s received: finishing the current step (and evaluation, if one runs) and saving a checkpoint "
                       "(press ctrl+c again to abort without saving)", signal.Signals(signum).name)

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(stop)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


class ProgressLine(TrainerCallback):
    """`step 420/5000 | loss 3.12 | lr 3.0e-4 | 41.2k tok/s | mfu 38% | mem 21.3GiB | eta 1h02m`, once per log
    step (MFU and peak GPU memory on GPUs only; tokens/s counts non-padding input tokens)."""

    def __init__(self, flops_per_token: float):
        self.flops_per_token = flops_per_token
        self.peak = peak_flops()
        self._last = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs or self._last is None:
            return
        now, tokens, step = time.perf_counter(), state.num_input_tokens_seen, state.global_step
        elapsed = max(now - self._last[0], 1e-9)
        tok_s = (tokens - self._last[1]) / elapsed
        step_s = elapsed / max(step - self._last[2], 1)
        self._last = (now, tokens, step)
        parts = [f"step {step}/{state.max_steps}", f"loss {logs['loss']:.4f}",
                 *([f"aux {logs['aux_loss']:.4f}"] if "aux_loss" in logs else []),  # an MoE's load balancing
                 f"lr {logs.get('learning_rate', 0):.1e}",
                 f"{tok_s / 1e3:.1f}k tok/s" if tok_s >= 1e3 else f"{tok_s:.0f} tok/s"]
        if self.peak:
            world = max(args.world_size, 1)
            parts.append(f"mfu {100 * self.flops_per_token * tok_s / (self.peak * world):.1f}%")
        if torch.cuda.is_available():
            parts.append(f"mem {torch.cuda.max_memory_allocated() / 2**30:.1f}GiB")
        parts.append(f"eta {format_duration(step_s * (state.max_steps - step))}")
        logger.info(" | ".join(parts))


def compile_counts() -> dict:
    """What torch.compile (dynamo) did in this process so far: graphs compiled, graph breaks by reason, and
    recompilations (frames compiled again because a guard failed, e.g. a new shape)."""
    breaks = counters["graph_break"]
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(breaks.values()),
            "break_reasons": [reason.splitlines()[0] for reason, _ in breaks.most_common(3)],
            "recompilations": max(counters["frames"]["total"] - len(convert_frame.input_codes.seen_ids), 0)}


class CompileReport(TrainerCallback):
    """Log once, with the first progress line, what torch.compile did over the first steps: a graph break or
    recompilation per step is where compiled training loses its speed."""

    def __init__(self):
        self.reported = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.reported or not logs or "loss" not in logs:
            return
        self.reported = True
        if state.is_world_process_zero:
            counts = compile_counts()
            logger.info("torch.compile after %d steps: %d graphs | %d graph breaks%s | %d recompilations",
                        state.global_step, counts["graphs"], counts["graph_breaks"],
                        f" ({'; '.join(counts['break_reasons'])})" if counts["break_reasons"] else "",
                        counts["recompilations"])


class QuietProgressBar(ProgressCallback):
    """HF's tqdm bar (with ETA) without printing raw log dicts; `ProgressLine` writes the log line. Drawn on a
    terminal only: in a log file or a pipe, tqdm's carriage-return redraws glue the bar to the log lines (the
    bars made here draw nothing there, so HF's callback runs unchanged)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if sys.stderr.isatty():
            super().on_train_begin(args, state, control, **kwargs)
        else:
            self.training_bar, self.current_step = tqdm(disable=True), 0

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not sys.stderr.isatty() and self.prediction_bar is None:
            self.prediction_bar = tqdm(disable=True)
        super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass
