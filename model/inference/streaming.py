"""One reply of a model, streamed piece by piece or whole, that its caller can stop; and a batch of replies
generated together, each with its own stream.

    stream = ReplyStream(model, tokenizer, prompt_ids, config)  # generation runs in its own thread
    for piece in stream:                                       # text as it is generated
        print(piece, end="", flush=True)
    stream.reply.finish_reason                                 # stop / length / cancelled
    reply = generate_reply(model, tokenizer, prompt_ids, config)  # the same reply, at once
    run_batch(model, tokenizer, [stream_a, stream_b])          # several streams in one model.generate

Every reply has its own text decoder and its own cancel flag, checked after each token by a per-row stopping
criterion, so replies generated in one batch never see each other's text, stop independently (end of turn,
their own max_new_tokens, a stop string, a caller that went away) and each streams as soon as its row is
done. Works for encoder-decoders (T5) and decoder-only models (Llama). What to generate (decoding options,
prompt within the context) is `model.inference.service`'s; when to batch is `model.inference.batching`'s.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from model.inference.generation import padded_batch


class ChineseTextStreamer(TextIteratorStreamer):
    """A `TextIteratorStreamer` that hands out text after every token and cuts it before a stop string.

    transformers' streamer waits for a space or a CJK ideograph before releasing text, so Chinese
    punctuation, digits and Latin words without spaces arrive late. Here every decoded character is
    released at once, except an incomplete UTF-8 sequence (byte-fallback tokens decode to U+FFFD until
    the character is complete), which waits for its remaining bytes, and text that could be the start of
    one of the `stop` strings, which waits until it is known not to be one. Once a stop string appears,
    the text before it is the whole reply (`stopped` turns True). `text` is everything released.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self.text = ""  # released so far
        self.pending = ""  # decoded but held back: it may begin a stop string
        self.stopped = False

    def put(self, value):
        if self.stopped:
            return
        self.token_cache.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\n"):
            # As transformers does: a finished line restarts the cache, keeping decoding cost per token flat.
            printable, self.token_cache, self.print_len = text[self.print_len:], [], 0
        else:
            stable = len(text.rstrip("\ufffd"))
            printable = text[self.print_len:stable]
            self.print_len = max(self.print_len, stable)
        if printable:
            self.on_finalized_text(printable)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if not self.stopped:
            self.pending += text
            cuts = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
            if cuts:
                self._release(self.pending[:min(cuts)])
                self.pending, self.stopped = "", True
            elif stream_end:
                self._release(self.pending)
                self.pending = ""
            else:
                held = max((n for s in self.stop for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                            if self.pending.endswith(s[:n])), default=0)
                self._release(self.pending[:len(self.pending) - held])
                self.pending = self.pending[len(self.pending) - held:]
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def _release(self, text: str) -> None:
        if text:
            self.text += text
            self.text_queue.put(text, timeout=self.timeout)


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


class ReplyStream:
    """Iterate over a reply's text as it is generated; `reply` holds the finished `Reply` afterwards.

    Without a `scheduler`, generation runs in a thread of its own; with one (`BatchScheduler`), the
    stream is handed to it when iteration begins and generated in a batch with others. `cancel()` (or
    leaving the loop early, or ctrl+c inside it) stops the generation after the current token. The
    pieces joined equal `reply.text`, cut before the first of the `stop` strings. Beam search cannot
    stream in transformers: its reply arrives as one piece.
    """

    def __init__(self, model, tokenizer, prompt_ids: list[int], config: GenerationConfig,
                 cancel: threading.Event | None = None, on_done: Callable[[Reply | None], object] | None = None,
                 stop: Sequence[str] = (), scheduler=None):
        self.model, self.tokenizer, self.prompt_ids, self.config = model, tokenizer, prompt_ids, config
        self.on_done = on_done  # called from the generation thread when it ends (reply None after an error)
        self.cancel_event = cancel or threading.Event()
        self.scheduler = scheduler
        self.reply: Reply | None = None
        self.error: BaseException | None = None
        self.streamer = ChineseTextStreamer(tokenizer, stop)
        self.token_ids: list[int] = []  # generated so far
        self.done = threading.Event()  # set once `reply` (or `error`) is final
        self.started = False  # True once iteration began (generation was asked for)
        self.announced = False  # counted by its scheduler as on its way (BatchScheduler.announce)
        self._claimed = False  # taken into a batch, or finished as cancelled before one took it
        self._claim_lock = threading.Lock()

    @property
    def max_new_tokens(self) -> int:
        return self.config.max_new_tokens

    def add_token(self, token: int, eos: set[int]) -> bool:
        """Take the next generated token; True when the reply ended with it (and is finished)."""
        if self.done.is_set():
            return True
        self.token_ids.append(token)
        if token not in eos:
            self.streamer.put(torch.tensor([token]))
        if token in eos or self.streamer.stopped:
            return self.finish("stop")
        if self.cancel_event.is_set():
            return self.finish("cancelled")
        if len(self.token_ids) >= self.max_new_tokens:
            return self.finish("length")
        return False

    def finish(self, reason: str | None = None, error: BaseException | None = None) -> bool:
        """End the reply (from the generating thread): flush its text, build `reply`, wake the reader."""
        if self.done.is_set():
            return True
        if error is not None:
            self.error = error
            self.streamer.text_queue.put(self.streamer.stop_signal)
        else:
            if reason is None:  # generation ended without this row saying why (e.g. model's max_length)
                reason = "cancelled" if self.cancel_event.is_set() else (
                    "length" if len(self.token_ids) >= self.max_new_tokens else "stop")
            self.streamer.end()
            self.reply = Reply(self.streamer.text, len(self.prompt_ids), len(self.token_ids), reason,
                               list(self.token_ids))
        self.done.set()
        if self.on_done is not None:
            self.on_done(self.reply)
        return True

    def cancel(self) -> None:
        """Stop after the current token; a stream still waiting for a batch ends at once (its reader must
        not wait for the batch before it)."""
        self.cancel_event.set()
        if self.started and self.scheduler is not None and self.claim():
            self.finish("cancelled")

    def claim(self) -> bool:
        """Take this stream for generation (the scheduler, once); False when it was cancelled first."""
        with self._claim_lock:
            claimed, self._claimed = self._claimed, True
        return not claimed

    def start(self) -> None:
        """Ask for the generation (once): to the scheduler, or in a thread of its own."""
        if self.started:
            return
        self.started = True
        if self.scheduler is not None:
            self.scheduler.submit(self)
        else:
            # Not a daemon: a reply is finished before `generate` returns, and a process that exits under a
            # thread still inside torch aborts ("terminate called without an active exception"); the
            # interpreter waits for this one, which stops at the next step once its reply is done or cancelled.
            threading.Thread(target=run_batch, args=(self.model, self.tokenizer, [self]), name="generate").start()

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


