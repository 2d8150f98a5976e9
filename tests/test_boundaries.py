"""Every training stage at the end of its run, as a user meets it (issue 22, "runs at their boundaries"):

- the finished command run again is a no-op: it says so, exits 0 and leaves every file byte-identical;
- killed during the final save (the state `kill -9` leaves: the old final model's record gone, the staging
  folder half-written), the same command writes the uninterrupted run's model bit-exactly, training no step
  past --max_steps (HF's loop would take one more from a checkpoint at the last step);
- ctrl+c in the last step, then the same command: the uninterrupted run's model, bit-exactly;
- a larger --max_steps extends a finished run, through the config.yaml it saved (the README's way) or with a
  repeated --overwrite_output_dir (which replaces another run only), LoRA runs included, to exactly the run
  asked for that long at once (a constant learning rate, so the schedule is the same);
- actions of one command (--overwrite_output_dir, --no_resume) are never saved into config.yaml, and a
  recipe that sets one is refused with its line.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import digest, run_script, run_until_interrupted
from safetensors.torch import load_file
from test_dpo import PAIRS, dpo_args, write_jsonl
from test_grpo import grpo_args
from test_reward import reward_args
from test_runs import pretrain_args
from test_sft import args_for as sft_args
from test_sft import conversation

import dpo_train
import grpo_train
import pre_train
import reward_train
import sft_train
from model.training.outputs import FINISHED_FILE

pytestmark = pytest.mark.slow

STEPS = 3
SAVE = ["--max_steps", STEPS, "--save_strategy", "steps", "--save_steps", 2]  # checkpoints at 2 and 3 (the end)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("boundary_data")
    return {"sft": write_jsonl(root / "sft.jsonl", [{"messages": conversation(i)} for i in range(24)]),
            "pairs": write_jsonl(root / "pairs.jsonl",
                                 [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]),
            "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": p, "response": c} for p, c, _ in PAIRS])}


def stage_run(stage: str, request, data, output, *extra) -> tuple:
    """(the stage's main, its arguments) for a short run of `stage` into `output`."""
    fixture = request.getfixturevalue
    if stage == "pretrain":
        return pre_train.main, pretrain_args(fixture("tiny_corpus"), fixture("tiny_tokenizer"), output, "llama-tiny",
                                             "--lr_scheduler_type", "constant", *extra)
    if stage == "sft":
        return sft_train.main, sft_args(fixture("tiny_t5"), data["sft"], output, "--per_device_train_batch_size", 4,
                                        "--eval_samples", 0, *extra)
    if stage == "dpo":
        return dpo_train.main, dpo_args(fixture("tiny_llama"), data["pairs"], output, *extra)
    if stage == "reward":
        return reward_train.main, reward_args(fixture("tiny_llama"), data["pairs"], output, *extra)
    return grpo_train.main, grpo_args(fixture("tiny_llama"), data["prompts"], output, "--rewards", "repetition",
                                      "--max_completion_length", 8, *extra)


def weights(output) -> dict:
    return load_file(output / "model.safetensors")


def assert_equal_weights(result: dict, reference: dict) -> None:
    assert result.keys() == reference.keys()
    assert all(torch.equal(result[k], reference[k]) for k in reference)


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo", "reward", "grpo"])
def test_rerun_is_a_no_op_and_a_kill_in_the_final_save_is_finished_bit_exactly(stage, request, data, tmp_path):
    output = tmp_path / "run"
    main, args = stage_run(stage, request, data, output, *SAVE)
    assert main(args).state.global_step == STEPS
    before, finished = digest(output), weights(output)
    assert not any(key in (output / "config.yaml").read_text() for key in ("overwrite_output_dir", "no_resume"))

    assert main(args) is None  # finished already: nothing to do
    assert digest(output) == before

    # What kill -9 in the final save leaves: the old record removed first, config.json and the weights not yet
    # renamed into place, the staging folder half-written.
    (output / FINISHED_FILE).unlink()
    (output / "config.json").unlink()
    (output / ".final-staging").mkdir()
    (output / "model.safetensors").rename(output / ".final-staging" / "model.safetensors")
    resumed = main(args)
    assert resumed.state.global_step == STEPS  # not one step past --max_steps
    assert_equal_weights(weights(output), finished)
    assert not (output / ".final-staging").exists() and (output / FINISHED_FILE).is_file()
    assert main(args) is None


def test_ctrl_c_in_the_last_step_then_the_same_command_equals_the_uninterrupted_run(request, data, tmp_path):
    """A real SIGINT once step 2 of 3 is logged: it lands in step 3 (a checkpoint at the last step, no final model)
    or after it (the run ends as usual); either way the same command ends with the uninterrupted model."""
    _, whole = stage_run("pretrain", request, data, tmp_path / "whole", *SAVE, "--logging_steps", 1)
    run_script("pre_train.py", *whole)
    _, args = stage_run("pretrain", request, data, tmp_path / "stopped", *SAVE, "--logging_steps", 1)
    code, log = run_until_interrupted(args, stop_at=STEPS - 1)
    assert code == 0 and "Traceback" not in log, log[-3000:]
    run_script("pre_train.py", *args)
    assert json.loads((tmp_path / "stopped" / "trainer_state.json").read_text())["global_step"] == STEPS
    assert_equal_weights(weights(tmp_path / "stopped"), weights(tmp_path / "whole"))
    finished = run_script("pre_train.py", *args)
    assert "has finished already" in finished.stderr and finished.returncode == 0


@pytest.mark.parametrize("stage", ["pretrain", "dpo"])
def test_a_larger_max_steps_extends_the_finished_run(stage, request, data, tmp_path):
    """pretrain through its saved config.yaml; DPO (LoRA) with --overwrite_output_dir repeated on the same run."""
    main, at_once = stage_run(stage, request, data, tmp_path / "at_once", "--max_steps", 4, "--save_steps", 2)
    reference = main(at_once)
    extended = tmp_path / "extended"
    main, args = stage_run(stage, request, data, extended, "--max_steps", 2, "--save_steps", 2)
    main(args)
    if stage == "pretrain":
        trainer = main(["--config", str(extended / "config.yaml"), "--max_steps", "4"])
    else:
        trainer = main([*args, "--max_steps", "4", "--overwrite_output_dir"])
    assert trainer.state.global_step == 4
    logged = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert logged(trainer) == logged(reference)
    assert_equal_weights(weights(extended), weights(tmp_path / "at_once"))
    if stage == "dpo":  # the adapter the merged model came from was extended too
        adapter = extended / "adapter" / "adapter_model.safetensors"
        assert_equal_weights(load_file(adapter), load_file(tmp_path / "at_once" / "adapter" / adapter.name))
    shorter = run_script("pre_train.py" if stage == "pretrain" else "dpo_train.py", *args, check=False)
    assert shorter.returncode == 2 and "past --max_steps 2" in shorter.stderr  # going back is refused


def test_one_command_actions_are_refused_in_a_recipe(request, data, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("max_steps: 2\noverwrite_output_dir: true\n", encoding="utf-8")
    _, args = stage_run("pretrain", request, data, tmp_path / "out")
    result = run_script("pre_train.py", *args, "--config", str(recipe), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{recipe}, line 2, field 'overwrite_output_dir'" in result.stderr
    assert not (tmp_path / "out").exists()
