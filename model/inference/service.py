"""The inference service chat.py and serve.py share: what a reply is generated from, and generating it.

    service = ChatService(model, tokenizer, DecodingOptions(max_new_tokens=64), max_concurrent=4)
    config = service.generation_config(temperature=0.7)        # a request's options over the defaults
    prepared = service.prepare(messages, config)               # prompt ids within the budget
    reply = await service.complete(prepared)                    # one whole reply, in a slot
    async with service.stream(prepared) as stream:             # or piece by piece, in a slot
        async for piece in stream:
            ...
    stream.reply.finish_reason                                  # stop / length / cancelled
    for piece in service.reply_stream(prepared): ...           # the terminal: synchronous, no slot
    prepared = service.prepare_prompt(ids, config, stop=["\n"])  # a raw prompt (/v1/completions)
    scores = await service.score(ids, top=1)                    # log-probabilities of the prompt's tokens

A reply may be as long as the model's context (a decoder-only model keeps 8 positions for a prompt); a
reply length nobody asked for is the model's default, at most half the context of a decoder-only model,
and the prompt gets what the reply leaves. With `batched=True` (the server) concurrent replies are generated
together in one continuous batch (`model.inference.batching`); each still equals the reply it would get
alone. No HTTP here: `model.serving` frames these calls as routes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields

import anyio
from transformers import GenerationConfig

from model.inference.batching import ContinuousBatcher
from model.inference.decoding import ModelRows
from model.inference.generation import context_length
from model.inference.reply import Reply
from model.inference.scoring import TokenScore, score_tokens
from model.inference.streaming import AsyncReplyStream, ReplyStream
from utils.errors import UserError
from utils.tokenization.chat_format import render_prompt

logger = logging.getLogger(__name__)
SAMPLING_FIELDS = ("temperature", "top_p", "top_k")


@dataclass
class DecodingOptions:
    """How to decode a reply. Every field left at None keeps the model's `generation_config.json`.

    Greedy is the toolkit's default; `--num_beams 4` is beam search; `--do_sample true` (or giving a
    temperature / top-p / top-k without --do_sample) samples; `--temperature 0` forces greedy.
    """

    max_new_tokens: int | None = field(default=None, metadata={
        "help": "Longest reply, in tokens. None = the model's generation config (256 for toolkit models)."})
    do_sample: bool | None = field(default=None, metadata={
        "help": "Sample instead of greedy/beam search. None = sample when --temperature (> 0), --top_p or "
                "--top_k is given, else the model's setting."})
    temperature: float | None = field(default=None, metadata={
        "help": "Sampling temperature (> 0 samples; 0 = greedy). None = the model's setting."})
    top_p: float | None = field(default=None, metadata={
        "help": "Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p, in (0, 1]."})
    top_k: int | None = field(default=None, metadata={
        "help": "Sample among the k most likely tokens (0 = no limit)."})
    num_beams: int | None = field(default=None, metadata={
        "help": "Beam search width (1 = no beam search). Beam replies are shown whole, not streamed."})
    repetition_penalty: float | None = field(default=None, metadata={
        "help": "Penalty > 1 discourages repeating tokens (1 = none). None = the model's (1.1 for toolkit models)."})

    def __post_init__(self):
        problems = []
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            problems.append(f"--max_new_tokens must be >= 1, not {self.max_new_tokens}")
        if self.temperature is not None and self.temperature < 0:
            problems.append(f"--temperature must be >= 0, not {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"--top_p must be in (0, 1], not {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            problems.append(f"--top_k must be >= 0, not {self.top_k}")
        if self.num_beams is not None and self.num_beams < 1:
            problems.append(f"--num_beams must be >= 1, not {self.num_beams}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            problems.append(f"--repetition_penalty must be > 0, not {self.repetition_penalty}")
        if problems:
            raise ValueError("; ".join(problems))

    def updated(self, **overrides) -> DecodingOptions:
        """A copy with the non-None `overrides` applied (e.g. the fields of one API request)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return DecodingOptions(**values)

    def generation_config(self, base: GenerationConfig) -> GenerationConfig:
        """`base` (the model's generation config) with these options applied."""
        config = copy.deepcopy(base)
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(config, f.name, value)
        sampling_asked = any(getattr(self, name) is not None for name in SAMPLING_FIELDS)
        if self.do_sample is None and sampling_asked:
            config.do_sample = True
        if self.temperature == 0:
            config.do_sample, config.temperature = False, None
        if not config.do_sample:
            # Sampling knobs inherited from the model's config would only trigger warnings under greedy.
            config.temperature = config.top_p = config.top_k = None
        if config.max_new_tokens is None:
            config.max_new_tokens = 256
        return config


