"""Reward models: TRL's `RewardTrainer` on the toolkit's preference pairs, and scoring replies with the result.

A reward model is the SFT model with its LM head replaced by a one-output score head
(`AutoModelForSequenceClassification`, `num_labels=1`), trained on the Bradley-Terry pairwise loss
`-log sigmoid(r(prompt, chosen) - r(prompt, rejected))`. It reads a pair exactly as DPO does
(`model.training.dpo.prepare_preferences`: the chat-template prompt, each answer followed by `<|end|>`,
the same length limits), so DPO, reward models and GRPO agree on what an answer is.

Which token is scored. Llama's sequence classifier scores the last non-padding token, here the answer's
`<|end|>`. T5's (`T5ForSequenceClassification`) runs encoder and decoder over the same tokens and scores
the decoder state at the tokenizer's EOS, which every sequence must hold once: the small extension for
T5 is to append EOS to what it reads (`scored_ids`). TRL's trainer is otherwise used as it is.

Evaluation reports the pairwise loss and accuracy (chosen scored above rejected) as exact means over
every held-out pair (TRL averages one figure per evaluation batch).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import suppress_seqcls_warning

from model.build import check_tokenizer_keeps_ids, is_seq2seq
from model.training.arguments import TRAINING_IDENTITY, RunArguments
from model.training.checkpoints import AtomicCheckpointMixin
from model.training.dpo import prepare_preferences
from model.training.losses import ExactEvalLossMixin
from model.training.runs import counts_in_identity
from utils.errors import UserError
from utils.tokenization.chat_format import answer_ids, render_prompt
from utils.tokenization.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

SUPPORTED = ("llama", "t5")  # families whose sequence classifier is tested with the toolkit's chat format


@counts_in_identity(*TRAINING_IDENTITY)
@dataclass
class RewardArguments(RunArguments, RewardConfig):
    """TRL's `RewardConfig` plus the toolkit's `--no_resume` / `--precision` / `--overwrite_output_dir`."""


def load_reward_model(path: str, tokenizer, trained: bool = False) -> PreTrainedModel:
    """A model directory as a reward model: an SFT output gets a fresh score head (seeded by the caller's
    `set_seed`), a reward model's directory loads as it is. Stock HF classes, no remote code. `trained`:
    refuse a directory that is not a trained reward model (a causal LM would score with a random head)."""
    check_tokenizer_keeps_ids(path, tokenizer)
    fix = f"pass a reward_train.py output directory (reward_train.py --model_name_or_path {path} trains one)"
    if trained:
        architectures = AutoConfig.from_pretrained(path).architectures or []
        if not any(name.endswith("ForSequenceClassification") for name in architectures):
            raise UserError(f"not a reward model: config.json names {', '.join(architectures) or 'no architecture'}, "
                            "not a ...ForSequenceClassification with a trained score head", path=path,
                            field="reward_model", fix=fix)
    # for an SFT output the new score head and the unused LM head are expected; TRL's context then also drops
    # the head from the missing keys, so a trained reward model is loaded without it
    with contextlib.nullcontext() if trained else suppress_seqcls_warning():
        model, loading = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1,
                                                                            output_loading_info=True)
    if trained and loading["missing_keys"]:
        raise UserError(f"the reward model's checkpoint lacks weights ({', '.join(sorted(loading['missing_keys'])[:3])}"
                        "): they would be random", path=path, field="reward_model", fix=fix)
    if model.config.model_type not in SUPPORTED:
        raise UserError(f"reward models are built for {', '.join(SUPPORTED)}, not '{model.config.model_type}'",
                        path=path, field="model_name_or_path", fix="start from a Llama or T5 sft_train.py output")
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id  # the classifier finds the last token by it
    return model


def scored_ids(tokenizer, model_config, prompt_ids: list[int], answer: list[int]) -> list[int]:
    """The tokens a reward model reads for one answer: the rendered prompt and the answer (ending with
    `<|end|>`), plus, for T5, the EOS whose decoder state is scored (see the module docstring)."""
    ids = prompt_ids + answer
    return ids + [tokenizer.eos_token_id] if is_seq2seq(model_config) else ids


class RewardModelTrainer(ExactEvalLossMixin, AtomicCheckpointMixin, RewardTrainer):
    """TRL's `RewardTrainer` with atomic checkpoints, the toolkit's chat-template tokenisation and exact
    evaluation figures. Pass datasets of `{prompt: [messages], chosen: str, rejected: str}` rows."""

    def __init__(self, *, max_prompt_length: int, max_completion_length: int, **kwargs):
        self.max_prompt_length, self.max_completion_length = max_prompt_length, max_completion_length
        self._model_config = kwargs["model"].config
        self._eval_correct: list[torch.Tensor] | None = None
        super().__init__(**kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "chosen_ids" in dataset.column_names:
            return dataset
        pairs = prepare_preferences(dataset, processing_class, self.max_prompt_length, self.max_completion_length,
                                    dataset_name, args.dataset_num_proc)

        def join(row):
            return {key: scored_ids(processing_class, self._model_config, row["prompt_ids"], row[key])
                    for key in ("chosen_ids", "rejected_ids")}

        return pairs.map(join, remove_columns=["prompt_ids"], num_proc=args.dataset_num_proc)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self._eval_correct is not None:
            chosen, rejected = outputs.logits.detach().float().squeeze(-1).chunk(2)
            self.record_eval_loss(-F.logsigmoid(chosen - rejected), torch.ones_like(chosen))
            self._eval_correct.append(self.accelerator.gather_for_metrics((chosen > rejected).double()).cpu())
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, *args, **kwargs):
        self._eval_correct = []
        try:
            output = super().evaluation_loop(*args, **kwargs)
        finally:
            correct, self._eval_correct = self._eval_correct, None
        if correct:
            # TRL's log() adds the mean of what `_metrics` holds: one exact figure over every pair
            self._metrics["eval"]["accuracy"] = [torch.cat(correct).mean().item()]
        return output


class RewardModelScore:
    """A trained reward model as a GRPO reward function: the score of each (prompt, completion), read
    exactly as the reward model was trained (`scored_ids`). Named after the directory in GRPO's logs."""

    def __init__(self, path: str, max_prompt_length: int, device: torch.device | str = "cpu", batch_size: int = 16):
        self.tokenizer = load_tokenizer(path, "reward_model")
        self.model = load_reward_model(path, self.tokenizer, trained=True).to(device).eval()
        self.max_prompt_length, self.device, self.batch_size = max_prompt_length, device, batch_size
        self.__name__ = "reward_model"

    @torch.inference_mode()
    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        sequences = [scored_ids(self.tokenizer, self.model.config,
                                render_prompt(self.tokenizer, prompt, self.max_prompt_length).ids,
                                answer_ids(self.tokenizer, completion[-1]["content"]))
                     for prompt, completion in zip(prompts, completions)]
        scores = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(sequences), self.batch_size):
            batch = sequences[start:start + self.batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in batch], device=self.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch], device=self.device)
            scores += self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist()
        return scores
