"""Streaming generation for chat.py and serve.py: decoding options, prompt fitting, one reply per call.

    options = DecodingOptions(temperature=0.7)                 # None everywhere = the model's own settings
    config = options.generation_config(model.generation_config)
    ids, trimmed = fit_prompt(tokenizer, messages, prompt_budget(model, tokenizer, config.max_new_tokens))
    stream = ReplyStream(model, tokenizer, ids, config)        # generation runs in its own thread
    for piece in stream:                                       # text as it is generated
        print(piece, end="", flush=True)
    stream.reply.finish_reason                                 # stop / length / cancelled

Every reply has its own streamer and its own cancel flag (a `threading.Event` checked by a stopping
criterion after each token), so concurrent requests never see each other's text and a caller that goes
away stops its generation. Works for encoder-decoders (T5) and decoder-only models (Llama).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from model.inference.generation import context_length
from utils.tokenization.chat_format import render_prompt

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


class PromptTooLong(ValueError):
    """The newest message alone (with the chat template) does not fit in the prompt budget."""

    def __init__(self, prompt_tokens: int, budget: int):
        self.prompt_tokens, self.budget = prompt_tokens, budget
        super().__init__(f"the last message needs {prompt_tokens} tokens but the prompt may use at most {budget}")


def prompt_budget(model, tokenizer, max_new_tokens: int) -> int:
    """Tokens a prompt may use: the whole context for an encoder (T5), else what the reply leaves."""
    limit = context_length(model, tokenizer)
    return limit if model.config.is_encoder_decoder else limit - max_new_tokens


def max_new_tokens_limit(model, tokenizer) -> int:
    """Longest reply a model can give: the decoder's context (a decoder-only model keeps >= 8 for a prompt)."""
    limit = context_length(model, tokenizer)
    return limit if model.config.is_encoder_decoder else limit - 8


def default_reply_tokens(model, tokenizer, max_new_tokens: int) -> int:
    """`max_new_tokens` from a model's defaults, capped for a decoder-only model at half its context so
    that a conversation keeps room (a 256-position model with the default of 256 would have none).
    Limits the user asked for explicitly are not capped."""
    if model.config.is_encoder_decoder:
        return max_new_tokens
    return max(1, min(max_new_tokens, context_length(model, tokenizer) // 2))


def fit_prompt(tokenizer, messages: list[dict], budget: int) -> tuple[list[int], bool]:
    """Prompt ids of a conversation within `budget` tokens and whether older turns were dropped to fit.

    Oldest turns go first and a system message stays while it fits (`render_prompt`); a newest message
    that does not fit even alone raises `PromptTooLong` rather than being cut.
    """
    newest = tokenizer.apply_chat_template(messages[-1:], add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    if len(newest) > budget:
        raise PromptTooLong(len(newest), budget)
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if len(full) <= budget:
        return list(full), False
    return render_prompt(tokenizer, messages, budget), True


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
