"""One reply of a model, streamed piece by piece or whole, that its caller can stop.

    stream = ReplyStream(model, tokenizer, prompt_ids, config)  # generation runs in its own thread
    for piece in stream:                                       # text as it is generated
        print(piece, end="", flush=True)
    stream.reply.finish_reason                                 # stop / length / cancelled
    reply = generate_reply(model, tokenizer, prompt_ids, config)  # the same reply, at once
    ReplyStream(..., batcher=batcher)                          # generated in a continuous batch with others
    async for piece in AsyncReplyStream(stream): ...           # the same, read from an event loop

A stream is the reader's handle on a `LiveReply` (the reply's state machine, `model.inference.reply`): its own
text decoder, stop strings and cancel, so replies generated in one batch never see each other's text, stop
independently (end of turn, their own max_new_tokens, a stop string, a caller that went away) and each streams
as soon as its token is chosen. Works for encoder-decoders (T5) and decoder-only models (Llama). What to
generate (decoding options, prompt within the context) is `model.inference.service`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

from transformers import GenerationConfig

from model.inference.batching import ContinuousBatcher, decode_alone
from model.inference.decoding import ModelRows, beam_search
from model.inference.reply import LiveReply, Reply
from model.inference.virtual_tokens import has_virtual_tokens


class ReplyStream:
    """Iterate over a reply's text as it is generated; `reply` holds the finished `Reply` afterwards.

    Generation is asked for when iteration begins (or `start()`/`wait()`): to `batcher`, or in a thread of its
    own without one; beam search, and every reply of a prompt-learning adapter (its virtual tokens go where
    training put them: `virtual_tokens.generate`), run alone in one `generate` and arrive whole, as one piece.
    `cancel()` (or leaving the loop early, or ctrl+c inside it) stops the generation after the current token. The
    pieces joined equal `reply.text`, cut before the first of the `stop` strings.
    """

    def __init__(self, model, tokenizer, prompt_ids: list[int], config: GenerationConfig,
                 on_done: Callable[[Reply | None], object] | None = None, stop: Sequence[str] = (),
                 batcher: ContinuousBatcher | None = None):
        self.model, self.tokenizer, self.batcher = model, tokenizer, batcher
        self.life = LiveReply(tokenizer, prompt_ids, config, stop, on_finish=on_done)
        self.started = False  # True once generation was asked for

    @property
    def reply(self) -> Reply | None:
        return self.life.reply

    @property
    def error(self) -> BaseException | None:
        return self.life.error

    @property
    def done(self) -> threading.Event:
        return self.life.done

    @property
    def streamer(self):
        return self.life.streamer

    def cancel(self) -> None:
        """Stop after the current token; a stream still queued for the batch ends at once."""
        if self.started:
            self.life.cancel()

    def start(self) -> None:
        """Ask for the generation (once): to the batcher, or in a thread of its own."""
        if self.started:
            return
        self.started = True
        if (self.life.config.num_beams or 1) > 1 or has_virtual_tokens(self.model):
            work = lambda: beam_search(self.model, self.tokenizer, self.life)  # noqa: E731
        elif self.batcher is not None:
            self.batcher.submit(self.life)
            return
        else:
            work = lambda: decode_alone(ModelRows(self.model, self.tokenizer), self.life)  # noqa: E731
        # Not a daemon: a reply is finished before its generation returns, and a process that exits under a
        # thread still inside torch aborts ("terminate called without an active exception"); the interpreter
        # waits for this one, which stops at the next step once its reply is done or cancelled.
        threading.Thread(target=work, name="generate").start()

    def wait(self) -> Reply:
        """Generate (if not begun) and block until the reply is final; re-raises a generation error."""
        self.start()
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.reply

    def __iter__(self) -> Iterator[str]:
        assert not self.started, "a ReplyStream is iterated once"
        self.start()
        finished = False
        try:
            for piece in self.streamer:
                if piece:
                    yield piece
            finished = True
        finally:
            if not finished:
                self.cancel()  # the consumer left early (break, GeneratorExit, KeyboardInterrupt)
            self.done.wait()
        if self.error is not None:
            raise self.error


class AsyncReplyStream:
    """A `ReplyStream` read from async code: the generating thread rings the event loop when a piece is
    queued, so that no thread waits per reader."""

    def __init__(self, stream: ReplyStream):
        self._stream = stream
        self._ready = asyncio.Event()
        loop = asyncio.get_running_loop()

        def ring():
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody reads any more
                loop.call_soon_threadsafe(self._ready.set)

        stream.streamer.wake = ring

    def cancel(self) -> None:
        self._stream.cancel()

    @property
    def reply(self) -> Reply | None:
        return self._stream.reply

    async def __aiter__(self) -> AsyncIterator[str]:
        self._stream.start()
        pieces = self._stream.streamer.text_queue
        while True:
            self._ready.clear()  # before looking: a piece queued after the look rings again
            try:
                piece = pieces.get_nowait()
            except queue.Empty:
                await self._ready.wait()
                continue
            if piece is None:  # the end: the reply (or error) is final
                break
            if piece:
                yield piece
        if self._stream.error is not None:
            raise self._stream.error


def generate_reply(model, tokenizer, prompt_ids: list[int], config: GenerationConfig,
                   stop: Sequence[str] = ()) -> Reply:
    """The whole reply to `prompt_ids` at once (blocking, in the caller's thread)."""
    life = LiveReply(tokenizer, prompt_ids, config, stop)
    if (config.num_beams or 1) > 1 or has_virtual_tokens(model):
        beam_search(model, tokenizer, life)
    else:
        decode_alone(ModelRows(model, tokenizer), life)
    if life.error is not None:
        raise life.error
    return life.reply
