"""Mixture of experts against a dense decoder at equal active parameters (issue 25, CPU): pretraining throughput and
held-out loss on the demo corpus, same data, same steps.

    .venv/bin/python -m bench.bench_moe                 # ~25 s on 2 idle cores (25 min at load 10)
    .venv/bin/python -m bench.bench_moe --steps 300     # longer training
    .venv/bin/python -m bench.bench_moe --quick         # a few steps (smoke test; no docs)

Models (hidden 128, 4 layers, 4 heads, tied embeddings: llama-demo at half its width, so that both arms train in
minutes on a shared 2-core machine):
- dense: a Llama with one SwiGLU feed-forward of hidden 352;
- MoE: mixtral-tiny's recipe at that size: 8 SwiGLU experts of hidden 176 per layer, 2 routed per token
  (router_aux_loss_coef 0.01). A token runs 2 x 176 = 352 expert units, so its active parameters are the dense
  model's plus the router (128 x 8 per layer); the MoE holds 4x the feed-forward parameters in all.
Data: the demo corpus (config/demo/prepare_data.yaml: the built-in zhwiki demo dump), its tokenizer
(config/demo/tokenizer.yaml), both made under bench/_work/moe. Each arm pretrains from the same seed with
config/demo/pretrain.yaml's settings (AdamW, cosine, warmup 10, lr 2e-3, batch 8) on blocks of 128 tokens, fp32, for
the same steps, then is evaluated on the corpus's validation split (held-out loss: mean cross-entropy per token,
the LM part only). Tokens/s: training tokens over the training time (the final evaluation excluded); the machine
is shared, so tokens per CPU-second is given as well.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

import pre_train
import prepare_data
import train_tokenizer
from bench.harness import WORK, fmt_int, log, markdown_table, other_work, recorded_run, timed, write_section
from model.build import count_parameters

WORK_DIR = WORK / "moe"
RESULTS = WORK_DIR / "results.json"
SHAPE = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
         "max_position_embeddings": 512}
DENSE = {"model_config": "llama-demo", "model_overrides": json.dumps({**SHAPE, "intermediate_size": 352})}
MOE = {"model_config": "mixtral-tiny",  # its routing recipe (top-2, coef 0.01) at the dense model's size
       "model_overrides": json.dumps({**SHAPE, "num_local_experts": 8, "num_experts_per_tok": 2,
                                      "intermediate_size": 176})}
ARMS = {"dense": DENSE, "moe": MOE}
ARM_NAMES = {"dense": "dense Llama (FFN 352)", "moe": "MoE Mixtral (8 experts x 176, top-2)"}


def prepare() -> tuple[Path, Path]:
    """The demo corpus and its tokenizer under bench/_work/moe (made once)."""
    corpus, tokenizer = WORK_DIR / "corpus", WORK_DIR / "tokenizer"
    if not (corpus / "stats.json").exists():
        prepare_data.main(["--config", "config/demo/prepare_data.yaml", "--output_dir", str(corpus)])
    if not (tokenizer / "tokenizer.json").exists():
        train_tokenizer.main(["--config", "config/demo/tokenizer.yaml", "--input", str(corpus),
                              "--output_dir", str(tokenizer)])
    return corpus, tokenizer


def active_parameters(model) -> int:
    """Parameters a token runs through: all but the experts it is not routed to."""
    config = model.config
    total = count_parameters(model)
    if not hasattr(config, "num_local_experts"):
        return total
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    return total - experts + experts * config.num_experts_per_tok // config.num_local_experts


def run_arm(name: str, corpus: Path, tokenizer: Path, steps: int) -> dict:
    output = WORK_DIR / name
    shutil.rmtree(output, ignore_errors=True)
    flags = [f"--{key}={value}" for key, value in ARMS[name].items()]
    argv = ["--config", "config/demo/pretrain.yaml", *flags, "--tokenizer_name_or_path", str(tokenizer),
            "--train_files", str(corpus), "--output_dir", str(output), "--max_steps", str(steps), "--block_size", "128",
            "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
            "--logging_steps", str(min(25, steps))]
    log(f"{name}: pre_train.py {' '.join(argv)}")
    with timed() as measured:
        trainer = pre_train.main(argv)
    summary = json.loads((output / "training_summary.json").read_text())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    model = trainer.model
    tokens = summary["num_input_tokens_seen"]
    return {"parameters": count_parameters(model), "active_parameters": active_parameters(model),
            "experts_implementation": getattr(model.config, "_experts_implementation", None),
            "steps": trainer.state.global_step, "tokens": tokens,
            "train_s": summary["train_runtime"], "tokens_per_s": tokens / summary["train_runtime"],
            "cpu_s": measured.cpu_s, "wall_s": measured.wall_s, "load": measured.load,
            "train_loss": summary["train_loss"], "held_out_loss": summary["eval_loss"],
            "last_logged_loss": logs[-1]["loss"], "aux_loss": logs[-1].get("aux_loss")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="Training steps of each arm (batch 8 x 128 tokens).")
    parser.add_argument("--quick", action="store_true", help="5 steps each, no docs/BENCHMARKS.md update.")
    args = parser.parse_args(argv)
    steps = 5 if args.quick else args.steps
    torch.set_num_threads(max(len(os.sched_getaffinity(0)), 1))
    corpus, tokenizer = prepare()
    results = {name: run_arm(name, corpus, tokenizer, steps) for name in ARMS}
    record = {"run": recorded_run(argv), "steps": steps, "arms": results}
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2), encoding="utf-8")
    for name, figures in results.items():
        log(f"{name}: {figures}")
    if not args.quick:
        write_section("bench_moe.py", "Mixture of experts vs dense at equal active parameters (CPU pretraining)",
                      ["torch", "transformers"], render(record), argv=record["run"]["argv"],
                      date=record["run"]["date"])
    return record


def render(record: dict) -> str:
    arms = record["arms"]
    dense, moe = arms["dense"], arms["moe"]
    table = markdown_table(
        ["model", "parameters", "active / token", "steps", "train tokens", "tokens/s", "tokens per CPU-s",
         "train loss (mean)", "held-out loss", "last aux_loss"],
        [[ARM_NAMES[name], fmt_int(a["parameters"]), fmt_int(a["active_parameters"]), a["steps"],
          fmt_int(a["tokens"]), fmt_int(a["tokens_per_s"]), fmt_int(a["tokens"] / a["cpu_s"]),
          f"{a['train_loss']:.3f}", f"{a['held_out_loss']:.3f}",
          "-" if a["aux_loss"] is None else f"{a['aux_loss']:.3f}"] for name, a in arms.items()])
    speed = moe["tokens_per_s"] / dense["tokens_per_s"]
    gap = moe["held_out_loss"] - dense["held_out_loss"]
    busy = (" (a shared machine: the absolute rates are low and only their ratio says something)"
            if other_work([dense["load"], moe["load"]]) else "")
    return f"""Both models: hidden 128, 4 layers, 4 heads, the demo tokenizer (4,096 tokens), tied embeddings; the MoE's
