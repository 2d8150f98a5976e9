"""The multi-GPU launch files: accelerate.yaml and the DeepSpeed configs are valid, and every "auto" value in
the DeepSpeed configs is filled from TrainingArguments and the model (T5 and Llama), as HF Trainer does at
launch. (DeepSpeed itself needs GPUs; the 2-process CPU run is in test_pretrain.py.)"""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import REPO
from transformers import AutoTokenizer
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

from model.build import build_model, model_config
from model.training.arguments import TrainArguments


def all_values(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from all_values(value)
    else:
        yield tree


def test_accelerate_yaml_launches_two_processes_with_the_zero2_config():
    config = yaml.safe_load((REPO / "accelerate.yaml").read_text())
    assert config["distributed_type"] == "DEEPSPEED" and config["num_processes"] == 2
    assert (REPO / config["deepspeed_config"]["deepspeed_config_file"]).is_file()


@pytest.mark.parametrize("ds_file,stage", [("ds_config.json", 2), ("ds_config_zero3.json", 3)])
@pytest.mark.parametrize("preset", ["t5-tiny", "llama-tiny"])
def test_deepspeed_auto_values_are_filled_from_training_arguments(ds_file, stage, preset, tiny_tokenizer, tmp_path,
                                                                  monkeypatch):
    # The model is built first: with ZeRO-3 arguments alive, from_config partitions it (deepspeed.zero.Init),
    # which needs the process group that `accelerate launch` sets up.
    model = build_model(model_config(preset, AutoTokenizer.from_pretrained(tiny_tokenizer)), seed=0)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    args = TrainArguments(output_dir=str(tmp_path), deepspeed=str(REPO / ds_file), per_device_train_batch_size=4,
                          gradient_accumulation_steps=2, max_grad_norm=0.5, learning_rate=1e-3)
    try:
        ds = args.hf_deepspeed_config
        ds.trainer_config_finalize(args, model, num_training_steps=100)
        config = ds.config
    finally:
        unset_hf_deepspeed_config()  # the global ZeRO-3 switch must not leak into later tests
    assert not is_deepspeed_zero3_enabled()
    assert "auto" not in list(all_values(config)), json.dumps(config)
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 0.5