class ReplyTooLong(ValueError):
    """A reply length that was asked for is outside 1 .. the longest this model can give."""

    def __init__(self, asked: int, limit: int, context: int):
        self.asked, self.limit = asked, limit
        super().__init__(f"a reply of {asked} tokens does not fit: this model's context of {context} tokens "
                         f"allows replies of 1 to {limit} tokens and leaves the rest for the prompt")

    def as_user_error(self) -> UserError:
        """The same refusal of a command's --max_new_tokens (chat.py, serve.py)."""
        return UserError(str(self), field="max_new_tokens", fix=f"lower --max_new_tokens to {self.limit} or less")


class PromptTooLong(ValueError):
    """The newest message alone (with the chat template), or with the system message, does not fit in the
    prompt budget."""

    def __init__(self, prompt_tokens: int, budget: int, what: str = "the last message alone"):
        self.prompt_tokens, self.budget, self.what = prompt_tokens, budget, what
        super().__init__(f"{what} needs {prompt_tokens} tokens but the prompt may use at most {budget}")


@dataclass
class PreparedReply:
    """What one reply is generated from: the prompt within its budget and the generation config."""

    ids: list[int]
    config: GenerationConfig
    trimmed: bool  # whether the oldest turns were left out to fit
    budget: int  # tokens the prompt could use
    stop: tuple[str, ...] = ()  # the reply ends before the first of these strings


