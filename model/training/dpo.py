"""Direct preference optimisation with TRL's `DPOTrainer` and a PEFT LoRA adapter, for decoder-only (Llama)
and encoder-decoder (T5) models, merged back into a plain model at the end (see dpo_train.py).

The reference policy is the base model with the adapter disabled (TRL does this when `ref_model` is None
and the model is a PEFT model), so there is no second copy of the model in memory. LoRA's B matrices start
at zero, so at step 0 the policy equals the reference and the sigmoid loss is exactly ln 2.

Encoder-decoder extension. TRL >= 0.29 supports only causal LMs in `DPOTrainer` (PR #3906 removed the
encoder-decoder path). Instead of pinning an old TRL, `PreferenceTrainer` subclasses the current one and
changes three things for T5, keeping TRL's `DPOConfig`, every `loss_type`, `ld_alpha`, WPO weighting,
precomputed reference log-probs and the metrics (rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/*, logits/*, entropy):
1. data: the prompt is the encoder input; chosen and rejected are decoder sequences
   `[decoder_start] + answer` (`DataCollatorForSeq2SeqPreference`). The batch keeps TRL's layout
   (`input_ids`, `attention_mask`, `completion_mask`, chosen rows then rejected rows) for the decoder side
   and adds `prompt_input_ids` / `prompt_attention_mask` for the encoder.
2. forward: TRL computes per-token log-probs by calling `model(..., labels=, fused_lm_head=True)` on a
   causal LM (`trl.trainer.utils.add_fused_lm_head`). `add_seq2seq_fused_lm_head` gives T5 the same call:
   encoder on the prompt, decoder on `input_ids`, and the decoder states projected through the LM head by
   TRL's own `ChunkedLogProbFunction`. Since decoder position t predicts token t+1, the outputs have the
   causal shapes `(batch, seq_len - 1)` that TRL's `_compute_loss` slices with `completion_mask[:, 1:]`.
3. nothing else: TRL's `_compute_loss`, loss variants, metrics, reference handling and logging are reused
   as they are.

Both architectures tokenise the same way (`tokenize_preference`): the prompt through the tokenizer's chat
template exactly as SFT and inference render it (`utils.tokenization.chat_format.render_prompt`: ends with
`<|assistant|>\\n`, oldest turns dropped to fit `max_prompt_length`), each answer as `text<|end|>`, the
tokens a reply ends with. For Llama the collator, fused LM head, loss and metrics are stock TRL.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass

import torch
from datasets import Dataset
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel
from trl import DPOConfig, DPOTrainer
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.utils import FusedCausalLMOutput

from model.build import is_seq2seq
from model.training.arguments import TRAINING_IDENTITY, RunArguments
from model.training.checkpoints import AtomicCheckpointMixin
from model.training.losses import ExactEvalLossMixin
from model.training.runs import counts_in_identity
from utils.errors import UserError
from utils.tokenization.chat_format import answer_ids, render_prompt

logger = logging.getLogger(__name__)

_LOGPROB_CHUNK = 32768  # vocabulary columns per tile of the chunked LM head (TRL's default)


@counts_in_identity(*TRAINING_IDENTITY, "beta", "loss_type", "loss_weights", "label_smoothing")
@dataclass
class DPOArguments(RunArguments, DPOConfig):
    """TRL's `DPOConfig` plus the toolkit's `--no_resume` / `--precision` / `--overwrite_output_dir`."""


def tokenize_preference(example: dict, tokenizer, max_prompt_length: int, max_completion_length: int) -> dict:
    """Token ids of one `{prompt: [messages], chosen: str, rejected: str}` pair: the chat-template prompt
    (ending with `<|assistant|>\\n`) and each answer followed by `<|end|>`, cut to the length limits."""
    messages = list(example["prompt"])
    prompt = render_prompt(tokenizer, messages, max_prompt_length)  # oldest turns dropped as inference does
    answers = {}
    for key in ("chosen", "rejected"):
        ids = answer_ids(tokenizer, example[key])
        answers[f"{key}_ids"], answers[f"{key}_cut"] = ids[:max_completion_length], len(ids) > max_completion_length
    return {"prompt_ids": prompt.ids, "prompt_cut": prompt.trimmed, **answers}


def prepare_preferences(dataset: Dataset, tokenizer, max_prompt_length: int, max_completion_length: int,
                        name: str, num_proc: int | None = None, keep: tuple[str, ...] = ()) -> Dataset:
    """Tokenise preference pairs (`tokenize_preference`), log how many were cut, and drop pairs whose chosen
    and rejected answers are the same tokens (they carry no preference). `keep`: columns to carry over (the
    reward model keeps each pair's `weight`; DPO trains every pair as one example)."""
    if "prompt_ids" in dataset.column_names:
        return dataset
    dropped = [column for column in dataset.column_names if column not in keep]
    dataset = dataset.map(tokenize_preference, remove_columns=dropped, num_proc=num_proc,
                          desc=f"Tokenizing {name} pairs",
                          fn_kwargs={"tokenizer": tokenizer, "max_prompt_length": max_prompt_length,
                                     "max_completion_length": max_completion_length})
    cuts = {key: sum(dataset[f"{key}_cut"]) for key in ("prompt", "chosen", "rejected")}
    dataset = dataset.remove_columns([f"{key}_cut" for key in cuts])
    kept = dataset.filter(lambda row: row["chosen_ids"] != row["rejected_ids"], num_proc=num_proc)
    logger.info("%s: %d pairs | prompts shortened to %d tokens: %d | answers cut to %d tokens: %d chosen, %d "
                "rejected | dropped (chosen = rejected): %d", name, len(kept), max_prompt_length, cuts["prompt"],
                max_completion_length, cuts["chosen"], cuts["rejected"], len(dataset) - len(kept))
    if not len(kept):
        raise UserError(f"no usable preference pairs in the {name} data (every chosen equals its rejected)",
                        field="train_files", fix="pass pairs whose chosen and rejected answers differ")
    return kept


@dataclass
class DataCollatorForSeq2SeqPreference:
    """Batches of an encoder-decoder preference dataset in TRL's layout: the first half of the rows are the
    chosen answers, the second half the rejected ones, each on the same prompt.

    - `prompt_input_ids`, `prompt_attention_mask`: the encoder input (the prompt), right-padded;
    - `input_ids`, `attention_mask`: the decoder input `[decoder_start] + answer`, right-padded;
    - `completion_mask`: 1 on the answer tokens, i.e. the decoder positions whose token is scored.
    """

    pad_token_id: int
    decoder_start_token_id: int

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [torch.tensor(e["prompt_ids"]) for e in examples] * 2
        answers = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        decoder = [torch.tensor([self.decoder_start_token_id, *a]) for a in answers]
        completion = [torch.tensor([0] + [1] * len(a)) for a in answers]
        batch = {
            "prompt_input_ids": pad_sequence(prompts, batch_first=True, padding_value=self.pad_token_id),
            "prompt_attention_mask": pad_sequence([torch.ones_like(p) for p in prompts], batch_first=True),
            "input_ids": pad_sequence(decoder, batch_first=True, padding_value=self.pad_token_id),
            "attention_mask": pad_sequence([torch.ones_like(d) for d in decoder], batch_first=True),
            "completion_mask": pad_sequence(completion, batch_first=True),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples])
        return batch


