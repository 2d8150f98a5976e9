"""LoRA / QLoRA in SFT and continued pretraining (model/training/lora.py): the base stays untouched until the
merge, the merged model reloads with AutoModel and gives the adapter's logits, the chat tokens' rows train
beside LoRA while every other row stays bit-equal, T5's frozen encoder gets no adapters, ctrl+c resume is
bit-exact, and QLoRA is refused on a machine without CUDA. The Chinese-LLaMA recipe runs end to end in
tests/test_recipes.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import SENTENCES, lora_deltas, run_script, run_until_interrupted
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import pre_train
import sft_train
from model.training.lora import PeftArguments, add_adapter
from model.training.merge import merge_adapter
from model.training.outputs import OUTPUT_FILES, RUN_FILE, clear_run
from utils.cli import run_main
from utils.errors import UserError
from utils.tokenization.chat_format import CHAT_TOKENS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("peft_sft") / "sft.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"请复述：{s}"}, {"role": "assistant", "content": s}]}
            for s in SENTENCES * 3]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def sft_args(model, data, output, *extra):
    return ["--config", "none", "--model_name_or_path", str(model), "--train_files", str(data),
            "--output_dir", str(output), "--max_length", "96", "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--logging_steps", "1",
            "--report_to", "none", "--seed", "5", "--validation_ratio", "0", "--eval_strategy", "no",
            "--eval_samples", "0", "--peft", "lora", "--lora_r", "8", "--lora_alpha", "16", *map(str, extra)]


@pytest.fixture(scope="module")
def llama_lora(tiny_llama, sft_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("sft_lora") / "out"
    return sft_train.main(sft_args(tiny_llama, sft_file, output, "--max_steps", "12", "--save_strategy", "no")), output


def test_sft_lora_leaves_the_base_untouched_and_merges_into_a_plain_model(llama_lora, tiny_llama):
    trainer, output = llama_lora
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
    for name in ("model.safetensors", "config.json", "tokenizer.json", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "adapter/training_summary.json"):
        assert (output / name).is_file(), name
    assert f"output_dir: {output}\n" in (output / "config.yaml").read_text()
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["peft"] == "lora" and 0 < summary["trainable_parameters"] < summary["parameters"] / 5

    tokenizer = AutoTokenizer.from_pretrained(output)
    chat = tokenizer.convert_tokens_to_ids(CHAT_TOKENS)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    merged = AutoModelForCausalLM.from_pretrained(output)
    assert not any("lora" in name or "token_adapter" in name for name, _ in merged.named_parameters())
    deltas, state = lora_deltas(output / "adapter"), merged.state_dict()
    assert len(deltas) == 2 * 7  # every attention and feed-forward projection of both layers
    rows = torch.zeros(base.config.vocab_size, dtype=torch.bool)
    rows[chat] = True
    for name, weight in base.state_dict().items():
        if name in deltas:  # merged = untouched base + B A
            assert torch.allclose(state[name] - weight, deltas[name], atol=1e-6), name
            assert deltas[name].abs().max() > 1e-4, name
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):  # tied: one matrix
            assert torch.equal(state[name][~rows], weight[~rows]), name  # every row but the chat tokens'
            assert not torch.equal(state[name][rows], weight[rows]), name
        else:
            assert torch.equal(state[name], weight), name

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), output / "adapter").eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "请复述：天气很好。"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=ids).logits, merged.eval()(input_ids=ids).logits, atol=1e-5)


def test_t5_lora_respects_freeze(tiny_t5):
    """The default freeze (embeddings, encoder) leaves the encoder without adapters; --freeze none adapts both."""
    lora = PeftArguments(peft="lora", lora_r=4)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5)
    adapted = add_adapter(model, lora, [5, 6], sft_train.freeze_parameters(model, "auto"))
    trainable = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".decoder." in name and ".lora_" in name for name in trainable)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5)
    adapted = add_adapter(model, PeftArguments(peft="lora", lora_r=4, lora_embeddings="none"), [5, 6],
                          sft_train.freeze_parameters(model, "none"))
    trainable = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert any(".encoder." in name for name in trainable) and all(".lora_" in name for name in trainable)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5)
    with pytest.raises(UserError, match="T5 cannot train token rows"):  # the shared matrix would come untied
        add_adapter(model, lora, [5, 6], sft_train.freeze_parameters(model, "encoder"))


def test_embedding_settings_that_would_do_nothing_are_refused_or_warned(tiny_t5, tiny_llama, sft_file, tmp_path):
    """T5's --freeze auto keeps the embeddings frozen, so --lora_embeddings all was silently ignored: refused,
    nothing written. Rows that may never have trained left frozen with --lora_embeddings none: warned."""
    out = tmp_path / "t5"
    result = run_script("sft_train.py", *sft_args(tiny_t5, sft_file, out, "--lora_embeddings", "all"), check=False)
    assert result.returncode == 2 and "error: field 'lora_embeddings': --lora_embeddings all" in result.stderr
    assert "--freeze" in result.stderr and not out.exists()
    result = run_script("sft_train.py", *sft_args(tiny_llama, sft_file, tmp_path / "llama", "--lora_embeddings", "none",
                                                  "--max_steps", "1", "--save_strategy", "no"))
    chat_rows = len(CHAT_TOKENS)
    assert f"{chat_rows} token rows stay frozen (--lora_embeddings none)" in result.stderr
    assert "--lora_embeddings rows trains exactly those rows" in result.stderr


@pytest.mark.parametrize("tied", [True, False])
def test_whole_embeddings_train_and_merge_tied_or_not(tiny_llama, tied):
    """--lora_embeddings all: both whole matrices train (PEFT's modules_to_save), a tied LM head stays tied
    through the merge, and the merged model gives the adapter's logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, tie_word_embeddings=tied)
    adapted = add_adapter(model, PeftArguments(peft="lora", lora_r=4, lora_embeddings="all"))
    trained = {name.split(".modules_to_save")[0].rsplit(".", 1)[-1] for name, p in adapted.named_parameters()
               if p.requires_grad and "lora_" not in name}
    assert trained == ({"embed_tokens"} if tied else {"embed_tokens", "lm_head"})
    ids = torch.tensor([list(range(3, 40))])
    optimizer = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.1)
    adapted(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    with torch.no_grad():
        expected = adapted.eval()(input_ids=ids).logits  # eval: no LoRA dropout
        merged = merge_adapter(adapted)
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied


def adapter_losses(output, step):
    state = json.loads((output / "adapter" / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def test_sigint_then_resume_equals_uninterrupted_run(tiny_llama, sft_file, tmp_path):
    """The adapter, the trained chat rows and the optimizer come back from the checkpoint bit-exact.

    This run's steps take milliseconds, so the ctrl+c sent once step 2 is logged may land in any later step or
    after the last (then the run ends as usual): what is asserted holds wherever it lands. The resume from a
    mid-run checkpoint is checked apart, deterministically: a copy of the finished run cut back to what a stop
    at step 2 leaves (checkpoint-2 and no final model) goes on to the same model."""
    args = lambda out: sft_args(tiny_llama, sft_file, out, "--max_steps", "6", "--save_steps", "2")  # noqa: E731
    reference, resumed, cut = tmp_path / "reference", tmp_path / "resumed", tmp_path / "cut"
    sft_train.main(args(reference))
    code, log = run_until_interrupted(args(resumed), stop_at=2, script="sft_train.py")
    assert code == 0 and "Traceback" not in log, log[-3000:]
    if "Run the same command again to resume" in log:
        stopped = max(int(p.name.split("-")[1]) for p in (resumed / "adapter").glob("checkpoint-*"))
        assert 2 < stopped <= 6 and f"stopped at step {stopped}" in log and not (resumed / "config.json").exists()
    sft_train.main(args(resumed))
    shutil.copytree(reference, cut)
    clear_run(cut, model_files=True)  # the merged model and its records
    for checkpoint in ("checkpoint-4", "checkpoint-6"):
        shutil.rmtree(cut / "adapter" / checkpoint)
    for name in set(OUTPUT_FILES) - {RUN_FILE}:
        (cut / "adapter" / name).unlink(missing_ok=True)  # the final adapter; the run's record stays
    assert sft_train.main(args(cut)).state.global_step == 6
    for run in (resumed, cut):
        assert adapter_losses(run, 6) == adapter_losses(reference, 6)  # every step's loss, bit-exact
        before, after = load_file(reference / "model.safetensors"), load_file(run / "model.safetensors")
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="QLoRA runs on CUDA (bench/gpu_check.py checks it there)")
@pytest.mark.parametrize("main", [sft_train.main, pre_train.main])
def test_qlora_is_refused_without_cuda(main, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        run_main(main, ["--config", "none", "--model_name_or_path", "base", "--peft", "qlora",
                        "--output_dir", str(tmp_path)])
    error = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in error
    assert error.startswith("error: field 'peft': --peft qlora needs a CUDA GPU") and "fix: use --peft lora" in error
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_pretraining_with_peft_needs_a_base(tmp_path):
    with pytest.raises(UserError, match="--peft lora adapts an existing model"):
        pre_train.main(["--config", "none", "--peft", "lora", "--output_dir", str(tmp_path)])
