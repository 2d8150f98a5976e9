"""The GPU check: one command of at most 9 minutes on one H100/H200 that measures, most important first,

1. recipes: the default recipes' first steps in bf16, launched as a user launches them on one GPU
   (`python pre_train.py --config config/pretrain.yaml`, ...): t5-0.2b pretraining (the recipe's model, compiled by
   its `--torch_compile auto`), llama-0.2b pretraining, SFT of the T5 (config/sft.yaml), DPO of the SFT model
   (config/dpo.yaml), 30 steps each: the first loss against ln(vocabulary) (DPO: ln 2), the last loss, tokens/s, MFU
   and peak memory;
2. resume: the Llama command again in another folder, stopped with ctrl+c (SIGINT to its process group) once step
   10 is logged, then the same command once more: its logged losses and input tokens against stage 1's
   uninterrupted run (bit-exact, or as close as the GPU's own run-to-run noise, measured before the stop);
3. mfu: t5-0.2b and llama-0.2b with `--attn_implementation flex_attention` (T5 with dropout 0, which FlexAttention
   needs), compiled: MFU, tokens/s and what torch.compile did, beside stage 1's SDPA figures;
4. qlora: `sft_train.py --config config/sft.yaml --peft qlora` on stage 1's Llama for 10 steps, then its merged
   output loads with plain AutoModelForCausalLM and gives the logits of its adapter on the reloaded base.

Every launch keeps the recipe's settings (batch x accumulation, lengths, optimizer, schedule, workers); only paths,
--max_steps, the logging / evaluation / save intervals, --precision bf16, --report_to none and the stage's own flags
are set. A launch starts only while --min_launch_s (45) of --budget_s (490, counted once the imports are done) is
left and is killed when the budget is spent, so with the wheels' installation the device command ends within about
8.7 minutes. The results file ($OUT/<gpu>.json) is rewritten before and after every launch, and what a launch cut
short logged (its log is in $OUT/logs/) still counts: a run stopped early, by the budget or by the device tool's
time limit, keeps what it measured.

Three steps, because the GPU machine has no ../shared, no package registry and no project virtualenv (its python3
holds a CUDA torch, transformers and accelerate; the rest travels as wheels):

    .venv/bin/python -m bench.gpu_check prepare     # here: data, 32k tokenizer, wheels (~1 min, 41 MiB)
    <the device command below>                      # on the GPU machine: < 9 min
    .venv/bin/python -m bench.gpu_check report --results <files_at>/<gpu>.json   # here: docs/BENCHMARKS.md

The device command, for the `run` tool with carry ["bench/_work/gpu_check/input"] and timeout_s 600:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site bench/_work/gpu_check/input/wheels/*.whl && PYTHONPATH=/tmp/site python3 -m bench.gpu_check run --out_dir $OUT

It runs in the carried repository's root, so `-m` puts that root first on the path (bench/ and the toolkit import
from it) and PYTHONPATH adds the wheels. `report` copies the results file into bench/results/ and writes the GPU's
section of docs/BENCHMARKS.md.

CPU check of the same stages (tiny presets and sizes; tests/test_bench.py runs it): flex_attention and QLoRA have
no CPU path, so there the MFU stage runs SDPA (its T5 launch; the Llama one would repeat stage 1) and the QLoRA
stage runs `--peft lora`, the same command and merge check on an unquantised base:

    .venv/bin/python -m bench.gpu_check prepare --quick
    .venv/bin/python -m bench.gpu_check run --smoke --out_dir /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.gpu_carry import GPU_PACKAGES, INPUT, INPUT_QUICK, ROOT, prepare
from bench.gpu_report import report
from bench.harness import REPO, Measured, log, recorded_run, run_command
from bench.launches import (
    RESUMED_LINE,
    STOPPED_LINE,
    Launch,
    check_merge,
    compare_resume,
    environment,
    measure,
    step_logged,
)
from utils.io import write_text_atomic


@dataclass(frozen=True)
class Sizes:
    """How much of each thing: `FULL` on the GPU, `SMOKE` for the CPU check."""

    t5: str
    llama: str
    steps: int  # --max_steps of every pretraining, SFT and DPO launch
    interrupt_at: int  # the resume stage's ctrl+c, once this step is logged
    eval_save_every: int
    qlora_steps: int
    peft: str  # qlora on the GPU; lora on CPU, where bitsandbytes' 4-bit layers cannot run
    attention: str  # the MFU stage's: flex_attention on the GPU; sdpa on CPU (no FlexAttention backward there)
    precision: str
    budget_s: float
    min_launch_s: float
    extra: dict[str, tuple[str, ...]] = field(default_factory=dict)  # smoke only: tiny lengths, batches, workers


FULL = Sizes("t5-0.2b", "llama-0.2b", steps=30, interrupt_at=10, eval_save_every=20, qlora_steps=10, peft="qlora",
             attention="flex_attention", precision="bf16", budget_s=490, min_launch_s=45)
# DPO on CPU takes seconds per step of the recipe's accumulation 4 (TRL's reference pass), hence 1 here.
SMOKE = Sizes("t5-tiny", "llama-tiny", steps=6, interrupt_at=2, eval_save_every=3, qlora_steps=4, peft="lora",
              attention="sdpa", precision="auto", budget_s=600, min_launch_s=0, extra={
                  "pretrain": ("--per_device_train_batch_size", "2", "--max_source_length", "64", "--block_size", "64",
                               "--preprocessing_num_workers", "1", "--dataloader_num_workers", "0"),
                  "sft": ("--per_device_train_batch_size", "2", "--max_source_length", "64", "--max_target_length",
                          "32", "--max_length", "128", "--preprocessing_num_workers", "1", "--sample_max_new_tokens",
                          "8", "--dataloader_num_workers", "0"),
                  "dpo": ("--per_device_train_batch_size", "2", "--max_prompt_length", "64", "--max_completion_length",
                          "32", "--dataloader_num_workers", "0", "--gradient_accumulation_steps", "1")})

# In order of importance: the budget ends the list early.
STAGES = (("recipes", ("t5", "llama", "sft", "dpo")), ("resume", ("llama_resumed",)),
          ("mfu", ("t5_flex", "llama_flex")), ("qlora", ("qlora",)))
ON_CPU_A_REPEAT = ("llama_flex",)  # with sdpa instead of flex_attention and no compilation: stage 1's `llama` again


def plan(data: Path, runs: Path, sizes: Sizes) -> dict[str, Launch]:
    """Every launch of the check, by key (the keys of `STAGES`)."""
    def common(steps: int) -> tuple[str, ...]:
        every = min(sizes.eval_save_every, steps)
        return ("--max_steps", str(steps), "--logging_steps", "1", "--eval_steps", str(every), "--save_steps",
                str(every), "--precision", sizes.precision, "--report_to", "none")

    extra = lambda script: sizes.extra.get(script, ())  # noqa: E731
    corpus = ("--tokenizer_name_or_path", str(data / "tokenizer"), "--train_files", str(data / "train.parquet"),
              "--validation_files", str(data / "validation.parquet"), *common(sizes.steps), *extra("pretrain"))
    t5 = () if sizes.t5 == FULL.t5 else ("--model_config", sizes.t5)  # t5-0.2b is the recipe's own model
    llama = ("--model_config", sizes.llama)
    attention = ("--attn_implementation", sizes.attention)
    no_dropout = ("--model_overrides", '{"dropout_rate": 0.0}')

    def pretrain(key: str, name: str, flags: tuple[str, ...]) -> Launch:
        return Launch(key, name, "pre_train.py", "config/pretrain.yaml",
                      ("--output_dir", str(runs / key), *flags, *corpus), runs / key)

    def sft(key: str, name: str, base: str, steps: int, flags: tuple[str, ...] = ()) -> Launch:
        return Launch(key, name, "sft_train.py", "config/sft.yaml",
                      ("--model_name_or_path", str(runs / base), "--train_files", str(data / "sft"), "--output_dir",
                       str(runs / key), *flags, *common(steps), *extra("sft")), runs / key, needs=base)

    return {
        "t5": pretrain("t5", f"{sizes.t5} pretraining", t5),
        "llama": pretrain("llama", f"{sizes.llama} pretraining", llama),
        "sft": sft("sft", f"{sizes.t5} SFT", "t5", sizes.steps),
        "dpo": Launch("dpo", f"{sizes.t5} DPO (LoRA)", "dpo_train.py", "config/dpo.yaml",
                      ("--model_name_or_path", str(runs / "sft"), "--train_files", str(data / "dpo"), "--output_dir",
                       str(runs / "dpo"), *common(sizes.steps), *extra("dpo")), runs / "dpo", needs="sft"),
        "llama_resumed": pretrain("llama_resumed", f"{sizes.llama} pretraining, ctrl+c at step {sizes.interrupt_at} "
                                                   "+ the same command", llama),
        "t5_flex": pretrain("t5_flex", f"{sizes.t5} {sizes.attention}, dropout 0", (*t5, *attention, *no_dropout)),
        "llama_flex": pretrain("llama_flex", f"{sizes.llama} {sizes.attention}", (*llama, *attention)),
        "qlora": sft("qlora", f"{sizes.llama} SFT, --peft {sizes.peft}", "llama", sizes.qlora_steps,
                     ("--peft", sizes.peft)),
    }


class Check:
    """The results file and the time budget of one `run`: a launch starts only while `min_launch_s` of the budget is
    left and is killed when it is spent; the results file is rewritten (atomically) before and after every launch,
    so whatever stops the run, it holds what was measured and names the launch that was running."""

    def __init__(self, path: Path, results: dict, deadline: float, min_launch_s: float, env: dict[str, str]):
        self.path, self.results, self.deadline, self.min_launch_s, self.env = path, results, deadline, min_launch_s, env

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.results, indent=2, ensure_ascii=False) + "\n")

    def skip(self, launch: Launch, reason: str) -> None:
        log(f"skipped {launch.key}: {reason}")
        self.results["runs"][launch.key] = {"name": launch.name, "script": launch.script, "skipped": reason}
        self.save()

    def execute(self, launch: Launch, interrupt_at: int | None = None, part: str = "") -> Measured | None:
        """Run `launch` (one of its commands: `part` names its log), or return None where the budget is spent."""
        left = self.left()
        if left <= 0 or left < self.min_launch_s:
            return None
        command = launch.command()
        log(" ".join(command))
        record = self.results["runs"].get(launch.key, {})
        logs = [*record.get("logs", []), f"logs/{launch.key}{part}.log"]
        self.results["runs"][launch.key] = {"name": launch.name, "script": launch.script, "recipe": launch.recipe,
                                            "args": list(launch.args), "logs": logs, "running": True}
        self.save()
        return run_command(command, self.path.parent / logs[-1], env=self.env, timeout_s=left, check=False,
                           interrupt_when=None if interrupt_at is None else step_logged(interrupt_at))

    def record(self, launch: Launch, processes: list[Measured], **extra) -> dict:
        result = {**measure(launch, processes), **extra}
        result["logs"] = self.results["runs"][launch.key]["logs"]
        self.results["runs"][launch.key] = result
        shown = {k: v for k, v in result.items() if k not in ("losses", "args", "log_tail", "summary")}
        log(json.dumps(shown, ensure_ascii=False))
        if "log_tail" in result:
            print(result["log_tail"][-1500:], flush=True)
        self.save()
        return result

    def finished(self, key: str | None) -> bool:
        return key is None or bool(self.results["runs"].get(key, {}).get("finished"))


def run_launch(check: Check, launch: Launch) -> dict | None:
    if not check.finished(launch.needs):
        check.skip(launch, f"needs {launch.needs}, which did not finish")
        return None
    process = check.execute(launch)
    if process is None:
        check.skip(launch, "time budget spent")
        return None
    return check.record(launch, [process])


def run_resume(check: Check, launch: Launch, sizes: Sizes) -> None:
    """ctrl+c once step `interrupt_at` is logged, then the same command; against stage 1's uninterrupted `llama`."""
    if not check.finished("llama"):
        check.skip(launch, "stage 1's llama run, the uninterrupted run to compare with, did not finish")
        return
    stopped = check.execute(launch, sizes.interrupt_at, "_stopped")
    if stopped is None:
        check.skip(launch, "time budget spent")
        return
    stop = STOPPED_LINE.search(stopped.log_text)
    processes = [stopped]
    if stop and (resumed := check.execute(launch, part="_resumed")):
        processes.append(resumed)
    resume = RESUMED_LINE.search(processes[-1].log_text) if len(processes) == 2 else None
    result = check.record(launch, processes, stopped_at=int(stop.group(1)) if stop else None,
                          stop_exit_code=stopped.returncode, resumed_from=resume.group(1) if resume else None)
    reference = check.results["runs"].get("llama", {})
    if result["finished"] and reference.get("finished"):
        check.results["resume_check"] = compare_resume(result, reference, result["stopped_at"])
        log(f"resume check: {json.dumps(check.results['resume_check'])}")
        check.save()


