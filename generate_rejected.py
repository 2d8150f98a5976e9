"""Preference pairs from the SFT model: for each prompt of an instruction or preference file, the dataset's
answer is `chosen` and the SFT model's own answer is `rejected` (how ChatLM-mini-Chinese built its DPO set).

    python generate_rejected.py                  # config/generate_rejected.yaml: model_save/sft, data/sft
    python generate_rejected.py --model_name_or_path model_save/sft --input data/sft/a.jsonl \\
        --output data/dpo/rejected.jsonl --batch_size 32

Writes JSON lines `{"id", "prompt": [messages], "chosen", "rejected"}` (what dpo_train.py reads; `id` is
the row's index in the input). Rows where the model's answer equals the dataset's, or is empty, are
skipped and counted; a run that ends with no pair at all is an error (exit status 2: DPO would have nothing
to learn from), one where fewer than half the rows gave a pair is warned about. Resumable after ctrl+c, kill -9
or a power cut (utils/data/resumable.py): the same command drops any torn or unrecorded lines and continues
from the first unfinished batch. The input is read through
utils/data/conversations.py (any SFT or preference format, hub names too).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import set_seed

from model.inference.generation import InferenceArguments, context_length, generate_replies, load_for_inference
from utils.cli import run_main
from utils.config import parse_config, recipe_path, run_config
from utils.data.conversations import DataFormat, load_answered_prompts
from utils.data.resumable import all_done, progress_path, resume_point, run_settings, start_output, write_batches
from utils.errors import UserError
from utils.logging import setup_logging

logger = logging.getLogger("generate_rejected")
LOW_PAIR_SHARE = 0.5  # warn when fewer rows than this share give a pair
MORE_PAIRS = ("sample instead of greedy decoding (--do_sample true, --temperature 1.0 or higher), or answer "
              "with a weaker or earlier checkpoint (--model_name_or_path)")


@dataclass
class GenerateArguments(InferenceArguments):
    model_name_or_path: str = field(default="model_save/sft", metadata={"help": "The SFT model (sft_train.py output)."})
    input: list[str] = field(default_factory=lambda: ["data/sft"], metadata={
        "help": "Instruction or preference data (files, directories or hub dataset names) whose prompts are answered."})
    output: str = field(default="data/dpo/rejected.jsonl", metadata={"help": "JSON lines of prompt/chosen/rejected."})
    data_format: DataFormat = field(default="auto", metadata={"help": "The rows' format (auto: per file)."})
    dataset_split: str = field(default="train", metadata={"help": "Split of hub datasets."})
    system_prompt: str | None = field(default=None, metadata={
        "help": "System turn put first in prompts that have none (use the one SFT used)."})
    max_rows: int = field(default=-1, metadata={"help": "Answer at most this many input rows (-1 = all)."})
    batch_size: int = field(default=16, metadata={"help": "Prompts generated together."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest answer (tokens)."})
    max_prompt_tokens: int = field(default=-1, metadata={
        "help": "Longest prompt (tokens; older turns dropped to fit); -1 = context length - max_new_tokens."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling share (with --do_sample)."})
    seed: int = field(default=42, metadata={"help": "Random seed (sampling)."})
    overwrite: bool = field(default=False, metadata={"help": "Start over instead of resuming an existing --output."})

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("--batch_size and --max_new_tokens must be at least 1")


def answer_rows(args: GenerateArguments, items: list[dict], start: int, output: Path, counts: dict,
                settings: dict) -> bool:
    """Answer `items[start:]` with the SFT model, batch by batch, appending the pairs to `output` and updating
    `counts` and the progress record; False when ctrl+c stopped it (what was recorded stays)."""
    model, tokenizer = load_for_inference(args.model_name_or_path, args.device, args.dtype)
    config = model.generation_config
    config.max_new_tokens, config.do_sample = args.max_new_tokens, args.do_sample
    if args.do_sample:
        config.temperature, config.top_p = args.temperature, args.top_p
    max_prompt = args.max_prompt_tokens if args.max_prompt_tokens > 0 else \
        max(context_length(model, tokenizer) - args.max_new_tokens, 16)

    def rows_of(begin: int, batch: list[dict]) -> list[dict]:
        replies = generate_replies(model, tokenizer, [item["prompt"] for item in batch], config,
                                   batch_size=len(batch), max_prompt_tokens=max_prompt, progress=False)
        rows = []
        for index, (item, reply) in enumerate(zip(batch, replies), start=begin):
            if not reply.strip():
                counts["empty_skipped"] += 1
            elif reply.strip() == item["chosen"].strip():
                counts["equal_skipped"] += 1
            else:
                rows.append({"id": index, "prompt": item["prompt"], "chosen": item["chosen"], "rejected": reply})
        return rows

    return write_batches(output, items, start, args.batch_size, counts, settings, rows_of, "generate rejected")


def main(argv: Sequence[str] | None = None) -> dict:
    setup_logging()
    (args,) = parse_config([GenerateArguments], argv, default_recipe=recipe_path("generate_rejected"),
                           description=__doc__)
    set_seed(args.seed)
    items = load_answered_prompts(args.input, args.data_format, args.dataset_split, args.system_prompt, "input")
    if args.max_rows >= 0:
        items = items[:args.max_rows]
    output = Path(args.output)
    start_output(output, args.overwrite)  # an existing file is resumed
    settings = run_settings(run_config(args))
    start, kept, state = resume_point(output, items, settings)
    counts = {"written": kept, "equal_skipped": state.get("equal_skipped", 0),
              "empty_skipped": state.get("empty_skipped", 0)}
    if not all_done(output, start, len(items)) and not answer_rows(args, items, start, output, counts, settings):
        return counts
    logger.info("%d pairs in %s; skipped %d rows where the model gave the dataset's answer and %d empty answers",
                counts["written"], output, counts["equal_skipped"], counts["empty_skipped"])
    if not counts["written"]:
        raise UserError(f"no preference pair: of the {len(items)} rows read, the model's answer equalled the "
                        f"dataset's in {counts['equal_skipped']} and was empty in {counts['empty_skipped']}",
                        path=str(output), fix=f"{MORE_PAIRS}; add --overwrite, since this run is recorded as "
                                              f"finished in {progress_path(output)}")
    if counts["written"] < LOW_PAIR_SHARE * len(items):
        logger.warning("only %d of %d rows (%.0f%%) gave a pair (%d answers equalled the dataset's, %d were empty); "
                       "for more: %s", counts["written"], len(items), 100 * counts["written"] / len(items),
                       counts["equal_skipped"], counts["empty_skipped"], MORE_PAIRS)
    return counts


if __name__ == "__main__":
    run_main(main)
