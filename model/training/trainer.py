"""The trainer of the language-model stages and the loop driver shared by every stage.

`LanguageModelTrainer` (pretraining, SFT): token-weighted losses, the exact evaluation loss, bits per
character, length grouping. `train_until_done_or_stopped` runs any HF / TRL trainer with ctrl+c turned into
a checkpoint and resumes from the latest one.

Every loss the toolkit reports is a mean over label tokens of the whole global batch (training) or the
whole evaluation set (evaluation), so it is the same number however a batch is split into micro-batches,
accumulation steps and processes (`tests/test_invariance.py`).

Ctrl+c / SIGTERM: the current optimizer step finishes, a full checkpoint is written (weights, optimizer,
scheduler, RNG states, data position), and the run exits 0; running the same command again resumes
from the latest complete checkpoint. Under several processes the stop request is all-reduced every
step, so all ranks stop at the same step and write one checkpoint.
"""

from __future__ import annotations

import logging
import math

import torch
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import ProgressCallback, Seq2SeqTrainer, Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import TrainOutput

from model.training.arguments import TrainArguments, adafactor_options
from model.training.callbacks import CompileReport, GracefulStop, QuietProgressBar
from model.training.checkpoints import AtomicCheckpointMixin, resolve_resume, resume_label
from model.training.distillation import DistillationArguments, distillation_token_losses
from model.training.losses import ExactEvalLossMixin, token_losses
from model.training.machines import one_outcome
from model.training.outputs import checkpoint_step
from model.training.runs import global_batch
from utils.errors import UserError

logger = logging.getLogger(__name__)


def router_aux_loss_coef(config) -> float | None:
    """The weight of a mixture of experts' load-balancing loss in training, or None for a model without one.

    TRL's rule (`DPOTrainer`): a config with an `output_router_logits` field is an MoE, and its
    `router_aux_loss_coef` (0 = off) weighs the loss. The trainers request the router logits in each training
    forward, so the saved config can keep `output_router_logits` false, as Mixtral's published checkpoints do:
    transformers 5.25's `generate` fails with it on (it computes the loss on each decoding step, against the
    whole attention mask)."""
    if not hasattr(config, "output_router_logits"):
        return None
    return float(getattr(config, "router_aux_loss_coef", 0.0)) or None


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

    Mixture of experts (Mixtral; `router_aux_loss_coef`). HF's Mixtral adds `router_aux_loss_coef x aux` to
    every micro-batch's loss, so the Trainer's sum over accumulation steps (and its x processes scaling) weighed
    the load-balancing loss by accumulation x processes. Here the trained and logged `loss` is the LM loss
    (token-weighted over the global batch, invariant to the split) plus coef x the mean of the micro-batches'
    load-balancing losses; `aux_loss` (unscaled, mean over the logging window) is logged beside it, so the LM
    part is `loss - coef * aux_loss`. The load-balancing loss itself is defined per micro-batch (the share of
    its tokens routed to each expert), so that part does depend on the micro-batch size, as in HF and Megatron.
    Evaluation losses are LM losses only (comparable with a dense model's).
    """

    def __init__(self, *args, chars_per_token: dict[str, float] | None = None, teacher=None,
                 distillation: DistillationArguments | None = None, **kwargs):
        model = kwargs.get("model") if "model" in kwargs else args[0]
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.aux_loss_coef = router_aux_loss_coef(model.config)
        if (self.is_encoder_decoder or self.aux_loss_coef is not None) and kwargs.get("compute_loss_func") is None:
            kwargs["compute_loss_func"] = self.token_mean_loss
        super().__init__(*args, **kwargs)
        self.chars_per_token = chars_per_token or {}
        self.teacher, self.distillation = teacher, distillation  # model.training.distillation
        if teacher is not None:
            teacher.to(self.args.device)
        self._aux_window: list[torch.Tensor] = []  # the micro-batches' load-balancing losses since the last log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """A mixture of experts is asked for its router logits in training (see the class docstring). With a
        teacher, the distillation loss (`distillation_token_losses`) over the label tokens of the global batch,
        scaled by the process count as HF scales the cross-entropy it replaces."""
        if self.aux_loss_coef is not None and model.training:
            inputs = {**inputs, "output_router_logits": True}
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(**{k: v for k, v in inputs.items() if k != "output_router_logits"}).logits
        sums, counts = distillation_token_losses(
            outputs.logits, teacher_logits, inputs["labels"], not self.is_encoder_decoder,
            len(self.processing_class), self.distillation.kd_alpha, self.distillation.kd_temperature)
        if num_items_in_batch is None:
            loss = sums.sum() / counts.sum().clamp(min=1)
        else:
            loss = sums.sum() / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        loss = self.with_load_balancing(loss, outputs, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def token_mean_loss(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """Sum of token losses over the label tokens of the global batch (HF scales it by the process count),
        plus a mixture of experts' weighted load-balancing loss, scaled so that the step's sum over micro-batches
        and processes is its mean (see the class docstring)."""
        sums, counts = token_losses(outputs["logits"], labels, shift=not self.is_encoder_decoder)
        loss = sums.sum() / (num_items_in_batch if num_items_in_batch is not None else counts.sum().clamp(min=1))
        return self.with_load_balancing(loss, outputs, num_items_in_batch)

    def with_load_balancing(self, loss: torch.Tensor, outputs, num_items_in_batch=None) -> torch.Tensor:
        """`loss` plus a mixture of experts' weighted load-balancing loss in training, scaled so that the step's
        sum over micro-batches and processes is its mean (see the class docstring); `loss` as it is otherwise."""
        aux = outputs.get("aux_loss") if self.aux_loss_coef is not None else None
        if aux is not None and self.model.training:
            self._aux_window.append(aux.detach().float())
            scale = self.current_gradient_accumulation_steps
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                scale *= self.accelerator.num_processes  # HF's compute_loss multiplies the loss by it
            loss = loss + self.aux_loss_coef * aux.to(loss.device) / scale
        return loss

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
        if "loss" in logs and self._aux_window:  # a training log line, reached by every process together
            window, self._aux_window = torch.stack(self._aux_window), []
            logs["aux_loss"] = self.accelerator.gather(window.mean()[None]).mean().item()
        for key in [k for k in logs if k.startswith("eval_") and k.endswith("loss")]:
            name = key[len("eval_"):-len("loss")].rstrip("_") or "eval"
            ratio = self.chars_per_token.get(name) or self.chars_per_token.get("eval")
            if ratio:
                logs[key[:-len("loss")] + "bpc"] = logs[key] / math.log(2) / ratio
        super().log(logs, *args, **kwargs)


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
