"""Parameter-efficient SFT methods side by side (issue 25, CPU): full fine-tuning, LoRA and its variants (DoRA,
rsLoRA, PiSSA, OLoRA, LoRA+), IA3, prefix tuning (P-tuning v2), P-tuning and prompt tuning, each at the same
steps on the same data from the same base, on a tiny Llama and a tiny T5.

    .venv/bin/python -m bench.bench_peft_methods              # a few minutes on 2 cores; writes docs/BENCHMARKS.md
    .venv/bin/python -m bench.bench_peft_methods --quick      # 4 steps per arm, no docs (smoke test)

Data: the demo instructions (data/demo/sft.jsonl, 220 conversations): the last 20 held out, the rest for
training. Bases: a tokenizer and a llama-tiny / t5-tiny model pretrained here on the training conversations'
text only (so the held-out answers are new to the base). Each arm runs `sft_train.main` with the same batch,
steps, seed and constant learning rate, the rate a method is usually run at (prompt methods and IA3 need a far
larger one than full fine-tuning). Figures: trainable parameters, held-out loss per answer token (the stage's own
exact evaluation), and training tokens per second (non-padding input tokens / training time, this process's
threads; virtual tokens not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import pre_train
import sft_train
import train_tokenizer
from bench.harness import REPO, WORK, fmt_int, log, markdown_table, other_work, write_section

DATA = REPO / "data" / "demo" / "sft.jsonl"
HELD_OUT = 20
# (arm, --peft and flags, learning rate): the rates methods are usually run at, scaled for tiny models
ARMS = [
    ("full fine-tuning", ["--peft", "none"], 1e-3),
    ("LoRA r 8", ["--peft", "lora"], 5e-3),
    ("DoRA", ["--peft", "lora", "--use_dora", "true"], 5e-3),
    ("rsLoRA", ["--peft", "lora", "--use_rslora", "true"], 5e-3),
    ("LoRA, PiSSA init", ["--peft", "lora", "--lora_init", "pissa"], 5e-3),
    ("LoRA, OLoRA init", ["--peft", "lora", "--lora_init", "olora"], 5e-3),
    ("LoRA+ (ratio 16)", ["--peft", "lora", "--loraplus_lr_ratio", "16"], 5e-3),
    ("IA3", ["--peft", "ia3"], 3e-2),
    ("prefix tuning (P-tuning v2)", ["--peft", "prefix"], 3e-2),
    ("P-tuning (v1, MLP encoder)", ["--peft", "ptuning"], 3e-2),
    ("prompt tuning", ["--peft", "prompt"], 3e-2),
]
FAMILIES = {"llama": "llama-tiny", "t5": "t5-tiny"}


def split_data(work: Path) -> tuple[Path, Path, Path]:
    """train.jsonl, held_out.jsonl (the last HELD_OUT conversations) and corpus.jsonl (the training text)."""
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    train, held = rows[:-HELD_OUT], rows[-HELD_OUT:]
    paths = work / "train.jsonl", work / "held_out.jsonl", work / "corpus.jsonl"
    for path, part in zip(paths[:2], (train, held)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    texts = ["".join(m["content"] for m in r["messages"]) for r in train]
    paths[2].write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return paths


def build_bases(work: Path, corpus: Path, steps: int) -> dict[str, Path]:
    tokenizer = work / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        train_tokenizer.main(["--config", "none", "--input", str(corpus), "--vocab_size", "2048",
                              "--output_dir", str(tokenizer), "--num_sentinels", "8", "--min_frequency", "1"])
    bases = {}
    for family, preset in FAMILIES.items():
        bases[family] = work / f"base_{family}"
        pre_train.main(["--config", "none", "--model_config", preset, "--tokenizer_name_or_path", str(tokenizer),
                        "--train_files", str(corpus), "--output_dir", str(bases[family]), "--block_size", "128",
                        "--max_source_length", "128", "--per_device_train_batch_size", "8", "--max_steps",
                        str(steps), "--learning_rate", "3e-3", "--logging_steps", "20", "--eval_strategy", "no",
                        "--save_strategy", "no", "--report_to", "none", "--seed", "3",
                        "--preprocessing_num_workers", "1"])
    return bases


def run_arm(base: Path, train: Path, held: Path, output: Path, flags: list[str], lr: float, steps: int) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    load, began = os.getloadavg()[0], time.perf_counter()
    trainer = sft_train.main([
        "--config", "none", "--model_name_or_path", str(base), "--train_files", str(train),
        "--validation_files", str(held), "--output_dir", str(output), "--max_length", "128",
        "--max_source_length", "96", "--max_target_length", "96", "--per_device_train_batch_size", "8",
        "--learning_rate", str(lr), "--lr_scheduler_type", "constant", "--max_steps", str(steps),
        "--logging_steps", str(max(1, steps // 4)), "--eval_strategy", "no", "--save_strategy", "no",
        "--eval_samples", "0", "--report_to", "none", "--seed", "7", "--lora_r", "8", "--lora_alpha", "16",
        "--num_virtual_tokens", "16", *flags])
    summary = json.loads((output / "training_summary.json").read_text())
    return {"trainable": summary["trainable_parameters"], "parameters": summary["parameters"],
            "eval_loss": summary["eval_loss"], "tokens_per_s": trainer.state.num_input_tokens_seen /
            summary["train_runtime"], "wall_s": time.perf_counter() - began, "load": load}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="SFT steps of every arm")
    parser.add_argument("--pretrain_steps", type=int, default=40, help="pretraining steps of each base")
    parser.add_argument("--quick", action="store_true", help="4 steps per arm, 20 of pretraining; no docs")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.pretrain_steps = 4, 20
    work = WORK / "peft_methods"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    train, held, corpus = split_data(work)
    bases = build_bases(work, corpus, args.pretrain_steps)
    results = {}
    for family, base in bases.items():
        for name, flags, lr in ARMS:
            log(f"{family}: {name}")
            results[f"{family} | {name}"] = {**run_arm(base, train, held, work / "out", flags, lr, args.steps),
                                             "lr": lr}
    (work / "results.json").write_text(json.dumps(results, indent=2))
    if args.quick:
        return results
    rows = []
    for key, r in results.items():
        family, name = key.split(" | ")
        rows.append([family, name, f"{r['lr']:g}", fmt_int(r["trainable"]),
                     f"{100 * r['trainable'] / r['parameters']:.2f}%", f"{r['eval_loss']:.3f}",
                     fmt_int(r["tokens_per_s"])])
    table = markdown_table(["model", "method", "learning rate", "trainable parameters", "of all",
                            "held-out loss", "train tokens/s"], rows)
    loads = [r["load"] for r in results.values()]
    speed = ("other work shared the 2 cores, so only differences of about 2x and more are signal"
             if other_work(loads) else "nothing else ran, so the rates compare")
    body = f"""{table}

