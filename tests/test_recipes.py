"""Every production recipe in config/ runs, as users run it: the default recipes chained through their
outputs, with only sizes (tiny presets, a few steps, small evaluation / save intervals, small batches)
and paths overridden. Whatever else a recipe sets — length grouping, accumulation, dataloader workers,
cosine warmup as a share of steps, TensorBoard, checkpoint rotation — runs here as it does for a user.
The Chinese-LLaMA recipe (config/chinese_llama/) runs end to end on a tiny Llama of our own standing in for
the public base. (The demo recipes in config/demo/ run in test_demo.py; serve.yaml in test_serve.py.)"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import digest, lora_deltas, make_documents, pretrain_tiny, run_script, shared_path
from peft import PeftModel
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from model.build import added_token_ids, load_model

pytestmark = pytest.mark.slow

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
    assert (pairs.parent / "rejected.jsonl.progress.json").is_file()  # beside the pairs, as in data/dpo/
    final = tmp_path / "model_save"
    dpo = ["dpo_train.py", *recipe("dpo"), "--model_name_or_path", str(chain / "sft"), "--train_files",
           str(pairs.parent), "--output_dir", str(final), "--validation_ratio", "0.1",  # the folder, as the recipes
           "--per_device_train_batch_size", "2", "--max_prompt_length", "64", "--max_completion_length", "32",
           "--dataloader_num_workers", "2", *STEPS]
    first = run_script(*dpo)
    trained(final / "adapter")
    assert not any("lora" in n for n, _ in AutoModelForSeq2SeqLM.from_pretrained(final).named_parameters())
    assert json.loads((final / "training_summary.json").read_text())["pairs"] < 100  # the progress file is no data
    assert "rejected.jsonl.progress.json" not in first.stderr
    before = digest(final)
    again = run_script(*dpo)  # the finished command, run again: nothing to do, nothing written
    assert "has finished already" in again.stderr and digest(final) == before

    evaluation = tmp_path / "eval"
    run_script("eval_model.py", *recipe("evaluate"), "--model_name_or_path", str(final), "--ceval_data",
               str(shared_path("ceval")), "--ceval_subjects", "accountant", "advanced_mathematics",
               "--max_questions", "20", "--output_dir", str(evaluation))
    results = json.loads((evaluation / "eval_results.json").read_text())["results"]
    assert results["ceval"]["total"] == 20 + 19 and results["ceval"]["shots_asked"] == 0  # 19 questions in the 2nd
    reply = run_script("chat.py", *recipe("chat"), "--model_name_or_path", str(final), "--message", "你好",
                       "--max_new_tokens", "8", "--do_sample", "true")  # a 4-step model's greedy reply is empty
    assert reply.stdout.strip()


def test_reward_recipe(chain, tmp_path):
    """config/reward.yaml on the chain's T5 SFT model (the EOS extension) and LLaMA-Factory's ranking rows."""
    output = tmp_path / "reward"
    run_script("reward_train.py", *recipe("reward"), "--model_name_or_path", str(chain / "sft"), "--train_files",
               str(shared_path("dpo/llamafactory_dpo_zh_demo.json")), "--output_dir", str(output),
               "--per_device_train_batch_size", "2", "--max_prompt_length", "64", "--max_completion_length", "32",
               *STEPS)
    assert 0 <= trained(output)["eval_accuracy"] <= 1
    model = AutoModelForSequenceClassification.from_pretrained(output)
    assert type(model).__name__ == "T5ForSequenceClassification" and model.config.num_labels == 1


def test_grpo_recipe(tiny_llama, tmp_path):
    """config/grpo.yaml on a tiny Llama (GRPO is decoder-only) with the shared alpaca data as prompts."""
    output = tmp_path / "grpo"
    run_script("grpo_train.py", *recipe("grpo"), "--model_name_or_path", str(tiny_llama), "--train_files",
               str(shared_path("sft/llamafactory_alpaca_zh_demo.json")), "--output_dir", str(output),
               "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_prompt_length", "64",
               "--max_completion_length", "8", "--validation_ratio", "0.01", "--eval_strategy", "steps", *STEPS)
    summary = trained(output / "adapter")
    assert {"eval_rewards/exact_answer/mean", "eval_rewards/format/mean"} <= set(summary)
    assert not any("lora" in n for n, _ in AutoModelForCausalLM.from_pretrained(output).named_parameters())


# The Chinese-LLaMA recipe (config/chinese_llama/, docs/PEFT.md "The Chinese-LLaMA recipe") on a tiny Llama of our own
# standing in for the public base: a small tokenizer that spells most Chinese characters as bytes, and an
# untied LM head, as Llama-2 has.
SYSTEM_PROMPT = "You are a helpful assistant. 你是一个乐于助人的助手。"


def chinese_llama_recipe(stage: str) -> list[str]:
    return ["--config", f"config/chinese_llama/{stage}.yaml"]


def bits_per_character(model, tokenizer, texts: list[str]) -> float:
    """Cross-entropy of `texts` in bits per character of the text the predicted tokens spell (comparable
    across tokenizers)."""
    bits = chars = 0.0
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        bits += loss * (ids.shape[1] - 1) / math.log(2)
        chars += len(tokenizer.decode(ids[0, 1:]))
    return bits / chars


@pytest.fixture(scope="module")
def chinese_llama(tiny_corpus, tmp_path_factory):
    """The stand-in base, then the three recipes chained (sizes and paths overridden), each in-process."""
    import pre_train
    import sft_train
    import train_tokenizer

    root = tmp_path_factory.mktemp("chinese_llama")
    train_tokenizer.main(["--config", "none", "--input", str(tiny_corpus), "--vocab_size", "384", "--num_sentinels",
                          "0", "--min_frequency", "1", "--output_dir", str(root / "base_tokenizer")])
    base = pretrain_tiny("llama-tiny", tiny_corpus, root / "base_tokenizer", root / "base", 30,
                         "--model_overrides", '{"tie_word_embeddings": false}')
    held_out = root / "held_out.jsonl"  # documents the training corpus does not hold
    held_out.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                for t in make_documents(8, seed=99, sentences_per_doc=3)), encoding="utf-8")

    train_tokenizer.main([*chinese_llama_recipe("tokenizer"), "--extend", str(base), "--input", str(tiny_corpus),
                          "--output_dir", str(root / "tokenizer_zh"), "--vocab_size", "1024"])
    pretrain = pre_train.main([
        *chinese_llama_recipe("pretrain"), "--model_name_or_path", str(base), "--tokenizer_name_or_path",
        str(root / "tokenizer_zh"), "--train_files", str(tiny_corpus), "--validation_files", str(held_out),
        "--output_dir", str(root / "pretrain"), "--block_size", "32", "--per_device_train_batch_size", "1",
        "--lora_r", "8", "--preprocessing_num_workers", "1", "--max_steps", "12", "--eval_steps", "6",
        "--save_steps", "6", "--logging_steps", "1"])
    sft = sft_train.main([
        *chinese_llama_recipe("sft"), "--model_name_or_path", str(root / "pretrain"), "--train_files",
        str(shared_path("sft/llamafactory_alpaca_zh_demo.json")), "--output_dir", str(root / "sft"),
        "--per_device_train_batch_size", "1", "--max_length", "128", "--lora_r", "8",
        "--preprocessing_num_workers", "1", "--sample_max_new_tokens", "8", *STEPS])
    return {"root": root, "base": base, "corpus": tiny_corpus, "held_out": held_out, "pretrain": pretrain, "sft": sft}


def test_chinese_llama_extended_tokenizer_keeps_the_base_ids(chinese_llama):
    root = chinese_llama["root"]
    base = AutoTokenizer.from_pretrained(root / "base_tokenizer")
    extended = AutoTokenizer.from_pretrained(root / "tokenizer_zh")
    assert len(extended) > len(base) + 300
    assert extended.convert_ids_to_tokens(list(range(len(base)))) == base.convert_ids_to_tokens(list(range(len(base))))
    for line in chinese_llama["held_out"].read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"]
        old = base(text, add_special_tokens=False)["input_ids"]
        assert extended.decode(old) == base.decode(old) == text  # the base's ids still spell the same text
        assert len(extended(text, add_special_tokens=False)["input_ids"]) < 0.6 * len(old)


def test_chinese_llama_pretraining_trains_lora_and_the_new_rows(chinese_llama):
    output = chinese_llama["root"] / "pretrain"
    trained(output / "adapter", steps=12)  # the recipe's run: evaluated, checkpointed, TensorBoard, in adapter/
    tokenizer = AutoTokenizer.from_pretrained(output)
    base = AutoModelForCausalLM.from_pretrained(chinese_llama["base"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(output).eval()
    assert not any("lora" in name or "token_adapter" in name for name, _ in merged.named_parameters())
    new = added_token_ids(str(chinese_llama["base"]), tokenizer)
    assert new == list(range(len(AutoTokenizer.from_pretrained(chinese_llama["base"])), len(tokenizer)))

    # LoRA leaves the base untouched until the merge: merged = base + B A on the adapted projections; the
    # embeddings and the (untied) LM head changed only in the new tokens' rows; all else bit-equal
    deltas, state = lora_deltas(output / "adapter"), merged.state_dict()
    assert len(deltas) == 2 * 7
    seen = set(new) & {i for line in chinese_llama["corpus"].read_text(encoding="utf-8").splitlines()
                       for i in tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]}
    assert len(seen) > 20  # new tokens the training text holds (BPE's intermediate merges never appear)
    for name, weight in base.state_dict().items():
        if name in deltas:
            assert torch.allclose(state[name] - weight, deltas[name], atol=1e-6), name
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            old = [i for i in range(len(weight)) if i not in set(new)]
            assert torch.equal(state[name][old], weight[old]), name
            # load_model's mean resizing starts each new row at the old rows' mean (+ noise of ~1e-6); the input
            # rows of tokens in the text and every output row (softmax) moved from there
            moved = (state[name][new] - weight.float().mean(0)).abs().amax(1) > 1e-4
            assert moved.all() if name == "lm_head.weight" else moved[[new.index(i) for i in seen]].all(), name
        else:
            assert torch.equal(state[name], weight), name
    assert merged.lm_head.weight.data_ptr() != merged.model.embed_tokens.weight.data_ptr()  # still untied
    # each checkpoint's adapter and the final one hold LoRA and the new tokens' trained rows, not the two whole
    # resized matrices (PEFT's default for a resized vocabulary); the merge below rebuilds the rest from the base
    for adapter in [*sorted((output / "adapter").glob("checkpoint-*")), output / "adapter"]:
        rows = {k: v.shape for k, v in load_file(adapter / "adapter_model.safetensors").items() if "lora_" not in k}
        assert sorted(rows) == [f"base_model.model.{m}.token_adapter.trainable_tokens_delta"
                                for m in ("lm_head", "model.embed_tokens")], (adapter, rows)
        assert all(shape[0] == len(new) for shape in rows.values()), rows

    # merged == the adapter on the resized base, and held-out Chinese got cheaper than at the start
    texts = [json.loads(line)["text"] for line in chinese_llama["held_out"].read_text(encoding="utf-8").splitlines()]
    resized = load_model(str(chinese_llama["base"]), tokenizer).eval()
    start = bits_per_character(resized, tokenizer, texts)
    adapted = PeftModel.from_pretrained(resized, output / "adapter").eval()
    ids = torch.tensor([tokenizer(texts[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits[..., :len(tokenizer)],
                              merged(input_ids=ids).logits[..., :len(tokenizer)], atol=1e-5)
    # at least 2% cheaper: 2.44 -> 2.32 with the bpe tokenizer when written, 1.124 -> 1.075 with the default
    # gguf_bpe, whose tokens span whole sentences of the tiny corpus (so fewer bits per character to cut)
    assert bits_per_character(merged, tokenizer, texts) < 0.98 * start


def test_chinese_llama_sft_opens_with_the_system_message(chinese_llama):
    output = chinese_llama["root"] / "sft"
    summary = trained(output / "adapter")
    assert summary["peft"] == "lora"
    tokenizer = AutoTokenizer.from_pretrained(output)
    first = tokenizer.decode(chinese_llama["sft"].train_dataset[0]["input_ids"])
    assert first.startswith(f"<|system|>\n{SYSTEM_PROMPT}<|end|>")
    model = AutoModelForCausalLM.from_pretrained(output)
    ids = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                         {"role": "user", "content": "你好"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    assert model.generate(input_ids=ids, max_new_tokens=4, do_sample=False).shape[-1] > ids.shape[-1]


def test_export_recipe(tiny_llama, tmp_path):
    """export.py on its recipe (a model on the default tokenizer) with llama.cpp's converter."""
    output = tmp_path / "gguf" / "model-f16.gguf"
    run_script("export.py", *recipe("export"), "--model_name_or_path", str(tiny_llama), "--output", str(output))
    assert output.stat().st_size > 0 and output.with_suffix(".Modelfile").is_file()