class ChatService:
    """Replies of one model to conversations: decoding options, reply and prompt lengths, prompt rendering,
    and generation, whole or streamed, at most `max_concurrent` at once (the rest wait in line).

    `active`, `peak_active` and `recent` (finished `Reply`s, newest last) count the generations run
    through `complete` and `stream`. Raises `ReplyTooLong` when `defaults` ask for a reply longer than the
    model can give. `batched`: generate concurrent replies in one continuous batch of up to `max_concurrent`
    rows (one worker thread, `batcher`) rather than each in a thread of its own.
    """

    def __init__(self, model, tokenizer, defaults: DecodingOptions | None = None, max_concurrent: int = 1,
                 batched: bool = False):
        self.model, self.tokenizer = model, tokenizer
        self.defaults = defaults or DecodingOptions()
        self.context_length = context_length(model, tokenizer)
        self.seq2seq = bool(model.config.is_encoder_decoder)
        # The decoder's whole context for an encoder-decoder (T5); else it keeps >= 8 positions for a prompt.
        self.reply_limit = self.context_length if self.seq2seq else self.context_length - 8
        self._check_reply_length(self.defaults.max_new_tokens)
        self.slots = asyncio.Semaphore(max_concurrent)
        self.batcher = ContinuousBatcher(ModelRows(model, tokenizer), max_concurrent) if batched else None
        self.active = 0  # generations running now
        self.peak_active = 0  # the most that ever ran at once
        self.recent: collections.deque[Reply] = collections.deque(maxlen=256)
        self._counter_lock = threading.Lock()

    def _check_reply_length(self, asked: int | None) -> None:
        if asked is not None and not 1 <= asked <= self.reply_limit:
            raise ReplyTooLong(asked, self.reply_limit, self.context_length)

    def generation_config(self, **overrides) -> GenerationConfig:
        """The defaults with the non-None `overrides` (DecodingOptions fields) applied, as a generation config.

        A reply length nobody asked for is the model's default, capped for a decoder-only model at half its
        context so that a conversation keeps room (a 256-position model with the default of 256 would have
        none). Raises `ReplyTooLong` for an asked length beyond `reply_limit`.
        """
        self._check_reply_length(overrides.get("max_new_tokens"))
        options = self.defaults.updated(**overrides)
        config = options.generation_config(self.model.generation_config)
        if options.max_new_tokens is None and not self.seq2seq:
            config.max_new_tokens = max(1, min(config.max_new_tokens, self.context_length // 2))
        config.max_new_tokens = min(config.max_new_tokens, self.reply_limit)
        return config

    def prompt_budget(self, max_new_tokens: int) -> int:
        """Tokens a prompt may use: the whole context for an encoder (T5), else what the reply leaves."""
        return self.context_length if self.seq2seq else self.context_length - max_new_tokens

    def prepare(self, messages: list[dict], config: GenerationConfig, stop: Sequence[str] = ()) -> PreparedReply:
        """The prompt of `messages` within the budget `config` leaves: oldest turns go first, the system
        message stays (`render_prompt`). Raises `PromptTooLong` when the newest message does not fit even
        alone, rather than cutting it, or not with the system message, rather than answering without the
        instructions (or, retrieval-augmented, the passages) it holds. The reply ends before the first of
        the `stop` strings."""
        budget = self.prompt_budget(config.max_new_tokens)
        prompt = render_prompt(self.tokenizer, messages, budget)
        if prompt.truncated_tokens:
            raise PromptTooLong(len(prompt.ids) + prompt.truncated_tokens, budget)
        if len(messages) > 1 and messages[0]["role"] == "system" and prompt.dropped_messages == len(messages) - 1:
            needed = render_prompt(self.tokenizer, [messages[0], messages[-1]], sys.maxsize).ids
            raise PromptTooLong(len(needed), budget, "the system message with the last message")
        return PreparedReply(prompt.ids, config, prompt.trimmed, budget, tuple(stop))

    def prepare_prompt(self, ids: list[int], config: GenerationConfig, stop: Sequence[str] = ()) -> PreparedReply:
        """A raw prompt, without the chat template (a text completion). Raises `PromptTooLong` when it does
        not fit in the budget `config` leaves."""
        budget = self.prompt_budget(config.max_new_tokens)
        if len(ids) > budget:
            raise PromptTooLong(len(ids), budget)
        return PreparedReply(list(ids), config, False, budget, tuple(stop))

    def reply_stream(self, prepared: PreparedReply) -> ReplyStream:
        """The reply's pieces for a synchronous caller (the terminal chat): no slot, not counted."""
        return ReplyStream(self.model, self.tokenizer, prepared.ids, prepared.config, stop=prepared.stop)

    def _stream_of(self, prepared: PreparedReply, began: float) -> ReplyStream:
        return ReplyStream(self.model, self.tokenizer, prepared.ids, prepared.config, stop=prepared.stop,
                           on_done=lambda reply: self._ended(reply, began), batcher=self.batcher)

    async def complete(self, prepared: PreparedReply,
                       disconnected: Callable[[], Awaitable[bool]] | None = None) -> Reply:
        """The whole reply, once a slot is free. `disconnected` is polled meanwhile; when it answers True (the
        client went away) the generation stops."""
        async def watch():
            while not await disconnected():
                await asyncio.sleep(0.1)
            stream.cancel()

        async with self.stream(prepared) as stream:
            watcher = asyncio.create_task(watch()) if disconnected is not None else None
            try:
                async for _ in stream:
                    pass
            finally:
                if watcher is not None:
                    watcher.cancel()
            return stream.reply

    async def score(self, ids: list[int], top: int = 0) -> list[TokenScore]:
        """The log-probability of each of `ids` after the first given those before it, and the `top` most
        likely tokens at its place (a decoder-only model's prompt log-likelihood), once a slot is free."""
        async with self.slots:
            return await anyio.to_thread.run_sync(score_tokens, self.model, ids, top)

    @contextlib.asynccontextmanager
    async def stream(self, prepared: PreparedReply) -> AsyncIterator[AsyncReplyStream]:
        """Waits for a slot, then gives the reply to iterate over piece by piece (`reply` holds the finished
        `Reply` after the loop). Leaving the block, early too (a client that disconnects), stops the
        generation; it is counted until its thread ends."""
        async with self.slots:
            began = self._began()
            stream = self._stream_of(prepared, began)
            try:
                yield AsyncReplyStream(stream)
            finally:
                stream.cancel()
                self._never_started(stream, began)

    def _never_started(self, stream: ReplyStream, began: float) -> None:
        """Bookkeeping of a stream left before it was asked to generate (its generation never ends)."""
        if not stream.started:
            self._ended(None, began)

    def _began(self) -> float:
        with self._counter_lock:
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)
        return time.monotonic()

    def _ended(self, reply: Reply | None, began: float) -> None:
        """Bookkeeping when a generation ends (called from the generating thread)."""
        with self._counter_lock:
            self.active -= 1
        if reply is not None:
            self.recent.append(reply)
            logger.info("reply: %d prompt + %d completion tokens, %s, %.2fs", reply.prompt_tokens,
                        reply.completion_tokens, reply.finish_reason, time.monotonic() - began)
