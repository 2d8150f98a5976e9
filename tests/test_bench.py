"""Smoke test of the benchmarks in bench/: each runs end to end with `--quick` (tiny sizes, real data from
../shared, no docs/BENCHMARKS.md update), the GPU check with `--smoke` on CPU. Benchmarks are never timed here;
their figures are in docs/BENCHMARKS.md. `bench.bench_pretrain --quick` takes longer than this file's budget and is
not run here."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, shared_path

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def shared_data(monkeypatch):
    monkeypatch.setenv("ZHLM_SHARED_DATA", str(shared_path("")))
    monkeypatch.setenv("ZHLM_SHARED_ANCHORS", str(shared_path("", "ZHLM_SHARED_ANCHORS")))


def test_bench_dedup_quick_keeps_shuffled_documents(capsys):
    from bench import bench_dedup

    bench_dedup.main(["--quick"])
    out = capsys.readouterr().out
    ours = next(line for line in out.splitlines() if line.startswith("| ") and "(defaults" in line)
    chatlm = next(line for line in out.splitlines() if line.startswith("| ChatLM"))
    shuffled = lambda row: float(row.split("|")[-3])  # noqa: E731
    assert shuffled(ours) == 0.0  # character n-gram shingles see word order
    assert shuffled(chatlm) > 0.5  # a character-set signature cannot
    assert "docs/s" in out


def test_bench_tokenizer_quick_measures_and_scores():
    from bench import bench_tokenizer
    from bench.harness import WORK

    bench_tokenizer.main(["--quick"])
    results = json.loads((WORK / "tokenizer_quick" / "results.json").read_text())
    assert len(results["runs"]) == 2 and all(r["peak_rss_mb"] > 0 and r["wall_s"] > 0 for r in results["runs"])
    budgeted = results["runs"][1]
    assert budgeted["train_chars"] < budgeted["chars"]  # the budget made it sample
    assert [s["name"] for s in results["scores"]][1:] == ["chatlm_mini_chinese_tokenizer", "chatglm2_tokenizer"]
    assert results["scores"][0]["unk_rate"] == 0.0


def test_bench_moe_quick_compares_equal_active_parameters():
    from bench import bench_moe

    docs = (REPO / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8")
    arms = bench_moe.main(["--quick"])["arms"]
    dense, moe = arms["dense"], arms["moe"]
    assert abs(moe["active_parameters"] - dense["active_parameters"]) < 0.01 * dense["active_parameters"]
    assert moe["parameters"] > 2 * moe["active_parameters"] and dense["tokens"] == moe["tokens"] > 0
    # num_experts x sum of routed share x mean router probability: 2 for even routing over 8 experts at top-2,
    # 8 when every token goes to the same 2
    assert dense["aux_loss"] is None and 1.9 < moe["aux_loss"] <= 8
    assert all(math.isfinite(arm["held_out_loss"]) for arm in (dense, moe))
    assert (REPO / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8") == docs  # --quick writes no figures


def test_bench_peft_methods_quick_trains_every_method():
    from bench import bench_peft_methods

    docs = (REPO / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8")
    results = bench_peft_methods.main(["--quick"])
    assert len(results) == 2 * len(bench_peft_methods.ARMS)
    assert all(math.isfinite(r["eval_loss"]) and 0 < r["trainable"] <= r["parameters"] for r in results.values())
    llama = {key.removeprefix("llama | "): r["trainable"] for key, r in results.items() if key.startswith("llama")}
    assert llama["IA3"] < llama["prompt tuning"] < llama["LoRA r 8"] < llama["DoRA"] < llama["full fine-tuning"]
    assert (REPO / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8") == docs


def test_bench_distill_quick_measures_both_students():
    from bench import bench_distill

    docs = (REPO / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8")
    figures = bench_distill.main(["--quick"])
    assert set(figures["kl"]) == {"plain", "kd"} and all(0 < kl < 20 for kl in figures["kl"].values())
    assert set(figures["bpc"]) == {"teacher", "plain", "kd"} and all(map(math.isfinite, figures["bpc"].values()))
    assert (REPO / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8") == docs


@pytest.fixture(scope="module")
def gpu_check_input(tmp_path_factory):
    """`python -m bench.gpu_check prepare --quick` (tiny corpus and tokenizer, no wheels): what its smoke runs
    read."""
    from bench import gpu_check

    data = tmp_path_factory.mktemp("gpu_check_input") / "input"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ZHLM_SHARED_DATA", str(shared_path("")))
        gpu_check.main(["prepare", "--quick", "--dir", str(data)])
    return data


def test_gpu_check_smoke_runs_every_stage_and_reports(gpu_check_input, tmp_path):
    """bench.gpu_check on CPU: `run --smoke` (tiny presets; every stage: the recipes, ctrl+c and resume, the MFU
    stage with sdpa, the QLoRA stage's command and merge check with --peft lora, which bitsandbytes' CUDA-only layers
    leave as the CPU path) and `report` into a scratch markdown file."""
    from bench import gpu_check

    out, markdown = tmp_path / "out", tmp_path / "BENCHMARKS.md"
    gpu_check.main(["run", "--smoke", "--input", str(gpu_check_input), "--out_dir", str(out),
                    "--runs_dir", str(tmp_path / "runs")])
    gpu_check.main(["report", "--results", str(out / "cpu_smoke.json"), "--markdown", str(markdown)])

    results = json.loads((out / "cpu_smoke.json").read_text())
    runs = results["runs"]
    assert list(runs) == ["t5", "llama", "sft", "dpo", "llama_resumed", "t5_flex", "llama_flex", "qlora"]
    assert [key for key, r in runs.items() if r.get("finished")] == [key for key in runs if key != "llama_flex"]
    assert "skipped" in runs["llama_flex"]  # on CPU it would repeat `llama`
    assert {runs[key]["last_step"] for key in runs if key not in ("llama_flex", "qlora")} == {6}
    for key in ("t5", "llama", "t5_flex"):  # from scratch: about uniform over the vocabulary
        assert runs[key]["first_loss"] == pytest.approx(runs[key]["ln_vocab"], rel=0.1)
    assert runs["dpo"]["first_loss"] == pytest.approx(math.log(2), abs=1e-3)  # LoRA starts at the reference
    resumed = runs["llama_resumed"]
    assert resumed["stop_exit_code"] == 0 and resumed["stopped_at"] < 6
    assert resumed["resumed_from"].endswith(f"checkpoint-{resumed['stopped_at']}")
    assert results["resume_check"]["identical"]  # one CPU process each: deterministic
    assert runs["qlora"]["last_step"] == 4 and "--peft" in runs["qlora"]["args"]
    assert runs["qlora"]["summary"]["trainable_parameters"] < runs["qlora"]["summary"]["parameters"]
    merged = results["merge_check"]
    assert merged["method"] == "lora" and merged["top1_agreement_adapter_on_unquantised_base"] == 1.0
    assert merged["max_abs_logit_diff_adapter_on_unquantised_base"] < 1e-4
    assert {path.name for path in (out / "logs").iterdir()} == {
        f"{key}.log" for key in ("t5", "llama", "sft", "dpo", "t5_flex", "qlora")} | {
        "llama_resumed_stopped.log", "llama_resumed_resumed.log"}
    assert not (tmp_path / "runs" / "llama_resumed").exists()  # outputs no later launch trains on are removed

    text = markdown.read_text(encoding="utf-8")
    assert text.count("<!-- section: gpu_check.py -->") == 1 and "on one CPU" in text
    for row in ("t5-tiny pretraining", "llama-tiny pretraining", "t5-tiny SFT", "t5-tiny DPO (LoRA)",
                "llama-tiny pretraining, ctrl+c at step 2 + the same command", "t5-tiny sdpa, dropout 0",
                "llama-tiny SFT, --peft lora"):
        assert f"| {row} |" in text
    assert "resuming from checkpoint-" in text and "bit-identical" in text and "Merged lora output" in text


def test_gpu_check_cut_short_keeps_what_it_measured(gpu_check_input, tmp_path):
    """A run cut short keeps what it measured: a budget spent during the first launch stops that launch and skips
    the rest; a run killed from outside (as the device tool kills a command at its time limit) once its first launch
    logged a step leaves that launch marked running, and `report` measures it from its log."""
    import psutil

    from bench import gpu_check

    budget, killed = tmp_path / "budget", tmp_path / "killed"
    gpu_check.main(["run", "--smoke", "--budget_s", "1", "--input", str(gpu_check_input), "--out_dir", str(budget),
                    "--runs_dir", str(tmp_path / "budget_runs")])
    gpu_check.main(["report", "--results", str(budget / "cpu_smoke.json"), "--markdown", str(budget / "BENCHMARKS.md")])
    runs = json.loads((budget / "cpu_smoke.json").read_text())["runs"]
    assert runs["t5"]["returncodes"] == [None] and not runs["t5"]["finished"]  # a smoke launch takes seconds
    assert all("skipped" in r for key, r in runs.items() if key != "t5")
    text = (budget / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert "| t5-tiny pretraining | `pre_train.py` `--model_config t5-tiny` | stopped by the time budget" in text
    assert "| llama-tiny pretraining | `pre_train.py` | skipped: time budget spent |" in text

    check = subprocess.Popen([sys.executable, "-m", "bench.gpu_check", "run", "--smoke", "--input",
                              str(gpu_check_input), "--out_dir", str(killed), "--runs_dir",
                              str(tmp_path / "killed_runs")], cwd=REPO, stdout=subprocess.DEVNULL,
                             start_new_session=True)
    log = killed / "logs" / "t5.log"
    deadline = time.monotonic() + 300
    while check.poll() is None and time.monotonic() < deadline:
        if log.exists() and "step 1/6 |" in log.read_text(encoding="utf-8"):
            break
        time.sleep(0.1)
    launches = psutil.Process(check.pid).children()  # each in its own process group
    os.killpg(check.pid, signal.SIGKILL)
    for launch in launches:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launch.pid, signal.SIGKILL)
    check.wait()
    results = killed / "cpu_smoke.json"
    runs = json.loads(results.read_text())["runs"]
    assert list(runs) == ["t5"] and runs["t5"]["running"] and runs["t5"]["logs"] == ["logs/t5.log"]
    gpu_check.main(["report", "--results", str(results), "--markdown", str(killed / "BENCHMARKS.md")])
    text = (killed / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert "| t5-tiny pretraining | `pre_train.py` `--model_config t5-tiny` | cut short when the run was stopped, " \
           "after step " in text
