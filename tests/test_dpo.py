"""DPO with LoRA, merged back: loss starts at ln 2, reward accuracy rises, the base stays untouched until the
merge, the merged model reloads with AutoModel and matches the adapter's logits, the T5 extension of TRL
computes the model's own log-probs and TRL's metrics, ctrl+c resume equals the uninterrupted run, bad input
and an existing model are refused."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, SummaryTable, lora_deltas, run_until_interrupted, shared_path
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import dpo_train
from dpo_train import DataArguments, ModelArguments
from model.training.dpo import (
    DataCollatorForSeq2SeqPreference,
    DPOArguments,
    add_seq2seq_fused_lm_head,
    prepare_preferences,
    tokenize_preference,
)
from model.training.lora import LoraArguments
from model.training.outputs import holds_model
from utils.config import parse_config
from utils.data.conversations import load_preferences
from utils.errors import UserError
from utils.tokenization.chat_format import END_OF_TURN

pytestmark = pytest.mark.slow

# Original preference pairs: a question, a fitting answer (chosen) and an off-topic one (rejected).
PAIRS = [
    ("春天的河边有什么？", "河边的柳树发出了嫩绿的新芽。", "这家工厂主要生产竹制家具。"),
    ("小明怎么去学校？", "小明每天骑自行车去学校。", "天气预报说明天有小雨。"),
    ("图书馆里的学生在做什么？", "学生们在认真地阅读和做笔记。", "古代的工匠用黏土烧制陶器。"),
    ("运动有什么好处？", "适量的运动可以帮助人们改善睡眠质量。", "这座城市修建了第一条地铁线路。"),
    ("茶叶有哪些种类？", "包括绿茶、红茶、乌龙茶和白茶。", "他用 Python 写了一个小程序。"),
    ("在山顶上能看到什么？", "可以看到远处的湖泊和连绵不断的群山。", "老师说学习语言要坚持练习。"),
    ("陶器是怎么来的？", "古代的工匠用黏土烧制陶器。", "小明每天骑自行车去学校。"),
    ("明天天气怎么样？", "明天有小雨，气温在12到18摄氏度之间。", "茶叶的种类很多。"),
]
ARCHS = {"t5": ("tiny_t5", AutoModelForSeq2SeqLM), "llama": ("tiny_llama", AutoModelForCausalLM)}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    """The same pairs as {prompt, chosen, rejected} and as ShareGPT conversations with chosen/rejected."""
    root = tmp_path_factory.mktemp("pairs")
    plain = write_jsonl(root / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    sharegpt = write_jsonl(root / "sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": p}], "chosen": c, "rejected": r} for p, c, r in PAIRS])
    return {"t5": plain, "llama": sharegpt}


def dpo_args(model, pairs, output, *extra):
    return ["--config", "none", "--model_name_or_path", str(model), "--train_files", str(pairs),
            "--output_dir", str(output), "--max_prompt_length", "48", "--max_completion_length", "32",
            "--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--lr_scheduler_type", "constant",
            "--logging_steps", "1", "--report_to", "none", "--seed", "7", "--activation_checkpointing", "false",
            "--dataset_num_proc", "1", *map(str, extra)]


@pytest.fixture(scope="module", params=list(ARCHS))
def trained(request, pair_files, tmp_path_factory):
    """One DPO run per architecture (10 steps on 8 pairs), evaluated on its own training pairs."""
    arch = request.param
    base = request.getfixturevalue(ARCHS[arch][0])
    output = tmp_path_factory.mktemp(f"dpo_{arch}") / "model_save"
    with SummaryTable() as table:
        trainer = dpo_train.main(dpo_args(base, pair_files[arch], output, "--max_steps", "10", "--save_strategy",
                                          "no", "--validation_files", pair_files[arch]))
    return {"arch": arch, "base": base, "output": output, "trainer": trainer, "auto": ARCHS[arch][1],
            "history": [h for h in trainer.state.log_history if "loss" in h],
            "summary": json.loads((output / "training_summary.json").read_text()), "table": table}


def test_loss_starts_at_ln2_and_reward_accuracy_rises(trained):
    first, history, summary = trained["history"][0], trained["history"], trained["summary"]
    assert trained["trainer"].ref_model is None  # the reference is the base with the adapter disabled
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: policy == reference
    assert first["rewards/margins"] == 0 and first["rewards/accuracies"] == 0
    assert summary["eval_rewards/accuracies"] >= 0.85 > first["rewards/accuracies"]
    assert summary["eval_rewards/margins"] > 0 and summary["eval_loss"] < math.log(2) - 0.05
    assert sum(h["loss"] for h in history[-3:]) < sum(h["loss"] for h in history[:3])


def test_trl_reward_metrics_are_logged(trained):
    """TRL's metrics, for T5 through the encoder-decoder extension as for Llama."""
    keys = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "entropy", "mean_token_accuracy"}
    assert keys <= set(trained["history"][-1])
    assert {f"eval_{k}" for k in keys} <= set(trained["summary"])
    summary, table = trained["summary"], trained["table"]  # the console's closing table shows the held-out figures
    assert table["held-out reward accuracy"] == f"{summary['eval_rewards/accuracies']:.3f}"
    assert table["held-out reward margin"] == f"{summary['eval_rewards/margins']:.3f}"
    assert table["steps"] == "10" and table["model"] == str(trained["output"])


