"""QLoRA SFT of the llama-0.2b preset on one GPU (issue 14), beside LoRA and full SFT: the same command
(`sft_train.py --config config/sft.yaml`) with `--peft none`, `--peft lora` and `--peft qlora` (4-bit NF4 base,
bf16 compute), recording peak GPU memory, tokens/s and losses of each; then the QLoRA output is checked: it
loads with plain AutoModelForCausalLM (no quantisation left in its config), gives the logits of its adapter
applied to the reloaded unquantised base, and generates; the 4-bit model it trained on is measured against it.

Three steps, as bench/gpu_recipes.py (the GPU machine has no ../shared, no package registry and no
bitsandbytes; its python3 holds a CUDA torch):

    .venv/bin/python bench/gpu_qlora.py prepare          # here: data, 32k tokenizer, wheels incl. bitsandbytes
    python3 bench/gpu_qlora.py run --out results.json    # on the GPU machine, from the repository root (~5 min)
    .venv/bin/python bench/gpu_qlora.py report --results results.json   # here: docs/BENCHMARKS.md section

On the GPU machine, carry bench/_work/gpu_qlora/input (about 61 MiB, 42 of them the bitsandbytes wheel, which
holds its CUDA libraries: with the repository's 1 MiB just under the 64 MiB a device call carries; carry nothing
else) and install its wheels before `run`:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site bench/_work/gpu_qlora/input/wheels/*.whl
    export PYTHONPATH=/tmp/site

The base is llama-0.2b pretrained here for a few dozen steps (`pre_train.py --config config/pretrain.yaml
--model_config llama-0.2b`): a stand-in, since memory, speed and the merge do not depend on how well it
learnt. Every SFT run keeps the recipe's settings (batch 16 x accumulation 4, 1,024 tokens, learning rate)
with only paths, --max_steps, the intervals, --precision bf16, --report_to none and
--activation_checkpointing true (so weights and optimizer states, where the methods differ, are not hidden
under the activations) overridden, each in a fresh directory under bench/_work/gpu_qlora/runs/.

CPU check of the logic (tiny preset; QLoRA is refused without CUDA, and the check verifies that it is):

    .venv/bin/python bench/gpu_qlora.py prepare --quick
    .venv/bin/python bench/gpu_qlora.py run --smoke --out /tmp/qlora.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from gpu_recipes import (  # noqa: E402
    Launch,
    download_wheels,
    environment,
    execute,
    fmt,
    gpu_extras,
    input_and_runs,
    measure,
    write_gpu_section,
)

ROOT = HERE / "_work" / "gpu_qlora"
INPUT, INPUT_QUICK = ROOT / "input", ROOT / "input_quick"
METHODS = ("none", "lora", "qlora")
# What sft_train.py needs beyond the GPU image (its own transformers/peft/accelerate are other versions), and
# bitsandbytes, which this .venv does not hold (GPU only): its pin is requirements-gpu.txt's.
WHEELS = ("transformers", "datasets", "dill", "multiprocess", "fsspec", "trl", "peft", "accelerate")
PROMPTS = ["请介绍一下长城。", "如何保持健康的生活习惯？", "把这句话翻译成英文：今天天气很好。"]


@dataclass(frozen=True)
class Sizes:
    """`full` for the GPU, `smoke` for the CPU check."""

    preset: str
    base_steps: int
    steps: int
    precision: str
    budget_s: int
    methods: tuple[str, ...] = METHODS  # the smoke run adds qlora, expecting it refused
    pretrain: list[str] = field(default_factory=list)
    sft: list[str] = field(default_factory=list)


FULL = Sizes("llama-0.2b", base_steps=40, steps=20, precision="bf16", budget_s=540)
SMOKE = Sizes("llama-tiny", base_steps=6, steps=4, precision="auto", budget_s=300, methods=("none", "lora"),
              pretrain=["--per_device_train_batch_size", "2", "--block_size", "64", "--preprocessing_num_workers", "1",
                        "--dataloader_num_workers", "0"],
              sft=["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_length", "128",
                   "--preprocessing_num_workers", "1", "--dataloader_num_workers", "0", "--sample_max_new_tokens",
                   "8"])


def prepare(args) -> None:
    """gpu_recipes.py's data (a smaller corpus: the base trains for a few dozen steps), and the wheels."""
    import gpu_recipes

    out = Path(args.dir or (INPUT_QUICK if args.quick else INPUT))
    gpu_recipes.prepare(argparse.Namespace(dir=str(out), quick=args.quick, corpus_mb=args.corpus_mb, no_wheels=True))
    shutil.rmtree(out / "dpo")  # not used here; the carry limit (64 MiB with the repository) is close
    wheels = [] if args.quick or args.no_wheels else download_wheels(out / "wheels", WHEELS, (), gpu_extras("bitsandbytes"))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    print(f"prepared {out}: {size:.1f} MiB, wheels: {', '.join(wheels) or 'none'}", flush=True)


