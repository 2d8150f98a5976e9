"""Tokenizer training benchmark (issue 2): peak RSS and wall time of `train_tokenizer.py` against corpus
size, with and without the memory budget, and compression on held-out real wiki text beside the two
reference tokenizers in ../shared/anchors.

    .venv/bin/python bench/bench_tokenizer.py                 # 25 / 100 / 200 MB, ~10-15 min on 2 cores
    .venv/bin/python bench/bench_tokenizer.py --quick         # tiny sizes, seconds (smoke test; no docs)

Each training runs as its own process (`common.run_measured`), so its peak RSS is its own. The corpora are
synthetic mixes of the real text (`common.build_mixed_corpus`, cached in bench/_work/); a quarter of the
zhwiki articles of zhwiki_text/jastfkjg_wiki_00.jsonl is held out of that mix and used for the
compression table. Also checks train_tokenizer.py's BYTES_PER_TRAIN_CHAR against the measured peak RSS
per training character of the runs without a budget.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import (MB, PYTHON, REPO, WIKI_JSONL, WORK, build_mixed_corpus, load_real_texts, log,
                    markdown_table, run_measured, shared_path, write_section)

from train_tokenizer import BYTES_PER_TRAIN_CHAR  # noqa: E402  (bench/common puts the repo on sys.path)
from utils.io import write_text_atomic  # noqa: E402

HELD_OUT_EVERY = 4  # every 4th article of the wiki JSONL is held out of the training mix


def split_real_texts() -> tuple[list[str], list[dict]]:
    """(texts the synthetic corpus is mixed from, held-out wiki articles as JSONL records)."""
    texts, held_out = [], []
    wiki_index = 0
    for item in load_real_texts():
        if item.source == Path(WIKI_JSONL).name:
            wiki_index += 1
            if wiki_index % HELD_OUT_EVERY == 0:
                held_out.append({"id": item.id, "title": item.title, "text": item.text})
                continue
        texts.append(item.text)
    return texts, held_out


def train_command(corpus: Path, output_dir: Path, vocab_size: int, budget_gb: float,
                  eval_file: Path | None = None) -> list[str]:
    command = [PYTHON, str(REPO / "train_tokenizer.py"), "--input", str(corpus), "--output_dir", str(output_dir),
               "--overwrite_output_dir", "--vocab_size", str(vocab_size), "--memory_budget_gb", str(budget_gb)]
    if eval_file is not None:
        command += ["--eval_files", str(eval_file), "--reference_tokenizers",
                    str(shared_path("chatlm_mini_chinese_tokenizer", "ZHLM_SHARED_ANCHORS")),
                    str(shared_path("chatglm2_tokenizer/tokenizer.model", "ZHLM_SHARED_ANCHORS"))]
    return command


def sampled_chars(log_text: str, total_chars: int) -> int:
    """Characters the run trained on, from its 'sampled X of Y documents, A of B characters' line."""
    for line in log_text.splitlines():
        if "sampled " in line and " characters (" in line:
            part = line.split(" documents, ", 1)[1].split(" of ", 1)[0]
            return int(part.replace(",", ""))
    return total_chars


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes_mb", type=float, nargs="+", default=[25, 100, 200],
                        help="Corpus sizes in decimal MB of UTF-8 text.")
    parser.add_argument("--budget_gb", type=float, default=1.0,
                        help="--memory_budget_gb of the budgeted runs (the others pass 0 = all text).")
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--quick", action="store_true",
                        help="Tiny sizes and vocabulary, no docs/BENCHMARKS.md update (smoke test).")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes_mb, args.vocab_size, args.budget_gb = [0.2], 1024, 0.002

    texts, held_out = split_real_texts()
    work = WORK / ("tokenizer_quick" if args.quick else "tokenizer")
    held_out_path = work / "held_out_wiki.jsonl"
    write_text_atomic(held_out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in held_out))
    log(f"{len(texts):,} real texts in the mix ({sum(map(len, texts)):,} characters); {len(held_out)} wiki "
        f"articles held out ({sum(len(r['text']) for r in held_out):,} characters)")

    rows, results = [], []
    largest = max(args.sizes_mb)
    for size in sorted(args.sizes_mb):
        corpus = build_mixed_corpus(size, texts, name="tokenizer_mix_quick" if args.quick else "tokenizer_mix")
        for budget in (0.0, args.budget_gb):
            score = budget > 0 and size == largest
            out = work / f"tok_{size:g}MB_budget{budget:g}"
            log(f"train: {corpus.mb:.0f} MB corpus, budget {budget:g} GB ...")
            measured = run_measured(train_command(corpus.path, out, args.vocab_size, budget,
                                                  held_out_path if score else None), out.with_suffix(".log"))
            chars = sampled_chars(measured.log_text, corpus.chars)
            result = {"size_mb": corpus.mb, "chars": corpus.chars, "budget_gb": budget, "train_chars": chars,
                      "wall_s": measured.wall_s, "cpu_s": measured.cpu_s, "peak_rss_mb": measured.peak_rss_mb}
            results.append(result)
            log(f"  peak RSS {measured.peak_rss_mb:,.0f} MB, wall {measured.wall_s:.1f} s, trained on "
                f"{chars:,} characters")
            rows.append([f"{corpus.mb:.0f}", f"{corpus.chars / 1e6:.1f}", "none" if budget == 0 else f"{budget:g} GB",
                         f"{chars / 1e6:.1f}", f"{measured.wall_s:.1f}", f"{measured.cpu_s:.1f}",
                         f"{measured.peak_rss_mb:,.0f}", f"{measured.peak_rss_mb / 1e3 / (corpus.mb / 1e3):.2f}",
                         f"{measured.peak_rss_mb * 1e6 / max(chars, 1):.1f}"])
    headers = ["corpus MB", "corpus Mchars", "budget", "trained on Mchars", "wall s", "CPU s", "peak RSS MB",
               "RSS GB per corpus GB", "RSS bytes per trained char"]
    table = markdown_table(headers, rows)
    print(table)

    report_path = work / f"tok_{largest:g}MB_budget{args.budget_gb:g}" / "tokenizer_report.json"
    scores = json.loads(report_path.read_text())["scores"]
    score_rows = [[s["name"], f"{s['vocab_size']:,}", f"{s['chars_per_token']:.3f}", f"{s['unk_rate']:.2%}",
                   f"{s['tokens']:,}"] for s in scores]
    score_table = markdown_table(["tokenizer", "vocab", "chars/token", "unk rate", "tokens"], score_rows)
    print(score_table)
    (work / "results.json").write_text(json.dumps({"runs": results, "scores": scores}, indent=2))
    if args.quick:
        return

    free = [r for r in results if r["budget_gb"] == 0]
    per_char = max(r["peak_rss_mb"] * 1e6 / r["train_chars"] for r in free if r is not free[0]) if len(free) > 1 \
        else free[0]["peak_rss_mb"] * 1e6 / free[0]["train_chars"]
    body = f"""