def test_base_untouched_and_merged_model_equals_the_adapter(trained):
    output, auto = trained["output"], trained["auto"]
    assert not any(p.name.startswith(".") for p in output.iterdir())  # no staging left
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "config.yaml",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (output / name).is_file(), name
    assert f"output_dir: {output}\n" in (output / "config.yaml").read_text()
    base, merged = auto.from_pretrained(trained["base"]), auto.from_pretrained(output)
    deltas = lora_deltas(output / "adapter")
    merged_state = merged.state_dict()
    assert deltas and all(name in merged_state for name in deltas)
    for name, weight in base.state_dict().items():
        if name in deltas:  # merged = untouched base + B A, and B A is not zero (the adapter learned)
            assert torch.allclose(merged_state[name] - weight, deltas[name], atol=1e-6), name
            assert deltas[name].abs().max() > 1e-4
        else:  # everything LoRA does not adapt is bit-equal to the base
            assert torch.equal(merged_state[name], weight), name

    tokenizer = AutoTokenizer.from_pretrained(output)
    peft = PeftModel.from_pretrained(auto.from_pretrained(trained["base"]), output / "adapter").eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PAIRS[0][0]}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    inputs = {"input_ids": ids}
    if trained["arch"] == "t5":
        inputs["decoder_input_ids"] = torch.tensor([[tokenizer.pad_token_id, *tokenizer("河边的柳树")["input_ids"]]])
    with torch.no_grad():
        assert torch.allclose(peft(**inputs).logits, merged.eval()(**inputs).logits, atol=1e-5)
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert end in merged.generation_config.eos_token_id
    assert merged.generate(input_ids=ids, max_new_tokens=4, do_sample=False).shape[-1] > 1


def test_seq2seq_fused_head_gives_the_models_own_log_probs(tiny_t5):
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).eval()
    rows = [tokenize_preference({"prompt": [{"role": "user", "content": p}], "chosen": c, "rejected": r},
                                tokenizer, 48, 32) for p, c, r in PAIRS[:3]]
    batch = DataCollatorForSeq2SeqPreference(tokenizer.pad_token_id, model.config.decoder_start_token_id)(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["prompt_input_ids"], attention_mask=batch["prompt_attention_mask"],
                       decoder_input_ids=batch["input_ids"], decoder_attention_mask=batch["attention_mask"]).logits
        add_seq2seq_fused_lm_head(model)
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        fused = model(**{k: v for k, v in batch.items() if k != "completion_mask"}, labels=labels, fused_lm_head=True)
    mask = batch["completion_mask"][:, 1:].bool()
    assert torch.equal(fused.label_mask, mask) and fused.log_probs.shape == mask.shape
    expected = logits[:, :-1].log_softmax(-1)
    target = batch["input_ids"][:, 1:]
    assert torch.allclose(fused.log_probs[mask], expected.gather(-1, target.unsqueeze(-1)).squeeze(-1)[mask],
                          atol=1e-5)
    entropy = -(expected.exp() * expected).sum(-1)
    assert torch.allclose(fused.entropy[mask], entropy[mask], atol=1e-4)
    assert torch.equal(fused.is_top1[mask], (logits[:, :-1].argmax(-1) == target)[mask])
    assert (fused.log_probs[~mask] == 0).all()
    # without fused_lm_head the forward is the model's own: generation still works
    assert model.generate(input_ids=batch["prompt_input_ids"][:1], max_new_tokens=3).shape[-1] > 1


