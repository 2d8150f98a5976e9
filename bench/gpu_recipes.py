"""The default recipes on one GPU, launched as a user launches them (issue 11): `pre_train.py` with
config/pretrain.yaml (t5-0.2b) and with `--model_config llama-0.2b`, `sft_train.py` with config/sft.yaml on
the T5 model, `dpo_train.py` with config/dpo.yaml on the SFT model, each for a few dozen steps in bf16
under DeepSpeed ZeRO-2 with one process; the Llama run is stopped with SIGINT (ctrl+c) after step 10 and
the same command resumes it. Records the losses (a from-scratch model starts near ln(vocab)), tokens/s,
peak GPU memory and whether the resumed run logged the losses of an uninterrupted one.

Three steps, because the GPU machine has no ../shared, no package registry and no project virtualenv
(its python3 holds a CUDA torch, transformers and accelerate; the rest travels as wheels):

    .venv/bin/python bench/gpu_recipes.py prepare        # here: data, 32k tokenizer, wheels (~1 min)
    python3 bench/gpu_recipes.py run --out results.json  # on the GPU machine, from the repository root (~6-8 min)
    .venv/bin/python bench/gpu_recipes.py report --results results.json   # here: docs/BENCHMARKS.md section

On the GPU machine, carry bench/_work/gpu_recipes/input and install its wheels before `run`:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site bench/_work/gpu_recipes/input/wheels/*.whl
    export PYTHONPATH=/tmp/site

Every command is `accelerate launch --config_file accelerate.yaml --num_processes 1 <stage>.py --config
config/<stage>.yaml` with only paths, --max_steps, the logging / evaluation / save intervals, --precision bf16
and --report_to none overridden, each in a fresh output directory under bench/_work/gpu_recipes/runs/.

CPU check of the logic (tiny presets and sizes, plain `python`, no DeepSpeed; tests/test_bench.py runs it):

    .venv/bin/python bench/gpu_recipes.py prepare --quick
    .venv/bin/python bench/gpu_recipes.py run --smoke --out /tmp/recipes.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

ROOT = HERE / "_work" / "gpu_recipes"
# The progress line of model/training/trainer.ProgressLine: `step 40/60 | loss 8.12 | lr ... | 312.4k tok/s |
# mfu 44.1% | mem 21.3GiB | eta ...` (mfu and mem on GPUs only).
LINE = re.compile(r"step (\d+)/(\d+) \| loss ([\d.]+) \| lr \S+ \| ([\d.]+k?) tok/s(?: \| mfu ([\d.]+)%)?"
                  r"(?: \| mem ([\d.]+)GiB)?")
INPUT, INPUT_QUICK = ROOT / "input", ROOT / "input_quick"
SFT_DATA = "sft/llamafactory_alpaca_zh_demo.json"
DPO_DATA = "dpo/medicalgpt_dpo_zh_500.jsonl"
ACCELERATE = ("-m", "accelerate.commands.launch", "--config_file", "accelerate.yaml", "--num_processes", "1")

# What the GPU image lacks or holds at a version the project was not tested with, as wheels of the versions
# installed in this .venv (pip download for CPython 3.12 on manylinux; DeepSpeed is only published as a
# source archive, so it is built here into a pure-Python wheel: its ops are compiled just in time, and
# ZeRO-2 with the Trainer's own fused AdamW needs none). torch, tokenizers, safetensors, huggingface_hub,
# pyarrow, numpy and the rest come from the image.
WHEELS = ("transformers", "datasets", "dill", "multiprocess", "fsspec", "regex", "trl", "peft", "accelerate",
          "hjson", "pydantic", "pydantic_core", "annotated_types", "typing_inspection")
SOURCE_BUILT = ("deepspeed",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


@dataclass(frozen=True)
class Sizes:
    """How much of each thing: `full` for the GPU, `smoke` for the CPU check."""

    steps: int
    interrupt_at: int
    eval_save_every: int
    precision: str
    budget_s: int
    # Smoke only: tiny presets and lengths (the GPU run keeps every size of the recipes).
    t5: str = "t5-0.2b"
    llama: str = "llama-0.2b"
    extra: dict[str, list[str]] = field(default_factory=dict)


FULL = Sizes(steps=30, interrupt_at=10, eval_save_every=20, precision="bf16", budget_s=510)
# DPO on CPU takes seconds per step of the recipe's 4 x accumulation (TRL's reference pass), hence 1 here.
SMOKE = Sizes(steps=6, interrupt_at=1, eval_save_every=3, precision="auto", budget_s=300,
              t5="t5-tiny", llama="llama-tiny", extra={
                  "pretrain": ["--per_device_train_batch_size", "2", "--max_source_length", "64", "--block_size",
                               "64", "--preprocessing_num_workers", "1", "--dataloader_num_workers", "0"],
                  "sft": ["--per_device_train_batch_size", "2", "--max_source_length", "64", "--max_target_length",
                          "32", "--preprocessing_num_workers", "1", "--sample_max_new_tokens", "8",
                          "--dataloader_num_workers", "0"],
                  "dpo": ["--per_device_train_batch_size", "2", "--max_prompt_length", "64",
                          "--max_completion_length", "32", "--dataloader_num_workers", "0",
                          "--gradient_accumulation_steps", "1"]})


# --------------------------------------------------------------------------------------------- prepare

def prepare(args) -> None:
    from common import MixSpec, build_mixed_corpus, load_real_texts, log, shared_path

    out = Path(args.dir or (INPUT_QUICK if args.quick else INPUT))
    out.mkdir(parents=True, exist_ok=True)
    texts = [t.text for t in load_real_texts()]
    train_mb, validation_mb = (0.3, 0.01) if args.quick else (args.corpus_mb, 0.5)
    corpus = build_mixed_corpus(train_mb, texts, name="gpu_recipes_train")
    # Another seed: with the same one the held-out file would be a prefix of the training file.
    held_out = build_mixed_corpus(validation_mb, texts, MixSpec(seed=4321), name="gpu_recipes_validation")
    shutil.copyfile(corpus.path, out / "train.parquet")
    shutil.copyfile(held_out.path, out / "validation.parquet")

    vocab = ["--vocab_size", "2048"] if args.quick else []
    subprocess.run([sys.executable, "train_tokenizer.py", "--config", "config/tokenizer.yaml", "--input",
                    str(out / "train.parquet"), "--eval_files", str(out / "validation.parquet"), "--output_dir",
                    str(out / "tokenizer"), "--overwrite_output_dir",
                    *vocab], cwd=REPO, check=True)

    rows = 200 if args.quick else None  # the quick copies keep tokenisation in the smoke run short
    (out / "sft").mkdir(exist_ok=True)
    (out / "dpo").mkdir(exist_ok=True)
    sft = json.loads(shared_path(SFT_DATA).read_text(encoding="utf-8"))[:rows]
    (out / "sft" / Path(SFT_DATA).name).write_text(json.dumps(sft, ensure_ascii=False, indent=1), encoding="utf-8")
    pairs = shared_path(DPO_DATA).read_text(encoding="utf-8").splitlines(keepends=True)[:rows]
    (out / "dpo" / Path(DPO_DATA).name).write_text("".join(pairs), encoding="utf-8")

    wheels = [] if args.quick or args.no_wheels else download_wheels(out / "wheels", pinned=gpu_extras("liger-kernel"))
    info = {"quick": args.quick, "corpus_mb": corpus.mb, "validation_mb": held_out.mb,
            "sft_rows": len(sft), "dpo_pairs": len(pairs), "wheels": wheels}
    (out / "prepared.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    log(f"prepared {out} ({size:.1f} MiB): carry '{out.relative_to(REPO) if out.is_relative_to(REPO) else out}' "
        "to the GPU machine")


def gpu_extras(*names: str) -> list[str]:
    """The pinned GPU-only packages of requirements-gpu.txt, which this CPU .venv never holds: those named (all
    without names), so that a bench carries only the wheels it uses (bitsandbytes' alone is 42 MB)."""
    lines = (REPO / "requirements-gpu.txt").read_text(encoding="utf-8").splitlines()
    pins = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [pin for pin in pins if not names or re.split(r"[<>=!~;\[ ]", pin, maxsplit=1)[0] in names]


def download_wheels(folder: Path, names=WHEELS, source_built=SOURCE_BUILT, pinned=()) -> list[str]:
    """Wheels of this .venv's versions of `names` (CPython 3.12, manylinux), of `pinned` requirements (packages
    this .venv lacks: the GPU-only extras of requirements-gpu.txt, `gpu_extras()`) and `source_built` into
    `folder`."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in names] + list(pinned)
    platforms = [flag for p in PLATFORMS for flag in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *pins],
                   check=True)
    built = [f"{name}=={importlib.metadata.version(name)}" for name in source_built]
    if built:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "-w", str(folder), *built], check=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    return sorted(p.name for p in folder.glob("*.whl"))


# ------------------------------------------------------------------------------------------------- run

@dataclass
class Launch:
    """One training command and where its outcome lands."""

    name: str
    stage: str  # pretrain / sft / dpo: the recipe config/<stage>.yaml
    model: str
    args: list[str]
    output: Path  # the directory that ends with training_summary.json and trainer_state.json

    @property
    def script(self) -> str:
        return {"pretrain": "pre_train.py", "sft": "sft_train.py", "dpo": "dpo_train.py"}[self.stage]


def launches(data: Path, runs: Path, sizes: Sizes) -> dict[str, Launch]:
    common = ["--max_steps", str(sizes.steps), "--logging_steps", "1", "--eval_steps", str(sizes.eval_save_every),
              "--save_steps", str(sizes.eval_save_every), "--precision", sizes.precision, "--report_to", "none"]
    pretrain = ["--tokenizer_name_or_path", str(data / "tokenizer"), "--train_files", str(data / "train.parquet"),
                "--validation_files", str(data / "validation.parquet"), *common, *sizes.extra.get("pretrain", [])]
    t5, llama = runs / "t5_pretrain", runs / "llama_pretrain"
    return {
        "t5": Launch(f"{sizes.t5} pretrain", "pretrain", sizes.t5,
                     ["--output_dir", str(t5), *pretrain,  # t5-0.2b is the recipe's own model
                      *([] if sizes.t5 == FULL.t5 else ["--model_config", sizes.t5])], t5),
        "llama": Launch(f"{sizes.llama} pretrain, ctrl+c at step {sizes.interrupt_at} + resume", "pretrain",
                        sizes.llama, ["--output_dir", str(llama), "--model_config", sizes.llama, *pretrain], llama),
        "llama_reference": Launch(f"{sizes.llama} pretrain, uninterrupted", "pretrain", sizes.llama,
                                  ["--output_dir", str(runs / "llama_reference"), "--model_config", sizes.llama,
                                   *pretrain], runs / "llama_reference"),
        "sft": Launch(f"{sizes.t5} SFT", "sft", sizes.t5,
                      ["--model_name_or_path", str(t5), "--train_files", str(data / "sft"),
                       "--output_dir", str(runs / "sft"), *common, *sizes.extra.get("sft", [])], runs / "sft"),
        "dpo": Launch(f"{sizes.t5} DPO (LoRA)", "dpo", sizes.t5,
                      ["--model_name_or_path", str(runs / "sft"), "--train_files", str(data / "dpo"),
                       "--output_dir", str(runs / "dpo"), *common, *sizes.extra.get("dpo", [])], runs / "dpo"),
    }


@dataclass
class Process:
    returncode: int | None  # None: killed at its time limit
    wall_s: float
    log: str


def execute(command: list[str], log_path: Path, timeout_s: float, interrupt_at: int | None = None,
            env: dict[str, str] | None = None) -> Process:
    """Run `command` from the repository root in its own process group with its output in `log_path`; once
    it logged step `interrupt_at`, SIGINT the group (as ctrl+c does, tests/conftest.run_until_interrupted)."""
    started = time.perf_counter()
    with open(log_path, "w+", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        signalled = interrupt_at is None
        while process.poll() is None and time.perf_counter() - started < timeout_s:
            if not signalled:
                log.seek(0)
                if re.search(rf"step {interrupt_at}/\d+ \|", log.read()):
                    os.killpg(process.pid, signal.SIGINT)
                    signalled = True
            time.sleep(0.05)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = None
        else:
            returncode = process.returncode
        log.seek(0)
        return Process(returncode, round(time.perf_counter() - started, 1), log.read())


def tokens_per_second(text: str) -> float:
    """`312.4k` or `840` (the progress line's two forms) as a number."""
    return float(text[:-1]) * 1e3 if text.endswith("k") else float(text)


def progress(text: str) -> list[dict]:
    """The progress lines of a log: step, loss, tokens/s, MFU (%) and peak GPU memory (GiB) (GPU only)."""
    return [{"step": int(m.group(1)), "max_steps": int(m.group(2)), "loss": float(m.group(3)),
             "tokens_per_s": tokens_per_second(m.group(4)), "mfu": float(m.group(5)) if m.group(5) else None,
             "mem_gib": float(m.group(6)) if m.group(6) else None}
            for m in LINE.finditer(text)]


def logged_losses(output: Path) -> dict[int, float]:
    """step -> training loss of a finished run, from its trainer_state.json (full precision)."""
    path = output / "trainer_state.json"
    if not path.exists():
        return {}
    history = json.loads(path.read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def measure(launch: Launch, processes: list[Process]) -> dict:
    """Figures of one finished (or failed) launch; `processes` are its commands in order (two after a ctrl+c)."""
    lines = [line for p in processes for line in progress(p.log)]
    losses = logged_losses(launch.output) or {line["step"]: line["loss"] for line in lines}
    config = launch.output / "config.json"
    vocab = json.loads(config.read_text())["vocab_size"] if config.exists() else None
    summary_path = launch.output / "training_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    # Warm-up (and the resumed command's restart) excluded: lines after the first third of the steps.
    steady = [line for line in lines if line["step"] > line["max_steps"] // 3] or lines
    mems = [line["mem_gib"] for line in lines if line["mem_gib"] is not None]
    mfus = [line["mfu"] for line in steady if line["mfu"] is not None]
    result = {
        "name": launch.name, "stage": launch.stage, "model": launch.model, "script": launch.script,
        "args": launch.args, "returncodes": [p.returncode for p in processes],
        "wall_s": round(sum(p.wall_s for p in processes), 1), "finished": bool(summary),
        "vocab_size": vocab, "ln_vocab": math.log(vocab) if vocab else None,
        "first_step": min(losses) if losses else None, "first_loss": losses[min(losses)] if losses else None,
        "last_step": max(losses) if losses else None, "last_loss": losses[max(losses)] if losses else None,
        "tokens_per_s": statistics.median(line["tokens_per_s"] for line in steady) if steady else None,
        "mfu": statistics.median(mfus) if mfus else None,
        "peak_mem_gib": max(mems) if mems else None, "losses": losses,
        "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and (
            k.startswith(("eval_", "train_")) or k in ("parameters", "epoch", "num_input_tokens_seen"))},
    }
    if not summary:
        result["log_tail"] = processes[-1].log[-3000:]
    return result


def compare_resume(resumed: dict, reference: dict, stopped_at: int | None) -> dict:
    """Logged losses of the interrupted-and-resumed run against the uninterrupted one, before and after the stop.
    Before it the two runs did the same work in two processes, so a difference there is run-to-run GPU noise."""
    common = sorted(set(resumed["losses"]) & set(reference["losses"]))
    diff = lambda steps: max((abs(resumed["losses"][s] - reference["losses"][s]) for s in steps),  # noqa: E731
                             default=None)
    after = [s for s in common if stopped_at is not None and s > stopped_at]
    before = [s for s in common if stopped_at is not None and s <= stopped_at]
    return {"steps_compared_after": len(after), "max_abs_diff_after": diff(after),
            "steps_compared_before": len(before), "max_abs_diff_before": diff(before),
            "identical": bool(after) and all(resumed["losses"][s] == reference["losses"][s] for s in common)}


def environment(smoke: bool, extra: tuple[str, ...] = ("deepspeed",)) -> dict:
    """The device and library versions; imports what the runs need (`extra`: on the GPU only), so a missing wheel
    shows here, at once."""
    import torch
    import transformers

    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__}
    for name in ("accelerate", "datasets", "trl", "peft", *([] if smoke else extra)):
        if not smoke:  # on the GPU machine: fail here, at once, on a wheel that is missing or does not fit
            __import__(name)
        versions[name] = importlib.metadata.version(name)
    gpu = torch.cuda.is_available()
    if not gpu and not smoke:
        sys.exit("error: no GPU visible; use --smoke for the CPU check")
    return {"device": torch.cuda.get_device_name() if gpu else "CPU", "gpus": torch.cuda.device_count(),
            "cpu_cores": os.cpu_count(), "python": platform.python_version(), "versions": versions,
            "smoke": smoke, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def input_and_runs(args, script: str, root: Path) -> tuple[Path, Path]:
    """(what `prepare` wrote, a fresh folder for the runs' outputs) of a `run` command of `script`."""
    data = Path(args.input or root / ("input_quick" if args.smoke else "input"))
    if not (data / "tokenizer").is_dir():
        sys.exit(f"error: {data / 'tokenizer'} not found; run `bench/{script} prepare"
                 f"{' --quick' if args.smoke else ''}` first (and carry its folder to this machine)")
    runs = Path(args.runs_dir or root / "runs" / (time.strftime("%Y%m%d-%H%M%S") + ("-smoke" if args.smoke else "")))
    runs.mkdir(parents=True, exist_ok=False)  # fresh output directories: stages refuse another run's
    return data, runs


def run(args) -> None:
    sizes = SMOKE if args.smoke else FULL
    data, runs = input_and_runs(args, "gpu_recipes.py", ROOT)
    budget_s = args.budget_s or sizes.budget_s
    deadline = time.perf_counter() + budget_s
    results = {"environment": environment(args.smoke), "argv": sys.argv[1:], "runs_dir": str(runs),
               "steps": sizes.steps, "interrupt_at": sizes.interrupt_at,
               "launcher": "plain `python <stage>.py`" if args.smoke else
               "`accelerate launch --config_file accelerate.yaml --num_processes 1` (DeepSpeed ZeRO-2)",
               "budget_s": budget_s, "runs": {}}
    out = Path(args.out)
    todo = launches(data, runs, sizes)
    port = 29500 + os.getpid() % 1000

    def command(launch: Launch) -> list[str]:
        nonlocal port
        port += 1
        launcher = [sys.executable] if args.smoke else [sys.executable, *ACCELERATE, "--main_process_port", str(port)]
        return [*launcher, launch.script, "--config", f"config/{launch.stage}.yaml", *launch.args]

    def start(key: str, interrupt_at: int | None = None, part: str = "") -> Process | None:
        left = deadline - time.perf_counter()
        if left < 20:
            print(f"skipped {key}{part}: time budget spent", flush=True)
            return None
        cmd = command(todo[key])
        print(f"[{time.strftime('%H:%M:%S')}] {shlex.join(cmd)}", flush=True)
        # One thread per tiny CPU run: the CPU check shares a small machine, and its models gain nothing from more.
        env = {"OMP_NUM_THREADS": "1"} if args.smoke else None
        return execute(cmd, runs / f"{key}{part}.log", min(left, args.timeout_s), interrupt_at, env)

    def record(key: str, processes: list[Process], **extra) -> None:
        result = {**measure(todo[key], processes), **extra}
        results["runs"][key] = result
        print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "args", "log_tail")}), flush=True)
        if "log_tail" in result:
            print(result["log_tail"][-1500:], flush=True)
        out.write_text(json.dumps(results, indent=2))  # partial results survive a time-out

    if first := start("t5"):
        record("t5", [first])
    if stopped := start("llama", sizes.interrupt_at, "_interrupted"):
        stop = re.search(r"stopped at step (\d+)", stopped.log)
        processes = [stopped]
        if stop and (resumed := start("llama", None, "_resumed")):
            processes.append(resumed)
        resume = re.search(r"resuming from (\S+)", processes[-1].log) if len(processes) == 2 else None
        record("llama", processes, stopped_at=int(stop.group(1)) if stop else None,
               stop_exit_code=stopped.returncode, resumed_from=resume.group(1) if resume else None)
    if results["runs"].get("t5", {}).get("finished") and (tuned := start("sft")):
        record("sft", [tuned])
    if results["runs"].get("sft", {}).get("finished") and (aligned := start("dpo")):
        record("dpo", [aligned])
    if results["runs"].get("llama", {}).get("finished") and (whole := start("llama_reference")):
        record("llama_reference", [whole])
        results["runs"]["llama"]["resume_check"] = compare_resume(
            results["runs"]["llama"], results["runs"]["llama_reference"], results["runs"]["llama"]["stopped_at"])
        out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["runs"].get("llama", {}).get("resume_check")), flush=True)
    if args.clean:
        shutil.rmtree(runs, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- report

def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def report(args) -> None:
    import common

    results = json.loads(Path(args.results).read_text())
    env, runs = results["environment"], results["runs"]
    expected = {"pretrain": lambda r: f"ln V = {fmt(r['ln_vocab'], '.2f')}",
                "sft": lambda r: f"from the pretrained T5 (untrained: ln V = {fmt(r['ln_vocab'], '.2f')})",
                "dpo": lambda r: f"ln 2 = {math.log(2):.3f} (LoRA starts at the reference)"}
    rows = []
    for key in ("t5", "llama_reference", "llama", "sft", "dpo"):
        if key not in runs:
            continue
        r = runs[key]
        status = "finished" if r["finished"] else f"failed (exit {r['returncodes']})"
        rows.append([r["name"], f"`{r['script']} --config config/{r['stage']}.yaml`", status,
                     f"{fmt(r['first_loss'], '.3f')} (step {r['first_step']})", expected[r["stage"]](r),
                     f"{fmt(r['last_loss'], '.3f')} (step {r['last_step']})",
                     f"{r['tokens_per_s'] / 1e3:,.1f}k" if r["tokens_per_s"] else "",
                     fmt(r["peak_mem_gib"], ".1f"), fmt(r["wall_s"], ".0f")])
    llama = runs.get("llama", {})
    check = llama.get("resume_check") or {}
    if llama.get("stopped_at") is None:
        resume = "- ctrl+c: **the run did not stop with a checkpoint** (see the results JSON)."
    else:
        resume = (f"- ctrl+c: SIGINT to the launcher's process group once step {results['interrupt_at']} was logged; "
                  f"the run finished step {llama['stopped_at']}, saved a checkpoint and exited "
                  f"{llama['stop_exit_code']}; the same command "
                  + (f"logged `resuming from {Path(llama['resumed_from']).name}` and "
                     f"{'finished' if llama['finished'] else 'did **not** finish'} at step {llama['last_step']}."
                     if llama.get("resumed_from") else "did **not** resume."))
        if check:
            resume += (f" Against the uninterrupted run of the same command: logged losses after the stop differ by "
                       f"at most {fmt(check['max_abs_diff_after'], '.2e')} over {check['steps_compared_after']} "
                       f"steps ({'bit-identical' if check['identical'] else 'not bit-identical'}); before the stop, "
                       f"where both runs did the same work, by {fmt(check['max_abs_diff_before'], '.2e')} "
                       "(run-to-run noise).")
    device = f"**{env['device']}**" + (" (smoke run on CPU: tiny presets, no DeepSpeed)" if env["smoke"] else "")
    body = "\n".join([
        f"Device: {device}; {results['launcher']}; `--precision "
        f"{'bf16' if not env['smoke'] else 'auto'}`, {results['steps']} steps each (`--max_steps`), a progress line "
        "every step; otherwise the recipes' own settings (batch x accumulation, lengths, optimizer, schedule, "
        "length grouping, workers). Data (`bench/gpu_recipes.py prepare`): a mixed corpus of the real zhwiki and "
        "ChatLM text in `../shared/data` (`bench/common.build_mixed_corpus`), the toolkit's tokenizer trained on it "
        "with `config/tokenizer.yaml`, `sft/llamafactory_alpaca_zh_demo.json` for SFT and "
        "`dpo/medicalgpt_dpo_zh_500.jsonl` for DPO. SFT continues the T5 pretraining run, DPO the SFT run. "
        "Tokens/s: median over the progress lines after the first third of the steps; memory: peak allocated "
        "by PyTorch (`torch.cuda.max_memory_allocated`).", "",
        common.markdown_table(["run", "command", "status", "first loss", "expected start", "last loss",
                               "tokens/s", "peak memory (GiB)", "wall s"], rows), "",
        resume, "",
        "Command on the GPU machine (after installing the carried wheels, see the script's docstring): "
        "`python3 bench/gpu_recipes.py run --out results.json`, after `bench/gpu_recipes.py prepare` here.",
    ])
    if args.notes:
        body += "\n\n" + Path(args.notes).read_text(encoding="utf-8").strip()
    write_gpu_section("gpu_recipes.py", "Default recipes on a GPU: losses, tokens/s, memory, ctrl+c resume", body,
                      results, args.markdown)


def write_gpu_section(script: str, title: str, body: str, results: dict, markdown: str | None) -> None:
    """Print `body` and write it as `script`'s section of docs/BENCHMARKS.md (or of `markdown`), naming the
    GPU machine and the library versions the results were measured with."""
    import common

    print(body)
    env = results["environment"]
    machine = (f"1x {env['device']} (lent GPU machine, {env['cpu_cores']} CPU cores), Python {env['python']}"
               if not env["smoke"] else None)
    libraries = ", ".join(f"{name} {version}" for name, version in env["versions"].items() if version)
    common.write_section(script, title, [], body, argv=results["argv"], date=env["date"], machine=machine,
                         libraries=libraries, markdown=Path(markdown) if markdown else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="data, tokenizer and wheels for the GPU machine (here, with ../shared)")
    p.add_argument("--quick", action="store_true", help="tiny corpus, vocabulary 2,048, no wheels (for --smoke)")
    p.add_argument("--corpus_mb", type=float, default=8, help="training corpus size (decimal MB of text)")
    p.add_argument("--no_wheels", action="store_true", help="skip the wheels (already carried, or not needed)")
    p.add_argument("--dir", default=None, help=f"output folder (default {INPUT.relative_to(REPO)}, "
                                               f"{INPUT_QUICK.relative_to(REPO)} with --quick)")
    p = sub.add_parser("run", help="run the recipes (on the GPU machine; --smoke: tiny, on CPU)")
    p.add_argument("--out", required=True, help="results JSON (rewritten after every run)")
    p.add_argument("--smoke", action="store_true", help="tiny presets and sizes, plain python, CPU")
    p.add_argument("--input", default=None, help="what `prepare` wrote (default: its default folder)")
    p.add_argument("--runs_dir", default=None, help="fresh folder for the runs' outputs and logs "
                                                    "(default bench/_work/gpu_recipes/runs/<time>)")
    p.add_argument("--budget_s", type=int, default=None, help="stop starting runs after this many seconds "
                                                              "(default 510, smoke 300)")
    p.add_argument("--timeout_s", type=float, default=300, help="time limit of one command (seconds)")
    p.add_argument("--clean", action="store_true", help="remove the runs' outputs at the end (the GB of checkpoints)")
    p = sub.add_parser("report", help="write the docs/BENCHMARKS.md section from a results file (here)")
    p.add_argument("--results", required=True)
    p.add_argument("--notes", default=None, help="markdown file with interpretation appended to the section")
    p.add_argument("--markdown", default=None, help="write into this file instead of docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    {"prepare": prepare, "run": run, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
