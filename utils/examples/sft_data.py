"""Conversations -> SFT training examples, through the tokenizer's chat template, with length limits.

T5 (encoder-decoder): one example per assistant turn. The encoder input is the conversation before that
turn rendered with the generation prompt (`utils.tokenization.chat_format.render_prompt`, the same rendering chat
and serving use; `ChatPrompts` renders and tokenises the conversation once for all its answers), the
target is the turn's content + `<|end|>` + EOS.
Llama (decoder-only): one example per conversation, the whole template rendering; labels are the input
ids on assistant tokens (the template's `{% generation %}` span, via `return_assistant_tokens_mask`) and
-100 elsewhere, so the loss covers only what the assistant says.

Over-long examples are truncated or dropped (`overlong`), and counted:
- T5 source > `max_source_length`: truncate drops the oldest turns (a system turn stays), then cuts the
  last message from the left; target > `max_target_length`: the answer is cut at the limit and loses its
  `<|end|>` (the model is not taught to stop mid-answer).
- Llama > `max_length`: cut at the limit; an example left without any assistant token is dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import datasets

from utils.errors import UserError
from utils.tokenization.chat_format import END_OF_TURN, ChatPrompts

logger = logging.getLogger(__name__)

OVERLONG = ("truncate", "drop")
IGNORE_INDEX = -100


@dataclass
class SftStats:
    """What tokenisation did to the data (logged, and saved in training_summary.json)."""

    seq2seq: bool
    conversations: int
    examples: int
    over_source: int = 0
    over_target: int = 0
    over_length: int = 0
    truncated: int = 0
    dropped: int = 0

    def describe(self) -> str:
        over = (f"{self.over_source} over the source limit, {self.over_target} over the target limit"
                if self.seq2seq else f"{self.over_length} over the length limit")
        return (f"{self.conversations:,} conversations -> {self.examples:,} examples ({over}; "
                f"{self.truncated} truncated, {self.dropped} dropped)")


def seq2seq_examples(messages: list[dict], tokenizer, max_source_length: int, max_target_length: int,
                     overlong: str) -> list[dict]:
    """One T5 example per assistant turn, with `over_source` / `over_target` / `kept` flags."""
    prompts = ChatPrompts(tokenizer, messages)  # rendered and tokenised once for all the answers
    examples = []
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        target = tokenizer(message["content"], add_special_tokens=False)["input_ids"] + [end, tokenizer.eos_token_id]
        over_source, over_target = prompts.length(index) > max_source_length, len(target) > max_target_length
        kept = overlong == "truncate" or not (over_source or over_target)
        source = prompts.render(index, max_source_length if kept else None).ids
        examples.append({"input_ids": source, "labels": target[:max_target_length], "over_source": over_source,
                         "over_target": over_target, "kept": kept})
    return examples


def causal_example(messages: list[dict], tokenizer, max_length: int, overlong: str) -> dict:
    """The whole conversation with labels on assistant tokens only, with `over_length` / `kept` flags."""
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    ids = list(encoded["input_ids"])
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, encoded["assistant_masks"])]
    over = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    kept = (overlong == "truncate" or not over) and any(label != IGNORE_INDEX for label in labels)
    return {"input_ids": ids, "labels": labels, "over_length": over, "kept": kept}


def tokenize_conversations(conversations: list[list[dict]], tokenizer, seq2seq: bool, max_source_length: int,
                           max_target_length: int, max_length: int, overlong: str = "truncate",
                           num_proc: int = 1) -> tuple[datasets.Dataset, SftStats]:
    """A dataset of `input_ids` / `labels` for the model type, and what the length limits did."""
    if overlong not in OVERLONG:
        raise UserError(f"unknown value '{overlong}'", field="overlong", fix="use truncate or drop")
    if tokenizer.chat_template is None:
        raise UserError("the tokenizer has no chat template", field="tokenizer_name_or_path",
                        fix="use a tokenizer made by train_tokenizer.py (it saves the toolkit's template)")

    def tokenize(batch):
        rows = []
        for messages in batch["messages"]:
            if seq2seq:
                rows += seq2seq_examples(messages, tokenizer, max_source_length, max_target_length, overlong)
            else:
                rows.append(causal_example(messages, tokenizer, max_length, overlong))
        return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}

    raw = datasets.Dataset.from_dict({"messages": conversations})
    tokenized = raw.map(tokenize, batched=True, remove_columns=["messages"],
                        num_proc=num_proc if num_proc > 1 else None, desc="tokenize conversations")
    flags = [c for c in ("over_source", "over_target", "over_length") if c in tokenized.column_names]
    columns = {c: tokenized[c] for c in (*flags, "kept")}
    over_any = [any(columns[c][i] for c in flags) for i in range(len(tokenized))]
    stats = SftStats(seq2seq, len(conversations), sum(columns["kept"]),
                     **{c: sum(columns[c]) for c in flags},
                     truncated=sum(o and k for o, k in zip(over_any, columns["kept"])),
                     dropped=len(tokenized) - sum(columns["kept"]))
    dataset = tokenized.filter(lambda kept: kept, input_columns="kept").remove_columns([*flags, "kept"])
    if len(dataset) == 0:
        raise UserError(f"no training examples left: {stats.describe()}", field="overlong",
                        fix="raise --max_source_length / --max_target_length / --max_length, "
                            "or use --overlong truncate")
    return dataset, stats