def test_pairs_render_like_the_chat_template_and_lengths_are_enforced(tiny_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    prompt = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "第一个问题？"},
              {"role": "assistant", "content": "第一个回答。"}, {"role": "user", "content": PAIRS[1][0]}]
    row = tokenize_preference({"prompt": prompt, "chosen": PAIRS[1][1], "rejected": PAIRS[1][2]}, tokenizer, 256, 64)
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": PAIRS[1][1]}], return_dict=False)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert row["prompt_ids"] + row["chosen_ids"] + newline == list(full)  # exactly the SFT / inference rendering
    assert tokenizer.decode(row["prompt_ids"]).endswith("<|assistant|>\n")
    assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert not (row["prompt_cut"] or row["chosen_cut"] or row["rejected_cut"])

    short = tokenize_preference({"prompt": prompt, "chosen": PAIRS[1][1] * 5, "rejected": "好"}, tokenizer, 24, 8)
    assert len(short["prompt_ids"]) <= 24 and short["prompt_cut"]
    assert tokenizer.decode(short["prompt_ids"]).endswith(f"{PAIRS[1][0]}<|end|>\n<|assistant|>\n")  # latest turn kept
    assert len(short["chosen_ids"]) == 8 and short["chosen_cut"] and not short["rejected_cut"]

    same = {"prompt": prompt, "chosen": "一样的回答。", "rejected": "一样的回答。"}
    data = Dataset.from_list([{"prompt": prompt, "chosen": PAIRS[1][1], "rejected": PAIRS[1][2]}, same])
    assert len(prepare_preferences(data, tokenizer, 256, 64, "train")) == 1  # identical answers carry no preference
    with pytest.raises(UserError, match="no usable preference pairs"):
        prepare_preferences(Dataset.from_list([same]), tokenizer, 256, 64, "train")


