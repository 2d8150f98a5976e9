"""Logit distillation: does a teacher make a small student better at the same data and step budget?

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_distill    # ~3 min on 2 idle cores (10 at load 11); writes docs/BENCHMARKS.md
    .venv/bin/python -m bench.bench_distill --quick              # a smoke run (no docs update)

The toolkit's own stages, in-process, on the real zhwiki articles of ../shared (wikiextractor output, 64 articles,
~1 MB: 56 to train on, 8 held out, seeded) with a tokenizer train_tokenizer.py makes from the training articles
(4,096 tokens): a teacher (llama-demo preset: 4 layers, hidden 256) pretrained for
--teacher_steps, then a student (llama-tiny: 2 layers, hidden 64) pretrained for --student_steps from the same
initialisation on the same blocks in the same order, once without a teacher and once with it (`--kd_alpha`,
`--kd_temperature`). Figures: the held-out cross-entropy and bits per character of each (pre_train.py's final
evaluation on the corpus's validation split), the student's KL(teacher || student) per held-out token, and
tokens/s of the student's training (the teacher's forward pass is the price). Working files:
bench/_work/distill/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil

import pre_train
import train_tokenizer
from bench.corpora import shared_path
from bench.harness import WORK, log, markdown_table, timed, write_section
from model.training.distillation import teacher_kl

SEED = 1234


def pretrain(work, name: str, preset: str, steps: int, *extra: str):
    """pre_train.py in-process; (trainer, training_summary.json, wall seconds)."""
    with timed() as run:
        trainer = pre_train.main([
            "--config", "none", "--model_config", preset, "--tokenizer_name_or_path", str(work / "tokenizer"),
            "--train_files", str(work / "train.jsonl"), "--validation_files", str(work / "validation.jsonl"),
            "--output_dir", str(work / name), "--block_size", "128",
            "--per_device_train_batch_size", "8", "--max_steps", str(steps), "--learning_rate", "2e-3",
            "--warmup_steps", "10", "--lr_scheduler_type", "cosine", "--logging_steps", "20", "--eval_strategy",
            "no", "--save_strategy", "no", "--report_to", "none", "--seed", str(SEED),
            "--preprocessing_num_workers", "1", *extra])
    return trainer, json.loads((work / name / "training_summary.json").read_text()), run.wall_s


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher_steps", type=int, default=300)
    parser.add_argument("--student_steps", type=int, default=300)
    parser.add_argument("--kd_alpha", type=float, default=0.5)
    parser.add_argument("--kd_temperature", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="A few steps of each run, no docs update.")
    args = parser.parse_args(argv)
    if args.quick:
        args.teacher_steps, args.student_steps = 10, 10
    work = WORK / ("distill_quick" if args.quick else "distill")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    articles = (shared_path("zhwiki_text") / "jastfkjg_wiki_00.jsonl").read_text(encoding="utf-8").splitlines()
    random.Random(SEED).shuffle(articles)
    (work / "validation.jsonl").write_text("\n".join(articles[:8]) + "\n", encoding="utf-8")
    (work / "train.jsonl").write_text("\n".join(articles[8:]) + "\n", encoding="utf-8")
    train_tokenizer.main(["--config", "none", "--input", str(work / "train.jsonl"), "--output_dir",
                          str(work / "tokenizer"), "--vocab_size", "4096", "--num_sentinels", "0"])
    teacher, teacher_summary, teacher_s = pretrain(work, "teacher", "llama-demo", args.teacher_steps)
    log(f"teacher: held-out bpc {teacher_summary['eval_bpc']:.3f}")
    load = os.getloadavg()[0]
    plain, plain_summary, plain_s = pretrain(work, "student", "llama-tiny", args.student_steps)
    distilled, kd_summary, kd_s = pretrain(work, "student_kd", "llama-tiny", args.student_steps,
                                           "--teacher_model_name_or_path", str(work / "teacher"), "--kd_alpha",
                                           str(args.kd_alpha), "--kd_temperature", str(args.kd_temperature))
    batches = list(plain.get_eval_dataloader())
    vocab = len(plain.processing_class)
    kl = {name: teacher_kl(trainer.model.eval(), teacher.model.eval(), batches, shift=True, vocab=vocab)
          for name, trainer in (("plain", plain), ("kd", distilled))}
    tokens = args.student_steps * 8 * 128

    def row(name, summary, seconds, kl_value, steps):
        return [name, f"{summary['parameters']:,}", steps, f"{summary['eval_loss']:.3f}", f"{summary['eval_bpc']:.3f}",
                "-" if kl_value is None else f"{kl_value:.3f}", f"{steps * 8 * 128 / seconds:,.0f}"]

    table = markdown_table(
        ["model", "parameters", "steps", "held-out loss", "held-out bits/char", "KL(teacher, model) per held-out token",
         "training tokens/s"],
        [row("teacher (llama-demo)", teacher_summary, teacher_s, None, args.teacher_steps),
         row("student (llama-tiny), no teacher", plain_summary, plain_s, kl["plain"], args.student_steps),
         row(f"student (llama-tiny), KD alpha {args.kd_alpha:g}, T {args.kd_temperature:g}", kd_summary, kd_s,
             kl["kd"], args.student_steps)])
    print(table)
    figures = {"kl": kl, "bpc": {name: summary["eval_bpc"] for name, summary in
                                 (("teacher", teacher_summary), ("plain", plain_summary), ("kd", kd_summary))}}
    if args.quick:
        return figures
    gain = plain_summary["eval_bpc"] - kd_summary["eval_bpc"]
    body = f"""
What it measures: a small student pretrained with and without a teacher, same data, same {args.student_steps} steps
of 8 x 128 tokens ({tokens:,} tokens), same initialisation and order (seed {SEED}); the teacher is a bigger model
pretrained for {args.teacher_steps} steps on the same articles (real zhwiki text from ../shared: 56 articles to
train on, 8 held out, a 4,096-token tokenizer trained on the 56). Loss with a teacher: (1 - alpha) CE + alpha T^2 KL(teacher_T || student_T) per token
(model/training/distillation.py). Held-out figures: pre_train.py's final evaluation on the corpus's validation
split (plain cross-entropy, whatever the training loss); KL per held-out token at T = 1.

{table}

Reading: with the teacher the student's held-out bits per character are {gain:.3f} lower than without it
({plain_summary['eval_bpc']:.3f} -> {kd_summary['eval_bpc']:.3f}) and its KL to the teacher {kl['plain']:.3f} ->
{kl['kd']:.3f}. The price is the teacher's forward pass at every step: the student trains at {plain_s / kd_s:.2f}x its
tokens/s without a teacher (a teacher {teacher_summary['parameters'] / plain_summary['parameters']:.0f}x the
student's size). The teacher here is itself short of training (held-out loss
{teacher_summary['eval_loss']:.3f} against the plain student's {plain_summary['eval_loss']:.3f}); a teacher
further ahead has more to give. Seeded; on a shared machine
compare the side-by-side figures, not absolute times (1-minute load average at the start of the student runs:
{load:.1f} on 2 cores).
"""
    write_section("bench_distill.py", "Logit distillation: a student with and without a teacher", [
        "torch", "transformers"], body)
    return figures


if __name__ == "__main__":
    main()
