"""The toolkit's training arguments: `RunArguments`, its switches mixed into any HF / TRL training-arguments
class (`TrainArguments` for our trainers; DPO, reward and GRPO arguments in their modules), precision and
torch.compile set from one flag, and the optimizer options the toolkit passes on (Adafactor's)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import Seq2SeqTrainingArguments

from model.build import Precision
from model.training.runs import counts_in_identity
from utils.errors import UserError

# The training settings in a run's identity (model/training/runs.py): they decide which examples each step sees
# and how the optimizer moves. A stage's own (DPO's beta, ...) are added where its arguments are.
TRAINING_IDENTITY = ("seed", "data_seed", "train_sampling_strategy", "optim", "optim_args", "learning_rate",
                     "lr_scheduler_type", "lr_scheduler_kwargs", "weight_decay", "adam_beta1", "adam_beta2",
                     "adam_epsilon", "warmup_steps", "max_grad_norm", "label_smoothing_factor")


@dataclass
class RunArguments:
    """The toolkit's switches on top of any HF / TRL training-arguments class (mixed in first):
    `TrainArguments` for our trainers, `model.training.dpo.DPOArguments` for TRL's `DPOConfig`."""

    no_resume: bool = field(default=False, metadata={
        "help": "Start this run over: remove its checkpoints in --output_dir (default: resume from the latest)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace another run's model and checkpoints in --output_dir (default: refuse; see "
                "model/training/runs.py)."})
    precision: Precision = field(default="auto", metadata={
        "help": "auto (bf16 on GPUs that support it, else fp32), bf16, fp16 or fp32. Sets --bf16/--fp16."})
    # HF's bool field, widened to take auto; true/false and True/False (a saved config.yaml) stay accepted.
    torch_compile: Literal["auto", "true", "false", True, False] = field(default=False, metadata={
        "help": "torch.compile the model: auto = on with a CUDA GPU, off on CPU (config/pretrain.yaml sets auto), "
                "true or false. The first steps compile (about a minute for a 0.2B model); the compiled graphs, "
                "graph breaks and recompilations are logged once, at the first progress line."})

    def __post_init__(self):
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


@counts_in_identity(*TRAINING_IDENTITY)
@dataclass
class TrainArguments(RunArguments, Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` plus the toolkit's resume switch."""


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
