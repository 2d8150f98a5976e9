"""Conversation data for SFT, DPO and rejected-answer generation: every instruction or preference format
read into the toolkit's one message format, `[{"role": "system"|"user"|"assistant", "content": str}, ...]`,
which the tokenizer's chat template renders.

    conversations = load_conversations(["data/sft.jsonl", "BelleGroup/train_0.5M_CN"])
    pairs = load_preferences(["data/dpo/rejected.jsonl"])

Formats, detected per file from the first row's keys (or declared with `fmt`):
- `prompt_response`: `{prompt, response}`;
- `alpaca`: `{instruction, input, output}`, optional `history` `[[question, answer], ...]` (earlier turns)
  and `system`;
- `sharegpt`: `{conversations: [{from, value}, ...]}`, `from` = human/user, gpt/assistant, system; an
  optional top-level `system` string (LLaMA-Factory's ShareGPT rows);
- `messages`: `{messages: [{role, content}, ...]}`.
Preference rows, in the shapes the peers write them:
- `chosen` and `rejected` (a string, a `{from, value}` / `{role, content}` turn, or a list holding one
  assistant turn) added to any prompt shape above: LLaMA-Factory's ShareGPT ranking rows
  `{conversations, chosen: {from, value}, rejected: {from, value}}`, TRL's explicit-prompt
  `{prompt, chosen, rejected}` with a string or a message list as prompt;
- LLaMA-Factory's alpaca pairwise rows: `{instruction, input, output: [chosen, rejected], history}`;
- `implicit_prompt`, TRL's implicit-prompt rows `{chosen: [messages], rejected: [messages]}`: two whole
  conversations, the same up to their last turn, which is the answer.
Rankings, two or more answers to one prompt (OpenAssistant ranks the replies to a message; InstructGPT's
labellers ranked 4 to 9 answers):
- LLaMA-Factory's older ranking rows: alpaca `output: [best, second, ..., worst]`;
- `answers: [...]` added to any prompt shape, best first, or in any order with `ranks` (one number per answer,
  lower is better: OpenAssistant's `rank`, 0 = best) or `scores` (higher is better); equal ranks or scores tie.
A pair is a ranking of two answers. `ranking_pairs` turns a ranking into (better, worse) pairs: `all` (every
pair of answers that do not tie: K(K-1)/2 of K), `best_vs_rest` (the best answer against each other one: K-1)
or `adjacent` (each answer against the next worse: K-1); each pair carries the weight 1 / (pairs of its
ranking), so that a ranking counts once however many answers it has (InstructGPT's reward model).

Files: `.jsonl`, `.json` (an array or JSON lines), `.parquet`, `.csv`; a directory means every file in
it. A hub id (`org/name`, not a local path) is a Hugging Face hub dataset (`datasets.load_dataset(name,
split=split)`) when the hub is allowed (`utils.hub`). Bad rows stop loading with a `UserError` naming the
file, the line (JSON lines, CSV) or row (JSON array, parquet, hub), the field and the fix.

Real chat logs have two quirks that are accepted rather than refused: user turns after the last answer
are dropped (nothing to learn from them), and empty user turns inside a multi-turn conversation are
kept (a user who pressed enter). A conversation with no answer at all is skipped; both are counted in
the log. The first user turn (the prompt) and every answer must be non-empty.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from utils.data.sources import Location, discover_inputs, read_rows
from utils.errors import UserError
from utils.hub import from_hub, missing_path

logger = logging.getLogger(__name__)

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
DataFormat = Literal["auto", "prompt_response", "alpaca", "sharegpt", "messages", "implicit_prompt"]
FORMATS = get_args(DataFormat)
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "model": "assistant"}
ANSWER_FIELDS = ("chosen", "rejected")
RankingPairs = Literal["all", "best_vs_rest", "adjacent"]
RANKING_PAIRS_HELP = ("Pairs taken from a ranking of K answers: all = every better/worse pair (K(K-1)/2), "
                      "best_vs_rest = the best answer against each other one (K-1), adjacent = each answer against "
                      "the next worse one (K-1). A row with one chosen and one rejected answer is one pair whatever "
                      "this says.")
Ranking = list[tuple[str, int]]  # answers best first, each with its tier: 0 = best, equal tiers tie


def iter_rows(name: str, split: str = "train") -> Iterator[tuple[dict, Location]]:
    """Every row of a local file / directory (`utils.data.sources.read_rows`), or of a hub dataset, with its
    location."""
    if from_hub(name):
        yield from _hub_rows(name, split)
        return
    if not Path(name).exists():
        raise missing_path(name, None, "check the path")
    for file in discover_inputs([name]):
        yield from read_rows(file)


def _hub_rows(name: str, split: str) -> Iterator[tuple[dict, Location]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # network, missing dataset or split: all the user's to fix
        raise UserError(f"no such local file or directory, and no hub dataset of that name could be loaded "
                        f"({type(err).__name__}: {err})", path=name,
                        fix="check the path, or the hub dataset name and split") from None
    for index, row in enumerate(dataset):
        yield row, Location(name, row=index)


def row_format(row: dict, location: Location) -> str:
    """The conversation format of a row (one of `FORMATS` but auto), from its keys."""
    if not isinstance(row, dict):
        raise location.error("a row is not a JSON object",
                             fix="write one object per row, e.g. {\"prompt\": \"...\", \"response\": \"...\"}")
    for fmt, key in (("messages", "messages"), ("sharegpt", "conversations"), ("alpaca", "instruction"),
                     ("prompt_response", "prompt"), ("implicit_prompt", "chosen")):
        if key in row:
            return fmt
    keys = ", ".join(map(str, row)) or "none"
    raise location.error(f"unknown data format; the row has: {keys}", fix=(
        "use {prompt, response}, alpaca {instruction, input, output}, ShareGPT {conversations: [{from, value}]} "
        "or {messages: [{role, content}]} (add chosen/rejected for preference data, or give whole conversations "
        "as {chosen: [messages], rejected: [messages]})"))


def _text(row: dict, key: str, location: Location, required: bool = True, field: str | None = None) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        problem = f"missing field '{key}'" if key not in row else f"field '{key}' is not a string"
        raise location.error(problem, field=field or key, fix=f"give every row a string '{key}'")
    return value


def _turn(turn: object, location: Location, field: str) -> Message:
    """A `{from, value}` or `{role, content}` turn as a message."""
    if isinstance(turn, dict) and "from" in turn:
        role_key, content_key = "from", "value"
    elif isinstance(turn, dict) and "role" in turn:
        role_key, content_key = "role", "content"
    else:
        raise location.error("a turn must be {from, value} or {role, content}", field=field,
                             fix="write each turn as {\"from\": \"human\", \"value\": \"...\"}")
    role = ROLES.get(str(turn[role_key]).lower())
    if role is None:
        raise location.error(f"unknown role '{turn[role_key]}'", field=f"{field}.{role_key}",
                             fix="use system, user/human or assistant/gpt")
    content = turn.get(content_key)
    if not isinstance(content, str):
        raise location.error(f"'{content_key}' is missing or not a string", field=f"{field}.{content_key}",
                             fix="give every turn its text as a string")
    return {"role": role, "content": content}


def _turns(turns: object, location: Location, field: str) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise location.error("must be a non-empty list of turns", field=field,
                             fix="write the conversation as a list of {from, value} / {role, content} turns")
    return [_turn(turn, location, f"{field}[{i}]") for i, turn in enumerate(turns)]


def row_messages(row: dict, fmt: str, location: Location, with_answer: bool = True) -> list[Message]:
    """The conversation of one row in format `fmt`. `with_answer=False` reads only the prompt part of
    the prompt-response and alpaca formats (a preference row's answers are `chosen` / `rejected`)."""
    if fmt == "prompt_response":
        prompt = row.get("prompt")
        messages = (_turns(prompt, location, "prompt") if isinstance(prompt, list)
                    else [{"role": "user", "content": _text(row, "prompt", location)}])
        if with_answer:
            messages.append({"role": "assistant", "content": _text(row, "response", location)})
    elif fmt == "alpaca":
        instruction = _text(row, "instruction", location)
        extra = _text(row, "input", location, required=False)
        system = _text(row, "system", location, required=False)
        messages = [{"role": "system", "content": system}] if system.strip() else []
        history = row.get("history") or []
        if not isinstance(history, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2
                                                    and all(isinstance(t, str) for t in p) for p in history):
            raise location.error("'history' must be a list of [question, answer] pairs", field="history",
                                 fix="write earlier turns as [[\"question\", \"answer\"], ...]")
        for question, answer in history:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": f"{instruction}\n{extra}" if extra.strip() else instruction})
        if with_answer:
            messages.append({"role": "assistant", "content": _text(row, "output", location)})
    elif fmt in ("sharegpt", "messages"):
        key = "conversations" if fmt == "sharegpt" else "messages"
        if key not in row:
            raise location.error(f"missing field '{key}'", field=key, fix=f"give every row a '{key}' list")
        messages = _turns(row[key], location, key)
        system = _text(row, "system", location, required=False) if fmt == "sharegpt" else ""
        if system.strip() and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
    elif fmt == "implicit_prompt":
        messages = _turns(row.get("chosen"), location, "chosen")
        if not with_answer:
            messages = _implicit_prompt(row, messages, location)
    else:
        raise UserError(f"unknown format '{fmt}'", field="format", fix=f"use one of {', '.join(FORMATS)}")
    return messages


def _check_prompt(messages: list[Message], location: Location, field: str) -> None:
    users = [m for m in messages if m["role"] == "user"]
    if not users or not users[0]["content"].strip():
        raise location.error("empty prompt (no user text)", field=field,
                             fix="give the row a non-empty question / instruction, or remove it")


def _answer_field(fmt: str, index: int, last: bool) -> str:
    if fmt in ("sharegpt", "messages"):
        return f"conversations[{index}].value" if fmt == "sharegpt" else f"messages[{index}].content"
    if not last:
        return "history"
    return "response" if fmt == "prompt_response" else "output"


def _finish_conversation(messages: list[Message], fmt: str, location: Location) -> list[Message] | None:
    """Drop trailing unanswered user turns, check the prompt and answers; None if nothing is answered."""
    field = _conversation_field(fmt)
    while messages and messages[-1]["role"] != "assistant":
        messages = messages[:-1]
    if not any(m["role"] == "assistant" for m in messages):
        return None
    _check_prompt(messages, location, field)
    first = 1 if messages[0]["role"] == "system" else 0
    if messages[first]["role"] != "user":
        raise location.error("the conversation starts with an answer", field=field,
                             fix="start with a user turn (after an optional system turn)")
    for index, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise location.error("empty answer", field=_answer_field(fmt, index, index == len(messages) - 1),
                                 fix="give every answer some text, or remove the row")
    return messages


def _implicit_prompt(row: dict, chosen: list[Message], location: Location) -> list[Message]:
    """The shared prompt of an implicit-prompt row: both conversations up to their last (assistant) turn."""
    rejected = _turns(row.get("rejected"), location, "rejected")
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if len(turns) < 2 or turns[-1]["role"] != "assistant":
            raise location.error("must be a whole conversation ending with the assistant's answer", field=key,
                                 fix="write [{\"role\": \"user\", ...}, {\"role\": \"assistant\", ...}]")
    if chosen[:-1] != rejected[:-1]:
        raise location.error("chosen and rejected differ before their last turn", field="rejected",
                             fix="give both the same conversation up to the answer, or use {prompt, chosen, "
                                 "rejected}")
    return chosen[:-1]


def ranked_answers(row: dict, fmt: str, location: Location) -> Ranking:
    """The answers of a preference row in format `fmt`, best first, each with its tier (0 = best; equal tiers
    tie): `[(chosen, 0), (rejected, 1)]` for a pair (see the module docstring)."""
    if fmt == "implicit_prompt":
        return [(_answer({"chosen": row["chosen"][-1]}, "chosen", location), 0),
                (_answer({"rejected": row["rejected"][-1]}, "rejected", location), 1)]
    if fmt == "alpaca" and "chosen" not in row and isinstance(row.get("output"), list):
        output = row["output"]
        if len(output) < 2:
            raise location.error(f"a pairwise 'output' holds [chosen, rejected], not {len(output)} answers",
                                 field="output", fix="write \"output\": [\"better answer\", \"worse answer\"] "
                                                     "(or a longer ranking, best first)")
        return [(_answer({f"output[{i}]": text}, f"output[{i}]", location), i) for i, text in enumerate(output)]
    if "answers" in row and "chosen" not in row:
        return _ranking(row, location)
    return [(_answer(row, "chosen", location), 0), (_answer(row, "rejected", location), 1)]


def _ranking(row: dict, location: Location) -> Ranking:
    """An `answers` row: best first, or ordered by its `ranks` (lower is better) or `scores` (higher is better)."""
    answers = row["answers"]
    if not isinstance(answers, list) or len(answers) < 2:
        raise location.error("'answers' must be a list of two or more answers", field="answers",
                             fix="write \"answers\": [\"best answer\", \"next\", ...], best first (or add 'ranks')")
    texts = [_answer({f"answers[{i}]": text}, f"answers[{i}]", location) for i, text in enumerate(answers)]
    keys = [key for key in ("ranks", "scores") if row.get(key) is not None]
    if len(keys) > 1:
        raise location.error("has both 'ranks' and 'scores'", field="scores", fix="keep one of them")
    if not keys:
        return [(text, i) for i, text in enumerate(texts)]
    key, values = keys[0], row[keys[0]]
    if not (isinstance(values, list) and len(values) == len(texts) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
        raise location.error(f"'{key}' must be a list of {len(texts)} numbers, one per answer", field=key,
                             fix="ranks: lower is better (0 or 1 = best); scores: higher is better")
    order = values if key == "ranks" else [-v for v in values]
    levels = sorted(set(order))
    if len(levels) < 2:
        raise location.error(f"all {len(texts)} answers have the same {key[:-1]}: no preference", field=key,
                             fix="rank the answers, or remove the row")
    tier = {level: i for i, level in enumerate(levels)}
    return [(text, tier[level]) for text, level in sorted(zip(texts, order), key=lambda pair: pair[1])]


def ranking_pairs(ranking: Ranking, pairs: str) -> list[tuple[str, str]]:
    """(better, worse) answer pairs of a ranking (`ranked_answers`) as `pairs` says (see the module docstring;
    answers that tie make no pair)."""
    return [(better, worse) for better, high in ranking for worse, low in ranking if low > high and (
        pairs == "all" or (pairs == "best_vs_rest" and high == 0) or (pairs == "adjacent" and low == high + 1))]


def is_preference_row(row: dict, fmt: str) -> bool:
    """Whether a row holds a preference pair or ranking rather than one answered conversation."""
    return "chosen" in row or "answers" in row or (fmt == "alpaca" and isinstance(row.get("output"), list))


def _answer(row: dict, key: str, location: Location) -> str:
    """A preference answer: a string, one `{from, value}` / `{role, content}` turn, or a list of one."""
    if key not in row:
        raise location.error(f"missing field '{key}'", field=key,
                             fix="give every preference row a 'chosen' and a 'rejected' answer")
    value = row[key]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        value = _turn(value, location, key)["content"]
    if not isinstance(value, str):
        raise location.error("must be a string or one assistant turn", field=key,
                             fix=f"write '{key}' as the answer text")
    if not value.strip():
        raise location.error("empty answer", field=key, fix="give every answer some text, or remove the row")
    return value


def _rows(paths: Sequence[str], fmt: str, split: str) -> Iterator[tuple[dict, str, Location]]:
    """Rows of every source with their format (declared, or detected from each source's first row)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}'", field="format", fix=f"use one of {', '.join(FORMATS)}")
    if not paths:
        raise UserError("no data files given", field="train_files", fix="pass one or more data files")
    for name in paths:
        detected = None if fmt == "auto" else fmt
        current_file = None
        for row, location in iter_rows(name, split):
            if location.path != current_file and fmt == "auto":  # a directory may mix formats
                current_file, detected = location.path, row_format(row, location)
            if not isinstance(row, dict):
                raise location.error("a row is not an object", fix="write one JSON object per row")
            yield row, detected, location


def load_conversations(paths: Sequence[str], fmt: str = "auto", split: str = "train",
                       system_prompt: str | None = None, field: str = "train_files") -> list[list[Message]]:
    """SFT data as conversations that end with an assistant turn (see the module docstring).

    `system_prompt` is put first in conversations that have no system turn of their own. `field`: the flag
    that named `paths`, for the error when they hold no data.
    """
    conversations: list[list[Message]] = []
    trimmed = unanswered = 0
    for row, row_fmt, location in _rows(paths, fmt, split):
        messages = row_messages(row, row_fmt, location)
        finished = _finish_conversation(messages, row_fmt, location)
        if finished is None:
            unanswered += 1
            continue
        trimmed += len(finished) < len(messages)
        if system_prompt and finished[0]["role"] != "system":
            finished = [{"role": "system", "content": system_prompt}, *finished]
        conversations.append(finished)
    if unanswered or trimmed:
        logger.warning("%d conversations without any answer skipped; %d ended with unanswered user turns "
                       "(dropped)", unanswered, trimmed)
    if not conversations:
        raise UserError("no conversations found", path=", ".join(paths), field=field,
                        fix="pass files with at least one answered prompt")
    logger.info("loaded %d conversations (%d turns) from %s", len(conversations),
                sum(len(c) for c in conversations), ", ".join(paths))
    return conversations


def load_rankings(paths: Sequence[str], fmt: str = "auto", split: str = "train",
                  field: str = "train_files") -> list[dict]:
    """Preference data as `{"prompt": [messages ending with a user turn], "answers": Ranking}`, one per row: a
    pair is a ranking of two answers (`ranked_answers`; `field`: as in `load_conversations`)."""
    rankings = []
    for row, row_fmt, location in _rows(paths, fmt, split):
        column = _conversation_field(row_fmt)
        prompt = row_messages(row, row_fmt, location, with_answer=False)
        if not prompt or prompt[-1]["role"] != "user":
            raise location.error("the prompt must end with a user turn", field=column,
                                 fix="put the answers in 'chosen' and 'rejected', not in the conversation")
        _check_prompt(prompt, location, column)
        rankings.append({"prompt": prompt, "answers": ranked_answers(row, row_fmt, location)})
    if not rankings:
        raise UserError("no preference pairs found", path=", ".join(paths), field=field,
                        fix="pass files with prompt, chosen and rejected")
    longer = [len(r["answers"]) for r in rankings if len(r["answers"]) > 2]
    if longer:
        logger.info("loaded %d rankings from %s: %d of 3 to %d answers, %d pairs", len(rankings), ", ".join(paths),
                    len(longer), max(longer), len(rankings) - len(longer))
    else:
        logger.info("loaded %d preference pairs from %s", len(rankings), ", ".join(paths))
    return rankings


def expand_rankings(rankings: list[dict], pairs: str) -> list[dict]:
    """`{"prompt", "chosen", "rejected", "weight"}` rows: the pairs of each ranking (`ranking_pairs`), each
    weighted 1 / (pairs of its ranking), so that the weights of a ranking sum to 1 (a pair row: one pair of
    weight 1)."""
    if pairs not in get_args(RankingPairs):
        raise UserError(f"unknown ranking_pairs '{pairs}'", field="ranking_pairs",
                        fix=f"use one of {', '.join(get_args(RankingPairs))}")
    rows = []
    for ranking in rankings:
        found = ranking_pairs(ranking["answers"], pairs)
        rows += [{"prompt": ranking["prompt"], "chosen": better, "rejected": worse, "weight": 1 / len(found)}
                 for better, worse in found]
    if len(rows) > len(rankings):
        logger.info("%d rankings -> %d pairs (ranking_pairs %s)", len(rankings), len(rows), pairs)
    return rows


def load_preferences(paths: Sequence[str], fmt: str = "auto", split: str = "train", field: str = "train_files",
                     pairs: str = "all") -> list[dict]:
    """Preference data as `{"prompt": [messages ending with a user turn], "chosen": str, "rejected": str,
    "weight": float}` pairs, rankings expanded as `pairs` says (`expand_rankings`; `field`: as in
    `load_conversations`)."""
    return expand_rankings(load_rankings(paths, fmt, split, field), pairs)


def load_answered_prompts(paths: Sequence[str], fmt: str = "auto", split: str = "train",
                          system_prompt: str | None = None, field: str = "train_files") -> list[dict]:
    """`{"prompt": [messages ending with a user turn], "chosen": answer}` from instruction data (the last
    answer of each conversation) or preference data (its chosen or best answer), decided per row
    (`is_preference_row`; `field`: as in `load_conversations`)."""
    items = []
    for row, row_fmt, location in _rows(paths, fmt, split):
        if is_preference_row(row, row_fmt):
            prompt = row_messages(row, row_fmt, location, with_answer=False)
            _check_prompt(prompt, location, _conversation_field(row_fmt))
            chosen = ranked_answers(row, row_fmt, location)[0][0]
        else:
            finished = _finish_conversation(row_messages(row, row_fmt, location), row_fmt, location)
            if finished is None:
                continue
            prompt, chosen = finished[:-1], finished[-1]["content"]
        if system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": system_prompt}, *prompt]
        items.append({"prompt": prompt, "chosen": chosen})
    if not items:
        raise UserError("holds no prompts (no row with a prompt and its answer)", path=", ".join(paths), field=field,
                        fix="pass files with at least one prompt and its answer")
    return items


def _conversation_field(fmt: str) -> str:
    return {"prompt_response": "prompt", "alpaca": "instruction", "sharegpt": "conversations",
            "messages": "messages", "implicit_prompt": "chosen"}[fmt]


@dataclass
class ConversationDataArguments:
    """Where a stage's conversation data comes from (SFT and DPO subclass it with their own defaults)."""

    train_files: list[str] = field(default_factory=list, metadata={
        "help": "Files or directories (.jsonl/.json/.parquet/.csv) or hub dataset names."})
    validation_files: list[str] = field(default_factory=list, metadata={
        "help": "Held-out data in the same formats; default: --validation_ratio of --train_files."})
    validation_ratio: float = field(default=0.0, metadata={
        "help": "Share of the training rows held out for evaluation when no --validation_files (0 = none)."})
    data_format: DataFormat = field(default="auto", metadata={"help": "The rows' format (auto: per file)."})
    dataset_split: str = field(default="train", metadata={"help": "Split of hub datasets."})

    def __post_init__(self):
        if not 0 <= self.validation_ratio < 1:
            raise ValueError(f"--validation_ratio must be in [0, 1), not {self.validation_ratio}")


@dataclass
class PreferenceDataArguments(ConversationDataArguments):
    """Preference pairs and their token limits (DPO and reward models)."""

    train_files: list[str] = field(default_factory=lambda: ["data/dpo"], metadata={
        "help": "Preference data: files, directories or hub datasets with a prompt and a chosen and a rejected "
                "answer (any format of utils/data/conversations.py)."})
    max_prompt_length: int = field(default=256, metadata={
        "help": "Prompt tokens (T5: encoder input); longer conversations lose their oldest turns."})
    max_completion_length: int = field(default=256, metadata={
        "help": "Tokens of each answer including <|end|>; longer answers are cut (and counted)."})
    ranking_pairs: RankingPairs = field(default="all", metadata={"identity": "unless_default", "help": RANKING_PAIRS_HELP})

    def __post_init__(self):
        super().__post_init__()
        if self.max_prompt_length < 8 or self.max_completion_length < 1:
            raise ValueError("--max_prompt_length must be at least 8 and --max_completion_length at least 1")


def load_preference_splits(data: PreferenceDataArguments, seed: int):
    """(train, validation) pairs as `datasets.Dataset`s of `expand_rankings` rows: --validation_files, else a
    seeded --validation_ratio share of the rankings (None if 0). Rankings are held out whole: no answer is on
    both sides."""
    from datasets import Dataset

    rankings = load_rankings(data.train_files, data.data_format, data.dataset_split)
    if data.validation_files:
        held = load_rankings(data.validation_files, data.data_format, "validation", "validation_files")
    else:
        rankings, held = hold_out(rankings, data.validation_ratio, seed)
    train = Dataset.from_list(expand_rankings(rankings, data.ranking_pairs))
    return train, Dataset.from_list(expand_rankings(held, data.ranking_pairs)) if held else None


def hold_out(rows: list, ratio: float, seed: int) -> tuple[list, list]:
    """(kept, held out): a seeded share `ratio` of `rows` held out (at least one row when ratio > 0), both
    in their original order. Refuses a ratio that would leave nothing to train on."""
    count = max(1, round(len(rows) * ratio)) if ratio > 0 else 0
    if count and count >= len(rows):
        raise UserError(f"--validation_ratio {ratio} leaves none of the {len(rows)} rows for training",
                        field="validation_ratio", fix="lower it, or pass --validation_files")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
