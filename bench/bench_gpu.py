"""GPU pretraining speed of the default recipe (issue 16): `pre_train.py --config config/pretrain.yaml` as a user
runs it on one GPU (bf16, micro-batch 16 x accumulation 4, `--torch_compile auto` = compiled, persistent
data-loader workers) for t5-0.2b (the recipe's model) and llama-0.2b, then the variants that may beat it:
T5 with FlexAttention (the position bias added inside the kernel; FlexAttention has no attention dropout, so
dropout_rate 0, beside its SDPA twin at dropout 0 for a like-with-like figure) and Llama with Liger kernels
(requirements-gpu.txt: fused linear + cross-entropy, RMSNorm, RoPE, SwiGLU), compiled and not. Each run
records tokens/s, MFU and peak memory (medians over the progress lines after the first third of the steps),
the first loss (a model from scratch starts near ln(vocab)) and the last, and what torch.compile did
(graphs, graph breaks, recompilations), into <out_dir>/<device>.json, with every run's log in <out_dir>/logs/.

Three steps, because the GPU machine has no ../shared, no package registry and no project virtualenv:

    .venv/bin/python bench/bench_gpu.py prepare      # here: corpus, 32k tokenizer, wheels incl. liger-kernel (~1 min)
    <the device command below>                       # on the GPU machine: ~8 min
    .venv/bin/python bench/bench_gpu.py report --results bench/results/<device>.json   # here: docs/BENCHMARKS.md

`prepare` is bench/gpu_recipes.py's (the same carried folder serves both). The device command, for the `run`
tool with carry ["bench/_work/gpu_recipes/input"] (about 33 MiB) and timeout_s 600:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site bench/_work/gpu_recipes/input/wheels/*.whl
    && PYTHONPATH=/tmp/site python3 bench/bench_gpu.py run --out_dir $OUT

then copy $OUT/<device>.json into bench/results/ and run `report` on it. `run` starts a run only while
--min_run_s (60 s) of --budget_s (450 s) is left and stops one still going at the end of it, so the command ends
inside the tool's limit with the runs done so far (the results file is rewritten after every run).

CPU check of the logic (the first variant with a tiny preset and sizes; tests/test_bench.py runs it):

    .venv/bin/python bench/gpu_recipes.py prepare --quick
    .venv/bin/python bench/bench_gpu.py run --smoke --out_dir /tmp/bench_gpu
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from gpu_recipes import INPUT, INPUT_QUICK, SMOKE, Launch, environment, execute, measure  # noqa: E402

COMPILE_LINE = re.compile(r"torch\.compile after (\d+) steps: (\d+) graphs \| (\d+) graph breaks(?: \((.*)\))? \| "
                          r"(\d+) recompilations")
NO_DROPOUT = ("--model_overrides", '{"dropout_rate": 0.0}')


@dataclass(frozen=True)
class Variant:
    """One `pre_train.py` run: the default recipe with `flags` on top."""

    name: str
    preset: str
    flags: tuple[str, ...] = ()
    smoke: bool = False  # also in the CPU check (one run checks the logic; some need CUDA: flex, Liger)


# In order of importance: the budget may end the list early.
VARIANTS = (
    Variant("t5-0.2b default", "t5-0.2b", smoke=True),
    Variant("llama-0.2b default", "llama-0.2b"),
    Variant("t5-0.2b flex_attention, dropout 0", "t5-0.2b", ("--attn_implementation", "flex_attention", *NO_DROPOUT)),
    Variant("llama-0.2b Liger", "llama-0.2b", ("--use_liger_kernel", "true")),
    Variant("t5-0.2b dropout 0", "t5-0.2b", NO_DROPOUT),
    Variant("llama-0.2b Liger, not compiled", "llama-0.2b", ("--use_liger_kernel", "true", "--torch_compile", "false")),
)
TINY = {"t5-0.2b": "t5-tiny", "llama-0.2b": "llama-tiny"}


def prepare(args) -> None:
    import gpu_recipes

    gpu_recipes.main(["prepare", *(["--quick"] if args.quick else [])])


def device_slug(name: str) -> str:
    """`NVIDIA H100 80GB HBM3` -> `nvidia_h100_80gb_hbm3`: the results file of a device."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def command(variant: Variant, data: Path, output: Path, smoke: bool) -> list[str]:
    """The user's command (the default recipe), with paths, the run length and the variant's flags."""
    steps = "4" if smoke else "60"
    return [sys.executable, "pre_train.py", "--config", "config/pretrain.yaml",
            "--model_config", TINY[variant.preset] if smoke else variant.preset,
            "--tokenizer_name_or_path", str(data / "tokenizer"), "--train_files", str(data / "train.parquet"),
            "--validation_files", str(data / "validation.parquet"), "--output_dir", str(output),
            "--max_steps", steps, "--logging_steps", "1" if smoke else "5", "--logging_first_step", "true",
            "--report_to", "none", *(SMOKE.extra["pretrain"] if smoke else []), *variant.flags]


