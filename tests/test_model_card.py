"""Model cards: every final model directory holds a README.md that huggingface_hub's own parser reads as a
model card (language zh, library_name transformers, the pipeline tag of the architecture, a license left for the
user, hub base models and datasets in the metadata), with the run's figures as its training_summary.json holds
them and the chain of stages (pretrain -> sft -> dpo) as its lineage. A README.md of the user's own is kept."""

from __future__ import annotations

import json

import pytest
from conftest import pretrain_tiny
from huggingface_hub import ModelCard
from test_dpo import PAIRS, dpo_args, write_jsonl
from test_sft import conversation
from transformers import AutoModelForCausalLM

import dpo_train
import sft_train
from model.training.card import LICENSE_PLACEHOLDER, SIDE_CARD_FILE, TAG, model_card

pytestmark = pytest.mark.slow


def sft_args(model, data, output, *extra):
    return ["--config", "none", "--model_name_or_path", str(model), "--train_files", str(data),
            "--output_dir", str(output), "--max_source_length", "64", "--max_target_length", "48",
            "--max_length", "128", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
            "--report_to", "none", "--seed", "7", "--validation_ratio", "0.25", "--eval_strategy", "no",
            "--save_strategy", "no", "--eval_samples", "0", "--max_steps", "3", *map(str, extra)]


@pytest.fixture(scope="module")
def chain(tiny_corpus, tiny_tokenizer, tmp_path_factory):
    """pretrain (6 steps) -> sft (3) -> dpo (2, LoRA merged), each a toolkit output on top of the one before."""
    root = tmp_path_factory.mktemp("card")
    pretrained = pretrain_tiny("llama-tiny", tiny_corpus, tiny_tokenizer, root / "pretrain", 6)
    sft_data = write_jsonl(root / "sft.jsonl", [{"messages": conversation(i)} for i in range(16)])
    sft_train.main(sft_args(pretrained, sft_data, root / "sft"))
    pairs = write_jsonl(root / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    dpo_train.main(dpo_args(root / "sft", pairs, root / "dpo", "--max_steps", "2", "--validation_ratio", "0.25"))
    return root


def read(directory):
    summary = json.loads((directory / "training_summary.json").read_text())
    return ModelCard.load(directory / "README.md"), summary


def test_every_stage_writes_a_card_huggingface_hub_parses(chain):
    for stage in ("pretrain", "sft", "dpo"):
        card, summary = read(chain / stage)
        data = card.data
        assert (data.language, data.library_name, data.pipeline_tag) == ("zh", "transformers", "text-generation")
        assert data.license == "other" and data.license_name == LICENSE_PLACEHOLDER
        assert data.tags == [TAG, stage, "llama"]
        assert data.base_model is None and data.datasets is None  # local directories and files: named in the text
        assert f"| stage | {stage} |" in card.text and "| hardware | 1 process, CPU (" in card.text
        if stage != "pretrain":
            assert f"| held-out loss | {summary['eval_loss']:.4f} |" in card.text
        assert f'AutoModelForCausalLM.from_pretrained("{chain / stage}")' in card.text
        assert f"python serve.py --model_name_or_path {chain / stage}" in card.text
    assert type(AutoModelForCausalLM.from_pretrained(chain / "dpo")).__name__ == "LlamaForCausalLM"


def test_the_lineage_chains_pretrain_sft_and_dpo(chain):
    card, summary = read(chain / "dpo")
    lineage = summary["lineage"]
    assert [entry["stage"] for entry in lineage] == ["pretrain", "sft", "dpo"]
    assert [entry["output_dir"] for entry in lineage] == [str(chain / s) for s in ("pretrain", "sft", "dpo")]
    assert [entry["steps"] for entry in lineage] == [6, 3, 2]
    for entry, stage in zip(lineage, ("pretrain", "sft", "dpo")):
        assert entry == json.loads((chain / stage / "training_summary.json").read_text())["lineage"][-1]
        assert f"| {stage} | `{chain / stage}` | {entry['steps']} |" in card.text
    sft_summary = json.loads((chain / "sft" / "training_summary.json").read_text())
    assert lineage[1]["tokens"] == sft_summary["num_input_tokens_seen"] > 0
    assert lineage[1]["eval_loss"] == sft_summary["eval_loss"]


def test_hub_base_models_and_datasets_go_in_the_metadata(chain):
    model = AutoModelForCausalLM.from_pretrained(chain / "sft")
    config = {"model_name_or_path": "Qwen/Qwen2.5-0.5B", "train_files": ["shibing624/medical", str(chain / "x.jsonl")]}
    card = model_card(model, chain / "sft", config, {"lineage": []}, "sft", 3, 2)
    parsed = ModelCard(str(card))  # the text as saved, parsed back
    assert parsed.data.base_model == "Qwen/Qwen2.5-0.5B" and parsed.data.datasets == ["shibing624/medical"]
    assert f"| data | shibing624/medical, {chain / 'x.jsonl'} |" in parsed.text and "2 processes" in parsed.text


def test_t5_is_text2text_and_a_users_own_readme_is_kept(tiny_t5, tmp_path):
    assert ModelCard.load(tiny_t5 / "README.md").data.pipeline_tag == "text2text-generation"
    output = tmp_path / "sft"
    output.mkdir()
    (output / "README.md").write_text("我的笔记\n", encoding="utf-8")
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": conversation(i)} for i in range(16)])
    sft_train.main(sft_args(tiny_t5, data, output))
    assert (output / "README.md").read_text(encoding="utf-8") == "我的笔记\n"
    assert ModelCard.load(output / SIDE_CARD_FILE).data.pipeline_tag == "text2text-generation"
