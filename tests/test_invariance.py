"""Every reported number is the same however a global batch of 4 is split (TRL's 1x8 == 8x1 test, taken
through processes and DeepSpeed): 1 process x batch 4, 1 x batch 1 x accumulation 4, 2 processes x 2 (DDP
over gloo) and 2 processes x 2 under DeepSpeed ZeRO-2 launched from the project's `accelerate.yaml`. Logged
losses, evaluation loss and bits per character agree to 1e-3 (relative), and each final weight tensor
to 1e-3 of the distance training moved it (see `assert_same`), for pretraining (T5 and Llama), SFT (T5), DPO
(Llama) and the reward model on rankings (Llama; pairs weighted per ranking over the global batch). And ctrl+c
under DeepSpeed (pretraining and SFT): stopped at a checkpoint and resumed by the same command, the run ends
bit-identical to the uninterrupted one.

DeepSpeed runs on the CPU accelerator here (gloo); its shared-memory op is compiled once per machine
(~3 minutes, cached under ~/.cache/torch_extensions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_until_interrupted
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

PYTHON = (sys.executable,)
ACCELERATE = (sys.executable, "-m", "accelerate.commands.launch")
# name -> (launcher, per-device batch, accumulation)
SPLITS = {
    "1x4": (PYTHON, 4, 1),
    "1x1x4": (PYTHON, 1, 4),
    "ddp-2x2": (ACCELERATE + ("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                              "no", "--dynamo_backend", "no"), 2, 1),
    "zero2-2x2": (ACCELERATE + ("--config_file", "accelerate.yaml"), 2, 1),
}
REL = 1e-3
# Weights: |w - w_ref| <= WEIGHT_REL |w_ref - w_start| per tensor (2-norms), argued in `assert_same`.
WEIGHT_REL = 1e-3


def port() -> tuple[str, ...]:
    return ("--main_process_port", str(29500 + (os.getpid() + port.calls) % 2000))


port.calls = 0


def launch(launcher: tuple, script: str, args: list[str]) -> subprocess.CompletedProcess:
    if launcher is not PYTHON:
        port.calls += 1
        launcher = (*launcher, *port())
    result = subprocess.run([*launcher, script, *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{launcher} {script} exited {result.returncode}\n{result.stderr[-4000:]}"
    return result


def outcome(output) -> dict:
    """The logged training losses, evaluation metrics and final weights of a finished run."""
    state = json.loads((output / "trainer_state.json").read_text())
    summary = json.loads((output / "training_summary.json").read_text())
    return {"losses": [h["loss"] for h in state["log_history"] if "loss" in h],
            "eval": {k: v for k, v in summary.items() if k.startswith("eval_") and k.split("_")[-1] in
                     ("loss", "bpc", "accuracies", "margins", "accuracy", "margin")},
            "tokens": summary.get("num_input_tokens_seen"),
            "weights": load_file(output / "model.safetensors")}


def start_weights(stage: str, arch: str, request) -> dict:
    """The weights a run starts from: the fixture model SFT, DPO and the reward model train on, or pretraining's
    initialisation (pre_train.py builds the model from its preset with the run's seed, 11)."""
    if stage == "reward":  # the fixture model and a score head drawn with the run's seed, as reward_train.py does
        from transformers import set_seed

        from model.training.reward import load_reward_model
        from utils.tokenization.tokenizer import load_tokenizer

        base = str(request.getfixturevalue(f"tiny_{arch}"))
        set_seed(11)
        return load_reward_model(base, load_tokenizer(base, "model_name_or_path")).state_dict()
    if stage != "pretrain":
        return load_file(request.getfixturevalue(f"tiny_{arch}") / "model.safetensors")
    from transformers import AutoTokenizer

    from model.build import build_model, model_config

    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue("tiny_tokenizer"))
    return build_model(model_config(f"{arch}-tiny", tokenizer, {}), 11).state_dict()


