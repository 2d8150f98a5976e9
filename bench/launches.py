"""Training commands of bench/gpu_check.py, launched as a user launches them and measured from outside: each runs
through `harness.run_command` (a child process in its own process group with its output in a log file, stopped as
ctrl+c stops it, SIGINT to the group once it logged a given step, or killed at a time limit), and its figures are
read from what it logged (the progress line of model/training/callbacks.ProgressLine) and saved (trainer_state.json,
training_summary.json, and for an adapter run its merged model, `check_merge`).

Not run directly. It runs on the GPU machine as well, where bench/corpora.py cannot (no ../shared), so it imports
only the standard library and the harness at the top; `environment` and `check_merge` import torch and the toolkit.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.harness import Measured, utc_now

# `step 40/60 | loss 8.1234 | lr ... | 312.4k tok/s | mfu 44.1% | mem 21.3GiB | eta ...` (mfu and mem on GPUs only).
LINE = re.compile(r"step (\d+)/(\d+) \| loss ([\d.]+) \| lr \S+ \| ([\d.]+k?) tok/s(?: \| mfu ([\d.]+)%)?"
                  r"(?: \| mem ([\d.]+)GiB)?")
COMPILE_LINE = re.compile(r"torch\.compile after (\d+) steps: (\d+) graphs \| (\d+) graph breaks(?: \((.*)\))? \| "
                          r"(\d+) recompilations")
MFLOP_LINE = re.compile(r"\| ([\d.]+) MFLOP/token")
STOPPED_LINE = re.compile(r"stopped at step (\d+)")
RESUMED_LINE = re.compile(r"resuming from (\S+)")
PROMPTS = ["请介绍一下长城。", "如何保持健康的生活习惯？", "把这句话翻译成英文：今天天气很好。"]


@dataclass(frozen=True)
class Launch:
    """One training command, `python <script> --config <recipe> <args>`, and where its outcome lands."""

    key: str  # its entry in the results and the name of its log
    name: str  # its row in the report
    script: str  # pre_train.py, sft_train.py or dpo_train.py
    recipe: str  # the default recipe the command starts from: config/pretrain.yaml, ...
    args: tuple[str, ...]  # on top of the recipe: paths, run length, the variant's flags
    output: Path  # ends with training_summary.json and trainer_state.json once finished
    needs: str | None = None  # the launch whose output this one trains on

    def command(self) -> list[str]:
        return [sys.executable, self.script, "--config", self.recipe, *self.args]


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


def compile_report(log: str) -> dict | None:
    """The trainer's one `torch.compile after N steps: ...` line, as numbers (None: not compiled)."""
    match = COMPILE_LINE.search(log)
    if not match:
        return None
    steps, graphs, breaks, reasons, recompilations = match.groups()
    return {"after_steps": int(steps), "graphs": int(graphs), "graph_breaks": int(breaks),
            "break_reasons": reasons, "recompilations": int(recompilations)}


def step_logged(step: int) -> str:
    """What `harness.run_command(interrupt_when=...)` waits for to send ctrl+c: the progress line of `step`."""
    return rf"step {step}/\d+ \|"


def measure(launch: Launch, processes: list[Measured]) -> dict:
    """Figures of one launch, finished or not; `processes` are its commands in order (two after a ctrl+c). What a
    run that did not finish logged (its progress lines) still counts: a run cut short keeps its first steps."""
    logs = "\n".join(p.log_text for p in processes)
    lines = progress(logs)
    losses = logged_losses(launch.output) or {line["step"]: line["loss"] for line in lines}
    config = launch.output / "config.json"
    vocab = json.loads(config.read_text())["vocab_size"] if config.exists() else None
    summary_path = launch.output / "training_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    # Warm-up (compilation, and the resumed command's restart) left out: lines after the first third of the steps.
    steady = [line for line in lines if line["step"] > line["max_steps"] // 3] or lines
    mems = [line["mem_gib"] for line in lines if line["mem_gib"] is not None]
    mfus = [line["mfu"] for line in steady if line["mfu"] is not None]
    mflop = MFLOP_LINE.search(logs)
    result = {
        "name": launch.name, "script": launch.script, "recipe": launch.recipe, "args": list(launch.args),
        "returncodes": [p.returncode for p in processes], "wall_s": round(sum(p.wall_s for p in processes), 1),
        "finished": bool(summary), "vocab_size": vocab, "ln_vocab": math.log(vocab) if vocab else None,
        "first_step": min(losses) if losses else None, "first_loss": losses[min(losses)] if losses else None,
        "last_step": max(losses) if losses else None, "last_loss": losses[max(losses)] if losses else None,
        "tokens_per_s": statistics.median(line["tokens_per_s"] for line in steady) if steady else None,
        "mfu": statistics.median(mfus) if mfus else None, "peak_mem_gib": max(mems) if mems else None,
        "mflop_per_token": float(mflop.group(1)) if mflop else None, "compile": compile_report(logs),
        "losses": losses,
        "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) and (
            k.startswith(("eval_", "train_")) or k in ("parameters", "trainable_parameters", "num_input_tokens_seen"))},
    }
    if not summary:
        result["log_tail"] = processes[-1].log_text[-3000:] if processes else ""
    return result


def compare_resume(resumed: dict, reference: dict, stopped_at: int | None) -> dict:
    """Logged losses of the interrupted-and-resumed run against the uninterrupted one (`measure` results of the same
    command), before and after the stop. Before it the two runs did the same work in two processes, so a difference
    there is the device's run-to-run noise (non-deterministic GPU kernels); a resume that lost or replayed batches,
    or restored another optimizer or RNG state, differs by far more after it."""
    ours, theirs = resumed["losses"], reference["losses"]
    common = sorted(set(ours) & set(theirs))
    after = [s for s in common if stopped_at is not None and s > stopped_at]
    before = [s for s in common if stopped_at is not None and s <= stopped_at]
    diff = lambda steps: max((abs(ours[s] - theirs[s]) for s in steps), default=None)  # noqa: E731
    return {"steps_compared_after": len(after), "max_abs_diff_after": diff(after),
            "steps_compared_before": len(before), "max_abs_diff_before": diff(before),
            "identical": bool(after) and all(ours[s] == theirs[s] for s in common)}


def environment(smoke: bool, gpu_packages: tuple[str, ...]) -> dict:
    """The device and the library versions. Imports what the runs need, so that a missing or broken wheel shows at
    once, in the results' `import_errors`: gpu_check.py ends the check on a core package, and skips the one stage
    that needs a package of `gpu_packages` (on the GPU only)."""
    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not smoke:
        sys.exit("error: no GPU visible; use --smoke for the CPU check")
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    failed = {}
    for name in ("transformers", "accelerate", "datasets", "trl", "peft", *([] if smoke else gpu_packages)):
        try:
            __import__(name)
            versions[name] = importlib.metadata.version(name)
        except Exception as err:  # noqa: BLE001 - any failure of a carried wheel is a finding to record
            failed[name] = f"{type(err).__name__}: {err}"
    return {"device": torch.cuda.get_device_name() if gpu else "CPU", "gpus": torch.cuda.device_count(),
            "cpu_cores": os.cpu_count(), "python": platform.python_version(), "versions": versions,
            "import_errors": failed, "smoke": smoke, "date": utc_now()}


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
