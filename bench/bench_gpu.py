"""GPU pretraining throughput: bf16 tokens/s, MFU and peak memory of `t5-0.2b` and `llama-0.2b` under
`pre_train.py` itself (HF Trainer, packed data), at a few micro-batch sizes, eager and `torch.compile`.

Three steps, because the GPU machine has no access to ../shared and no package registry:

    .venv/bin/python bench/bench_gpu.py prepare     # here: corpus + 32k tokenizer into bench/_work/gpu/
    python3 bench/bench_gpu.py run --out results.json [--only llama]   # on the GPU machine
    .venv/bin/python bench/bench_gpu.py report --results results.json  # here: docs/BENCHMARKS.md section

`prepare` builds a parquet corpus of mixed real Chinese text (bench/common.build_mixed_corpus) and
trains the toolkit's default tokenizer (vocab 32,000) on it. `run` starts one `pre_train.py` process per
configuration and reads its progress lines (`... | 312.4k tok/s | mfu 44.1% | mem 21.3GiB | ...`); the
figure of a run is the median over the log steps after the first third (warm-up and compilation excluded).
MFU counts the model's training FLOPs per token (model/build.flops_per_token: 6 x matmul parameters touched
plus attention) against the GPU's dense bf16 peak (utils/training.PEAK_FLOPS).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GPU_WORK = HERE / "_work" / "gpu"
LINE = re.compile(r"step (\d+)/(\d+) \| loss ([\d.]+) \| lr \S+ \| ([\d.]+k?) tok/s(?: \| mfu ([\d.]+)%)?"
                  r"(?: \| mem ([\d.]+)GiB)?")

# (preset, micro-batch, torch.compile, Liger kernels, attention); sequence length 1024 for Llama, 512 encoder
# tokens for T5. Liger (`--use_liger_kernel`, pip install liger-kernel) patches Llama's RMSNorm, RoPE, SwiGLU
# and the LM head + cross-entropy (fused: the full logits are never materialised); it has no T5 kernels.
# T5's relative position bias enters SDPA as an additive mask, so no flash kernel serves it.
CONFIGS = [("llama-0.2b", 16, False, False, "sdpa"), ("llama-0.2b", 32, False, False, "sdpa"),
           ("llama-0.2b", 32, True, False, "sdpa"), ("llama-0.2b", 64, True, False, "sdpa"),
           ("llama-0.2b", 64, False, True, "sdpa"), ("llama-0.2b", 64, True, True, "sdpa"),
           ("llama-0.2b", 128, True, True, "sdpa"),
           ("t5-0.2b", 32, False, False, "sdpa"), ("t5-0.2b", 64, False, False, "sdpa"),
           ("t5-0.2b", 64, True, False, "sdpa"), ("t5-0.2b", 128, True, False, "sdpa"),
           ("t5-0.2b", 256, True, False, "sdpa")]


def run_name(preset: str, batch: int, compile_: bool, liger: bool, attention: str) -> str:
    return (f"{preset}-b{batch}{'-compile' if compile_ else ''}{'-liger' if liger else ''}"
            f"{'' if attention == 'sdpa' else '-' + attention}")


def prepare(args) -> None:
    sys.path.insert(0, str(HERE))
    from common import build_mixed_corpus, load_real_texts, log

    texts = [t.text for t in load_real_texts()]
    corpus = build_mixed_corpus(args.corpus_mb, texts, name="gpu_train")
    held_out = build_mixed_corpus(1, texts, name="gpu_validation")
    GPU_WORK.mkdir(parents=True, exist_ok=True)
    for info, name in ((corpus, "train.parquet"), (held_out, "validation.parquet")):
        target = GPU_WORK / name
        target.unlink(missing_ok=True)
        os.link(info.path, target)
    tokenizer = GPU_WORK / "tokenizer"
    subprocess.run([sys.executable, "train_tokenizer.py", "--config", "none", "--input", str(GPU_WORK / "train.parquet"),
                    "--eval_files", str(GPU_WORK / "validation.parquet"), "--vocab_size", "32000",
                    "--output_dir", str(tokenizer), "--overwrite_output_dir"], cwd=REPO, check=True)
    log(f"prepared {GPU_WORK}: carry 'bench/_work/gpu' to the GPU machine")


def tokens_per_second(text: str) -> float:
    """`312.4k` or `840` (the progress line's two forms) as a number."""
    return float(text[:-1]) * 1e3 if text.endswith("k") else float(text)


def run_one(preset: str, batch: int, compile_: bool, liger: bool, attention: str, steps: int, workdir: Path) -> dict:
    name = run_name(preset, batch, compile_, liger, attention)
    output = workdir / name
    command = [sys.executable, "pre_train.py", "--config", "none", "--model_config", preset,
               "--tokenizer_name_or_path", str(GPU_WORK / "tokenizer"),
               "--train_files", str(GPU_WORK / "train.parquet"),
               "--validation_files", str(GPU_WORK / "validation.parquet"),
               "--output_dir", str(output), "--no_resume", "--max_steps", str(steps),
               "--per_device_train_batch_size", str(batch), "--block_size", "1024", "--max_source_length", "512",
               "--learning_rate", "3e-4", "--warmup_steps", "10", "--logging_steps", "10",
               "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
               "--dataloader_num_workers", "6", "--preprocessing_num_workers", "8", "--seed", "1",
               "--attn_implementation", attention]
    if compile_:
        command += ["--torch_compile", "true"]
    if liger:
        command += ["--use_liger_kernel", "true"]
    started = time.perf_counter()
    process = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    log_text = process.stdout + process.stderr
    (workdir / f"{name}.log").write_text(log_text)
    rows = [m.groups() for m in LINE.finditer(log_text)]
    after_warmup = [r for r in rows if int(r[0]) > steps // 3]
    result = {"name": name, "preset": preset, "batch": batch, "compile": compile_, "liger": liger,
              "attention": attention, "steps": steps,
              "returncode": process.returncode, "wall_s": round(time.perf_counter() - started, 1)}
    if after_warmup:
        result.update(
            tokens_per_s=statistics.median(tokens_per_second(r[3]) for r in after_warmup),
            mfu=statistics.median(float(r[4]) for r in after_warmup) if after_warmup[0][4] else None,
            peak_mem_gib=max(float(r[5]) for r in after_warmup) if after_warmup[0][5] else None,
            first_loss=float(rows[0][2]), last_loss=float(rows[-1][2]))
    params = re.search(r"model \S+: ([\d,]+) parameters", log_text)
    flops = re.search(r"\| ([\d.]+) MFLOP/token", log_text)
    result.update(parameters=params.group(1) if params else None, mflop_per_token=float(flops.group(1)) if flops else None)
    if process.returncode != 0:
        result["error"] = log_text[-2000:]
    return result


def run(args) -> None:
    import torch

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    import platform

    import transformers

    device = {"gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "transformers": transformers.__version__, "cpu_cores": os.cpu_count(),
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    results = {"device": device, "runs": []}
    out = Path(args.out)
    for config in CONFIGS:
        if args.only and not re.search(args.only, run_name(*config)):
            continue
        result = run_one(*config, args.steps, workdir)
        results["runs"].append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "error"}), flush=True)
        if "error" in result:
            print(result["error"][-1500:], flush=True)
        out.write_text(json.dumps(results, indent=2))  # partial results survive a time-out