def assert_same(result: dict, reference: dict, start: dict, name: str) -> None:
    assert len(result["losses"]) == len(reference["losses"]) > 0
    assert result["losses"] == pytest.approx(reference["losses"], rel=REL), name
    assert reference["eval"] and result["eval"].keys() == reference["eval"].keys()
    for key, value in reference["eval"].items():
        assert result["eval"][key] == pytest.approx(value, rel=REL, abs=1e-6), f"{name}: {key}"
    assert result["tokens"] == reference["tokens"], name
    weights = reference["weights"]
    assert result["weights"].keys() == weights.keys()  # tied weights saved once under DeepSpeed too
    # Another split sums the same float32 terms in another order (micro-batches, processes, all-reduce): each
    # gradient moves by ~u sqrt(n) of the sum of its terms' magnitudes (u = 2^-24, n ~ 10^3 tokens), ~1e-6. Adam
    # divides every coordinate by its own running RMS, so a coordinate whose gradient nearly cancels can move
    # apart by a good part of a step (lr 1e-3): a bound on single weights either fails on another CPU's kernels
    # or admits real errors. Over a tensor such coordinates are few: its difference was at most 6e-5 of the
    # distance training moved it (SFT of T5 at accumulation 4, on an Intel Xeon; 1e-5 for pretraining), while
    # another order of the same examples (--data_seed) puts every tensor 0.43 or more of it apart, and a wrong or
    # dropped micro-batch or a mis-weighted token does no less. Frozen tensors stay equal.
    for key, final in weights.items():
        moved = (final.double() - start[key].double()).norm().item()
        apart = (result["weights"][key].double() - final.double()).norm().item()
        if moved == 0:
            assert apart == 0, f"{name}: {key} is frozen in one run and not in the other"
        else:
            assert apart <= WEIGHT_REL * moved, f"{name}: {key} differs by {apart / moved:.2e} of its update"


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    """SFT conversations of uneven lengths (padding differs with the split) and preference pairs."""
    from test_dpo import PAIRS
    from test_sft import conversation

    root = tmp_path_factory.mktemp("invariance_data")
    (root / "sft.jsonl").write_text("".join(json.dumps({"messages": conversation(i)}, ensure_ascii=False) + "\n"
                                            for i in range(40)), encoding="utf-8")
    (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r},
                                                         ensure_ascii=False) + "\n" for p, c, r in PAIRS),
                                      encoding="utf-8")
    return root


def stage_args(stage, arch, data, request, output) -> tuple[str, list[str]]:
    common = ["--config", "none", "--output_dir", str(output), "--logging_steps", "1", "--report_to", "none",
              "--seed", "11", "--max_steps", "6", "--eval_strategy", "steps", "--eval_steps", "6",
              "--save_strategy", "no", "--per_device_eval_batch_size", "3"]
    if stage == "pretrain":
        return "pre_train.py", [*common, "--model_config", f"{arch}-tiny", "--tokenizer_name_or_path",
                                str(request.getfixturevalue("tiny_tokenizer")), "--train_files", str(data["corpus"]),
                                "--validation_files", str(data["corpus"]), "--block_size", "64",
                                "--max_source_length", "64", "--learning_rate", "1e-3",
                                "--preprocessing_num_workers", "1", "--train_sampling_strategy", "group_by_length"]
    model = request.getfixturevalue(f"tiny_{arch}")
    if stage == "sft":
        return "sft_train.py", [*common, "--model_name_or_path", str(model), "--train_files",
                                str(data["sft"]), "--max_source_length", "64", "--max_target_length", "48",
                                "--max_length", "128", "--learning_rate", "1e-3", "--validation_ratio", "0.2",
                                "--eval_samples", "0", "--freeze", "none"]
    if stage == "reward":  # 6 rankings of 2 to 5 answers: 29 pairs weighted 1 / (pairs of their ranking)
        rankings = REPO / "tests" / "data" / "ranking_alpaca_zh.json"
        return "reward_train.py", [*common, "--model_name_or_path", str(model), "--train_files", str(rankings),
                                   "--validation_files", str(rankings), "--max_prompt_length", "96",
                                   "--max_completion_length", "160", "--learning_rate", "3e-3",
                                   "--activation_checkpointing", "false", "--dataset_num_proc", "1"]
    # 8 pairs and an evaluation batch of 2: no pair is repeated to even out processes (see PreferenceTrainer)
    return "dpo_train.py", [*common, "--model_name_or_path", str(model), "--train_files", str(data["pairs"]),
                            "--validation_files", str(data["pairs"]), "--max_prompt_length", "48",
                            "--max_completion_length", "32", "--learning_rate", "5e-3", "--activation_checkpointing",
                            "false", "--dataset_num_proc", "1", "--lora_dropout", "0",
                            "--per_device_eval_batch_size", "2"]