def check_merge(base: Path, output: Path, quantized: bool) -> dict:
    """The merged output against its adapter on the unquantised base (and, for QLoRA, on the 4-bit base it trained
    on): max |logit difference| and top-1 agreement over the tokens of a few chat prompts; a greedy reply."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model.build import load_model
    from model.training.lora import PeftArguments, load_base

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(output)
    config = json.loads((output / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(output, dtype="auto").to(device).eval()
    unquantised = PeftModel.from_pretrained(load_model(str(base), tokenizer, dtype="auto"),
                                            output / "adapter").to(device).eval()
    models = {"adapter_on_unquantised_base": unquantised}
    if quantized:
        models["adapter_on_4bit_base"] = PeftModel.from_pretrained(
            load_base(str(base), tokenizer, PeftArguments(peft="qlora")), output / "adapter").eval()
    result = {"loads_with_AutoModelForCausalLM": True, "quantization_config_in_config": "quantization_config" in config,
              "dtype": str(next(merged.parameters()).dtype)}
    batches = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"].to(device)
               for p in PROMPTS]
    with torch.no_grad():
        reference = [merged(input_ids=ids).logits.float() for ids in batches]
        for name, model in models.items():
            logits = [model(input_ids=ids).logits.float() for ids in batches]
            result[f"max_abs_logit_diff_{name}"] = max((a - b).abs().max().item() for a, b in zip(logits, reference))
            result[f"top1_agreement_{name}"] = sum((a.argmax(-1) == b.argmax(-1)).sum().item()
                                                   for a, b in zip(logits, reference)) / sum(b.numel() for b in batches)
        reply = merged.generate(input_ids=batches[0], max_new_tokens=32, do_sample=False)
    result["reply"] = tokenizer.decode(reply[0, batches[0].shape[1]:], skip_special_tokens=True)
    return result


def run(args) -> None:
    sizes = SMOKE if args.smoke else FULL
    data, runs = input_and_runs(args, "gpu_qlora.py", ROOT)
    deadline = time.perf_counter() + (args.budget_s or sizes.budget_s)
    out = Path(args.out)
    results = {"environment": environment(args.smoke, extra=() if args.smoke else ("bitsandbytes",)),
               "argv": sys.argv[1:], "runs_dir": str(runs), "preset": sizes.preset, "steps": sizes.steps,
               "base_steps": sizes.base_steps, "runs": {}}
    env = {"OMP_NUM_THREADS": "1"} if args.smoke else None

    def launch(key: str, stage: str, flags: list[str], output: Path) -> dict | None:
        left = deadline - time.perf_counter()
        if left < 20:
            print(f"skipped {key}: time budget spent", flush=True)
            return None
        job = Launch(key, stage, sizes.preset, flags, output)
        command = [sys.executable, job.script, "--config", f"config/{stage}.yaml", *flags]
        print(f"[{time.strftime('%H:%M:%S')}] {shlex.join(command)}", flush=True)
        process = execute(command, runs / f"{key}.log", min(left, args.timeout_s), env=env)
        result = measure(job, [process])
        summary = output / "training_summary.json"
        result["trainable_parameters"] = json.loads(summary.read_text()).get("trainable_parameters") \
            if summary.exists() else None
        results["runs"][key] = result
        print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "args", "log_tail")}), flush=True)
        if "log_tail" in result:
            print(result["log_tail"][-1500:], flush=True)
        out.write_text(json.dumps(results, indent=2))
        return result

    common = ["--precision", sizes.precision, "--report_to", "none", "--max_steps"]
    base = runs / "base"
    launch("base", "pretrain", ["--model_config", sizes.preset, "--tokenizer_name_or_path", str(data / "tokenizer"),
                                "--train_files", str(data / "train.parquet"), "--validation_files",
                                str(data / "validation.parquet"), "--output_dir", str(base), "--eval_strategy", "no",
                                "--save_strategy", "no", "--logging_steps", "10", *common, str(sizes.base_steps),
                                *sizes.pretrain], base)
    if not results["runs"]["base"]["finished"]:
        return
    for method in (*sizes.methods, *(["qlora"] if args.smoke else [])):
        output = runs / f"sft_{method}"
        launch(method, "sft", ["--model_name_or_path", str(base), "--train_files", str(data / "sft"), "--output_dir",
                               str(output), "--peft", method, "--activation_checkpointing", "true", "--logging_steps",
                               "1", "--eval_steps", str(sizes.steps), "--save_steps", str(sizes.steps), *common,
                               str(sizes.steps), *sizes.sft], output)
    if args.smoke:  # QLoRA without CUDA: one clear error, exit 2, before anything is written
        qlora = results["runs"].pop("qlora")
        results["qlora_refused"] = {"returncode": qlora["returncodes"][0], "error": next(
            (line for line in qlora.get("log_tail", "").splitlines() if line.startswith("error:")), None)}
    checked = "lora" if args.smoke else "qlora"
    if results["runs"].get(checked, {}).get("finished"):
        results["merge_check"] = {"method": checked, **check_merge(base, runs / f"sft_{checked}", checked == "qlora")}
        print(json.dumps(results["merge_check"], ensure_ascii=False), flush=True)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False))


def report(args) -> None:
    import common

    results = json.loads(Path(args.results).read_text())
    env, runs, check = results["environment"], results["runs"], results.get("merge_check", {})
    names = {"none": "full SFT (`--peft none`)", "lora": "LoRA (`--peft lora`)", "qlora": "QLoRA (`--peft qlora`)"}
    rows = []
    for key in METHODS:
        if key in runs:
            r = runs[key]
            rows.append([names[key], "finished" if r["finished"] else f"failed (exit {r['returncodes']})",
                         f"{r['trainable_parameters']:,}" if r.get("trainable_parameters") else "",
                         fmt(r["peak_mem_gib"], ".1f"), f"{r['tokens_per_s'] / 1e3:,.1f}k" if r["tokens_per_s"] else "",
                         f"{fmt(r['first_loss'], '.3f')} -> {fmt(r['last_loss'], '.3f')}",
                         fmt(r["summary"].get("eval_loss"), ".3f"), fmt(r["wall_s"], ".0f")])
    lines = []
    if check:
        lines.append(f"- Merged {check['method']} output: loads with `AutoModelForCausalLM` ({check['dtype']}), "
                     f"quantisation config left in config.json: {check['quantization_config_in_config']}; against "
                     f"its adapter on the reloaded unquantised base: max |logit diff| "
                     f"{check['max_abs_logit_diff_adapter_on_unquantised_base']:.2e}, top-1 agreement "
                     f"{check['top1_agreement_adapter_on_unquantised_base']:.1%}.")
        if "max_abs_logit_diff_adapter_on_4bit_base" in check:
            lines.append(f"- The 4-bit model QLoRA trained on, against the merged output (the NF4 rounding the merge "
                         f"leaves out): max |logit diff| {check['max_abs_logit_diff_adapter_on_4bit_base']:.2e}, top-1 "
                         f"agreement {check['top1_agreement_adapter_on_4bit_base']:.1%}.")
        lines.append(f"- Greedy reply of the merged model to “{PROMPTS[0]}”: "
                     f"`{json.dumps(check['reply'][:80], ensure_ascii=False)}`")
    if "qlora_refused" in results:
        lines.append(f"- `--peft qlora` on CPU: exit {results['qlora_refused']['returncode']}, "
                     f"`{results['qlora_refused']['error']}`")
    device = f"**{env['device']}**" + (" (smoke run on CPU: tiny preset)" if env["smoke"] else "")
    body = "\n".join([
        f"Device: {device}. The base: {results['preset']} pretrained for {results['base_steps']} steps "
        "(`config/pretrain.yaml`); then `sft_train.py --config config/sft.yaml` with each `--peft`, "
        f"{results['steps']} steps, `--activation_checkpointing true`, `--precision "
        f"{'bf16' if not env['smoke'] else 'auto'}`, the recipe's batch, lengths and learning rate, on "
        "`sft/llamafactory_alpaca_zh_demo.json`. Tokens/s: median of the progress lines after the first third of "
        "the steps; memory: peak allocated by PyTorch.", "",
        common.markdown_table(["run", "status", "trainable parameters", "peak memory (GiB)", "tokens/s",
                               "loss first -> last", "eval loss", "wall s"], rows), "", *lines])
    write_gpu_section("gpu_qlora.py", "QLoRA SFT of llama-0.2b on a GPU: memory, tokens/s, the merged output", body,
                      results, args.markdown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="data, tokenizer and wheels for the GPU machine (here, with ../shared)")
    p.add_argument("--quick", action="store_true", help="tiny corpus, vocabulary 2,048, no wheels (for --smoke)")
    p.add_argument("--corpus_mb", type=float, default=1, help="training corpus of the base (decimal MB of text)")
    p.add_argument("--no_wheels", action="store_true", help="skip the wheels")
    p.add_argument("--dir", default=None, help="output folder (default bench/_work/gpu_qlora/input[_quick])")
    p = sub.add_parser("run", help="the runs and the merge check (on the GPU machine; --smoke: tiny, on CPU)")
    p.add_argument("--out", required=True, help="results JSON (rewritten after every run)")
    p.add_argument("--smoke", action="store_true", help="tiny preset and sizes, CPU, QLoRA expected to be refused")
    p.add_argument("--input", default=None, help="what `prepare` wrote (default: its default folder)")
    p.add_argument("--runs_dir", default=None,
                   help="fresh folder for the runs (default bench/_work/gpu_qlora/runs/<time>)")
    p.add_argument("--budget_s", type=int, default=None, help="stop starting runs after this many seconds")
    p.add_argument("--timeout_s", type=float, default=300, help="time limit of one command (seconds)")
    p = sub.add_parser("report", help="write the docs/BENCHMARKS.md section from a results file (here)")
    p.add_argument("--results", required=True)
    p.add_argument("--markdown", default=None, help="write into this file instead of docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    {"prepare": prepare, "run": run, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
