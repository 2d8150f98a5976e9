"""GRPO demo-sized check (issue 14): does GRPO with the exact-answer reward raise a tiny Llama's held-out accuracy
on simple arithmetic?

    .venv/bin/python bench/bench_grpo_arithmetic.py             # ~10-20 min on 2 shared cores; writes docs/BENCHMARKS.md
    .venv/bin/python bench/bench_grpo_arithmetic.py --quick     # a smoke run (no docs update)

The data is written here (our own text, seeded): questions `{a}加{b}等于多少？` with answer `{a+b}`, a and b in
0..--max_operand; a seeded share of the pairs is held out and never trained on. The chain is the toolkit's own
stages, in-process: train_tokenizer.py on the training questions and answers, pre_train.py (llama-tiny preset) on
them as text, sft_train.py on the training pairs, then grpo_train.py with `--rewards exact_answer` (LoRA) on the
training prompts. Accuracy: greedy replies (`model.inference.generation.generate_replies`) to the held-out
questions, scored by the reward's own `answer_matches`, for the SFT model and for GRPO's merged model. Working
files go to bench/_work/grpo_arithmetic/.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time

from common import WORK, log, markdown_table, write_section
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, set_seed

import grpo_train  # noqa: E402  (bench/common puts the repo on sys.path)
import pre_train  # noqa: E402
import sft_train  # noqa: E402
import train_tokenizer  # noqa: E402
from model.inference.generation import generate_replies  # noqa: E402
from model.training.rewards import answer_matches  # noqa: E402

SEED = 1234


def problems(max_operand: int, held_out: float) -> tuple[list[dict], list[dict]]:
    """(train, held out) rows `{prompt, response}` of every sum a + b, a and b in 0..max_operand."""
    rows = [{"prompt": f"{a}加{b}等于多少？", "response": str(a + b)}
            for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(SEED).shuffle(rows)
    count = int(len(rows) * held_out)
    return rows[count:], rows[:count]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def accuracy(model_dir, rows) -> float:
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    config = GenerationConfig(**{**model.generation_config.to_dict(), "do_sample": False, "max_new_tokens": 8,
                                 "repetition_penalty": 1.0})
    replies = generate_replies(model, tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in rows], config,
                               batch_size=64, progress=False)
    return sum(answer_matches(reply, r["response"]) for reply, r in zip(replies, rows)) / len(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_operand", type=int, default=29)
    parser.add_argument("--pretrain_steps", type=int, default=300)
    parser.add_argument("--sft_steps", type=int, default=150)
    parser.add_argument("--grpo_steps", type=int, default=60)
    parser.add_argument("--quick", action="store_true", help="A few steps of each stage, no docs update.")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_operand, args.pretrain_steps, args.sft_steps, args.grpo_steps = 9, 20, 10, 2
    work = WORK / ("grpo_arithmetic_quick" if args.quick else "grpo_arithmetic")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    set_seed(SEED)
    train, held = problems(args.max_operand, 0.1)
    train_file, held_file = write_jsonl(work / "train.jsonl", train), write_jsonl(work / "held_out.jsonl", held)
    text = write_jsonl(work / "text.jsonl", [{"text": f"{r['prompt']}{r['response']}"} for r in train])
    log(f"{len(train)} training sums, {len(held)} held out (a, b in 0..{args.max_operand})")
    common = ["--config", "none", "--report_to", "none", "--seed", str(SEED), "--logging_steps", "10"]
    timings = {}

    began = time.perf_counter()
    train_tokenizer.main(["--config", "none", "--input", str(text), "--output_dir", str(work / "tokenizer"),
                          "--vocab_size", "512", "--num_sentinels", "0", "--min_frequency", "1"])
    pre_train.main([*common, "--model_config", "llama-tiny", "--tokenizer_name_or_path", str(work / "tokenizer"),
                    "--train_files", str(text), "--output_dir", str(work / "pretrain"), "--block_size", "64",
                    "--per_device_train_batch_size", "16", "--max_steps", str(args.pretrain_steps),
                    "--learning_rate", "3e-3", "--eval_strategy", "no", "--save_strategy", "no",
                    "--preprocessing_num_workers", "1"])
    sft_train.main([*common, "--model_name_or_path", str(work / "pretrain"), "--train_files", str(train_file),
                    "--output_dir", str(work / "sft"), "--max_source_length", "32", "--max_target_length", "16",
                    "--max_length", "48", "--per_device_train_batch_size", "32", "--learning_rate", "3e-3",
                    "--max_steps", str(args.sft_steps), "--eval_strategy", "no", "--save_strategy", "no",
                    "--eval_samples", "0"])
    timings["pretrain + SFT"] = time.perf_counter() - began
    sft_accuracy = accuracy(work / "sft", held)
    log(f"SFT model: held-out accuracy {sft_accuracy:.3f}")

    began = time.perf_counter()
    trainer = grpo_train.main([*common, "--model_name_or_path", str(work / "sft"), "--train_files", str(train_file),
                               "--output_dir", str(work / "grpo"), "--rewards", "exact_answer", "--max_prompt_length",
                               "32", "--max_completion_length", "8", "--num_generations", "8",
                               "--per_device_train_batch_size", "32", "--learning_rate", "2e-4",
                               "--lr_scheduler_type", "constant", "--temperature", "1.0", "--lora_r", "16",
                               "--max_steps", str(args.grpo_steps), "--save_strategy", "no",
                               "--gradient_checkpointing", "false", "--logging_steps", "1"])
    timings["GRPO"] = time.perf_counter() - began
    grpo_accuracy = accuracy(work / "grpo", held)
    log(f"GRPO model: held-out accuracy {grpo_accuracy:.3f}")

    rewards = [h["rewards/exact_answer/mean"] for h in trainer.state.log_history if "rewards/exact_answer/mean" in h]
    tenth = max(len(rewards) // 10, 1)
    rows = [["SFT (before GRPO)", f"{len(held)}", f"{100 * sft_accuracy:.1f}%", "", f"{timings['pretrain + SFT']:.0f}"],
            [f"GRPO, {args.grpo_steps} steps", f"{len(held)}", f"{100 * grpo_accuracy:.1f}%",
             f"{sum(rewards[:tenth]) / tenth:.3f} -> {sum(rewards[-tenth:]) / tenth:.3f}", f"{timings['GRPO']:.0f}"]]
    table = markdown_table(["model", "held-out sums", "held-out accuracy (greedy)",
                            "training reward (first -> last tenth of steps)", "seconds"], rows)
    print(table)
    if args.quick:
        return
    body = f"""
What it measures: whether GRPO (`grpo_train.py --rewards exact_answer`, LoRA r 16, 8 sampled replies per
prompt at temperature 1.0, 4 prompts per step, learning rate 2e-4 constant, {args.grpo_steps} steps) raises a
tiny Llama's (llama-tiny preset: 2 layers, hidden 64) accuracy on sums it never trained on. The data is written by
the script (seed {SEED}): `a加b等于多少？` -> `a+b`, a and b in 0..{args.max_operand}, 10% of the {len(train) + len(held)}
sums held out. Before GRPO: train_tokenizer.py (512 tokens), pre_train.py ({args.pretrain_steps} steps on the
training sums as text), sft_train.py ({args.sft_steps} steps). Accuracy: greedy replies of at most 8 tokens,
scored by the exact-answer reward's `answer_matches` (the reply's last number equals the sum).

{table}

The training reward is the exact-answer reward's mean over the sampled replies of each step (logged by TRL as
`rewards/exact_answer/mean`).
"""
    write_section("bench_grpo_arithmetic.py", "GRPO on arithmetic: held-out accuracy of a tiny Llama",
                  ["torch", "transformers", "trl", "peft"], body)


if __name__ == "__main__":
    main()
