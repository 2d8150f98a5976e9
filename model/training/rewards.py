"""Rule-based rewards for GRPO, in TRL's reward-function form: `f(prompts, completions, completion_ids, **columns)`
returns one float per completion. GRPO logs each under its name (`rewards/<name>/mean`) and sums them with
`--reward_weights`.

- `exact_answer`: 1 when the reply gives the reference answer (the dataset's answer to the prompt), else 0.
  A numeric reference is matched by the reply's last number ("3+4 等于 7。" gives 7); any other reference
  by the whole reply, both compared after NFKC (full-width digits and letters become ASCII), without
  spaces and without trailing punctuation.
- `format`: 1 when the reply ends with the end-of-turn token `<|end|>` (it finished its turn instead of
  being cut off at --max_completion_length), else 0.
- `repetition`: minus the share of the reply's character n-grams that repeat an earlier one
  (`utils.data.text.repeated_ngram_share`): 0 for no repetition, towards -1 for a reply that says one
  phrase over and over.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from utils.data.text import repeated_ngram_share
from utils.tokenization.chat_format import END_OF_TURN

RULE_REWARDS = ("exact_answer", "format", "repetition")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_TRAILING = "。.！!？?，,；;：:、 \n\t"


def _reply(completion) -> str:
    """The text of a completion: a string, or TRL's conversational `[{"role": "assistant", "content": ...}]`."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def _normalise(text: str) -> str:
    return "".join(unicodedata.normalize("NFKC", text).split()).rstrip(_TRAILING)


def _number(text: str) -> float | None:
    found = _NUMBER.findall(unicodedata.normalize("NFKC", text).replace(",", ""))
    return float(found[-1]) if found else None


def answer_matches(reply: str, reference: str) -> bool:
    """Whether `reply` gives `reference` (see the module docstring)."""
    wanted = _normalise(reference)
    if _NUMBER.fullmatch(wanted.replace(",", "")):
        return _number(reply) == float(wanted.replace(",", ""))
    return _normalise(reply) == wanted


def exact_answer(completions, answer, **kwargs) -> list[float]:
    return [float(answer_matches(_reply(c), reference)) for c, reference in zip(completions, answer)]


def format_reward(end_of_turn_id: int) -> Callable:
    def format(completion_ids, **kwargs) -> list[float]:  # shadows the builtin: the name GRPO logs
        return [float(bool(ids) and ids[-1] == end_of_turn_id) for ids in completion_ids]
    return format


def repetition_reward(n: int) -> Callable:
    def repetition(completions, **kwargs) -> list[float]:
        return [-repeated_ngram_share(_reply(c), n) for c in completions]
    return repetition


def rule_rewards(names: list[str], tokenizer, repetition_ngram: int) -> list[Callable]:
    """The reward functions called `names` (of `RULE_REWARDS`), for a policy with `tokenizer`."""
    made = {"exact_answer": lambda: exact_answer,
            "format": lambda: format_reward(tokenizer.convert_tokens_to_ids(END_OF_TURN)),
            "repetition": lambda: repetition_reward(repetition_ngram)}
    return [made[name]() for name in names]
