"""Every production recipe in config/ runs, as users run it: the default recipes chained through their
outputs, with only sizes (tiny presets, a few steps, small evaluation / save intervals, small batches)
and paths overridden. Whatever else a recipe sets — length grouping, accumulation, dataloader workers,
cosine warmup as a share of steps, TensorBoard, checkpoint rotation — runs here as it does for a user.
(The demo recipes in config/demo/ run in test_demo.py; serve.yaml in test_serve.py.)"""

from __future__ import annotations

import json

import pytest
from conftest import run_script, shared_path
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

STEPS = ["--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1"]


def recipe(stage: str) -> list[str]:
    return ["--config", f"config/{stage}.yaml"]


def trained(output, steps: int = 4) -> dict:
    """The summary of a finished training run, after checking it evaluated, checkpointed and saved."""
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["epoch"] > 0 and any(key.startswith("eval_") and key.endswith("loss") for key in summary)
    assert (output / f"checkpoint-{steps}").is_dir() and (output / "run.json").is_file()
    assert list((output / "runs").rglob("events.out.tfevents.*"))  # report_to: [tensorboard]
    return summary


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """prepare_data -> train_tokenizer -> pre_train (T5, the recipe's model) -> sft on the default recipes."""
    root = tmp_path_factory.mktemp("recipes")
    run_script("prepare_data.py", *recipe("prepare_data"), "--input",
               str(shared_path("zhwiki_xml/zhwiki-test-pages.xml")), "--output_dir", str(root / "corpus"),
               "--validation_ratio", "0.2")
    run_script("train_tokenizer.py", *recipe("tokenizer"), "--input", str(root / "corpus"), "--output_dir",
               str(root / "tokenizer"), "--vocab_size", "2048", "--num_sentinels", "16")
    result = run_script("pre_train.py", *recipe("pretrain"), "--model_config", "t5-tiny",
                        "--tokenizer_name_or_path", str(root / "tokenizer"), "--train_files", str(root / "corpus"),
                        "--output_dir", str(root / "pretrain"), "--per_device_train_batch_size", "2",
                        "--max_source_length", "64", "--preprocessing_num_workers", "1", *STEPS)
    assert "(batch 2 x accum 4 x 1 processes x 64)" in result.stderr  # the recipe's accumulation
    run_script("sft_train.py", *recipe("sft"), "--model_name_or_path", str(root / "pretrain"), "--train_files",
               str(shared_path("sft/llamafactory_alpaca_zh_demo.json")), "--output_dir", str(root / "sft"),
               "--per_device_train_batch_size", "2", "--max_source_length", "64", "--max_target_length", "32",
               "--preprocessing_num_workers", "1", "--sample_max_new_tokens", "8", *STEPS)
    return root


def test_pretrain_recipe_t5(chain):
    summary = trained(chain / "pretrain")
    assert summary["objective"] == "span_corruption" and summary["eval_span_bpc"] > 0
    AutoModelForSeq2SeqLM.from_pretrained(chain / "pretrain")


def test_pretrain_recipe_llama(chain, tmp_path):
    """The same recipe with the decoder preset: length grouping over packed blocks evaluates and ends."""
    run_script("pre_train.py", *recipe("pretrain"), "--model_config", "llama-tiny", "--tokenizer_name_or_path",
               str(chain / "tokenizer"), "--train_files", str(chain / "corpus"), "--output_dir",
               str(tmp_path / "llama"), "--per_device_train_batch_size", "2", "--block_size", "64",
               "--preprocessing_num_workers", "1", *STEPS)
    assert trained(tmp_path / "llama")["eval_bpc"] > 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "llama")


def test_sft_rejected_dpo_evaluate_and_chat_recipes(chain, tmp_path):
    trained(chain / "sft")
    pairs = tmp_path / "dpo" / "rejected.jsonl"
    run_script("generate_rejected.py", *recipe("generate_rejected"), "--model_name_or_path", str(chain / "sft"),
               "--input", str(shared_path("sft/llamafactory_alpaca_zh_demo.json")), "--output", str(pairs),
               "--max_rows", "100", "--max_new_tokens", "16", "--do_sample", "true")  # a 4-step model's greedy
    assert len(pairs.read_text(encoding="utf-8").splitlines()) >= 50          # answer is mostly empty
    final = tmp_path / "model_save"
    run_script("dpo_train.py", *recipe("dpo"), "--model_name_or_path", str(chain / "sft"), "--train_files",
               str(pairs), "--output_dir", str(final), "--validation_ratio", "0.1",
               "--per_device_train_batch_size", "2", "--max_prompt_length", "64", "--max_completion_length", "32",
               "--dataloader_num_workers", "2", *STEPS)
    trained(final / "adapter")
    assert not any("lora" in n for n, _ in AutoModelForSeq2SeqLM.from_pretrained(final).named_parameters())

    evaluation = tmp_path / "eval"
    run_script("evaluate.py", *recipe("evaluate"), "--model_name_or_path", str(final), "--ceval_data",
               str(shared_path("ceval")), "--ceval_subjects", "accountant", "advanced_mathematics",
               "--max_questions", "20", "--output_dir", str(evaluation))
    results = json.loads((evaluation / "eval_results.json").read_text())["results"]
    assert results["ceval"]["total"] == 20 + 19 and results["ceval"]["shots_asked"] == 0  # 19 questions in the 2nd
    reply = run_script("chat.py", *recipe("chat"), "--model_name_or_path", str(final), "--message", "你好",
                       "--max_new_tokens", "8", "--do_sample", "true")  # a 4-step model's greedy reply is empty
    assert reply.stdout.strip()


def test_export_recipe(gguf_llama, tmp_path):
    """export.py on its recipe (a model whose tokenizer is gguf_bpe) with llama.cpp's converter."""
    output = tmp_path / "gguf" / "model-f16.gguf"
    run_script("export.py", *recipe("export"), "--model_name_or_path", str(gguf_llama), "--output", str(output))
    assert output.stat().st_size > 0 and output.with_suffix(".Modelfile").is_file()
