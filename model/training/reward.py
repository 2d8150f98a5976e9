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

Rankings. A prompt ranked with K answers gives up to K(K-1)/2 pairs (`utils.data.conversations.expand_rankings`),
each weighted 1 / (pairs of its ranking). The loss is sum(weight x pair loss) / sum(weight) over the global
batch: InstructGPT's reward model averages the K(K-1)/2 comparisons of a prompt as one group, so that a prompt
ranked with 6 answers does not count 15 times as much as a pair. Pair data has weight 1 everywhere, which is
TRL's pair mean. The sum of weights is taken over every micro-batch of the optimizer step and every process
(`_get_num_items_in_batch`, as HF does for token-weighted losses), so the loss and its gradients are the same
however the global batch is split.

Evaluation reports the pairwise loss and accuracy (chosen scored above rejected) as exact means over
every held-out pair, weighted the same way (TRL averages one figure per evaluation batch): for rankings, the
mean over rankings of each ranking's share of correctly ordered pairs.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference, suppress_seqcls_warning

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


class WeightedPreferenceCollator(DataCollatorForPreference):
    """TRL's preference batches plus `weight`, each pair's weight (1 for a row without one)."""

    def torch_call(self, examples: list[dict]) -> dict:
        batch = super().torch_call(examples)
        batch["weight"] = torch.tensor([example.get("weight", 1.0) for example in examples], dtype=torch.float32)
        return batch


class RewardModelTrainer(ExactEvalLossMixin, AtomicCheckpointMixin, RewardTrainer):
    """TRL's `RewardTrainer` with atomic checkpoints, the toolkit's chat-template tokenisation, pairs weighted
    by ranking over the global batch and exact evaluation figures (see the module docstring). Pass datasets of
    `{prompt: [messages], chosen: str, rejected: str}` rows, optionally with a `weight` (default 1)."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the weight of the whole global batch

    def __init__(self, *, max_prompt_length: int, max_completion_length: int, data_collator=None, **kwargs):
        self.max_prompt_length, self.max_completion_length = max_prompt_length, max_completion_length
        self._model_config = kwargs["model"].config
        self._eval_correct: list[torch.Tensor] | None = None
        if data_collator is None:
            data_collator = WeightedPreferenceCollator(kwargs["processing_class"].pad_token_id,
                                                       pad_to_multiple_of=kwargs["args"].pad_to_multiple_of)
        super().__init__(data_collator=data_collator, **kwargs)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "weight" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "weight"]

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "chosen_ids" in dataset.column_names:
            return dataset
        pairs = prepare_preferences(dataset, processing_class, self.max_prompt_length, self.max_completion_length,
                                    dataset_name, args.dataset_num_proc, keep=("weight",))

        def join(row):
            return {key: scored_ids(processing_class, self._model_config, row["prompt_ids"], row[key])
                    for key in ("chosen_ids", "rejected_ids")}

        return pairs.map(join, remove_columns=["prompt_ids"], num_proc=args.dataset_num_proc)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """The weight of the optimizer step's global batch: every micro-batch's pair weights, on every process."""
        total = sum(batch["weight"].double().sum() for batch in batch_samples).to(device)
        return self.accelerator.gather(total.reshape(1)).sum() if self.accelerator.num_processes > 1 else total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """sum(weight x pair loss) of this micro-batch over the global batch's weight `num_items_in_batch`, times
        the process count (DDP and DeepSpeed average gradients over processes); in evaluation (no
        `num_items_in_batch`), this batch's weighted mean. TRL's forward and logged metrics are kept."""
        weights = inputs["weight"]
        _, outputs = super().compute_loss(model, {k: v for k, v in inputs.items() if k != "weight"},
                                          return_outputs=True)
        chosen, rejected = outputs.logits.float().squeeze(-1).chunk(2)
        pair_losses = -F.logsigmoid(chosen - rejected - inputs["margin"] if "margin" in inputs else chosen - rejected)
        if self.args.center_rewards_coefficient is not None:
            pair_losses = pair_losses + self.args.center_rewards_coefficient * (chosen + rejected) ** 2
        weights = weights.to(pair_losses)
        if num_items_in_batch is None:
            loss = (weights * pair_losses).sum() / weights.sum()
        else:
            loss = (weights * pair_losses).sum() / num_items_in_batch * self.accelerator.num_processes
        if self._eval_correct is not None:
            chosen, rejected = chosen.detach(), rejected.detach()
            self.record_eval_loss(weights * -F.logsigmoid(chosen - rejected), weights)
            correct = torch.stack([weights * (chosen > rejected), weights], dim=1).double()
            # gathered per pair (gather_for_metrics drops the pairs repeated to even out processes), then summed
            self._eval_correct.append(self.accelerator.gather_for_metrics(correct).sum(0).cpu())
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, *args, **kwargs):
        self._eval_correct = []
        try:
            output = super().evaluation_loop(*args, **kwargs)
        finally:
            correct, self._eval_correct = self._eval_correct, None
        if correct:
            # TRL's log() adds the mean of what `_metrics` holds: one exact figure over every pair
            right, weight = torch.stack(correct).sum(0).tolist()
            self._metrics["eval"]["accuracy"] = [right / weight]
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
