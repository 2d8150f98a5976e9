"""SFT data from a teacher: the prompts of instruction or preference data, answered by any model behind an
OpenAI-compatible chat API (a local vLLM, llama.cpp's server, ollama, or this toolkit's serve.py), written as
conversations that sft_train.py reads. Sequence-level distillation: the student learns the teacher's answers.

    python serve.py --model_name_or_path big_model --port 8001 &      # or vLLM / llama.cpp / ollama
    python distill_data.py --base_url http://127.0.0.1:8001/v1         # config/distill.yaml: data/sft
    python sft_train.py --train_files data/distill                     # the student learns the answers

Writes JSON lines `{"id", "messages": [the prompt's turns, {"role": "assistant", "content": answer}],
"teacher": model}` (`id`: the row's index in the input; `teacher`: the model name the server answered with).
`--concurrency` requests are in flight at once (a server that batches, like serve.py or vLLM, answers them
together); rows are written in input order, batch by batch. Answers that are empty, cut at --max_tokens (the
server says finish_reason "length"; `--keep_cut_answers` keeps them) or whose prompt is over the teacher's
context are skipped and counted. Resumable after ctrl+c, kill -9 or a power cut (utils/data/resumable.py): the
same command continues from the first unfinished batch; an output begun with another teacher or other
settings is refused. The API key is never written to disk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from utils.chat_api import ChatAPI, PromptOverContext
from utils.cli import run_main
from utils.config import parse_config, recipe_path, run_config
from utils.data.conversations import DataFormat, load_answered_prompts
from utils.data.resumable import all_done, progress_path, resume_point, run_settings, start_output, write_batches
from utils.errors import UserError
from utils.logging import setup_logging

logger = logging.getLogger("distill_data")
# Where the server is and how to reach it do not make the output another run's (the teacher's name does).
NOT_RECORDED = ("base_url", "api_key", "concurrency")


@dataclass
class DistillArguments:
    base_url: str = field(default="http://127.0.0.1:8000/v1", metadata={
        "help": "The teacher's OpenAI-compatible API: serve.py's default address, or a vLLM / llama.cpp / ollama "
                "server, /v1 included."})
    api_key: str | None = field(default=None, metadata={
        "help": "The server's API key. None: the ZHLM_API_KEY environment variable (serve.py's), else none. "
                "Never written to disk."})
    model: str | None = field(default=None, metadata={
        "help": "The teacher's model name on the server. None: the first one it lists (serve.py serves one)."})
    input: list[str] = field(default_factory=lambda: ["data/sft"], metadata={
        "help": "Instruction or preference data (files, directories or hub dataset names) whose prompts the "
                "teacher answers; their own answers are not used."})
    output: str = field(default="data/distill/teacher.jsonl", metadata={
        "help": "JSON lines of conversations with the teacher's answers (sft_train.py --train_files data/distill)."})
    data_format: DataFormat = field(default="auto", metadata={"help": "The rows' format (auto: per file)."})
    dataset_split: str = field(default="train", metadata={"help": "Split of hub datasets."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "System turn put first in prompts that have none."})
    max_rows: int = field(default=-1, metadata={"help": "Answer at most this many input rows (-1 = all)."})
    batch_size: int = field(default=64, metadata={"help": "Rows written (and recorded as done) together."})
    concurrency: int = field(default=8, metadata={"help": "Requests in flight at once."})
    max_tokens: int = field(default=512, metadata={"help": "Longest answer (tokens of the teacher)."})
    temperature: float | None = field(default=None, metadata={"help": "None: the server's default."})
    keep_cut_answers: bool = field(default=False, metadata={
        "help": "Keep answers the teacher had to stop at --max_tokens (by default they are skipped: SFT would "
                "teach answers that stop mid-sentence)."})
    overwrite: bool = field(default=False, metadata={"help": "Start over instead of resuming an existing --output."})

    def __post_init__(self):
        for name in ("batch_size", "concurrency", "max_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"must be at least 1, not {getattr(self, name)}", field=name,
                                fix=f"pass --{name} with a positive number")


def ask(api: ChatAPI, args: DistillArguments, prompt: list[dict]) -> tuple[str, str | None, str | None]:
    """(what happened: "answer" / "empty" / "cut" / "too_long", the answer, the model that answered)."""
    try:
        reply = api.complete(prompt, args.max_tokens, args.temperature)
    except PromptOverContext:
        return "too_long", None, None
    text = (reply.choices[0].message.content or "").strip()
    if not text:
        return "empty", None, reply.model
    if reply.choices[0].finish_reason == "length" and not args.keep_cut_answers:
        return "cut", None, reply.model
    return "answer", text, reply.model


def answer_rows(api: ChatAPI, args: DistillArguments, items: list[dict], start: int, output: Path, counts: dict,
                settings: dict) -> bool:
    """Have the teacher answer `items[start:]`, `--concurrency` at a time, appending each batch's conversations
    to `output` in input order; False when ctrl+c stopped it (what was recorded stays)."""
    def rows_of(begin: int, batch: list[dict]) -> list[dict]:
        rows = []
        answers = pool.map(lambda item: ask(api, args, item["prompt"]), batch)
        for index, (item, (outcome, text, model)) in enumerate(zip(batch, answers), start=begin):
            if outcome != "answer":
                counts[f"{outcome}_skipped"] += 1
                continue
            rows.append({"id": index, "messages": [*item["prompt"], {"role": "assistant", "content": text}],
                         "teacher": model})
        return rows

    with ThreadPoolExecutor(args.concurrency) as pool:
        return write_batches(output, items, start, args.batch_size, counts, settings, rows_of,
                             f"answers of {api.model}")


def main(argv: Sequence[str] | None = None) -> dict:
    setup_logging()
    (args,) = parse_config([DistillArguments], argv, default_recipe=recipe_path("distill"), description=__doc__)
    items = load_answered_prompts(args.input, args.data_format, args.dataset_split, args.system_prompt, "input")
    if args.max_rows >= 0:
        items = items[:args.max_rows]
    output = Path(args.output)
    start_output(output, args.overwrite)  # an existing file is resumed
    api = ChatAPI(args.base_url, args.api_key, args.model, context_field="input",
                  context_fix="such prompts are skipped and counted; to keep them, serve the teacher with a longer "
                              "context")
    recorded = {key: value for key, value in run_config(args).items() if key not in NOT_RECORDED}
    settings = run_settings({**recorded, "model": api.model})  # the teacher the server named, not the flag
    start, kept, state = resume_point(output, items, settings, prompt_of=lambda row: row["messages"][:-1])
    counts = {"written": kept, **{f"{outcome}_skipped": state.get(f"{outcome}_skipped", 0)
                                  for outcome in ("empty", "cut", "too_long")}}
    if not all_done(output, start, len(items)) and not answer_rows(api, args, items, start, output, counts, settings):
        return counts
    logger.info("%d conversations with answers of %s in %s; skipped: %d empty, %d cut at --max_tokens %d, %d over "
                "the teacher's context", counts["written"], api.model, output, counts["empty_skipped"],
                counts["cut_skipped"], args.max_tokens, counts["too_long_skipped"])
    if not counts["written"]:
        raise UserError(f"no answer kept of the {len(items)} rows read: {counts['empty_skipped']} empty, "
                        f"{counts['cut_skipped']} cut at --max_tokens, {counts['too_long_skipped']} over the "
                        "teacher's context", path=str(output), field="max_tokens",
                        fix="raise --max_tokens, or pass --keep_cut_answers true; add --overwrite, since this run is "
                            f"recorded as finished in {progress_path(output)}")
    return counts


if __name__ == "__main__":
    run_main(main)