What it measures: `train_tokenizer.py` (default `bpe`: character-level BPE with byte fallback,
vocabulary {args.vocab_size:,}) run as a separate process per row; peak RSS is that process's own
(`wait4` `ru_maxrss`), wall and CPU time are the whole command (reading, sampling, training, saving).
Corpora: synthetic parquet files built by `bench/common.build_mixed_corpus` from the real text in
`../shared/data` (zhwiki articles + ChatLM-mini-Chinese pretraining pairs) cut into 2-32 character slices
and glued into documents, so the pre-token table keeps growing with size as in a large real corpus.
"budget none" passes `--memory_budget_gb 0` (train on all text); the other rows pass
`--memory_budget_gb {args.budget_gb:g}`, which samples at most {args.budget_gb:g} GB / {BYTES_PER_TRAIN_CHAR} bytes =
{args.budget_gb * 1e9 / BYTES_PER_TRAIN_CHAR / 1e6:.0f} M characters. The machine has 2 cores shared with other
engineers' test runs, so wall times are noisy; RSS is not affected by that.

{table}

Compression on held-out real wiki text ({len(held_out)} zhwiki articles of `{WIKI_JSONL}`, every
{HELD_OUT_EVERY}th article, never part of the training mix; scored by `train_tokenizer.py --eval_files ...
--reference_tokenizers ...` in the {largest:g} MB budgeted run; the reference tokenizers are the ones in
`../shared/anchors`):

{score_table}

`BYTES_PER_TRAIN_CHAR = {BYTES_PER_TRAIN_CHAR}` in `train_tokenizer.py` (turns the budget into a sample size):
the largest measured peak RSS per trained character without a budget (all corpus sizes above the smallest,
where the fixed ~interpreter/library baseline dominates) is {per_char:.1f} bytes.
"""
    write_section("bench_tokenizer.py", "Tokenizer training: memory, time, compression",
                  ["tokenizers", "transformers", "sentencepiece", "pyarrow"], body)
    log("wrote the bench_tokenizer.py section of docs/BENCHMARKS.md")


if __name__ == "__main__":
    sys.exit(main())
