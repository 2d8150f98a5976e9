"""SFT tokenisation benchmark (issue 11, item 8): `utils/sft_data.tokenize_conversations` on the shared
ShareGPT sample, T5 (one example per answer, the conversation before it as the prompt) and Llama, and the
T5 examples of its 86- and 330-message conversations alone.

    .venv/bin/python -m bench.bench_sft_tokenize            # about a minute on 2 cores
    .venv/bin/python -m bench.bench_sft_tokenize --quick    # seconds (smoke test; no docs)

The tokenizer is trained on the fly from real zhwiki text (`train_tokenizer.py` with the demo recipe's
vocabulary and sentinels) into bench/_work/. Limits are the default SFT recipe's (config/sft.yaml). The old
algorithm (every answer rendered the conversation before it, then once more after each dropped turn) is
quoted from the issue for the whole file and the 330-message conversation (minutes), and run here on the
86-message conversation, whose prompts it must reproduce exactly.
"""

from __future__ import annotations

import argparse

import datasets
import yaml
from transformers import AutoTokenizer

import train_tokenizer
from bench.corpora import WIKI_DOC, WIKI_JSONL, shared_path
from bench.harness import REPO, WORK, fastest, log, markdown_table, write_section
from utils.data.conversations import load_conversations
from utils.examples.sft_data import seq2seq_examples, tokenize_conversations
from utils.tokenization.chat_format import ChatPrompts, rerender_prompt

SHAREGPT = "sft/medicalgpt_sharegpt_zh_1K_format.jsonl"
# Old figures, measured by the issue's reporter on the same file (issue 11, item 8).
ISSUE_OLD = {"file": "11 min 47 s", 86: "3.9 s", 330: "> 290 s (unfinished)"}


def old_sources(tokenizer, messages: list[dict], max_source_length: int) -> list[list[int]]:
    """The T5 encoder inputs as utils/examples/sft_data.py built them before this change: each answer's conversation
    rendered whole, and when over the limit, rendered again after each dropped turn."""
    sources = []
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            source = tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
            if len(source) > max_source_length:
                source = rerender_prompt(tokenizer, messages[:index], max_source_length).ids
            sources.append(list(source))
    return sources