def compile_report(log: str) -> dict | None:
    """The trainer's one `torch.compile after N steps: ...` line, as numbers."""
    match = COMPILE_LINE.search(log)
    if not match:
        return None
    steps, graphs, breaks, reasons, recompilations = match.groups()
    return {"after_steps": int(steps), "graphs": int(graphs), "graph_breaks": int(breaks),
            "break_reasons": reasons, "recompilations": int(recompilations)}


def run(args) -> None:
    data = Path(args.input or (INPUT_QUICK if args.smoke else INPUT))
    if not (data / "tokenizer").is_dir():
        sys.exit(f"error: {data / 'tokenizer'} not found; run `bench/bench_gpu.py prepare"
                 f"{' --quick' if args.smoke else ''}` first (and carry its folder to this machine)")
    env = environment(args.smoke)
    try:
        env["versions"]["liger-kernel"] = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        env["versions"]["liger-kernel"] = None
    out_dir = Path(args.out_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{device_slug(env['device'])}{'_smoke' if args.smoke else ''}.json"
    runs_dir = Path(args.runs_dir)  # model outputs (GBs): never under out_dir, whose files travel back
    shutil.rmtree(runs_dir, ignore_errors=True)
    deadline = time.perf_counter() + args.budget_s
    results = {"environment": env, "argv": sys.argv[1:], "budget_s": args.budget_s, "runs": []}
    for variant in VARIANTS:
        if args.smoke and not variant.smoke:
            continue
        left = deadline - time.perf_counter()
        if left < args.min_run_s:
            print(f"skipped {variant.name}: {left:.0f} s of the budget left", flush=True)
            results["runs"].append({"variant": variant.name, "skipped": "time budget spent"})
            continue
        slug = device_slug(variant.name)
        output = runs_dir / slug
        cmd = command(variant, data, output, args.smoke)
        print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
        env_vars = {"OMP_NUM_THREADS": "1"} if args.smoke else None  # tiny CPU runs share a small machine
        process = execute(cmd, out_dir / "logs" / f"{slug}.log", left, env=env_vars)
        launch = Launch(variant.name, "pretrain", cmd[cmd.index("--model_config") + 1], cmd[2:], output)
        result = {"variant": variant.name, "preset": variant.preset, "flags": list(variant.flags),
                  **measure(launch, [process]), "compile": compile_report(process.log)}
        mflop = re.search(r"\| ([\d.]+) MFLOP/token", process.log)
        result["mflop_per_token"] = float(mflop.group(1)) if mflop else None
        del result["args"]
        results["runs"].append(result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "log_tail")}), flush=True)
        if "log_tail" in result:
            print(result["log_tail"][-1500:], flush=True)
        out.write_text(json.dumps(results, indent=2))  # partial results survive a time-out
        shutil.rmtree(output, ignore_errors=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}", flush=True)


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def report(args) -> None:
    import common

    results = json.loads(Path(args.results).read_text())
    env = results["environment"]
    rows = []
    for r in results["runs"]:
        if "skipped" in r:
            rows.append([r["variant"], "", f"skipped ({r['skipped']})", *[""] * 7])
            continue
        compiled = r["compile"]
        rows.append([
            r["variant"], " ".join(f"`{flag}`" for flag in r["flags"]) or "(recipe)",
            "finished" if r["finished"] else f"failed (exit {r['returncodes'][0]})",
            f"{r['tokens_per_s'] / 1e3:,.1f}k" if r["tokens_per_s"] else "",
            f"{r['mfu']:.1f}%" if r["mfu"] is not None else "",
            fmt(r["peak_mem_gib"], ".1f"),
            f"{fmt(r['first_loss'], '.2f')} ({fmt(r['ln_vocab'], '.2f')})", fmt(r["last_loss"], ".2f"),
            f"{compiled['graphs']} / {compiled['graph_breaks']} / {compiled['recompilations']}" if compiled else "off",
            fmt(r["wall_s"], ".0f")])
    device = f"**{env['device']}**" + (" (smoke run on CPU: tiny presets)" if env["smoke"] else "")
    body = "\n".join([
        f"Device: {device}. Each row is `pre_train.py --config config/pretrain.yaml` (the default recipe: bf16, "
        "micro-batch 16 x accumulation 4, AdamW fused, `--torch_compile auto`, 2 persistent data-loader workers), "
        "one process on one GPU, for 60 optimizer steps with a progress line every 5 (and at step 1), with "
        "the flags shown on top. T5: span corruption, 512 encoder tokens (tokens/s counts encoder input tokens); "
        "Llama: 1024-token packed blocks. tokens/s and MFU: medians over the progress lines after step 20; "
        "MFU = training FLOPs per token (`model/build.flops_per_token`) x tokens/s / the GPU's dense bf16 peak "
        "(`model/training/trainer.PEAK_FLOPS`). First loss at step 1, with ln(vocabulary) beside it (where a "
        "model from scratch starts); torch.compile: graphs / graph breaks / recompilations after the first "
        "progress line. Data (`bench/gpu_recipes.py prepare`): a mixed corpus of the real zhwiki and ChatLM text "
        "in `../shared/data`, the toolkit's 32k tokenizer trained on it.", "",
        common.markdown_table(["run", "flags", "status", "tokens/s", "MFU", "peak memory (GiB)",
                               "first loss (ln V)", "last loss", "torch.compile", "wall s"], rows), "",
        "Goals (issue 16, on an H100, default recipe): llama-0.2b >= 50% MFU, t5-0.2b >= 40% MFU. Raw results: "
        f"`bench/results/{Path(args.results).name}`, logs in the run's `$OUT/logs/`.",
    ])
    if args.notes:
        body += "\n\n" + Path(args.notes).read_text(encoding="utf-8").strip()
    print(body)
    machine = (f"1x {env['device']} (lent GPU machine, {env['cpu_cores']} CPU cores), Python {env['python']}"
               if not env["smoke"] else None)
    libraries = ", ".join(f"{name} {version}" for name, version in env["versions"].items() if version)
    common.write_section("bench_gpu.py", "Pretraining speed on one GPU: the default recipe and its variants", [], body,
                         argv=results["argv"], date=env["date"], machine=machine, libraries=libraries,
                         markdown=Path(args.markdown) if args.markdown else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="data, tokenizer and wheels for the GPU machine (bench/gpu_recipes.py's)")
    p.add_argument("--quick", action="store_true", help="tiny corpus and vocabulary, no wheels (for --smoke)")
    p = sub.add_parser("run", help="measure the variants (on the GPU machine; --smoke: tiny, on CPU)")
    p.add_argument("--out_dir", required=True, help="results JSON (named by device) and logs/ go here")
    p.add_argument("--smoke", action="store_true", help="the first variant only, tiny preset and sizes, CPU")
    p.add_argument("--input", default=None, help="what `prepare` wrote (default: its default folder)")
    p.add_argument("--runs_dir", default="/tmp/bench_gpu_runs", help="scratch folder for the runs' outputs")
    p.add_argument("--budget_s", type=float, default=450, help="start no run after this many seconds")
    p.add_argument("--min_run_s", type=float, default=60, help="start a run only with this much budget left")
    p = sub.add_parser("report", help="write the docs/BENCHMARKS.md section from a results file (here)")
    p.add_argument("--results", required=True)
    p.add_argument("--notes", default=None, help="markdown file with interpretation appended to the section")
    p.add_argument("--markdown", default=None, help="write into this file instead of docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    {"prepare": prepare, "run": run, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
