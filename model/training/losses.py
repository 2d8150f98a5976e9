"""Losses and evaluation figures that do not depend on how a batch is split: per-example token-loss sums
(`token_losses`) and the evaluation loss as one weighted mean over the whole evaluation set
(`ExactEvalLossMixin`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_losses(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example sums of the cross-entropy over label tokens (-100 ignored) and the number of those tokens.
    `shift`: causal LMs predict token i+1 at position i (labels are the inputs). Logits longer than the labels
    (prompt tuning and P-tuning put virtual tokens before a causal LM's input) lose their leading positions."""
    logits = logits[:, logits.shape[1] - labels.shape[1]:]
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
