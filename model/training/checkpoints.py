"""Checkpoints and the final save: atomic checkpoints for any HF `Trainer` (`AtomicCheckpointMixin`), the
checkpoint a run resumes from (`resolve_resume`), and `save_final`, the one final save of every stage (a full
model, a LoRA adapter, a merged model). Names of what an output directory holds: `model.training.outputs`.
Several machines without a shared output directory each get every file (`model.training.machines`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from safetensors import safe_open
from transformers import PreTrainedModel, Trainer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import rotate_checkpoints

from model.training.callbacks import format_duration
from model.training.card import base_lineage, lineage_entry, write_model_card
from model.training.machines import share_files
from model.training.outputs import (
    FINAL_STAGING_DIR,
    FINISHED_FILE,
    RUN_FILE,
    STAGING_DIR,
    checkpoint_name,
    checkpoint_step,
    latest_checkpoint,
)
from utils.config import run_config, save_config
from utils.errors import UserError
from utils.io import honour_umask
from utils.tokenization.chat_format import default_generation_config

logger = logging.getLogger(__name__)


def resume_label(resume) -> str:
    return checkpoint_name(checkpoint_step(resume)) if resume else "none (step 0)"


def resolve_resume(args) -> str | None:
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


class AtomicCheckpointMixin:
    """Atomic checkpoints for any HF `Trainer` subclass (mix in first: `class T(AtomicCheckpointMixin, Trainer)`).

    A checkpoint is written under `output_dir/.staging/` and renamed into place once complete (after all
    ranks have written their part), so `kill -9` during a save never leaves a partial `checkpoint-N`
    for the next run to resume from. Rotation (`save_total_limit`) happens after the rename.

    A run resumed from the checkpoint of its last step (stopped in that step, or killed during the final save)
    trains no further: HF would run one step past `max_steps` (its epoch loop takes a step before it checks).

    A checkpoint whose weights are saved under other names than the model's modules hold them is loaded through
    `from_pretrained` (`_load_from_checkpoint`).
    """

    _staging = False

    def _run_epoch(self, *args, **kwargs):
        if self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """HF's load of a checkpoint's weights, except where the file's layout is not the modules': transformers 5
        saves a mixture of experts in the hub's layout (Mixtral: each expert's w1 / w2 / w3 apart, the router as
        `block_sparse_moe.gate`) and converts it back in `from_pretrained`, while the Trainer's resume reads the file
        with a plain `load_state_dict(strict=False)`, which leaves every expert and router weight at its initial
        value with only a warning (transformers#48805, 5.25). Such a checkpoint is read by `from_pretrained` and its
        weights copied in, every one of them (strict)."""
        target = model if model is not None else self.model
        saved = checkpoint_weight_names(Path(resume_from_checkpoint))
        if not isinstance(target, PreTrainedModel) or saved is None or saved <= set(target.state_dict()):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = type(target).from_pretrained(resume_from_checkpoint, dtype=target.dtype)
        target.load_state_dict(loaded.state_dict(), strict=True)
        logger.info("loaded the weights of %s through from_pretrained (saved in the hub's layout)",
                    resume_from_checkpoint)

    def _get_output_dir(self, trial):
        base = super()._get_output_dir(trial)
        return os.path.join(base, STAGING_DIR) if self._staging else base

    def _save_checkpoint(self, model, trial):
        run_dir = Path(self._get_output_dir(trial))
        name = checkpoint_name(self.state.global_step)
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


def checkpoint_weight_names(checkpoint: Path) -> set[str] | None:
    """The weight names of a checkpoint's safetensors file(s), or None when it has none (an adapter's)."""
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    if not (checkpoint / "model.safetensors").is_file():
        return None
    with safe_open(checkpoint / "model.safetensors", "pt") as weights:
        return set(weights.keys())


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
    staging = output / FINAL_STAGING_DIR
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
    if writes and hasattr(trainer.accelerator.unwrap_model(model), "peft_config"):
        model.generation_config.save_pretrained(staging)  # PEFT saves none; an adapter's consumers stop by it
    if writes:
        tokenizer.save_pretrained(staging)
        save_config(staging, *configs, overrides=config_overrides)
        if "train_runtime" in summary:
            summary = {**summary, "train_runtime_human": format_duration(summary["train_runtime"])}
        run_record = Path(trainer.args.output_dir) / RUN_FILE
        stage = "train"
        if run_record.is_file():
            shutil.copy2(run_record, staging / RUN_FILE)
            stage = json.loads(run_record.read_text(encoding="utf-8")).get("stage", stage)
        config, steps = run_config(*configs, overrides=config_overrides), trainer.state.global_step
        summary = {**summary, "lineage": [*base_lineage(config.get("model_name_or_path")),
                                          lineage_entry(stage, output, summary, steps)]}
        (staging / "training_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        trainer.state.save_to_json(str(staging / "trainer_state.json"))  # the whole run, for plots
        (staging / "training_args.bin").unlink(missing_ok=True)
        saved = trainer.accelerator.unwrap_model(model)
        if not hasattr(saved, "peft_config"):  # an adapter keeps the card PEFT writes beside it
            write_model_card(staging, output, saved, config, summary, stage, steps, trainer.args.world_size)
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
