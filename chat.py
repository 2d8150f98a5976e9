"""Chat with a trained model in the terminal: the reply streams in token by token, and the whole
conversation is sent each turn (oldest turns dropped when it outgrows the context).

    python chat.py                                         # config/chat.yaml: model_save
    python chat.py --model_name_or_path model_save/sft --system "你是一个乐于助人的助手。"
    python chat.py --temperature 0.7 --top_p 0.9           # sampling; --num_beams 4 for beam search
    python chat.py --message "你好"                         # one reply, printed, then exit (for scripts)

In the chat: /reset clears the conversation, /exit (or ctrl+d) quits, ctrl+c stops the reply being
written. Works with any toolkit output directory (T5 or Llama) or compatible HF model directory; the
prompt is built with the tokenizer's chat template.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from model.build import count_parameters
from model.inference.generation import InferenceArguments, load_for_inference
from model.inference.reply import Reply, why_empty
from model.inference.service import ChatService, DecodingOptions, PromptTooLong, ReplyTooLong
from utils.cli import run_main
from utils.config import parse_config, recipe_path
from utils.errors import UserError
from utils.logging import setup_logging

logger = logging.getLogger("chat")
HELP = "/reset clears the conversation, /exit quits, ctrl+c stops a reply"


@dataclass
class ChatArguments(InferenceArguments):
    system: str | None = field(default=None, metadata={
        "help": "System prompt put before the conversation (kept when old turns are dropped). None = no system turn."})
    message: str | None = field(default=None, metadata={
        "help": "Non-interactive: print the reply to this one message and exit."})


class ChatSession:
    """A conversation with one model: the history, the decoding settings, and one streamed reply per turn."""

    def __init__(self, model, tokenizer, decoding: DecodingOptions | None = None, system: str | None = None):
        self.service = ChatService(model, tokenizer, decoding)  # ReplyTooLong for a --max_new_tokens too long
        self.config = self.service.generation_config()
        self.budget = self.service.prompt_budget(self.config.max_new_tokens)
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[dict] = []  # user and assistant turns so far
        self.last_prompt_ids: list[int] | None = None  # what the model saw last turn
        self.trimmed = False  # whether the last prompt dropped old turns to fit
        self.last_reply: Reply | None = None

    def reset(self) -> None:
        self.history = []

    def send(self, text: str) -> Iterator[str]:
        """Stream the reply to `text`, given the whole conversation so far. The turn joins the history
        once the reply is complete; a reply stopped early (ctrl+c) leaves the history as it was.
        Raises `PromptTooLong` when `text` alone does not fit in the context."""
        user = {"role": "user", "content": text}
        prepared = self.service.prepare(self.system + self.history + [user], self.config)
        self.last_prompt_ids, self.trimmed = prepared.ids, prepared.trimmed
        stream = self.service.reply_stream(prepared)
        yield from stream
        self.last_reply = stream.reply
        self.history += [user, {"role": "assistant", "content": stream.reply.text.strip()}]


def print_reply(session: ChatSession, text: str) -> None:
    """Stream the reply to stdout as it is generated (leading blank space skipped); a reply without text says
    why instead of leaving an empty line."""
    started = False
    for piece in session.send(text):
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        print(piece, end="", flush=True)
    if not started:
        print(f"[empty reply: {why_empty(session.last_reply, session.service.tokenizer)}]", end="")
    print(flush=True)


def interact(session: ChatSession) -> None:
    """The read-reply loop until /exit, ctrl+d or ctrl+c at the prompt."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    while True:
        try:
            text = input("user> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            session.reset()
            print("[conversation cleared]")
            continue
        if text.startswith("/"):
            print(f"[unknown command {text.split()[0]}: {HELP}]")
            continue
        print("assistant> ", end="", flush=True)
        try:
            print_reply(session, text)
        except KeyboardInterrupt:
            print("\n[stopped; this turn is not kept]")
        except PromptTooLong as err:
            print(f"\n[{err}; shorten the message]")
            continue
        if session.trimmed:
            print("[the oldest turns no longer fit in the context and were left out]")


def main(argv: Sequence[str] | None = None) -> ChatSession:
    setup_logging()
    args, decoding = parse_config([ChatArguments, DecodingOptions], argv, default_recipe=recipe_path("chat"),
                                  description=__doc__)
    model, tokenizer = load_for_inference(args.model_name_or_path, device=args.device, dtype=args.dtype)
    try:
        session = ChatSession(model, tokenizer, decoding, args.system)
    except ReplyTooLong as err:
        raise err.as_user_error() from None
    if args.message is not None:
        try:
            print_reply(session, args.message)
        except PromptTooLong as err:
            raise UserError(str(err), field="message", fix="shorten the message") from None
        return session
    config = session.config
    mode = (f"beam search ({config.num_beams} beams)" if (config.num_beams or 1) > 1 else
            f"sampling (temperature {config.temperature}, top_p {config.top_p}, top_k {config.top_k})"
            if config.do_sample else "greedy")
    print(f"{args.model_name_or_path}: {type(model).__name__}, {count_parameters(model) / 1e6:.1f}M parameters, "
          f"context {session.service.context_length} tokens | {mode}, up to {config.max_new_tokens} new tokens, "
          f"repetition penalty {config.repetition_penalty}\n{HELP}", flush=True)
    interact(session)
    return session


if __name__ == "__main__":
    run_main(main)