def _seq2seq_fused_forward(self, *args, fused_lm_head=False, labels=None, prompt_input_ids=None,
                           prompt_attention_mask=None, **kwargs):
    """`forward` of a T5 model with TRL's fused-LM-head call: with `fused_lm_head=True`, `input_ids` are the
    decoder tokens, `prompt_input_ids` the encoder's, and the output is a `FusedCausalLMOutput` of the
    decoder's next-token log-probs (plus entropy, mean logit, top-1, WPO term) where `labels[:, 1:]` is set.
    Without it, the model's own forward (generation is unchanged)."""
    if not fused_lm_head:
        if labels is not None:
            kwargs["labels"] = labels
        return type(self).forward(self, *args, **kwargs)
    if args:
        raise TypeError("the fused LM head takes keyword arguments only")
    for unused in ("use_cache", "num_items_in_batch", "shift_labels", "output_router_logits"):
        kwargs.pop(unused, None)
    encoded = self.get_encoder()(input_ids=prompt_input_ids, attention_mask=prompt_attention_mask)
    decoded = self.get_decoder()(input_ids=kwargs.pop("input_ids"), attention_mask=kwargs.pop("attention_mask", None),
                                 encoder_hidden_states=encoded.last_hidden_state,
                                 encoder_attention_mask=prompt_attention_mask, use_cache=False, **kwargs)
    hidden = decoded.last_hidden_state[:, :-1]
    if getattr(self.config, "scale_decoder_outputs", self.config.tie_word_embeddings):
        hidden = hidden * (self.model_dim ** -0.5)  # as T5ForConditionalGeneration.forward does before lm_head
    labels = labels[:, 1:]
    mask = labels != -100
    head = self.get_output_embeddings()
    fields = ChunkedLogProbFunction.apply(hidden[mask], head.weight, head.bias, labels[mask], 1.0, _LOGPROB_CHUNK,
                                          None, 1.0, ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
    # masked_scatter keeps an all-masked batch connected to the graph (a differentiable zero), as TRL does
    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (
        x.new_zeros(mask.shape).masked_scatter(mask, x) for x in fields)
    loss = -log_probs.sum() / mask.sum().clamp(min=1)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                               mean_logits=mean_logits, is_top1=is_top1, label_mask=mask)