experts run with transformers' `{moe['experts_implementation']}` experts implementation. Same corpus, seed, batch
(8 x 128 tokens), schedule and {record['steps']} steps; held-out loss = mean cross-entropy per token on the demo
corpus's validation split (the LM part only; the MoE trains on it plus 0.01 x its load-balancing loss, which
`aux_loss` shows: 2 = perfectly even routing over 8 experts at top-2).

{table}

Reading: at equal active parameters the MoE ran at {speed:.2f}x the dense model's tokens/s
({moe['tokens'] / moe['cpu_s'] / (dense['tokens'] / dense['cpu_s']):.2f}x its tokens per CPU-second) and ended
{abs(gap):.3f} nats/token {'below' if gap < 0 else 'above'} it on held-out text. 1-minute load average at the arms'
starts: {dense['load']:.1f} and {moe['load']:.1f} on 2 cores{busy}. On a CPU the experts cost more than their FLOPs: each layer sorts the
tokens by expert, runs grouped matrix products over uneven groups and scatters the results back, where the
dense model runs one matrix product; and with 4x the feed-forward parameters the MoE also keeps 4x their
optimizer state. At {record['steps']} steps of 1,024 tokens both models are early in training (a uniform guess
over 4,096 tokens is 8.32 nats), where the experts have not yet specialised; MoE's gain in loss at equal active
compute shows with more tokens than this CPU budget allows (a GPU run: `--model_config mixtral-0.2b`).
"""


if __name__ == "__main__":
    main()
