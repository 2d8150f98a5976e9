"""Retrieval-augmented chat: answer questions over a local folder of Chinese documents with a model served by
serve.py (or any OpenAI-compatible server). The passages BM25 ranks best for the question (utils/data/retrieval.py:
jieba words, Okapi BM25) go into the system turn, the question into the user turn; the answer is printed with
the sources it was given.

    python serve.py --model_name_or_path model_save &              # the model, on http://127.0.0.1:8000
    python rag_chat.py --docs my_notes/ --question "长城有多长？"    # one answer, then exit
    python rag_chat.py --docs my_notes/                             # questions from the terminal, one a line
    python rag_chat.py --docs my_notes/ --base_url http://127.0.0.1:11434/v1 --model qwen2.5:7b   # ollama

A small model trained on the default recipes answers in the form it learnt in SFT; whether it uses the passages
well depends on its SFT data (conversations with a reference text in the system turn teach it). The retrieval
does not depend on the model.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from utils.chat_api import ChatAPI
from utils.cli import run_main
from utils.config import parse_config, recipe_path
from utils.data.retrieval import Passage, Retriever
from utils.errors import UserError
from utils.logging import setup_logging

logger = logging.getLogger("rag_chat")
SYSTEM = "请根据下面的资料回答用户的问题。资料里没有答案时，就说不知道。\n\n资料：\n{passages}"


@dataclass
class RagArguments:
    docs: list[str] = field(default_factory=lambda: ["data/rag_docs"], metadata={
        "help": "Files or folders of documents: UTF-8 text (each block of lines between blank lines a passage), "
                "JSON lines or parquet with a `text` field, wikiextractor output."})
    question: list[str] = field(default_factory=list, metadata={
        "help": "Questions to answer, then exit. None: read questions from the terminal, one a line."})
    base_url: str = field(default="http://127.0.0.1:8000/v1", metadata={
        "help": "The OpenAI-compatible API: serve.py's default address, or a vLLM / llama.cpp / ollama server."})
    api_key: str | None = field(default=None, metadata={
        "help": "The server's API key. None: the ZHLM_API_KEY environment variable (serve.py's), else none."})
    model: str | None = field(default=None, metadata={
        "help": "The model name the server knows. None: the first one it lists (serve.py serves one)."})
    top_k: int = field(default=3, metadata={"help": "Passages given to the model at most."})
    max_passage_chars: int = field(default=200, metadata={
        "help": "Documents are cut into passages of at most this many characters, at sentence ends."})
    max_context_chars: int = field(default=600, metadata={
        "help": "Characters of passages in one prompt at most (the best first; keep the prompt within the "
                "model's context: the demo models take 512 tokens, about 1.5 characters a token)."})
    max_tokens: int = field(default=256, metadata={"help": "Tokens of the answer at most."})
    temperature: float | None = field(default=None, metadata={"help": "None: the server's default (greedy)."})

    def __post_init__(self):
        for name in ("top_k", "max_passage_chars", "max_context_chars", "max_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"must be at least 1, not {getattr(self, name)}", field=name,
                                fix=f"pass --{name} with a positive number")


@dataclass
class Answer:
    text: str
    passages: list[Passage]  # what the model was given, best first
    messages: list[dict]  # the conversation sent


def context_messages(question: str, retriever: Retriever, args: RagArguments) -> tuple[list[dict], list[Passage]]:
    """The system turn with the best passages (numbered, at most `max_context_chars` of them) and the question."""
    chosen: list[Passage] = []
    used = 0
    for passage, _ in retriever.search(question, args.top_k):
        if chosen and used + len(passage.text) > args.max_context_chars:
            break
        chosen.append(passage)
        used += len(passage.text)
    listed = "\n".join(f"[{n}] {passage.text[:args.max_context_chars]}" for n, passage in enumerate(chosen, 1))
    return [{"role": "system", "content": SYSTEM.format(passages=listed or "（没有找到相关资料）")},
            {"role": "user", "content": question}], chosen


class RagClient:
    """One server, one document index: `ask(question)` retrieves, sends and returns the `Answer`."""

    def __init__(self, args: RagArguments, retriever: Retriever):
        self.args, self.retriever = args, retriever
        self.api = ChatAPI(args.base_url, args.api_key, args.model, context_field="max_context_chars",
                           context_fix="lower --max_context_chars or --top_k (fewer passages), or --max_tokens")

    def ask(self, question: str) -> Answer:
        messages, passages = context_messages(question, self.retriever, self.args)
        reply = self.api.complete(messages, self.args.max_tokens, self.args.temperature)
        return Answer(reply.choices[0].message.content or "", passages, messages)


def print_answer(answer: Answer) -> None:
    print(answer.text.strip() or "[empty reply]")
    for n, passage in enumerate(answer.passages, 1):
        print(f"  [{n}] {passage.where}")


def main(argv: Sequence[str] | None = None) -> list[Answer]:
    setup_logging()
    (args,) = parse_config([RagArguments], argv, default_recipe=recipe_path("rag"), description=__doc__)
    retriever = Retriever.from_paths(args.docs, args.max_passage_chars)
    logger.info("%d passages from %s", len(retriever.passages), ", ".join(args.docs))
    client = RagClient(args, retriever)
    answers = []
    questions = args.question or (line.strip() for line in sys.stdin if line.strip())
    for question in questions:
        answers.append(client.ask(question))
        print_answer(answers[-1])
    return answers


if __name__ == "__main__":
    run_main(main)
