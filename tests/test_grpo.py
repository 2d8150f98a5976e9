"""GRPO with LoRA: the logged reward rises on a reward the tiny model learns quickly, each reward is logged on
its own, the base stays untouched until the merge, the merged model reloads with AutoModelForCausalLM and
matches the adapter's logits, the rule-based rewards score known replies, T5 and bad settings are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import SummaryTable, run_script
from peft import PeftModel
from safetensors.torch import load_file
from test_dpo import PAIRS, lora_deltas, write_jsonl
from test_reward import reward_args
from transformers import AutoModelForCausalLM, AutoTokenizer, T5Config

import grpo_train
import reward_train
from model.training.rewards import answer_matches, rule_rewards
from utils.errors import UserError

pytestmark = pytest.mark.slow


def grpo_args(model, prompts, output, *extra):
    return ["--config", "none", "--model_name_or_path", str(model), "--train_files", str(prompts),
            "--output_dir", str(output), "--max_prompt_length", "48", "--max_completion_length", "24",
            "--num_generations", "4", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
            "--lr_scheduler_type", "constant", "--logging_steps", "1", "--report_to", "none", "--seed", "7",
            "--temperature", "1.0", "--lora_r", "8", "--activation_checkpointing", "false", "--save_strategy", "no",
            *map(str, extra)]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("grpo") / "prompts.jsonl",
                       [{"prompt": p, "response": c} for p, c, _ in PAIRS])


@pytest.fixture(scope="module")
def reward_model(tiny_llama, tmp_path_factory):
    """A reward model of the tiny Llama that scores on-topic answers above off-topic ones (test_reward.py)."""
    root = tmp_path_factory.mktemp("grpo_reward")
    pairs = write_jsonl(root / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    reward_train.main(reward_args(tiny_llama, pairs, root / "reward", "--max_steps", "12"))
    return root / "reward"


def reward_model_run(model, prompts, reward_model, output, *extra):
    """6 steps of 16 completions (4 per prompt) scored by the reward model alone (weights 0, 0, 1)."""
    return grpo_train.main(grpo_args(model, prompts, output, "--max_steps", "6", "--per_device_train_batch_size", "16",
                                     "--learning_rate", "1e-3", "--rewards", "exact_answer", "repetition",
                                     "--reward_model", reward_model, "--reward_weights", "0.0", "0.0", "1.0", *extra))


@pytest.fixture(scope="module")
def trained(tiny_llama, prompts, reward_model, tmp_path_factory):
    output = tmp_path_factory.mktemp("grpo_llama") / "model_save"
    with SummaryTable() as table:
        trainer = reward_model_run(tiny_llama, prompts, reward_model, output)
    return {"output": output, "trainer": trainer, "base": tiny_llama, "table": table,
            "history": [h for h in trainer.state.log_history if "reward" in h]}


def test_logged_reward_rises(trained, tiny_llama, prompts, reward_model, tmp_path):
    """The reward model's score, the one weighted reward, rises above what the untrained policy scores; every
    reward is logged on its own.

    One step's reward is the mean of 16 sampled completions, so the first step alone is a noisy baseline (from
    -0.8 to 1.7 over seeds). The baseline is the same run at learning rate 0: 6 steps, 96 completions of the
    untrained policy. The trained run's last 3 steps score 0.77 to 1.69 above it over 8 seeds (1-8, seed 7 the
    test's; issue 22's note), against the 0.5 asked here."""
    history = trained["history"]
    names = {"rewards/exact_answer/mean", "rewards/repetition/mean", "rewards/reward_model/mean"}
    assert names <= set(history[0])
    untrained = [h["reward"] for h in reward_model_run(tiny_llama, prompts, reward_model, tmp_path / "untrained",
                                                       "--learning_rate", "0").state.log_history if "reward" in h]
    first, last = history[0]["reward"], [h["reward"] for h in history[-3:]]
    assert untrained[0] == first and len(untrained) == 6  # the same first samples: the same policy and seed
    assert sum(last) / 3 > sum(untrained) / 6 + 0.5
    # With weights 0, 0, 1 each completion's weighted reward is its reward-model score exactly (x*0 and x*1 are
    # exact), but TRL averages the two columns with different float32 reductions (mean, nanmean), whose order
    # depends on the CPU's vector kernels. Each sum of n = 16 completions' scores is off by at most (n - 1)
    # roundings of partial sums no larger than sum |x_i| <= n (|mean| + sqrt(n) std); two such means differ by
    # at most twice that, over n.
    n, unit = 16, 2.0 ** -24
    bound = 2 * (n - 1) * unit * (abs(first) + n ** 0.5 * history[0]["reward_std"])
    assert history[0]["rewards/reward_model/mean"] == pytest.approx(first, rel=0, abs=bound)
    table = trained["table"]  # the console's closing table
    assert table["reward (last logged)"] == f"{history[-1]['reward']:.3f}" and table["steps"] == "6"


def test_base_untouched_and_merged_model_equals_the_adapter(trained):
    output = trained["output"]
    assert json.loads((output / "training_summary.json").read_text())["prompts"] == len(PAIRS)
    base, merged = AutoModelForCausalLM.from_pretrained(trained["base"]), AutoModelForCausalLM.from_pretrained(output)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    deltas, merged_state = lora_deltas(output / "adapter"), merged.state_dict()
    assert deltas and all(name in merged_state for name in deltas)
    for name, weight in base.state_dict().items():
        if name in deltas:  # merged = the untouched base + B A, and the adapter learned
            assert torch.allclose(merged_state[name] - weight, deltas[name], atol=1e-6), name
            assert deltas[name].abs().max() > 1e-4
        else:
            assert torch.equal(merged_state[name], weight), name
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained["base"]), output / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(output)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PAIRS[0][0]}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.allclose(peft(input_ids=ids).logits, merged.eval()(input_ids=ids).logits, atol=1e-5)


def test_rule_rewards_score_known_replies(tiny_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    exact, format_, repetition = rule_rewards(["exact_answer", "format", "repetition"], tokenizer, 4)
    replies = ["3 加 4 等于 7。", "答案是７", "7.5", "好的好的好的好的", "杭州"]
    completions = [[{"role": "assistant", "content": r}] for r in replies]
    assert exact(completions=completions, answer=["7"] * 4 + ["杭州。"]) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert answer_matches("北京 。", "北京") and not answer_matches("北京市", "北京")
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert format_(completion_ids=[[5, end], [5, 6], [], [end, 5]]) == [1.0, 0.0, 0.0, 0.0]
    assert repetition(completions=completions) == [0.0, 0.0, 0.0, -3 / 5, 0.0]


def test_t5_and_bad_reward_settings_are_refused(tiny_llama, prompts, tmp_path):
    t5 = tmp_path / "t5"
    T5Config(vocab_size=64).save_pretrained(t5)
    with pytest.raises(UserError, match="not encoder-decoders: TRL's GRPOTrainer") as error:
        grpo_train.main(grpo_args(t5, prompts, tmp_path / "out"))
    assert error.value.field == "model_name_or_path" and "dpo_train.py" in error.value.fix
    with pytest.raises(UserError, match="2 weights for 3 rewards"):
        grpo_train.main(grpo_args(tiny_llama, prompts, tmp_path / "out", "--reward_weights", "1", "1"))
    with pytest.raises(UserError, match="unknown length"):
        grpo_train.main(grpo_args(tiny_llama, prompts, tmp_path / "out", "--rewards", "length"))


def test_a_causal_lm_as_reward_model_and_an_empty_prompt_file_are_refused(tiny_llama, prompts, tmp_path):
    """A plain causal LM would score with a random head: refused, as is a sequence classifier whose checkpoint
    lacks the head; an empty prompt file is named as holding no prompts (it was blamed on max_prompt_length)."""
    out = tmp_path / "out"
    result = run_script("grpo_train.py", *grpo_args(tiny_llama, prompts, out, "--reward_model", tiny_llama),
                        check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {tiny_llama}, field 'reward_model': not a reward model: config.json names LlamaForCausalLM" \
        in result.stderr and "reward_train.py" in result.stderr
    headless = tmp_path / "headless"
    shutil.copytree(tiny_llama, headless)
    config = json.loads((headless / "config.json").read_text())
    (headless / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(UserError, match=r"lacks weights \(score.weight\)") as error:
        grpo_train.main(grpo_args(tiny_llama, prompts, out, "--reward_model", headless))
    assert error.value.field == "reward_model"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run_script("grpo_train.py", *grpo_args(tiny_llama, empty, out), check=False)
    assert result.returncode == 2
    assert f"error: {empty}, field 'train_files': holds no prompts" in result.stderr
    assert not out.exists()


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tiny_llama, prompts, tmp_path):
    """4 steps at once, and 2 steps then 4 resumed from that run's checkpoint-2 (a finished run's directory holds
    its merged model, so the resumed run writes elsewhere): the sampled replies (the RNG state is in the
    checkpoint), rewards, losses and the merged weights are the same."""
    args = lambda out, steps: grpo_args(tiny_llama, prompts, out, "--max_steps", steps,  # noqa: E731
                                        "--max_completion_length", "16", "--rewards", "repetition",
                                        "--repetition_ngram", "2",
                                        "--save_strategy", "steps", "--save_steps", "2")
    reference = grpo_train.main(args(tmp_path / "reference", 4))
    grpo_train.main(args(tmp_path / "first", 2))
    resumed = grpo_train.main([*args(tmp_path / "resumed", 4), "--resume_from_checkpoint",
                               str(tmp_path / "first" / "adapter" / "checkpoint-2")])
    logged = lambda trainer: [(h["reward"], h["loss"]) for h in trainer.state.log_history if "loss" in h]  # noqa: E731
    assert logged(resumed) == logged(reference) and any(loss for _, loss in logged(reference))
    before, after = (load_file(tmp_path / run / "model.safetensors") for run in ("reference", "resumed"))
    assert all(torch.equal(before[k], after[k]) for k in before)
