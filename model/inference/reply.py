"""The life of one reply, as a small state machine, and the finished `Reply` it ends in.

    QUEUED --admit--> PREFILLING --take(first token)--> STREAMING --take(token)--> STREAMING ...
       |                  |                                 |
       +---- cancel ------+--------- take / cancel / fail --+-----> FINISHED (stop | length | cancelled | error)

    life = LiveReply(tokenizer, prompt_ids, config, stop=["。"])    # QUEUED: waiting for a batch
    life.admit()                 # the engine took it (False: it was cancelled while queued, and is finished)
    life.take(token)             # PREFILLING/STREAMING: True once this token ended the reply
    life.cancel()                # any thread: a queued reply ends at once, a running one at its next token
    life.done.wait(); life.reply # the finished Reply; life.error after fail(err)

What ends a reply, checked in this order for each token: an end-of-sequence token (EOS, the end of turn:
"stop", the token counted), a stop string in the text ("stop", the text cut before it), a cancel ("cancelled",
the token counted), `max_new_tokens` reached ("length"). The engine that computes tokens
(`model.inference.batching`) only admits, feeds tokens and fails; every decision about the reply is here.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig

from model.inference.detokenizer import ChineseTextStreamer


@dataclass
class Reply:
    """A finished reply. finish_reason: stop (end of turn / EOS / a stop string), length (max_new_tokens),
    cancelled. `token_ids`: the generated tokens (a stop string's tokens included; `text` ends before it)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    token_ids: list[int] = field(default_factory=list, repr=False)

    def text_token_ids(self, tokenizer) -> list[int]:
        """The tokens that spell `text`: when a stop string cut it, those up to the one that completes the
        text (it may run into the stop string), so per-token figures (logprobs) end where the text ends;
        otherwise every token, the end of turn included."""
        def spelled(count: int) -> int:
            return len(tokenizer.decode(self.token_ids[:count], skip_special_tokens=True).rstrip("\ufffd"))

        if spelled(len(self.token_ids)) <= len(self.text):  # not cut: one decode, not one per prefix
            return list(self.token_ids)
        return self.token_ids[:next(count for count in range(len(self.token_ids) + 1)
                                    if spelled(count) >= len(self.text))]


def why_empty(reply: Reply, tokenizer) -> str | None:
    """Why `reply` shows no text, in words for the person waiting for it; None when it has text. A reply is
    decoded without special tokens, so a model that wrote only those (a T5's sentinels, a role token) or only
    blank space until its end of turn or its max_new_tokens limit shows nothing at all."""
    if reply.text.strip():
        return None
    if reply.finish_reason == "cancelled":
        return "stopped before any text arrived"
    special = set(tokenizer.all_special_ids)
    written = reply.token_ids
    if reply.finish_reason == "stop" and written and written[-1] in special:
        written = written[:-1]  # the end-of-turn token that stopped it
    if not written:
        return "the model ended its turn at once"
    names = list(dict.fromkeys(tokenizer.convert_ids_to_tokens([t for t in written if t in special])))
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    blank = any(t not in special for t in written)
    what = " and ".join(filter(None, [f"special tokens ({shown})" if names else "", "blank space" if blank else ""]))
    if reply.finish_reason == "length":
        return f"the model wrote only {what} until the limit of {len(reply.token_ids)} new tokens (max_new_tokens)"
    return f"the model wrote only {what}, then ended its turn"


def eos_ids(config: GenerationConfig) -> set[int]:
    eos = config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


class Phase(enum.Enum):
    QUEUED = "queued"  # waiting for the engine to take it into its batch
    PREFILLING = "prefilling"  # its prompt is being read; the first token comes from that pass
    STREAMING = "streaming"  # in the running batch, one token per step
    FINISHED = "finished"  # `reply` (or `error`) is final


# The moves each phase allows (STREAMING -> STREAMING is every token after the first).
MOVES = {Phase.QUEUED: {Phase.PREFILLING, Phase.FINISHED}, Phase.PREFILLING: {Phase.STREAMING, Phase.FINISHED},
         Phase.STREAMING: {Phase.STREAMING, Phase.FINISHED}, Phase.FINISHED: set()}


class LiveReply:
    """One reply from the moment it waits for the engine to the moment it is finished (see the module).

    Thread-safe: the engine's thread admits, feeds and fails it; any thread may cancel it or wait for it.
    `on_finish(reply)` runs once, in the thread that finished it (reply None after an error). `phases` is the
    path it took, for tests and logs.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], config: GenerationConfig, stop: Sequence[str] = (),
                 on_finish: Callable[[Reply | None], object] | None = None):
        self.prompt_ids, self.config, self.on_finish = prompt_ids, config, on_finish
        self.max_new_tokens: int = config.max_new_tokens
        self.eos = eos_ids(config)
        self.streamer = ChineseTextStreamer(tokenizer, stop)
        self.streamer.closes_at_end = False  # the reader is told the text ended once `reply` is final
        self.token_ids: list[int] = []
        self.phase = Phase.QUEUED
        self.phases = [Phase.QUEUED]
        self.finish_reason: str | None = None
        self.reply: Reply | None = None
        self.error: BaseException | None = None
        self.cancelled = False  # asked to stop; a running reply ends at its next step
        self.done = threading.Event()
        self._lock = threading.Lock()

    def _move(self, phase: Phase) -> None:
        assert phase in MOVES[self.phase], f"a reply cannot go from {self.phase.value} to {phase.value}"
        if phase is not self.phase:
            self.phases.append(phase)
        self.phase = phase

    def admit(self) -> bool:
        """QUEUED -> PREFILLING: the engine takes the reply. False when it was finished first (cancelled)."""
        with self._lock:
            if self.phase is Phase.FINISHED:
                return False
            self._move(Phase.PREFILLING)
            return True

    def take(self, token: int) -> bool:
        """The next generated token (the first comes while PREFILLING). True when the reply is finished."""
        with self._lock:
            if self.phase is Phase.FINISHED:
                return True
            self._move(Phase.STREAMING)
            self.token_ids.append(token)
            if token not in self.eos:
                self.streamer.put(torch.tensor([token]))
            reason = ("stop" if token in self.eos or self.streamer.stopped else "cancelled" if self.cancelled else
                      "length" if len(self.token_ids) >= self.max_new_tokens else None)
            if reason is None:
                return False
            self._finish(reason)
        self._finished()
        return True

    def take_whole(self, tokens: list[int]) -> None:
        """A reply that arrives whole (beam search): its tokens up to the first end-of-sequence token, released
        as one piece."""
        with self._lock:
            if self.phase is Phase.FINISHED:
                return
            self._move(Phase.STREAMING)
            end = next((i + 1 for i, token in enumerate(tokens) if token in self.eos), len(tokens))
            self.token_ids = list(tokens[:end])
            self.streamer.put(torch.tensor([token for token in self.token_ids if token not in self.eos]))
            ended = end > 0 and tokens[end - 1] in self.eos
            self._finish("stop" if ended or self.streamer.stopped else "cancelled" if self.cancelled else
                         "length" if len(self.token_ids) >= self.max_new_tokens else "stop")
        self._finished()

    def cancel(self) -> None:
        """Stop the reply: at once while it is queued (no engine holds it), else at its next step."""
        with self._lock:
            self.cancelled = True
            if self.phase is not Phase.QUEUED:
                return
            self._finish("cancelled")
        self._finished()

    def end_if_cancelled(self) -> bool:
        """The engine's check between steps: a reply asked to stop ends now ("cancelled"), before another token
        is computed for it. True when the reply is finished."""
        with self._lock:
            if self.phase is Phase.FINISHED:
                return True
            if not self.cancelled:
                return False
            self._finish("cancelled")
        self._finished()
        return True

    def fail(self, error: BaseException) -> None:
        """Generation failed: the reader re-raises `error`."""
        with self._lock:
            if self.phase is Phase.FINISHED:
                return
            self.error = error
            self._move(Phase.FINISHED)
        self._finished()

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self._move(Phase.FINISHED)
        self.streamer.end()
        self.reply = Reply(self.streamer.text, len(self.prompt_ids), len(self.token_ids), reason, list(self.token_ids))

    def _finished(self) -> None:
        # Outside the lock (on_finish's bookkeeping and the woken reader may call back in), in this order: a
        # reader that sees the end finds the reply final and counted.
        try:
            if self.on_finish is not None:
                self.on_finish(self.reply)
        finally:
            self.done.set()
            self.streamer.close()