def run_qlora(check: Check, launch: Launch, sizes: Sizes) -> None:
    """The SFT launch with --peft qlora (lora on CPU), then the merged output against its adapter."""
    failed = check.results["environment"]["import_errors"].get("bitsandbytes")
    if failed:
        check.skip(launch, f"bitsandbytes does not import: {failed}")
        return
    result = run_launch(check, launch)
    if not (result and result["finished"]) or check.left() < check.min_launch_s:
        return
    try:
        merged = check_merge(launch.output.parent / launch.needs, launch.output, sizes.peft == "qlora")
    except Exception as err:  # noqa: BLE001 - the check's finding, not a reason to lose the results
        merged = {"error": f"{type(err).__name__}: {err}"}
    check.results["merge_check"] = {"method": sizes.peft, **merged}
    log(f"merge check: {json.dumps(check.results['merge_check'], ensure_ascii=False)}")
    check.save()


def prune(launch: Launch, launches: dict[str, Launch]) -> None:
    """Free the disk (a 0.2B checkpoint with its optimizer state is ~2.3 GB): the checkpoints of a measured launch,
    and its whole output unless a later launch trains on it."""
    if not launch.output.is_dir():
        return
    if any(other.needs == launch.key for other in launches.values()):
        for checkpoint in launch.output.rglob("checkpoint-*"):
            shutil.rmtree(checkpoint, ignore_errors=True)
    else:
        shutil.rmtree(launch.output, ignore_errors=True)