def report(args) -> None:
    sys.path.insert(0, str(HERE))
    from common import markdown_table, write_section

    merged = {"device": None, "runs": []}
    for path in args.results:
        data = json.loads(Path(path).read_text())
        merged["device"] = merged["device"] or data["device"]
        merged["runs"] += data["runs"]
    rows = []
    for r in merged["runs"]:
        ok = "tokens_per_s" in r and r["returncode"] == 0
        rows.append([r["preset"], r["parameters"] or "", r["batch"], "yes" if r["compile"] else "no",
                     "yes" if r.get("liger") else "no", r.get("attention", "sdpa"),
                     f"{r['tokens_per_s'] / 1e3:,.1f}k" if ok else "failed",
                     f"{r['mfu']:.1f}%" if ok and r.get("mfu") is not None else "",
                     f"{r['peak_mem_gib']:.1f}" if ok and r.get("peak_mem_gib") else "",
                     f"{r['first_loss']:.2f} → {r['last_loss']:.2f}" if ok else ""])
    device = merged["device"]
    body = "\n".join([
        f"GPU: **{device['gpu']}** x{device['gpus']} (PyTorch {device['torch']}, CUDA {device['cuda']}), bf16 "
        "mixed precision (`--precision auto`), AdamW (fused) + "
        f"cosine, packed data, {merged['runs'][0]['steps']} steps per configuration; tokens/s and MFU are medians "
        "over the log steps after the first third. MFU = training FLOPs per token (6 x parameters touched + "
        "attention; `model/build.flops_per_token`) x tokens/s / dense bf16 peak (989 TFLOP/s for H100/H200, "
        "`utils/training.PEAK_FLOPS`). Llama: 1024-token blocks; T5: span corruption, 512 encoder tokens "
        "(114 decoder tokens), tokens/s counts encoder input tokens. Vocabulary: the toolkit's 32k BPE.", "",
        markdown_table(["preset", "parameters", "micro-batch", "torch.compile", "Liger", "attention", "tokens/s", "MFU",
                        "peak memory (GiB)", "loss"], rows), "",
        "Goals (issue 3, on H100): MFU ≥ 45% for Llama, ≥ 35% for T5. Command on the GPU machine: "
        "`python3 bench/bench_gpu.py run --out results.json` after `bench/bench_gpu.py prepare` here.",
    ])
    if args.notes:
        body += "\n\n" + Path(args.notes).read_text(encoding="utf-8").strip()
    print(body)
    machine = f"1x {device['gpu']} (lent GPU machine, {device['cpu_cores']} CPU cores), Python {device['python']}"
    libraries = f"torch {device['torch']} (CUDA {device['cuda']}), transformers {device['transformers']}"
    write_section("bench_gpu.py", "Pretraining throughput on a GPU (bf16 MFU, tokens/s, memory)", [], body,
                  argv=["run", "--out", "results.json"], date=device["date"], machine=machine, libraries=libraries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build the corpus and tokenizer (here, with ../shared)")
    p.add_argument("--corpus_mb", type=float, default=12)
    p = sub.add_parser("run", help="run the configurations (on the GPU machine)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--only", default=None, help="regular expression over the run names, e.g. llama")
    p.add_argument("--workdir", default="/tmp/bench_gpu")
    p = sub.add_parser("report", help="write the docs/BENCHMARKS.md section from result files (here)")
    p.add_argument("--results", nargs="+", required=True)
    p.add_argument("--notes", default=None, help="markdown file with interpretation appended to the section")
    args = parser.parse_args()
    {"prepare": prepare, "run": run, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
