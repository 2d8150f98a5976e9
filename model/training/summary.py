"""The end of every training stage: the final evaluation (reused when the Trainer evaluated at the last step)
and a short table on the console of what a newcomer looks for first, read from the `training_summary.json`
dict the stage saves:

    training summary
      train loss               3.1234 (mean over the run)
      held-out loss            3.3012
      held-out bits/char       1.402
      steps                    5000
      time                     1h02m
      model                    model_save/pretrain
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from transformers import Trainer

from model.training.callbacks import format_duration

logger = logging.getLogger(__name__)

# `eval_loss`, or `eval_span_loss` / `eval_pairs_loss` when a stage evaluates several held-out sets
_EVAL_LOSS = re.compile(r"^eval_(?:(\w+)_)?loss$")
# (summary key, label, format): the preference stages' and GRPO's figures; the first key found of a label wins
_FIGURES = [
    ("eval_rewards/accuracies", "held-out reward accuracy", "{:.3f}"),  # DPO (TRL)
    ("eval_accuracy", "held-out reward accuracy", "{:.3f}"),  # reward model
    ("eval_rewards/margins", "held-out reward margin", "{:.3f}"),
    ("eval_margin", "held-out reward margin", "{:.3f}"),
    ("last_reward", "reward (last logged)", "{:.3f}"),  # GRPO
    ("eval_reward", "held-out reward", "{:.3f}"),
]


def final_evaluation(trainer: Trainer) -> dict:
    """The held-out metrics at the end of training: those the Trainer logged at the last step, when its schedule
    evaluated there (max_steps a multiple of eval_steps, or the last epoch's end), else `trainer.evaluate()`.
    Evaluating again would cost a second pass over the held-out set for the same figures and log them twice."""
    step = trainer.state.global_step
    logged = [entry for entry in trainer.state.log_history
              if entry.get("step") == step and any(key.startswith("eval_") for key in entry)]
    if not logged:
        return trainer.evaluate()
    metrics = {}
    for entry in logged:  # one entry per held-out set when there are several
        metrics.update({key: value for key, value in entry.items() if key != "step"})
    return metrics


def summary_rows(summary: dict, steps: int, model_dir: str | Path) -> list[tuple[str, str]]:
    """(label, value) rows of the table, for the figures the summary holds."""
    rows = []
    if "train_loss" in summary:
        rows.append(("train loss", f"{summary['train_loss']:.4f} (mean over the run)"))
    for key in sorted(k for k in summary if _EVAL_LOSS.match(k)):
        name = _EVAL_LOSS.match(key).group(1)
        label = f"held-out {name}" if name else "held-out"
        rows.append((f"{label} loss", f"{summary[key]:.4f}"))
        bpc = key[:-len("loss")] + "bpc"
        if bpc in summary:
            rows.append((f"{label} bits/char", f"{summary[bpc]:.3f}"))
    labels = set()
    for key, label, form in _FIGURES:
        if key in summary and label not in labels:
            labels.add(label)
            rows.append((label, form.format(summary[key])))
    rows.append(("steps", str(steps)))
    if "train_runtime" in summary:
        rows.append(("time", format_duration(summary["train_runtime"])))
    rows.append(("model", str(model_dir)))
    return rows


def log_summary(trainer: Trainer, summary: dict, model_dir: str | Path) -> None:
    """Log the table (main process only): the figures a run ends with, without opening its files."""
    if trainer.is_world_process_zero():
        rows = summary_rows(summary, trainer.state.global_step, model_dir)
        width = max(len(label) for label, _ in rows) + 3
        logger.info("training summary\n%s", "\n".join(f"  {label:<{width}}{value}" for label, value in rows))