def device_slug(name: str) -> str:
    """`NVIDIA H100 80GB HBM3` -> `nvidia_h100_80gb_hbm3`: the results file of a device."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run(args) -> None:
    sizes = SMOKE if args.smoke else FULL
    data = Path(args.input or (INPUT_QUICK if args.smoke else INPUT))
    if not (data / "tokenizer").is_dir():
        sys.exit(f"error: {data / 'tokenizer'} not found; run `.venv/bin/python -m bench.gpu_check prepare"
                 f"{' --quick' if args.smoke else ''}` first (and carry its folder to this machine)")
    runs = Path(args.runs_dir or ROOT / "runs" / (time.strftime("%Y%m%d-%H%M%S") + ("-smoke" if args.smoke else "")))
    runs.mkdir(parents=True, exist_ok=False)  # fresh output directories: the stages refuse another run's
    budget_s = sizes.budget_s if args.budget_s is None else args.budget_s
    min_launch_s = sizes.min_launch_s if args.min_launch_s is None else args.min_launch_s
    if not args.smoke:  # nothing outside the GPU machine answers: hub look-ups on import (bitsandbytes' CPU kernels
        os.environ["HF_HUB_OFFLINE"] = "1"  # through `kernels`) then fail at once instead of at a time-out
    env = environment(args.smoke, GPU_PACKAGES)
    out = Path(args.out_dir) / f"{device_slug(env['device'])}{'_smoke' if args.smoke else ''}.json"
    results = {"environment": env, "argv": args.argv, "stages": dict(STAGES), "budget_s": budget_s,
               "min_launch_s": min_launch_s,
               "sizes": {"steps": sizes.steps, "interrupt_at": sizes.interrupt_at, "qlora_steps": sizes.qlora_steps,
                         "precision": sizes.precision}, "runs": {}}
    # Nothing is downloaded; one thread per tiny CPU run (the CPU check shares a small machine).
    child_env = {"HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": "1"} if args.smoke else {})}
    started = time.perf_counter()  # the budget counts from here, after the imports of the environment check
    check = Check(out, results, started + budget_s, min_launch_s, child_env)
    broken = {name: error for name, error in env["import_errors"].items() if name not in GPU_PACKAGES}
    if broken:
        check.save()
        sys.exit(f"error: carried packages do not import: {broken} (results: {out})")
    launches = plan(data, runs, sizes)
    for stage, keys in STAGES:
        for key in keys:
            launch = launches[key]
            if args.smoke and key in ON_CPU_A_REPEAT:
                check.skip(launch, "on CPU (sdpa, not compiled) it repeats stage 1's run")
            elif stage == "resume":
                run_resume(check, launch, sizes)
            elif stage == "qlora":
                run_qlora(check, launch, sizes)
            else:
                run_launch(check, launch)
            prune(launch, launches)
        results.setdefault("stage_end_s", {})[stage] = round(time.perf_counter() - started, 1)
        check.save()
    log(f"results: {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="data, tokenizer and wheels for the GPU machine (here, with ../shared)")
    p.add_argument("--quick", action="store_true", help="tiny corpus, vocabulary 2,048, no wheels (for --smoke)")
    p.add_argument("--corpus_mb", type=float, default=8, help="training corpus size (decimal MB of text)")
    p.add_argument("--no_wheels", action="store_true", help="skip the wheels (already carried, or not needed)")
    p.add_argument("--dir", default=None, help=f"output folder (default {INPUT.relative_to(REPO)}, "
                                               f"{INPUT_QUICK.relative_to(REPO)} with --quick)")
    p = sub.add_parser("run", help="the stages (on the GPU machine; --smoke: tiny, on CPU)")
    p.add_argument("--out_dir", required=True, help="the results JSON (named by device) and logs/ go here")
    p.add_argument("--smoke", action="store_true", help="tiny presets and sizes, CPU")
    p.add_argument("--input", default=None, help="what `prepare` wrote (default: its default folder)")
    p.add_argument("--runs_dir", default=None, help="fresh folder for the runs' outputs, never under --out_dir "
                                                    "(default bench/_work/gpu_check/runs/<time>)")
    p.add_argument("--budget_s", type=float, default=None, help="seconds the run may take: launches are killed when "
                                                                "they are spent (default 490; smoke 600)")
    p.add_argument("--min_launch_s", type=float, default=None,
                   help="start a launch only with this many seconds of the budget left (default 45; smoke 0)")
    p = sub.add_parser("report", help="write the docs/BENCHMARKS.md section from a results file (here)")
    p.add_argument("--results", required=True, help="the results JSON `run` wrote (its logs/ beside it)")
    p.add_argument("--notes", default=None, help="markdown file with interpretation appended to the section")
    p.add_argument("--markdown", default=None, help="write into this file instead of docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    args.argv = recorded_run(argv)["argv"]
    {"prepare": prepare, "run": run, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
