"""Training helpers shared by every stage: graceful ctrl+c, atomic checkpoints, resume discovery,
the one-line progress log with tokens/s and MFU, token-weighted losses and bits per character at evaluation.

Every loss the toolkit reports is a mean over label tokens of the whole global batch (training) or the
whole evaluation set (evaluation), so it is the same number however a batch is split into micro-batches,
accumulation steps and processes (`tests/test_invariance.py`).

Ctrl+c / SIGTERM: the current optimizer step finishes, a full checkpoint is written (weights, optimizer,
scheduler, RNG states, data position), and the run exits 0; running the same command again resumes
from the latest complete checkpoint. Under several processes the stop request is all-reduced every
step, so all ranks stop at the same step and write one checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch._dynamo import convert_frame
from torch._dynamo.utils import counters
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import ProgressCallback, Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainerCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, rotate_checkpoints

from model.build import check_precision
from model.training.machines import one_outcome, share_files
from model.training.runs import FINISHED_FILE, RUN_FILE, global_batch
from utils.config import save_config
from utils.errors import UserError
from utils.io import honour_umask
from utils.tokenization.chat_format import default_generation_config

logger = logging.getLogger(__name__)

STAGING_DIR = ".staging"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")

# Dense bf16 peak FLOP/s per GPU, by a substring of torch.cuda.get_device_name().
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A800": 312e12, "H800": 989e12,
              "L40S": 362e12, "L40": 181e12, "A10": 125e12, "4090": 165e12, "3090": 71e12,
              "L4": 121e12, "V100": 125e12, "T4": 65e12}


@dataclass
class RunArguments:
    """The toolkit's switches on top of any HF / TRL training-arguments class (mixed in first):
    `TrainArguments` for our trainers, `model.training.dpo.DPOArguments` for TRL's `DPOConfig`."""

    no_resume: bool = field(default=False, metadata={
        "help": "Start this run over: remove its checkpoints in --output_dir (default: resume from the latest)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace another run's model and checkpoints in --output_dir (default: refuse; see "
                "model/training/runs.py)."})
    precision: str = field(default="auto", metadata={
        "help": "auto (bf16 on GPUs that support it, else fp32), bf16, fp16 or fp32. Sets --bf16/--fp16."})
    # HF's bool field, widened to take auto; true/false and True/False (a saved config.yaml) stay accepted.
    torch_compile: Literal["auto", "true", "false", True, False] = field(default=False, metadata={
        "help": "torch.compile the model: auto = on with a CUDA GPU, off on CPU (config/pretrain.yaml sets auto), "
                "true or false. The first steps compile (about a minute for a 0.2B model); the compiled graphs, "
                "graph breaks and recompilations are logged once, at the first progress line."})

    def __post_init__(self):
        check_precision(self.precision, "precision")
        if self.precision == "auto":
            self.bf16 = bool(self.bf16 or (torch.cuda.is_available() and torch.cuda.is_bf16_supported()))
        else:
            self.bf16, self.fp16 = self.precision == "bf16", self.precision == "fp16"
        if not torch.cuda.is_available():
            # CPU-only: several processes (accelerate launch --multi_gpu --num_processes 2) run DDP over gloo
            self.use_cpu, self.dataloader_pin_memory = True, False
        if self.optim_args and getattr(self.optim, "value", self.optim) == "adafactor":  # not galore_adafactor
            adafactor_options(self.optim_args)  # refuse bad options before any data is tokenised
        if self.include_num_input_tokens_seen in ("no", False):
            self.include_num_input_tokens_seen = "non_padding"  # the progress line's tokens/s and MFU
        if isinstance(self.torch_compile, str):
            auto = self.torch_compile == "auto"
            self.torch_compile = torch.cuda.is_available() if auto else self.torch_compile == "true"
        if self.use_liger_kernel:
            check_liger_kernel()
        if self.dataloader_num_workers == 0:
            self.dataloader_persistent_workers = False  # a recipe's setting that means nothing without workers
        super().__post_init__()