Each arm: `sft_train.py` for {args.steps} steps of 8 conversations (constant learning rate, seed 7) on the
demo instructions (200 for training, the last {HELD_OUT} held out), from the same base: a llama-tiny and a t5-tiny
pretrained here for {args.pretrain_steps} steps on the training conversations' text (T5 with SFT's default
`--freeze auto`: embeddings and encoder frozen, so full fine-tuning and LoRA train the decoder only). LoRA r 8,
alpha 16 on every projection; prompt methods 16 virtual tokens. Held-out loss: mean cross-entropy per answer token
of the held-out conversations. Tokens/s: non-padding input tokens over training time (virtual tokens not counted)
on 2 cores; the 1-minute load average at the arms' starts was {min(loads):.1f} to {max(loads):.1f}: {speed}.
Models this small say which methods learn at all in a few steps and what each costs, not how they rank on a
real base: at d_model 64 the adapters' extra small matrix products and PEFT's per-layer dispatch cost more than
the weight gradients they save, so LoRA and its variants run slower than full fine-tuning here, while IA3 and the
prompt methods (a scale per channel, or a few virtual tokens) add little."""
    write_section("bench_peft_methods.py", "Parameter-efficient SFT methods", ["torch", "transformers", "peft"],
                  body, argv)
    return results


if __name__ == "__main__":
    main()
