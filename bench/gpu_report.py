"""The docs/BENCHMARKS.md section of a bench/gpu_check.py results file, naming the GPU it ran on: one row per launch
(status, first loss against where a model from scratch starts, last loss, tokens/s, MFU, memory, what torch.compile
did), the ctrl+c resume check and the check of the merged QLoRA output. A launch that was running when the run
itself was stopped is measured from its log, which comes back with the results file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.gpu_carry import DPO_DATA, SFT_DATA
from bench.harness import REPO, Measured, markdown_table, write_section
from bench.launches import PROMPTS, Launch, measure
from utils.io import write_text_atomic


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def cut_short(entry: dict, folder: Path) -> dict:
    """A launch the run was running when something stopped the run itself (the device tool's time limit): measured
    from its logs in `folder`, which come back with the results file."""
    logs = [folder / name for name in entry["logs"]]
    processes = [Measured(returncode=None, log_path=log) for log in logs if log.exists()]
    launch = Launch("", entry["name"], entry["script"], entry["recipe"], tuple(entry["args"]), folder / "(gone)")
    return {**measure(launch, processes), "wall_s": None, "cut_short": True}


def status(r: dict) -> str:
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    if r["finished"]:
        return "finished"
    reached = f"after step {r['last_step']}" if r["last_step"] else "before step 1"
    if r.get("cut_short"):
        return f"cut short when the run was stopped, {reached}"
    if None in r["returncodes"]:
        return f"stopped by the time budget, {reached}"
    return f"failed (exit {', '.join(map(str, r['returncodes']))}), {reached}"


def expected_start(r: dict) -> str:
    if r["script"] == "dpo_train.py":
        return f"ln 2 = {math.log(2):.3f}"
    return f"ln V = {fmt(r['ln_vocab'], '.2f')}" + (" (untrained)" if r["script"] == "sft_train.py" else "")


SHOWN_FLAGS = ("--model_config", "--attn_implementation", "--model_overrides", "--peft")


def report(args) -> None:
    path = Path(args.results)
    results = json.loads(path.read_text())
    env, runs = results["environment"], results["runs"]
    for key, entry in runs.items():
        if entry.get("running"):
            runs[key] = cut_short(entry, path.parent)
    rows = []
    for keys in results["stages"].values():
        for r in (runs[k] for k in keys if k in runs):
            if "skipped" in r:
                rows.append([r["name"], f"`{r['script']}`", status(r), *[""] * 8])
                continue
            shown = " ".join(f"`{flag} {r['args'][r['args'].index(flag) + 1]}`" for flag in SHOWN_FLAGS
                             if flag in r["args"])
            compiled = r["compile"]
            compile_counts = f"{compiled['graphs']} / {compiled['graph_breaks']} / {compiled['recompilations']}" \
                if compiled else "off"
            rows.append([
                r["name"], f"`{r['script']}` {shown}".strip(), status(r),
                f"{fmt(r['first_loss'], '.3f')} (step {r['first_step']})" if r["first_step"] else "",
                expected_start(r), f"{fmt(r['last_loss'], '.3f')} (step {r['last_step']})" if r["last_step"] else "",
                f"{r['tokens_per_s'] / 1e3:,.1f}k" if r["tokens_per_s"] else "", f"{fmt(r['mfu'], '.1f')}%" if r["mfu"]
                else "", fmt(r["peak_mem_gib"], ".1f"),
                compile_counts, fmt(r["wall_s"], ".0f")])
    lines = [resume_line(results), *merge_lines(results)]
    failed = env.get("import_errors") or {}
    if failed:
        lines.append("- Carried packages that did not import: " + "; ".join(f"{k}: `{v}`" for k, v in failed.items()))
    device = f"**{env['device']}**" + (" (smoke run on CPU: tiny presets and sizes)" if env["smoke"] else "")
    sizes = results["sizes"]
    ends = ", ".join(f"{stage} at {seconds:.0f} s" for stage, seconds in results.get("stage_end_s", {}).items())
    body = "\n".join([
        f"Device: {device}. Produced by `bench/gpu_check.py` (`prepare` here, `run` on the GPU machine, `report` "
        f"here; its docstring has the device command), within a budget of {results['budget_s']:.0f} s (stages "
        f"ended: {ends or 'none'}). "
        f"Each row is `python <script> --config config/<stage>.yaml` as a user runs it on one GPU, "
        f"`--precision {sizes['precision']}`, {sizes['steps']} steps (QLoRA: {sizes['qlora_steps']}) with a progress "
        "line every step, and only the flags shown, paths and the evaluation / save interval on top of the recipe "
        "(batch x accumulation, lengths, optimizer, schedule, workers, `--torch_compile auto` for pretraining). "
        "SFT continues the T5 pretraining run, DPO the SFT run, QLoRA the Llama run. Tokens/s and MFU: medians over "
        "the progress lines after the first third of the steps (T5 counts encoder input tokens); MFU = training "
        "FLOPs per token (`model/build.flops_per_token`) x tokens/s / the GPU's dense bf16 peak "
        "(`model/training/callbacks.PEAK_FLOPS`); memory: peak allocated by PyTorch; torch.compile: graphs / graph "
        "breaks / recompilations after the first step. Data (`prepare`): a mixed corpus of the real zhwiki and "
        "ChatLM text in `../shared/data`, the toolkit's tokenizer trained on it with `config/tokenizer.yaml`, "
        f"`{SFT_DATA}` for SFT and `{DPO_DATA}` for DPO.", "",
        markdown_table(["run", "command", "status", "first loss", "expected start", "last loss", "tokens/s", "MFU",
                        "peak memory (GiB)", "torch.compile", "wall s"], rows), "",
        *lines,
        *([] if env["smoke"] else ["", f"Raw results: `bench/results/{path.name}`; the logs came back in the run's "
                                       "`$OUT/logs/`."]),
    ])
    if args.notes:
        body += "\n\n" + Path(args.notes).read_text(encoding="utf-8").strip()
    print(body)
    if not env["smoke"] and args.markdown is None:  # the raw results beside the figures, cut-short runs measured
        write_text_atomic(REPO / "bench" / "results" / path.name, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    machine = (f"1x {env['device']} (lent GPU machine, {env['cpu_cores']} CPU cores), Python {env['python']}"
               if not env["smoke"] else None)
    libraries = ", ".join(f"{name} {version}" for name, version in env["versions"].items() if version)
    write_section("gpu_check.py", f"The GPU check: recipes, resume, MFU, QLoRA on one {env['device']}", [], body,
                  argv=results["argv"], date=env["date"], machine=machine, libraries=libraries,
                  markdown=Path(args.markdown) if args.markdown else None,
                  python=".venv/bin/python" if env["smoke"] else "PYTHONPATH=/tmp/site python3")


def resume_line(results: dict) -> str:
    r = results["runs"].get("llama_resumed", {})
    if "stopped_at" not in r:
        return "- ctrl+c and resume: not run (see the row above)."
    if r["stopped_at"] is None:
        return "- ctrl+c and resume: **the run did not stop with a checkpoint** (see its log)."
    text = (f"- ctrl+c: SIGINT to the command's process group once step {results['sizes']['interrupt_at']} was logged; "
            f"it finished step {r['stopped_at']}, saved a checkpoint and exited {r['stop_exit_code']}; the same "
            "command "
            + (f"logged `resuming from {Path(r['resumed_from']).name}` and "
               f"{'finished' if r['finished'] else 'did **not** finish'} at step {r['last_step']}."
               if r.get("resumed_from") else "did **not** resume."))
    check = results.get("resume_check")
    if check:
        text += (f" Against the uninterrupted run of the same command (stage 1) the logged losses are "
                 f"{'bit-identical' if check['identical'] else '**not** bit-identical'}, differing by at most "
                 f"{fmt(check['max_abs_diff_after'], '.2e')} over the {check['steps_compared_after']} steps after the "
                 f"stop and by {fmt(check['max_abs_diff_before'], '.2e')} before it, where both runs did the same "
                 "work (the device's run-to-run noise).")
    return text


def merge_lines(results: dict) -> list[str]:
    check = results.get("merge_check")
    if not check:
        return []
    if "error" in check:
        return [f"- Merged {check['method']} output: the check failed: `{check['error']}`"]
    lines = [f"- Merged {check['method']} output: loads with `AutoModelForCausalLM` ({check['dtype']}), "
             f"quantisation config left in config.json: {check['quantization_config_in_config']}; against its adapter "
             "on the reloaded unquantised base: max |logit diff| "
             f"{check['max_abs_logit_diff_adapter_on_unquantised_base']:.2e}, top-1 agreement "
             f"{check['top1_agreement_adapter_on_unquantised_base']:.1%}."]
    if "max_abs_logit_diff_adapter_on_4bit_base" in check:
        lines.append("- The 4-bit model QLoRA trained on, against the merged output (the NF4 rounding the merge "
                     f"leaves out): max |logit diff| {check['max_abs_logit_diff_adapter_on_4bit_base']:.2e}, top-1 "
                     f"agreement {check['top1_agreement_adapter_on_4bit_base']:.1%}.")
    lines.append(f"- Greedy reply of the merged model to “{PROMPTS[0]}”: "
                 f"`{json.dumps(check['reply'][:80], ensure_ascii=False)}`")
    return lines