@pytest.mark.parametrize("name", ["dpo/llamafactory_dpo_zh_demo.json", "dpo/medicalgpt_dpo_zh_500.jsonl"])
def test_shared_preference_data_tokenizes_within_limits(name, tiny_tokenizer):
    """The real preference files (ShareGPT-style conversations, multi-turn, long answers) load through
    utils.data.conversations and tokenise within the limits, every prompt ending with the generation prompt."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    pairs = load_preferences([str(shared_path(name))])[:200]
    data = prepare_preferences(Dataset.from_list(pairs), tokenizer, 128, 96, "train")
    assert len(data) > 0.9 * len(pairs)
    assistant = tokenizer.encode("<|assistant|>\n", add_special_tokens=False)
    for row in data:
        assert len(row["prompt_ids"]) <= 128 and row["prompt_ids"][-len(assistant):] == assistant
        assert 0 < len(row["chosen_ids"]) <= 96 and 0 < len(row["rejected_ids"]) <= 96


def test_rankings_give_dpo_the_best_answer_against_each_other_one(tiny_llama, tmp_path):
    """LLaMA-Factory's ranking rows (2 to 5 answers, best first): by default DPO takes the best answer against
    each other one, 15 pairs from 6 rankings (`--ranking_pairs all` would make 29), and the run records it."""
    rankings = Path(__file__).parent / "data" / "ranking_alpaca_zh.json"
    trainer = dpo_train.main(dpo_args(tiny_llama, rankings, tmp_path / "dpo", "--max_steps", "1",
                                      "--max_prompt_length", "96", "--max_completion_length", "160"))
    assert len(trainer.train_dataset) == 15
    best = {row["output"][0] for row in json.loads(rankings.read_text(encoding="utf-8"))}
    assert {trainer.processing_class.decode(ids[:-1]) for ids in trainer.train_dataset["chosen_ids"]} == best
    # recorded in the resolved configuration; in the run's identity only when not the default (older runs resume)
    assert yaml.safe_load((tmp_path / "dpo" / "config.yaml").read_text())["ranking_pairs"] == "best_vs_rest"
    assert "ranking_pairs" not in json.loads((tmp_path / "dpo" / "run.json").read_text())["settings"]


def adapter_losses(output, step):
    state = json.loads((output / "adapter" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def test_sigint_then_resume_equals_uninterrupted_run(tiny_llama, pair_files, tmp_path):
    args = lambda out: dpo_args(tiny_llama, pair_files["t5"], out, "--max_steps", "8",  # noqa: E731
                                "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                                "--save_steps", "8")
    reference = tmp_path / "reference"
    dpo_train.main(args(reference))
    resumed = tmp_path / "resumed"
    code, log = run_until_interrupted(args(resumed), stop_at=2, script="dpo_train.py")
    assert code == 0 and "Run the same command again to resume" in log, log[-3000:]
    stopped = sorted((resumed / "adapter").glob("checkpoint-*"))
    assert len(stopped) == 1 and int(stopped[0].name.split("-")[1]) < 8 and not holds_model(resumed)
    second = subprocess.run([sys.executable, "dpo_train.py", *args(resumed)], cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 0 and f"resuming from {stopped[0]}" in second.stderr, second.stderr[-3000:]
    assert adapter_losses(resumed, 8) == adapter_losses(reference, 8)  # every step's loss, bit-exact
    before, after = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("line, problem", [
    ({"prompt": "问题？", "rejected": "不好的回答。"}, "missing field 'chosen'"),
    ({"prompt": "  ", "chosen": "好的回答。", "rejected": "不好的回答。"}, "empty prompt"),
    ('{"prompt": "问题？", "chosen": "好的回答。"', "not valid JSON"),
])
def test_bad_rows_are_refused_with_file_and_line(line, problem, tmp_path):
    good = {"prompt": PAIRS[0][0], "chosen": PAIRS[0][1], "rejected": PAIRS[0][2]}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good, ensure_ascii=False) + "\n"
                    + (line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n",
                    encoding="utf-8")
    with pytest.raises(UserError, match=problem) as error:
        dpo_train.main(dpo_args(tmp_path / "no_model", path, tmp_path / "out"))
    assert error.value.path == str(path) and error.value.line == 2


def test_existing_model_is_refused_but_checkpoints_are_not_a_model(tmp_path, pair_files, tiny_llama):
    (tmp_path / "adapter" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    assert not holds_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert holds_model(tmp_path)
    for output in (tmp_path, tmp_path / "adapter"):  # a model where the merged model goes; checkpoints where the
        with pytest.raises(UserError, match="no record of the run") as error:  # adapter's go
            dpo_train.main(dpo_args(tiny_llama, pair_files["t5"], tmp_path))
        assert error.value.path == str(output) and "--overwrite_output_dir" in error.value.fix
        (output / "model.safetensors").unlink(missing_ok=True)


def test_recipes_parse_and_help_works(capsys):
    for recipe in (REPO / "config" / "dpo.yaml", REPO / "config" / "demo" / "dpo.yaml"):
        model_args, lora, data, args = parse_config([ModelArguments, LoraArguments, DataArguments, DPOArguments],
                                                    ["--config", str(recipe)])
        assert data.train_files and args.output_dir.startswith("model_save") and args.loss_type == ["sigmoid"]
    with pytest.raises(SystemExit) as done:
        dpo_train.main(["--help"])
    assert done.value.code == 0 and "--overwrite_output_dir" in capsys.readouterr().out