class RowsDone(StoppingCriteria):
    """The per-row stopping criterion of a batch: hands each row's new token to its stream, which says
    whether its reply ended (end of turn, its own length, a stop string, cancelled)."""

    def __init__(self, streams: Sequence[ReplyStream], eos: set[int]):
        self.streams, self.eos = streams, eos

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        tokens = input_ids[:, -1].tolist()
        done = [stream.add_token(token, self.eos) for stream, token in zip(self.streams, tokens)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class CancelBeams(StoppingCriteria):
    """Beam search of one reply stops once its caller cancels (beams cannot be stopped row by row)."""

    def __init__(self, stream: ReplyStream):
        self.stream = stream

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.stream.cancel_event.is_set(), dtype=torch.bool,
                          device=input_ids.device)


def run_batch(model, tokenizer, streams: Sequence[ReplyStream]) -> None:
    """Generate the replies of `streams` together in one `model.generate` (blocking). The streams must share
    their generation config but for max_new_tokens (`BatchScheduler` groups them so); beam search takes one
    stream. Each stream is finished (its `reply` or `error` set) when this returns."""
    seq2seq = bool(model.config.is_encoder_decoder)
    config = streams[0].config
    beams = (config.num_beams or 1) > 1
    assert not beams or len(streams) == 1, "beam search runs one reply at a time"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids(config)))
    try:
        input_ids, attention_mask = padded_batch([s.prompt_ids for s in streams], pad, not seq2seq, model.device)
        batch_config = copy.deepcopy(config)
        batch_config.max_new_tokens = max(s.max_new_tokens for s in streams)
        batch_config.pad_token_id = pad
        criterion = CancelBeams(streams[0]) if beams else RowsDone(streams, eos_ids(config))
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=batch_config,
                                    stopping_criteria=StoppingCriteriaList([criterion]))
        if beams:  # the reply arrives whole, as one piece
            stream, eos = streams[0], eos_ids(config)
            new = (output[0, 1:] if seq2seq else output[0, input_ids.shape[1]:]).tolist()
            end = next((i + 1 for i, token in enumerate(new) if token in eos), len(new))
            stream.token_ids = new[:end]
            stream.streamer.put(torch.tensor([token for token in new[:end] if token not in eos]))
            ended = new[end - 1] in eos if end else False
            stream.finish("stop" if ended or stream.streamer.stopped else None)
        for stream in streams:
            stream.finish()
    except BaseException as err:  # each reader re-raises it in its own thread
        for stream in streams:
            stream.finish(error=err)


def generate_reply(model, tokenizer, prompt_ids: list[int], config: GenerationConfig,
                   cancel: threading.Event | None = None, stop: Sequence[str] = ()) -> Reply:
    """The whole reply to `prompt_ids` at once (blocking, in the caller's thread). `cancel` stops it early."""
    stream = ReplyStream(model, tokenizer, prompt_ids, config, cancel, stop=stop)
    stream.started = True
    run_batch(model, tokenizer, [stream])
    if stream.error is not None:
        raise stream.error
    return stream.reply
