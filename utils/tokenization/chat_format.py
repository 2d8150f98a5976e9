"""The toolkit's one conversation format: the chat template saved with every tokenizer, its tokens, prompt
rendering within a token budget, and the generation settings that stop at the end of a turn.

Every stage renders prompts here: SFT (the prompt an answer is trained after), rejected-answer generation
and DPO (the prompt of a preference pair), chat, serving and evaluation. So a model is always asked in
exactly the format it was trained on, trimmed the same way when a conversation is too long.

    prompt = render_prompt(tokenizer, messages, max_prompt_tokens=512)
    prompt.ids, prompt.dropped_messages, prompt.truncated_tokens    # what fitting the budget took out
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass

from transformers import GenerationConfig, PreTrainedConfig

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
CHAT_TOKENS = [*ROLE_TOKENS.values(), END_OF_TURN]

# The one conversation format of the toolkit. Each turn is `<|role|>\n{content}<|end|>\n`; a prompt for
# generation ends with `<|assistant|>\n`. Assistant content is wrapped in {% generation %} so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` marks the tokens SFT trains on.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('Unknown role: ' + message['role'] + ' (use system, user or assistant)') }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else -%}"
    "{{ message['content'] + '<|end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)

# `{% generation %}` is transformers' own Jinja extension; other renderers (llama.cpp, ollama) reject it.
GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


def gguf_chat_template(template: str) -> str:
    """`template` as plain Jinja for llama.cpp's GGUF metadata: the `{% generation %}` markers go (they only
    mark the assistant tokens SFT trains on), so it renders the same text everywhere."""
    return GENERATION_TAG.sub("", template)


def ollama_template() -> str:
    """The toolkit's chat template in ollama's Go template syntax (a Modelfile's TEMPLATE): each message
    `<|role|>\n{content}<|end|>\n`, then the assistant generation prompt, as CHAT_TEMPLATE renders it."""
    return ("{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}" + END_OF_TURN + "\n{{ end }}"
            + ROLE_TOKENS["assistant"] + "\n")


def default_generation_config(tokenizer, config: PreTrainedConfig) -> GenerationConfig:
    """The toolkit's generation defaults for a model of `config` with `tokenizer`."""
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    eos = [tokenizer.eos_token_id] + ([end] if end not in (None, tokenizer.unk_token_id) else [])
    return GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id,
                            decoder_start_token_id=tokenizer.pad_token_id if seq2seq else None,
                            max_new_tokens=256, repetition_penalty=1.1)


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of an assistant answer as the model writes it after a rendered prompt: the text, then
    `<|end|>` (what DPO, reward models and GRPO's reward-model scores read)."""
    return tokenizer(answer + END_OF_TURN, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class RenderedPrompt:
    """A generation prompt's token ids and what fitting it into its budget took out."""

    ids: list[int]
    dropped_messages: int = 0  # oldest messages left out (a system message counts when it goes too)
    truncated_tokens: int = 0  # tokens cut from the left of the newest message, which did not fit alone

    @property
    def trimmed(self) -> bool:
        """Whether the prompt is shorter than the conversation rendered whole."""
        return bool(self.dropped_messages or self.truncated_tokens)


def prompt_text(tokenizer, messages: list[dict]) -> str:
    """The generation prompt of `messages` as text, whole: what another runtime (llama.cpp, `model.gguf`) is
    given to tokenise, to compare with the ids `render_prompt` gives transformers."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def render_prompt(tokenizer, messages: list[dict], max_prompt_tokens: int) -> RenderedPrompt:
    """`messages` rendered with the chat template plus the assistant generation prompt, and what was trimmed.

    When the conversation is longer than `max_prompt_tokens`, the oldest turns are dropped (a system
    message stays) until it fits; the last message alone is truncated from the left if it must be.
    """
    return ChatPrompts(tokenizer, messages).render(len(messages), max_prompt_tokens)


def rerender_prompt(tokenizer, messages: list[dict], max_prompt_tokens: int) -> RenderedPrompt:
    """`render_prompt` for any chat template: render, and render again after each dropped turn (quadratic
    in the number of turns; `ChatPrompts` uses it only for templates other than the toolkit's)."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while True:
        ids = list(tokenizer.apply_chat_template(system + turns, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False))
        dropped = len(messages) - len(system) - len(turns)
        if len(ids) <= max_prompt_tokens:
            return RenderedPrompt(ids, dropped)
        if len(turns) > 1:
            turns = turns[1:]
        elif system:
            system = []
        else:
            return RenderedPrompt(ids[-max_prompt_tokens:], dropped, len(ids) - max_prompt_tokens)


class ChatPrompts:
    """The generation prompts of a conversation's beginnings, from one rendering and one tokenisation.

    `render(end, limit)` equals `render_prompt(tokenizer, messages[:end], limit)`, and SFT asks for it
    before every answer, so rendering each beginning and each trimmed candidate anew was cubic in the
    conversation's length. The toolkit's template renders a conversation as its messages rendered one by
    one, each starting with a role token, then the generation prompt `<|assistant|>\n`; the tokenizer splits
    the text at added tokens before anything else, so the ids of any run of messages are that run's slice
    of the whole tokenisation. The cuts are checked to fall on added tokens; another template, or a cut
    that fails the check, falls back to `rerender_prompt`.
    """

    def __init__(self, tokenizer, messages: list[dict]):
        self.tokenizer, self.messages = tokenizer, messages
        self.has_system = bool(messages) and messages[0]["role"] == "system"
        self.tokens: list[int] | None = None  # the whole conversation + generation prompt; None = re-render
        self.starts: list[int] = []  # token index where message i starts; starts[-1]: the generation prompt
        if messages and tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.is_fast:
            self._tokenize_once()

    def _tokenize_once(self):
        render = lambda messages, prompt: self.tokenizer.apply_chat_template(  # noqa: E731
            messages, add_generation_prompt=prompt, tokenize=False)
        pieces = [render([message], False) for message in self.messages]
        pieces.append(render(self.messages[-1:], True)[len(pieces[-1]):])
        # tokenised as apply_chat_template does, with character offsets to find the cuts
        encoded = self.tokenizer("".join(pieces), add_special_tokens=False, return_offsets_mapping=True)
        first_token_at: dict[int, int] = {}
        for index, (start, _) in enumerate(encoded["offset_mapping"]):
            first_token_at.setdefault(start, index)
        added, tokens = self.tokenizer.added_tokens_decoder, encoded["input_ids"]
        cuts, starts = 0, []
        for piece in pieces:
            index = first_token_at.get(cuts)
            if index is None or tokens[index] not in added:
                return
            starts.append(index)
            cuts += len(piece)
        self.tokens, self.starts = tokens, starts

    def length(self, end: int) -> int:
        """Tokens of `messages[:end]` rendered whole with the generation prompt (before any trimming)."""
        if self.tokens is None:
            return len(self.tokenizer.apply_chat_template(self.messages[:end], add_generation_prompt=True,
                                                          tokenize=True, return_dict=False))
        return self.starts[end] + len(self.tokens) - self.starts[-1]

    def render(self, end: int, max_prompt_tokens: int | None = None) -> RenderedPrompt:
        """`render_prompt(tokenizer, messages[:end], max_prompt_tokens)`; None = no limit, nothing dropped."""
        limit = max_prompt_tokens if max_prompt_tokens is not None else self.length(end)
        if self.tokens is None:
            return rerender_prompt(self.tokenizer, self.messages[:end], limit)
        tokens, starts = self.tokens, self.starts
        generation = tokens[starts[-1]:]
        oldest = 1 if self.has_system and end > 0 else 0  # the oldest turn after a system message
        newest = max(end - 1, oldest)  # the newest turn always stays
        system = starts[oldest]  # tokens of the system message, 0 without one
        # the oldest turn from which the conversation fits: system + starts[end] - starts[turn] + generation
        turn = bisect_left(starts, system + starts[end] + len(generation) - limit, oldest, newest + 1)
        if turn <= newest:
            return RenderedPrompt(tokens[:system] + tokens[starts[turn]:starts[end]] + generation, turn - oldest)
        alone = tokens[starts[newest]:starts[end]] + generation  # the system message goes too
        return RenderedPrompt(alone[-limit:], newest, max(len(alone) - limit, 0))
