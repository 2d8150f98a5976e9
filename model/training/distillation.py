"""Logit distillation for pretraining and SFT: a larger toolkit model that shares the student's tokenizer (the
teacher) gives its next-token distribution at every position the loss counts, and the student learns from it
and from the data (Hinton et al.'s knowledge distillation, MiniLLM's / minimind's "white-box" distillation):

    loss per token = (1 - alpha) * CE(data) + alpha * T^2 * KL(teacher_T || student_T)

with `_T` the softmax at temperature T (`--kd_temperature`; T^2 keeps the gradient's scale as T changes) and
alpha `--kd_alpha`. The sum runs over exactly the tokens cross-entropy counts (labels not -100: SFT's masked
prompt counts in neither) and is divided, like the toolkit's cross-entropy, by the label tokens of the whole
global batch, so the loss and its gradients do not depend on how a batch is split
(`LanguageModelTrainer.compute_loss`). Evaluation reports the student's plain cross-entropy (and bits per
character), so runs with and without a teacher compare directly.

    python pre_train.py --model_config llama-demo --teacher_model_name_or_path model_save/pretrain_big
    python sft_train.py --teacher_model_name_or_path model_save/sft_big --kd_alpha 0.5 --kd_temperature 2

TRL's GKDTrainer is on-policy distillation for SFT (the student generates, the teacher scores its samples):
it is built for chat data and generation at every step, and does not cover pretraining; this loss term runs in
the toolkit's own trainer for both, on the same data pipeline. The teacher is frozen, in evaluation mode, on
every process beside the student (its memory adds to the student's; under DeepSpeed it is not sharded).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model.build import count_parameters, is_seq2seq, load_model
from utils.errors import UserError
from utils.hub import local_dir
from utils.tokenization.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class DistillationArguments:
    teacher_model_name_or_path: str | None = field(default=None, metadata={"identity": "content",
        "help": "A larger toolkit model with the student's tokenizer whose next-token distributions the student "
                "learns (logit distillation). None: no teacher. A teacher with another tokenizer: answer through "
                "an API with distill_data.py instead."})
    kd_alpha: float = field(default=0.5, metadata={
        "help": "Weight of the distillation term: loss = (1 - kd_alpha) * cross-entropy + kd_alpha * T^2 * KL."})
    kd_temperature: float = field(default=2.0, metadata={
        "help": "Softmax temperature of teacher and student in the KL term (higher: softer distributions)."})

    def __post_init__(self):
        if not 0 <= self.kd_alpha <= 1:
            raise UserError(f"must be between 0 and 1, not {self.kd_alpha}", field="kd_alpha",
                            fix="pass --kd_alpha 0.5 (0: data only, 1: teacher only)")
        if self.kd_temperature <= 0:
            raise UserError(f"must be positive, not {self.kd_temperature}", field="kd_temperature",
                            fix="pass --kd_temperature 1.0 or 2.0")


def load_teacher(args: DistillationArguments, student, tokenizer, attn_implementation: str = "sdpa"):
    """The frozen teacher, or None without one. Refuses a teacher whose tokenizer is not the student's (their
    distributions would be over different tokens) or of the other architecture family."""
    if not args.teacher_model_name_or_path:
        return None
    path = local_dir(args.teacher_model_name_or_path, "teacher_model_name_or_path")
    if load_tokenizer(path, "teacher_model_name_or_path").get_vocab() != tokenizer.get_vocab():
        raise UserError("the teacher's tokenizer is not the student's: logit distillation compares distributions "
                        "over the same tokens", path=path, field="teacher_model_name_or_path",
                        fix="pass a teacher trained with the student's tokenizer, or distil through answers: "
                            "python distill_data.py")
    teacher = load_model(path, tokenizer, attn_implementation)
    if is_seq2seq(teacher.config) != is_seq2seq(student.config):
        raise UserError(f"the teacher is a {type(teacher).__name__}, the student a {type(student).__name__}: "
                        "logit distillation needs the same kind of model (encoder-decoder or decoder-only)",
                        path=path, field="teacher_model_name_or_path", fix="pass a teacher of the student's family")
    teacher.requires_grad_(False).eval()
    logger.info("teacher %s: %s, %s parameters | kd_alpha %g, kd_temperature %g", path, type(teacher).__name__,
                f"{count_parameters(teacher):,}", args.kd_alpha, args.kd_temperature)
    return teacher


def distillation_token_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                              shift: bool, vocab: int, alpha: float, temperature: float,
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example sums over label tokens of (1 - alpha) CE + alpha T^2 KL(teacher_T || student_T), and the number
    of those tokens (`model.training.losses.token_losses`'s shape). `vocab`: the tokenizer's size: the KL term
    compares the first `vocab` logits (embedding rows padded past it are not tokens, and teacher and student
    may pad differently); the cross-entropy is the student's own, over all its logits."""
    if shift:
        student_logits, teacher_logits, labels = student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
    labels = labels.to(student_logits.device)
    mask = labels.ne(-100)
    student = student_logits.float()
    cross_entropy = F.cross_entropy(student.reshape(-1, student.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                    reduction="none").view(labels.shape)  # as `token_losses` computes it
    student_log = F.log_softmax(student[..., :vocab] / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher_logits[..., :vocab].float().to(student.device) / temperature, dim=-1)
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum(-1) * temperature**2
    per_token = (1 - alpha) * cross_entropy + alpha * kl
    return torch.where(mask, per_token, 0).sum(-1), mask.sum(-1)


def teacher_kl(student, teacher, batches, shift: bool, vocab: int) -> float:
    """Mean KL(teacher || student) per label token over `batches` (T = 1): how far the student is from the
    teacher, for tests and benchmarks."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            sums, counts = distillation_token_losses(student(**batch).logits, teacher(**batch).logits,
                                                     batch["labels"], shift, vocab, alpha=1.0, temperature=1.0)
            total, tokens = total + sums.sum().item(), tokens + counts.sum().item()
    return total / max(tokens, 1)
