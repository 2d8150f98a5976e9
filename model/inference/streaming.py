"""One reply of a model, streamed piece by piece or whole, that its caller can stop.

    stream = ReplyStream(model, tokenizer, prompt_ids, config)  # generation runs in its own thread
    for piece in stream:                                       # text as it is generated
        print(piece, end="", flush=True)
    stream.reply.finish_reason                                 # stop / length / cancelled
    reply = generate_reply(model, tokenizer, prompt_ids, config)  # the same reply, at once

Every reply has its own streamer and its own cancel flag (a `threading.Event` checked by a stopping
criterion after each token), so concurrent requests never see each other's text and a caller that goes
away stops its generation. Works for encoder-decoders (T5) and decoder-only models (Llama). What to
generate (decoding options, prompt within the context) is `model.inference.service`'s.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer


class CancelOnEvent(StoppingCriteria):
    """Stops generation once `event` is set (a client went away, ctrl+c in the chat)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChineseTextStreamer(TextIteratorStreamer):
    """A `TextIteratorStreamer` that hands out text after every token.

    transformers' streamer waits for a space or a CJK ideograph before releasing text, so Chinese
    punctuation, digits and Latin words without spaces arrive late. Here every decoded character is
    released at once, except an incomplete UTF-8 sequence (byte-fallback tokens decode to U+FFFD until
    the character is complete), which waits for its remaining bytes.
    """

    def put(self, value):
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError("ChineseTextStreamer only supports batch size 1")
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.token_cache.extend(value.tolist())
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


@dataclass
class Reply:
    """A finished reply. finish_reason: stop (end of turn / EOS), length (max_new_tokens), cancelled."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


def _generate(model, prompt_ids: list[int], config: GenerationConfig, cancel: threading.Event, streamer=None):
    input_ids = torch.tensor([prompt_ids], device=model.device)
    with torch.inference_mode():
        return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                              generation_config=config, streamer=streamer,
                              stopping_criteria=StoppingCriteriaList([CancelOnEvent(cancel)]))


def _finish(model, tokenizer, prompt_ids: list[int], output, config: GenerationConfig, cancel) -> Reply:
    """Decode the new tokens of `output` (batch of one) into a `Reply`."""
    seq2seq = bool(model.config.is_encoder_decoder)
    new = output[0, 1:] if seq2seq else output[0, len(prompt_ids):]  # T5 output starts with decoder_start
    new = new.tolist()
    eos = config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) - {None}
    if new and new[-1] in eos:
        reason = "stop"
    elif cancel.is_set():
        reason = "cancelled"
    else:
        reason = "length" if len(new) >= config.max_new_tokens else "stop"
    text = tokenizer.decode(new, skip_special_tokens=True)
    return Reply(text, len(prompt_ids), len(new), reason)


def generate_reply(model, tokenizer, prompt_ids: list[int], config: GenerationConfig,
                   cancel: threading.Event | None = None) -> Reply:
    """The whole reply to `prompt_ids` at once (blocking; no streamer). `cancel` stops it early."""
    cancel = cancel or threading.Event()
    output = _generate(model, prompt_ids, config, cancel)
    return _finish(model, tokenizer, prompt_ids, output, config, cancel)


class ReplyStream:
    """Iterate over a reply's text as it is generated; `reply` holds the finished `Reply` afterwards.

    Generation runs in a thread with this stream's own streamer. `cancel()` (or leaving the loop
    early, or ctrl+c inside it) stops the generation after the current token. The pieces joined
    equal `reply.text`. Beam search cannot stream in transformers: its reply arrives as one piece.
    """

    def __init__(self, model, tokenizer, prompt_ids: list[int], config: GenerationConfig,
                 cancel: threading.Event | None = None, on_done: Callable[[Reply | None], object] | None = None):
        self.model, self.tokenizer, self.prompt_ids, self.config = model, tokenizer, prompt_ids, config
        self.on_done = on_done  # called from the generation thread when it ends (reply None after an error)
        self.cancel_event = cancel or threading.Event()
        self.reply: Reply | None = None
        self._error: BaseException | None = None
        self._streamer = ChineseTextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._thread = threading.Thread(target=self._run, name="generate", daemon=True)
        self.started = False  # True once iteration began (the thread runs)

    def _run(self):
        beams = (self.config.num_beams or 1) > 1
        try:
            output = _generate(self.model, self.prompt_ids, self.config, self.cancel_event,
                               None if beams else self._streamer)
            self.reply = _finish(self.model, self.tokenizer, self.prompt_ids, output, self.config, self.cancel_event)
            if beams:
                self._streamer.on_finalized_text(self.reply.text)
                self._streamer.end()
        except BaseException as err:  # handed to the consuming thread, which re-raises it
            self._error = err
            self._streamer.end()
        finally:
            if self.on_done is not None:
                self.on_done(self.reply)

    def cancel(self) -> None:
        self.cancel_event.set()

    def __iter__(self) -> Iterator[str]:
        assert not self.started, "a ReplyStream is iterated once"
        self.started = True
        self._thread.start()
        finished = False
        try:
            for piece in self._streamer:
                if piece:
                    yield piece
            finished = True
        finally:
            if not finished:
                self.cancel()  # the consumer left early (break, GeneratorExit, KeyboardInterrupt)
            self._thread.join()
        if self._error is not None:
            raise self._error
