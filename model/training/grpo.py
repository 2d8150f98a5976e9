"""Group relative policy optimisation (GRPO) through TRL's `GRPOTrainer` with a PEFT LoRA adapter, for
decoder-only (Llama) models; merged back into a plain model at the end (see grpo_train.py).

For each prompt the policy samples `num_generations` replies, every reward function scores them
(`model.training.rewards` for the rule-based ones, `model.training.reward.RewardModelScore` for a trained
reward model), the weighted sum is normalised within the prompt's group into advantages, and the policy
is moved towards the better replies of each group. TRL renders prompts with the tokenizer's chat template
(the toolkit's, saved by every stage) and stops generation at the model's end-of-turn token.

T5 is not supported: TRL's GRPO is causal-only. It generates a completion as the continuation of the
prompt's tokens and computes log-probabilities over the one concatenated sequence, so an encoder-decoder
would need a separate generation, log-probability and padding path (more than the small extension DPO
needed). A T5 model is refused before anything is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from model.training.arguments import TRAINING_IDENTITY, RunArguments
from model.training.checkpoints import AtomicCheckpointMixin
from model.training.rewards import RULE_REWARDS
from model.training.runs import counts_in_identity
from utils.data.conversations import ConversationDataArguments, hold_out, load_answered_prompts
from utils.errors import UserError
from utils.tokenization.chat_format import render_prompt

logger = logging.getLogger(__name__)

T5_REFUSAL = ("GRPO supports decoder-only models (Llama), not encoder-decoders: TRL's GRPOTrainer generates a reply "
              "as the continuation of the prompt's tokens and scores the one concatenated sequence, which a T5 "
              "model does not have")


@counts_in_identity(*TRAINING_IDENTITY, "beta", "loss_type")
@dataclass
class GRPOArguments(RunArguments, GRPOConfig):
    """TRL's `GRPOConfig` plus the toolkit's `--no_resume` / `--precision` / `--overwrite_output_dir`."""

    def __post_init__(self):
        super().__post_init__()
        # GRPO's batches hold prompt and completion ids, not `input_ids`, for HF to count; TRL counts the
        # prompt and reply tokens into `num_input_tokens_seen` itself (the progress line's tokens/s)
        self.include_num_input_tokens_seen = "no"


@dataclass
class RewardFunctionArguments:
    rewards: list[str] = field(default_factory=lambda: ["exact_answer", "format", "repetition"], metadata={
        "help": f"Rule-based rewards, any of {', '.join(RULE_REWARDS)} (see model/training/rewards.py); weighted "
                "by --reward_weights in this order, then --reward_model."})
    reward_model: str | None = field(default=None, metadata={
        "help": "A reward_train.py output directory whose score is one more reward (last in --reward_weights)."})
    repetition_ngram: int = field(default=4, metadata={
        "help": "Character n-grams the repetition reward counts repeats of."})

    def __post_init__(self):
        unknown = [name for name in self.rewards if name not in RULE_REWARDS]
        if unknown:
            raise ValueError(f"--rewards: unknown {', '.join(unknown)}; choose from {', '.join(RULE_REWARDS)}")
        if not self.rewards and not self.reward_model:
            raise ValueError("give at least one reward: --rewards and / or --reward_model")
        if self.repetition_ngram < 1:
            raise ValueError(f"--repetition_ngram must be at least 1, not {self.repetition_ngram}")


@dataclass
class PromptDataArguments(ConversationDataArguments):
    train_files: list[str] = field(default_factory=lambda: ["data/sft"], metadata={
        "help": "Prompts with reference answers: any instruction format (the answer is the reference) or preference "
                "format (the chosen answer is) of utils/data/conversations.py."})
    max_prompt_length: int = field(default=256, metadata={
        "help": "Prompt tokens; longer prompts are left out (and counted)."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "System turn put first in prompts that have none (use the one SFT used)."})

    def __post_init__(self):
        super().__post_init__()
        if self.max_prompt_length < 8:
            raise ValueError("--max_prompt_length must be at least 8")


def load_prompts(data: PromptDataArguments, tokenizer, seed: int) -> tuple[Dataset, Dataset | None]:
    """(train, validation) datasets of `{prompt: [messages], answer: reference}`; prompts longer than
    --max_prompt_length are left out (GRPO has no prompt truncation of its own)."""

    def prompts(files, split, field):
        rows = load_answered_prompts(files, data.data_format, split, data.system_prompt, field)
        kept = [{"prompt": r["prompt"], "answer": r["chosen"]} for r in rows
                if not render_prompt(tokenizer, r["prompt"], data.max_prompt_length).trimmed]
        if len(kept) < len(rows):
            logger.warning("%d of %d prompts are longer than --max_prompt_length %d tokens: left out",
                           len(rows) - len(kept), len(rows), data.max_prompt_length)
        if not kept:
            raise UserError("no prompt fits --max_prompt_length", path=", ".join(files), field="max_prompt_length",
                            fix="raise --max_prompt_length, or pass shorter prompts")
        return kept

    train = prompts(data.train_files, data.dataset_split, "train_files")
    if data.validation_files:
        held = prompts(data.validation_files, "validation", "validation_files")
    else:
        train, held = hold_out(train, data.validation_ratio, seed)
    return Dataset.from_list(train), Dataset.from_list(held) if held else None


class PolicyTrainer(AtomicCheckpointMixin, GRPOTrainer):
    """TRL's `GRPOTrainer` with atomic checkpoints (ctrl+c saves and the same command resumes)."""
