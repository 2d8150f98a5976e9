"""Reward models: pairwise accuracy on the training pairs rises while the loss falls, the output reloads with
AutoModelForSequenceClassification and scores as the trainer did (and as GRPO's reward-model reward reads it),
a resumed run equals the uninterrupted one. (T5 through the EOS extension, on LLaMA-Factory's ranking rows:
tests/test_recipes.py.)"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import SummaryTable
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_dpo import PAIRS, write_jsonl
from transformers import AutoModelForSequenceClassification

import reward_train
from model.training.reward import RewardModelScore

pytestmark = pytest.mark.slow


def reward_args(model, pairs, output, *extra):
    return ["--config", "none", "--model_name_or_path", str(model), "--train_files", str(pairs),
            "--output_dir", str(output), "--max_prompt_length", "48", "--max_completion_length", "32",
            "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--lr_scheduler_type", "constant",
            "--logging_steps", "1", "--report_to", "none", "--seed", "7", "--dataset_num_proc", "1",
            "--save_strategy", "no", "--activation_checkpointing", "false", *map(str, extra)]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """PAIRS as LLaMA-Factory alpaca pairwise rows (output = [chosen, rejected])."""
    return write_jsonl(tmp_path_factory.mktemp("reward") / "pairs.jsonl",
                       [{"instruction": p, "input": "", "output": [c, r]} for p, c, r in PAIRS])


@pytest.fixture(scope="module")
def trained(tiny_llama, pairs, tmp_path_factory):
    output = tmp_path_factory.mktemp("reward_llama") / "reward"
    with SummaryTable() as table:
        trainer = reward_train.main(reward_args(tiny_llama, pairs, output, "--max_steps", "12", "--validation_files",
                                                pairs, "--eval_strategy", "steps", "--eval_steps", "12",
                                                "--eval_on_start", "true"))
    return output, trainer, table


def test_accuracy_on_training_pairs_rises_and_the_model_reloads(trained, pairs):
    output, trainer, table = trained
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    # the Trainer evaluated at the last step (12 = eval_steps), which stands as the final evaluation
    assert [h["step"] for h in evals] == [0, 12]
    assert evals[0]["step"] == 0 and evals[-1]["eval_accuracy"] == 1.0 > evals[0]["eval_accuracy"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.2
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["eval_accuracy"] == 1.0 and summary["pairs"] == len(PAIRS)
    assert table["held-out reward accuracy"] == "1.000" and table["held-out loss"] == f"{summary['eval_loss']:.4f}"
    assert table["held-out reward margin"] == f"{summary['eval_margin']:.3f}" and table["model"] == str(output)

    assert ModelCard.load(output / "README.md").data.pipeline_tag == "text-classification"  # its model card
    model = AutoModelForSequenceClassification.from_pretrained(output).eval()  # stock class, no remote code
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.num_labels == 1
    trained_state = trainer.model.state_dict()
    assert all(torch.equal(value, trained_state[name]) for name, value in model.state_dict().items())
    # GRPO's reward-model reward scores every chosen answer above its rejected one, as in training
    score = RewardModelScore(str(output), max_prompt_length=48)
    prompts = [[{"role": "user", "content": p}] for p, _, _ in PAIRS]
    chosen = score(prompts, [[{"role": "assistant", "content": c}] for _, c, _ in PAIRS])
    rejected = score(prompts, [[{"role": "assistant", "content": r}] for _, _, r in PAIRS])
    assert all(c > r for c, r in zip(chosen, rejected))


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tiny_llama, pairs, tmp_path):
    """6 steps at once, and 3 steps then the same command extended to 6 (resuming from checkpoint-3)."""
    args = lambda out, steps: reward_args(tiny_llama, pairs, out, "--max_steps", steps,  # noqa: E731
                                          "--save_strategy", "steps", "--save_steps", "3")
    reward_train.main(args(tmp_path / "reference", 6))
    reward_train.main(args(tmp_path / "resumed", 3))
    reward_train.main(args(tmp_path / "resumed", 6))
    before, after = load_file(tmp_path / "reference" / "model.safetensors"), load_file(
        tmp_path / "resumed" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_rankings_train_every_pair_with_each_ranking_weighted_once(tiny_llama, tmp_path):
    """LLaMA-Factory's ranking rows (2 to 5 answers, best first): 29 pairs from 6 rankings (`ranking_pairs: all`,
    recorded in the run). The held-out loss is the mean over rankings of each ranking's mean pair loss, recomputed
    here from the saved model's scores: pair weights 1/6 and 1/10 beside 1 would show as a different figure
    (tolerance 1e-5 relative: the same float32 forward, batched with padding in the trainer and here)."""
    rankings = Path(__file__).parent / "data" / "ranking_alpaca_zh.json"
    output = tmp_path / "reward"
    trainer = reward_train.main(reward_args(tiny_llama, rankings, output, "--max_steps", "8", "--validation_files",
                                            rankings, "--max_prompt_length", "96", "--max_completion_length", "160"))
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["pairs"] == len(trainer.train_dataset) == 29
    assert yaml.safe_load((output / "config.yaml").read_text())["ranking_pairs"] == "all"  # the resolved config
    score = RewardModelScore(str(output), max_prompt_length=96)
    losses, right = [], []
    for row in json.loads(rankings.read_text(encoding="utf-8")):
        prompt = render_alpaca(row)
        scores = score([prompt] * len(row["output"]), [[{"role": "assistant", "content": a}] for a in row["output"]])
        pairs = [(scores[i], scores[j]) for i in range(len(scores)) for j in range(i + 1, len(scores))]
        losses.append(sum(-F.logsigmoid(torch.tensor(b - w)).item() for b, w in pairs) / len(pairs))
        right.append(sum(b > w for b, w in pairs) / len(pairs))
    assert summary["eval_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert summary["eval_accuracy"] == pytest.approx(sum(right) / len(right), rel=1e-9)


def render_alpaca(row: dict) -> list[dict]:
    """The prompt messages of an alpaca row, as utils.data.conversations reads them."""
    from utils.data.conversations import load_answered_prompts

    path = Path(tempfile.mkdtemp()) / "row.jsonl"
    write_jsonl(path, [row])
    return load_answered_prompts([str(path)])[0]["prompt"]