def seconds(value: float) -> str:
    return f"{value * 1000:,.1f} ms" if value < 1 else f"{value:,.2f} s"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="Runs per measurement; the shortest is reported.")
    parser.add_argument("--quick", action="store_true", help="100 conversations, a small tokenizer, no old "
                        "algorithm, no docs/BENCHMARKS.md update.")
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()
    demo = yaml.safe_load((REPO / "config/demo/tokenizer.yaml").read_text(encoding="utf-8"))
    limits = yaml.safe_load((REPO / "config/sft.yaml").read_text(encoding="utf-8"))
    source_limit, target_limit, length_limit = (limits[k] for k in ("max_source_length", "max_target_length",
                                                                     "max_length"))

    tokenizer_dir = WORK / ("sft_tokenize_tokenizer_quick" if args.quick else "sft_tokenize_tokenizer")
    vocab_size = 1024 if args.quick else demo["vocab_size"]
    train_tokenizer.main(["--config", "none", "--input", str(shared_path(WIKI_DOC if args.quick else WIKI_JSONL)),
                          "--output_dir", str(tokenizer_dir), "--overwrite_output_dir", "--vocab_size",
                          str(vocab_size), "--num_sentinels", str(demo["num_sentinels"]),
                          "--model_max_length", str(demo["model_max_length"])])
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    conversations = load_conversations([str(shared_path(SHAREGPT))])
    if args.quick:
        conversations = conversations[:100]
    messages = sum(map(len, conversations))
    scope = f"first {len(conversations)} conversations" if args.quick else "whole file"
    log(f"{len(conversations):,} conversations, {messages:,} messages; tokenizer {vocab_size:,} tokens")

    rows, per_token = [], {}
    for model, seq2seq in (("T5", True), ("Llama", False)):
        measured, (dataset, stats) = fastest(lambda seq2seq=seq2seq: tokenize_conversations(
            conversations, tokenizer, seq2seq, source_limit, target_limit, length_limit), args.repeats)
        log(f"{model}: {stats.describe()} in {measured.wall_s:.2f} s")
        rows.append([f"{scope}, {model}", f"{len(conversations):,}", f"{messages:,}", f"{stats.examples:,}",
                     ISSUE_OLD["file"] if seq2seq else "(renders once; unchanged)", "-", seconds(measured.wall_s), "-",
                     f"{measured.load:.1f}"])

    for size in (86, 330):
        conversation = next((c for c in conversations if len(c) == size), None)
        if conversation is None:
            continue
        measured, examples = fastest(lambda conversation=conversation: seq2seq_examples(
            conversation, tokenizer, source_limit, target_limit, "truncate"), args.repeats)
        wall = measured.wall_s
        old, speedup = "-", "-"
        if size == 86 and not args.quick:
            old_run, sources = fastest(lambda: old_sources(tokenizer, conversation, source_limit))  # noqa: B023
            if sources != [e["input_ids"] for e in examples]:
                raise AssertionError("the new T5 prompts differ from the old algorithm's")
            old, speedup = seconds(old_run.wall_s), f"{old_run.wall_s / wall:,.0f}x"
        log(f"{size} messages: {len(examples)} examples in {seconds(wall)} (old here: {old})")
        tokens = ChatPrompts(tokenizer, conversation).length(len(conversation))
        per_token[size] = wall / tokens
        rows.append([f"{size}-message conversation ({tokens:,} tokens), T5", "1", str(size), str(len(examples)),
                     ISSUE_OLD[size], old, seconds(wall), speedup, f"{measured.load:.1f}"])

    scaling = ", ".join(f"{value * 1e6:.1f} µs per token of the {size}-message conversation"
                        for size, value in per_token.items())
    table = markdown_table(["what", "conversations", "messages", "examples", "old (issue)", "old (here)",
                            "new (here)", "speed-up here", "load avg"], rows)
    print(table)
    print(f"Time per conversation token: {scaling}")
    if args.quick:
        return
    body = f"""
What it measures: `utils/sft_data.tokenize_conversations` as `sft_train.py` calls it (one process) on
`{SHAREGPT}` of `../shared/data` (read by `utils/conversations.load_conversations`), with
the default recipe's limits (config/sft.yaml: `--max_source_length {source_limit}`, `--max_target_length
{target_limit}`, `--max_length {length_limit}`, `--overlong truncate`); then `seq2seq_examples` (the T5 examples)
of the 86- and 330-message conversations alone. Times are the shortest of {args.repeats} runs. Tokenizer:
trained on the fly by `train_tokenizer.py` on `{WIKI_JSONL}` with the demo recipe's settings
({vocab_size:,} tokens, {demo['num_sentinels']} sentinels).

T5 builds one example per answer whose prompt is the conversation before it, oldest turns dropped to fit
(`utils.tokenization.chat_format.render_prompt`). The old code rendered and tokenised each answer's conversation, then
once more after each dropped turn: a quadratic number of renderings of growing text. Now
`utils.tokenization.chat_format.ChatPrompts` renders and tokenises a conversation once and cuts every prompt from it at
message boundaries (binary search for the oldest turn that fits), with the same token ids
(tests/test_sft.py compares them with each trimmed prompt rendered whole; this script checks the
86-message conversation against the old algorithm). "old (issue)" is the reporter's figure (another
machine and tokenizer); "old (here)" runs the old algorithm here. Llama renders each conversation once
(labels from the assistant mask) and did not have the problem; its row is for comparison. The machine has
2 cores shared with other engineers' tests ("load avg": 1-minute load average when the row's fastest run started), so
wall times are upper bounds.

{table}

Linear in the conversation: {scaling}.
"""
    write_section("bench_sft_tokenize.py", "SFT tokenisation: time on long conversations",
                  ["transformers", "tokenizers", "datasets"], body)


if __name__ == "__main__":
    main()