# Two classes, so that `make test` (pytest-xdist, --dist loadscope: a class is one unit) runs pretraining's and
# the tuning stages' splits on two workers at once rather than some eight minutes of them on one.
class TestPretraining:
    @pytest.mark.parametrize("stage,arch,interrupt", [("pretrain", "t5", True), ("pretrain", "llama", False)])
    def test_numbers_do_not_depend_on_how_the_batch_is_split(self, stage, arch, interrupt, conversations,
                                                            tiny_corpus, request, tmp_path):
        numbers_do_not_depend_on_how_the_batch_is_split(stage, arch, interrupt, conversations, tiny_corpus,
                                                        request, tmp_path)


class TestTuning:
    @pytest.mark.parametrize("stage,arch,interrupt", [("sft", "t5", True), ("dpo", "llama", False),
                                                      ("reward", "llama", False)])
    def test_numbers_do_not_depend_on_how_the_batch_is_split(self, stage, arch, interrupt, conversations,
                                                            tiny_corpus, request, tmp_path):
        numbers_do_not_depend_on_how_the_batch_is_split(stage, arch, interrupt, conversations, tiny_corpus,
                                                        request, tmp_path)


def numbers_do_not_depend_on_how_the_batch_is_split(stage, arch, interrupt, conversations, tiny_corpus, request,
                                                    tmp_path):
    data = {"corpus": tiny_corpus, "sft": conversations / "sft.jsonl", "pairs": conversations / "pairs.jsonl"}
    results = {}
    for name, (launcher, batch, accumulation) in SPLITS.items():
        script, args = stage_args(stage, arch, data, request, tmp_path / name)
        launch(launcher, script, [*args, "--per_device_train_batch_size", str(batch),
                                  "--gradient_accumulation_steps", str(accumulation)])
        results[name] = outcome(tmp_path / name)
    reference, start = results.pop("1x4"), start_weights(stage, arch, request)
    if stage in ("pretrain", "sft"):  # the loss must be a language-model loss, not a multiple of one
        assert 3 < reference["losses"][0] < 9
    for name, result in results.items():
        assert_same(result, reference, start, f"{stage}/{arch} {name}")
    if interrupt:
        ctrl_c_under_deepspeed_resumes_bit_identical(*stage_args(stage, arch, data, request, tmp_path / "stopped"),
                                                     results["zero2-2x2"])


def ctrl_c_under_deepspeed_resumes_bit_identical(script: str, args: list[str], whole: dict) -> None:
    """`accelerate launch --config_file accelerate.yaml` (ZeRO-2, 2 processes): SIGINT after step 2 makes both
    ranks finish a step and save one checkpoint; the same command resumes and ends equal to the uninterrupted
    run `whole`. (torchrun's agent forwards the signal once to the workers, waits up to 30 s for them and then
    exits with it: 130, after the workers exited 0.)"""
    launcher = (*SPLITS["zero2-2x2"][0], *port())
    args = [*args, "--per_device_train_batch_size", "2"]
    output = REPO / args[args.index("--output_dir") + 1]
    code, log = run_until_interrupted(args, stop_at=2, launcher=launcher, script=script)
    assert code == 130 and log.count("stopped at step") == 1 and "KeyboardInterrupt" not in log, log[-3000:]
    saved = [p.name for p in output.glob("checkpoint-*")]
    assert len(saved) == 1 and saved[0] in ("checkpoint-2", "checkpoint-3", "checkpoint-4"), saved
    assert not (output / "model.safetensors").exists()
    finish = launch(launcher, script, args)
    assert "resuming from" in finish.stderr
    resumed = outcome(output)
    assert resumed["losses"] == whole["losses"] and resumed["eval"] == whole["eval"]
    assert all(torch.equal(resumed["weights"][k], w) for k, w in whole["weights"].items())