def add_seq2seq_fused_lm_head(model: PreTrainedModel) -> None:
    """Give a T5 model TRL's `model(..., labels=, fused_lm_head=True)` call (replacing the causal one TRL adds)."""
    if model.config.model_type not in ("t5", "mt5", "umt5"):
        raise UserError(f"DPO supports T5-family encoder-decoders, not '{model.config.model_type}'",
                        field="model_name_or_path", fix="use a T5 or a decoder-only model")
    model.forward = types.MethodType(_seq2seq_fused_forward, model)


class PreferenceTrainer(ExactEvalLossMixin, AtomicCheckpointMixin, DPOTrainer):
    """TRL's `DPOTrainer` with atomic checkpoints, the toolkit's chat-template tokenisation
    (`tokenize_preference`) for both architectures, the encoder-decoder extension for T5 (see the
    module docstring) and an evaluation loss weighted by pairs (`ExactEvalLossMixin`). Pass datasets of
    `{prompt: [messages], chosen: str, rejected: str}` rows."""

    def __init__(self, *, model, max_prompt_length: int, max_completion_length: int, data_collator=None,
                 **kwargs):
        self.max_prompt_length, self.max_completion_length = max_prompt_length, max_completion_length
        self.seq2seq = is_seq2seq(model.config)
        if self.seq2seq and data_collator is None:
            tokenizer = kwargs["processing_class"]
            start = model.config.decoder_start_token_id
            data_collator = DataCollatorForSeq2SeqPreference(tokenizer.pad_token_id,
                                                             tokenizer.pad_token_id if start is None else start)
        super().__init__(model=model, data_collator=data_collator, **kwargs)
        self._install_seq2seq_head()

    def _install_seq2seq_head(self) -> None:
        if self.seq2seq:
            model = self.accelerator.unwrap_model(self.model)
            add_seq2seq_fused_lm_head(model.get_base_model() if hasattr(model, "get_base_model") else model)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """TRL's step; its loss is the mean over the batch's pairs (chosen rows, then rejected rows). TRL does not
        expose per-pair losses, so each pair carries its batch's mean: exact unless accelerate repeats pairs
        to even out the last batch across processes (a validation set that is a multiple of
        per_device_eval_batch_size x processes avoids that)."""
        pairs = len(inputs["input_ids"]) // 2
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        self.record_eval_loss(loss.detach().reshape(1).expand(pairs), torch.ones(pairs, device=loss.device))
        return loss, logits, labels

    def _prepare_dataset(self, dataset, processing_class, args: DPOConfig, dataset_name: str):
        return prepare_preferences(dataset, processing_class, self.max_prompt_length, self.max_completion_length,
                                   dataset_name, args.dataset_num_proc)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        self._install_seq2seq_head()  # DPOTrainer.__init__ precomputes before our __init__ could install it
        return super()._precompute_ref_logps(dataset, name, batch_size)