def check_liger_kernel() -> None:
    """Refuse --use_liger_kernel where HF would fail only once the data is tokenised: Liger's kernels are Triton
    kernels for CUDA GPUs, installed apart (requirements-gpu.txt)."""
    if not torch.cuda.is_available():
        raise ValueError("--use_liger_kernel needs a CUDA GPU (Liger's kernels are Triton kernels; there is no CPU "
                         "path); leave it off on CPU")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError("--use_liger_kernel needs the liger-kernel package: pip install -r requirements-gpu.txt")


@dataclass
class TrainArguments(RunArguments, Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` plus the toolkit's resume switch."""


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step (checkpoints appear only by an atomic rename)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint was saved at (its trainer_state.json, else its name checkpoint-N)."""
    state = Path(path) / "trainer_state.json"
    if state.is_file():
        return int(json.loads(state.read_text())["global_step"])
    found = _CHECKPOINT.match(Path(path).name)
    return int(found.group(1)) if found else 0


def resume_label(resume) -> str:
    return f"checkpoint-{checkpoint_step(resume)}" if resume else "none (step 0)"


def resolve_resume(args: TrainArguments) -> str | None:
    """`--resume_from_checkpoint PATH` if given, else the latest checkpoint unless `--no_resume`."""
    if args.resume_from_checkpoint:
        if not Path(args.resume_from_checkpoint).is_dir():
            raise UserError("checkpoint not found", path=args.resume_from_checkpoint,
                            field="resume_from_checkpoint", fix="pass a checkpoint-N directory of --output_dir")
        return args.resume_from_checkpoint
    if args.no_resume:
        return None
    found = latest_checkpoint(args.output_dir)
    return str(found) if found else None


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


def plan_steps(args, examples: int) -> tuple[int, int]:
    """(examples per optimizer step, optimizer steps) for a training set of `examples`: the global batch, and
    --max_steps or else the steps of --num_train_epochs epochs."""
    per_step = global_batch(args)
    return per_step, args.max_steps if args.max_steps > 0 else math.ceil(examples * args.num_train_epochs / per_step)


def describe_plan(args, examples: int, unit: str) -> str:
    """`32 pairs/step (batch 8 x accum 4 x 1 processes) | 120 steps`: the plan of a training set of `examples`
    (`plan_steps`), for a stage's start-up log line."""
    per_step, steps = plan_steps(args, examples)
    return (f"{per_step} {unit}/step (batch {args.per_device_train_batch_size} x accum "
            f"{args.gradient_accumulation_steps} x {args.world_size} processes) | {steps} steps")


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


class AtomicCheckpointMixin:
    """Atomic checkpoints for any HF `Trainer` subclass (mix in first: `class T(AtomicCheckpointMixin, Trainer)`).

    A checkpoint is written under `output_dir/.staging/` and renamed into place once complete (after all
    ranks have written their part), so `kill -9` during a save never leaves a partial `checkpoint-N`
    for the next run to resume from. Rotation (`save_total_limit`) happens after the rename.

    A run resumed from the checkpoint of its last step (stopped in that step, or killed during the final save)
    trains no further: HF would run one step past `max_steps` (its epoch loop takes a step before it checks).
    """

    _staging = False

    def _run_epoch(self, *args, **kwargs):
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _get_output_dir(self, trial):
        base = super()._get_output_dir(trial)
        return os.path.join(base, STAGING_DIR) if self._staging else base

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging, self.args.save_total_limit = False, limit
        self.accelerator.wait_for_everyone()
        share_files(run_dir / STAGING_DIR / name, self.args)  # machines without shared storage: each gets all parts
        if self.args.should_save:
            if (run_dir / RUN_FILE).is_file():  # the checkpoint names the run it belongs to
                shutil.copy2(run_dir / RUN_FILE, run_dir / STAGING_DIR / name / RUN_FILE)
            honour_umask(run_dir / STAGING_DIR / name)  # safetensors writes model.safetensors 0600
            final = run_dir / name
            if final.exists():
                shutil.rmtree(final)
            os.replace(run_dir / STAGING_DIR / name, final)
            shutil.rmtree(run_dir / STAGING_DIR, ignore_errors=True)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
        self.accelerator.wait_for_everyone()


ADAFACTOR_OPTIONS = {"scale_parameter": bool, "beta1": float, "clip_threshold": float, "decay_rate": float}


def adafactor_options(text: str) -> dict:
    """`scale_parameter=true,beta1=0.9` -> Adafactor keyword arguments (the ones that combine with a
    learning-rate schedule; `relative_step` would replace the schedule and is refused)."""
    options = {}
    for item in filter(None, text.replace(" ", "").split(",")):
        key, _, value = item.partition("=")
        kind = ADAFACTOR_OPTIONS.get(key)
        if kind is None or not value:
            raise UserError(f"'{item}' is not an Adafactor option this toolkit passes on", field="optim_args",
                            fix=f"use key=value pairs of {', '.join(ADAFACTOR_OPTIONS)} (the learning rate "
                                "and its schedule come from --learning_rate / --lr_scheduler_type)")
        if kind is bool:
            if value.lower() not in ("true", "false"):
                raise UserError(f"{key} must be true or false, not '{value}'", field="optim_args",
                                fix=f"pass {key}=true or {key}=false")
            options[key] = value.lower() == "true"
        else:
            try:
                options[key] = float(value)
            except ValueError:
                raise UserError(f"{key} must be a number, not '{value}'", field="optim_args",
                                fix=f"pass e.g. {key}=0.9") from None
    return options


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """HF's `LengthGroupedSampler` (shuffle, then sort by length within mega-batches of 50 batches) with
    its shuffle seeded by (seed, epoch), so a resumed run replays exactly the batches of the interrupted one.
    `batch_size` is the global batch (micro-batch x accumulation x processes), so the order of examples
    does not depend on how a batch is split."""

    def __init__(self, batch_size: int, lengths, seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return super().__iter__()


def token_losses(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example sums of the cross-entropy over label tokens (-100 ignored) and the number of those tokens.
    `shift`: causal LMs predict token i+1 at position i (labels are the inputs)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.to(logits.device)
    losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                             reduction="none").view(labels.shape)
    return losses.sum(-1), labels.ne(-100).sum(-1)


class ExactEvalLossMixin:
    """The evaluation loss as one weighted mean over the whole evaluation set (mix in first).

    HF averages one loss per evaluation batch, each repeated by the *first* batch's size, so a short last
    batch counts as a full one and the figure moves with the evaluation batch size and process count. A
    subclass's `prediction_step` instead calls `record_eval_loss(sums, weights)` with per-example loss sums
    and weights (label tokens, or pairs); they are gathered per example, which drops the examples accelerate
    repeats to even out the last batch across processes, and `{prefix}_loss` becomes sum / weight.
    """

    _eval_sums: list[torch.Tensor] | None = None

    def record_eval_loss(self, sums: torch.Tensor, weights: torch.Tensor) -> None:
        if self._eval_sums is not None:
            per_example = torch.stack([sums.detach().double(), weights.detach().double()], dim=1)
            self._eval_sums.append(self.accelerator.gather_for_metrics(per_example).sum(0).cpu())

    def evaluation_loop(self, *args, **kwargs):
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        self._eval_sums = []
        try:
            output = super().evaluation_loop(*args, **kwargs)
        finally:
            sums, self._eval_sums = self._eval_sums, None
        if sums:
            loss_sum, weight = torch.stack(sums).sum(0).tolist()
            output.metrics[f"{prefix}_loss"] = loss_sum / max(weight, 1e-12)
        return output


class LanguageModelTrainer(ExactEvalLossMixin, AtomicCheckpointMixin, Seq2SeqTrainer):
    """`Seq2SeqTrainer` with atomic checkpoints (`AtomicCheckpointMixin`), token-weighted losses, bits per
    character in evaluation logs, and `--train_sampling_strategy group_by_length` read from a dataset's own
    `lengths` (the pretraining datasets know them; HF would otherwise load every example to measure it).

    Losses. HF's Trainer sums the micro-batch losses of a step and expects each to be normalised by the
    label tokens of the whole global batch (`num_items_in_batch`). Llama's loss does that; T5's ignores it
    and returns its micro-batch mean, so the logged loss grew with accumulation steps and processes (x8 at
    accumulation 4 on 2 GPUs) and its gradients weighted tokens by micro-batch. T5 therefore gets the
    token-sum loss as `compute_loss_func`. Evaluation sums every example's token losses and divides once by
    all label tokens, whatever the evaluation batch size or process count (HF averages batch means).
    """

    def __init__(self, *args, chars_per_token: dict[str, float] | None = None, **kwargs):
        model = kwargs.get("model") if "model" in kwargs else args[0]
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        if self.is_encoder_decoder and kwargs.get("compute_loss_func") is None:
            kwargs["compute_loss_func"] = self.token_mean_loss
        super().__init__(*args, **kwargs)
        self.chars_per_token = chars_per_token or {}

    def token_mean_loss(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """Sum of token losses over the label tokens of the global batch (HF scales it by the process count)."""
        sums, counts = token_losses(outputs["logits"], labels, shift=False)
        return sums.sum() / (num_items_in_batch if num_items_in_batch is not None else counts.sum().clamp(min=1))

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        """HF's optimizer choice, plus `--optim adafactor --optim_args scale_parameter=true,...`: HF's handler
        ignores `optim_args` for Adafactor and turns parameter scaling off; with `scale_parameter=true` each
        update is relative to the parameter's RMS (T5's original optimizer, which suits T5's initialisation:
        its query weights start 8x smaller than the others), while the learning-rate schedule stays ours."""
        optimizer_cls, kwargs = Seq2SeqTrainer.get_optimizer_cls_and_kwargs(args, model)
        if args.optim == "adafactor" and args.optim_args:
            kwargs.update(adafactor_options(args.optim_args))
        return optimizer_cls, kwargs

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = getattr(dataset, "lengths", None)
        if self.args.train_sampling_strategy != "group_by_length" or lengths is None:
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return EpochLengthGroupedSampler(global_batch(self.args), lengths.tolist(), seed)

    def _get_eval_sampler(self, eval_dataset):
        """In order: the evaluation loss is a token-weighted sum, so grouping by length buys nothing, and HF's
        grouped sampler would measure every example by loading it."""
        if self.args.world_size <= 1:
            return torch.utils.data.SequentialSampler(eval_dataset)
        return None  # accelerate shards the evaluation set in order

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        if not prediction_loss_only or "labels" not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys, **gen_kwargs)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**inputs)
        sums, counts = token_losses(outputs["logits"], inputs["labels"], shift=not self.is_encoder_decoder)
        self.record_eval_loss(sums, counts)
        return (sums.sum() / counts.sum().clamp(min=1)).detach(), None, None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        for key in [k for k in logs if k.startswith("eval_") and k.endswith("loss")]:
            name = key[len("eval_"):-len("loss")].rstrip("_") or "eval"
            ratio = self.chars_per_token.get(name) or self.chars_per_token.get("eval")
            if ratio:
                logs[key[:-len("loss")] + "bpc"] = logs[key] / math.log(2) / ratio
        super().log(logs, *args, **kwargs)


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


def train_until_done_or_stopped(trainer: Trainer, args: TrainArguments) -> TrainOutput | None:
    """Run `trainer.train()` with ctrl+c / SIGTERM turned into "save a checkpoint and stop", resuming
    from the latest checkpoint of `args.output_dir` (see `resolve_resume`).

    Returns the train output when training ran to the end, or None when a signal stopped it (after the
    checkpoint was saved and the resume hint logged). Works for any HF `Trainer` subclass (TRL's too).
    """
    stopper = GracefulStop()
    trainer.add_callback(stopper)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgressBar())
    if args.torch_compile:
        trainer.add_callback(CompileReport())
    resume = one_outcome(lambda: resolve_resume(args), "the step to resume from", describe=resume_label,
                         fix="give every machine the same latest checkpoint-N of --output_dir (copy it from the "
                             "machine that has it), or start over on every machine with --no_resume")
    done = checkpoint_step(resume) if resume else 0
    if resume and not args.resume_from_checkpoint:
        logger.info("resuming from %s (pass --no_resume to start over)", resume)
    if resume and 0 < args.max_steps < done:
        raise UserError(f"the run has trained {done} steps already, past --max_steps {args.max_steps}",
                        path=resume, field="max_steps",
                        fix=f"pass --max_steps {done} or more to go on from there, --no_resume to start over, or "
                            "--resume_from_checkpoint an earlier checkpoint-N with another --output_dir")
    stopper.install()
    try:
        with logging_redirect_tqdm():
            result = trainer.train(resume_from_checkpoint=resume)
    finally:
        stopper.uninstall()
    if stopper.stopped_at is None:
        if trainer.state.global_step == done:  # resumed at its last step: HF's mean of no steps is 0, not a loss
            result.metrics.pop("train_loss", None)
            logger.info("the run had trained all %d steps before it stopped; writing its final model", done)
        return result
    if trainer.is_world_process_zero():
        logger.warning("stopped at step %d; checkpoint saved in %s. Run the same command again to resume "
                       "(or add --no_resume to start over).", stopper.stopped_at, args.output_dir)
    return None


def save_final(trainer: Trainer, tokenizer, configs: list, summary: dict, output_dir: str | Path | None = None,
               model=None, config_overrides: dict | None = None) -> Path:
    """Write the model, tokenizer, generation config, resolved config (`config.yaml`),
    `training_summary.json` and `trainer_state.json` (the log history) into `output_dir` (default
    `args.output_dir`) through a staging directory, so the final model is never half-written: files are
    renamed into place one by one, `config.json` second to last, so a loader only sees a model once its
    weights are complete, and `training_summary.json` (`FINISHED_FILE`) last, after the old one was removed
    first: a rerun sees the run as finished only when every file is in place. Machines that do not share the
    output directory each write the whole final model (`model.training.machines`).

    `model` (default `trainer.model`) lets a stage save something else than the trained module, e.g.
    DPO's merged model; `config_overrides` are recorded in `config.yaml` over the configs' own values (DPO
    records the command's --output_dir, not the adapter directory its trainer writes to). The summary
    gains `train_runtime_human` from `train_runtime`, and `run.json` is copied from the trainer's output.
    The generation config written is the toolkit's (`utils.tokenization.chat_format.default_generation_config`:
    stop on EOS or <|end|>).
    """
    model = model if model is not None else trainer.model
    output = Path(output_dir or trainer.args.output_dir)
    staging = output / ".final-staging"
    writes, saves = trainer.is_world_process_zero(), trainer.args.should_save
    if saves:  # the main process, and each machine's first where the machines do not share the output directory
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    model.generation_config = default_generation_config(tokenizer, model.config)
    if model is trainer.model and is_deepspeed_zero3_enabled():
        trainer.save_model(str(staging))  # ZeRO-3: the parameters are gathered from every rank
    elif writes:
        # the module itself, not HF's DeepSpeed state-dict copy: tied weights (T5's shared embeddings and head)
        # keep one storage, so they are saved once
        trainer.accelerator.unwrap_model(model).save_pretrained(staging)
    if writes:
        tokenizer.save_pretrained(staging)
        save_config(staging, *configs, overrides=config_overrides)
        if "train_runtime" in summary:
            summary = {**summary, "train_runtime_human": format_duration(summary["train_runtime"])}
        run_record = Path(trainer.args.output_dir) / RUN_FILE
        if run_record.is_file():
            shutil.copy2(run_record, staging / RUN_FILE)
        (staging / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        trainer.state.save_to_json(str(staging / "trainer_state.json"))  # the whole run, for plots
        (staging / "training_args.bin").unlink(missing_ok=True)
    trainer.accelerator.wait_for_everyone()
    share_files(staging, trainer.args)
    if saves:
        honour_umask(staging)  # safetensors writes model.safetensors 0600
        (output / FINISHED_FILE).unlink(missing_ok=True)
        for path in sorted(staging.iterdir(), key=lambda p: (p.name == FINISHED_FILE, p.name == "config.json")):
            target = output / path.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(path, target)
        shutil.rmtree(staging, ignore_errors=True)
        logger.info("saved the model to %s", output)
    trainer.accelerator.wait_for_everyone()
    return output
