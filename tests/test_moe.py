"""Mixture of experts (config/models/mixtral-*.yaml, transformers' MixtralForCausalLM) through every stage: pretraining
with the router's load-balancing loss logged and weighted once per step, SFT (full, and LoRA on every expert), DPO,
a plain AutoModelForCausalLM load, replies, GGUF export."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, SENTENCES, run_until_interrupted
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from test_dpo import PAIRS, dpo_args
from test_export import PROMPT, REPLY, read
from test_pretrain import common
from test_sft import args_for, conversation
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import dpo_train
import export
import pre_train
import sft_train
from model.build import load_model
from model.gguf import round_trip
from model.inference.batching import decode_alone
from model.inference.decoding import ModelRows
from model.inference.generation import load_for_inference
from model.inference.reply import LiveReply
from model.training.lora import PeftArguments
from model.training.outputs import latest_checkpoint
from utils.errors import UserError
from utils.tokenization.chat_format import render_prompt

pytestmark = pytest.mark.slow

COEF = 0.01  # router_aux_loss_coef of mixtral-tiny.yaml


def pretrain_args(tiny_corpus, tiny_tokenizer, output, *extra):
    return ["--config", "none", "--model_config", "mixtral-tiny", "--tokenizer_name_or_path", str(tiny_tokenizer),
            "--train_files", str(tiny_corpus), "--validation_files", str(tiny_corpus), "--output_dir", str(output),
            "--block_size", "64", "--learning_rate", "3e-3", "--eval_strategy", "no", "--save_strategy", "no",
            "--report_to", "none", "--seed", "3", "--preprocessing_num_workers", "1", *map(str, extra)]


def history(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def stages(tiny_corpus, tiny_tokenizer, tmp_path_factory):
    """mixtral-tiny pretrained (40 steps), then SFT (25 steps), then DPO (10 steps, LoRA)."""
    root = tmp_path_factory.mktemp("moe")
    pretrained = pre_train.main(pretrain_args(tiny_corpus, tiny_tokenizer, root / "pretrain", "--max_steps", "40",
                                              "--per_device_train_batch_size", "4", "--logging_steps", "5"))
    sft_file = root / "sft.jsonl"
    sft_file.write_text("".join(json.dumps({"messages": conversation(i)}, ensure_ascii=False) + "\n"
                                for i in range(48)), encoding="utf-8")
    sft = sft_train.main(args_for(root / "pretrain", sft_file, root / "sft", "--max_steps", "25"))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}, ensure_ascii=False) + "\n"
                             for p, c, r in PAIRS), encoding="utf-8")
    dpo = dpo_train.main(dpo_args(root / "sft", pairs, root / "dpo", "--max_steps", "10", "--save_strategy", "no"))
    return {"root": root, "pretrain": pretrained, "sft": sft, "dpo": dpo}


def assert_falls_with_aux_logged(trainer, drop: float):
    logs = history(trainer)
    losses, aux = [h["loss"] for h in logs], [h.get("aux_loss") for h in logs]
    assert all(np.isfinite(losses)) and np.mean(losses[-2:]) < np.mean(losses[:2]) - drop, losses
    # the load-balancing loss (num_experts x sum of routed share x mean router probability) is top_k = 2 when the
    # 4 experts are used evenly, and 2 x 4 / 2 = 4 when every token goes to the same 2
    assert all(a is not None and 1.9 < a < 4 for a in aux), aux


def test_pretraining_learns_and_logs_the_load_balancing_loss(stages):
    assert_falls_with_aux_logged(stages["pretrain"], drop=1.0)
    summary = json.loads((stages["root"] / "pretrain" / "training_summary.json").read_text())
    assert summary["eval_loss"] < history(stages["pretrain"])[0]["loss"] - 1.0


def test_sft_and_dpo_train_a_mixture_of_experts(stages):
    assert_falls_with_aux_logged(stages["sft"], drop=0.5)
    logs = history(stages["dpo"])
    # TRL adds coef x aux to the DPO loss; at step 1 the policy is the reference (LoRA B = 0): ln 2 + coef x aux
    assert logs[0]["loss"] == pytest.approx(math.log(2) + COEF * logs[0]["aux_loss"], abs=1e-5)
    assert np.mean([h["loss"] for h in logs[-3:]]) < logs[0]["loss"]
    # LoRA adapts the attention only: the experts and the router of the SFT model are bit-equal after DPO
    with safe_open(stages["root"] / "sft" / "model.safetensors", "pt") as base, \
            safe_open(stages["root"] / "dpo" / "model.safetensors", "pt") as merged:
        moe = [key for key in base.keys() if "block_sparse_moe" in key]  # noqa: SIM118 (safe_open)
        assert len(moe) == 2 * (4 * 3 + 1)  # 2 layers x (4 experts x w1 w2 w3 + the router)
        assert all(torch.equal(base.get_tensor(key), merged.get_tensor(key)) for key in moe)
        assert not torch.equal(base.get_tensor("model.layers.0.self_attn.q_proj.weight"),
                               merged.get_tensor("model.layers.0.self_attn.q_proj.weight"))


def test_lora_on_the_experts_trains_every_expert_and_merges_exactly(stages, tmp_path):
    """--lora_target_parameters mlp.experts.gate_up_proj mlp.experts.down_proj (PEFT's target_parameters: a LoRA
    per expert on the stacked 3-D weights) beside the attention's: SFT's loss falls with aux_loss logged, every
    expert of every layer moves in the merged model and the routers stay bit-equal, and the merged model gives
    the adapter's logits on its base (1e-5: the same sums, merged or not, in fp32 of logits ~10)."""
    pretrained = stages["root"] / "pretrain"
    experts = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    trainer = sft_train.main(args_for(pretrained, stages["root"] / "sft.jsonl", tmp_path / "sft", "--max_steps", "12",
                                      "--peft", "lora", "--lora_target_parameters", *experts, "--lora_dropout", "0",
                                      "--learning_rate", "1e-2", "--validation_ratio", "0"))
    assert_falls_with_aux_logged(trainer, drop=0.3)
    adapter = json.loads((tmp_path / "sft" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_parameters"]) == sorted(experts)
    with safe_open(pretrained / "model.safetensors", "pt") as base, \
            safe_open(tmp_path / "sft" / "model.safetensors", "pt") as merged:
        moved = lambda key: not torch.equal(base.get_tensor(key), merged.get_tensor(key))  # noqa: E731
        keys = list(base.keys())  # noqa: SIM118 (safe_open)
        expert_weights = [key for key in keys if ".experts." in key]
        assert len(expert_weights) == 2 * 4 * 3 and all(moved(key) for key in expert_weights)
        routers = [key for key in keys if key.endswith("block_sparse_moe.gate.weight")]
        assert len(routers) == 2 and not any(moved(key) for key in routers)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "sft")
    ids = render_prompt(tokenizer, [{"role": "user", "content": SENTENCES[0]}], 200).ids
    # the base as the run loaded it (rows for tokens the SFT tokenizer adds), then the adapter
    adapted = PeftModel.from_pretrained(load_model(str(pretrained), tokenizer), tmp_path / "sft" / "adapter").eval()
    merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft").eval()
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=torch.tensor([ids])).logits,
                              merged_model(input_ids=torch.tensor([ids])).logits, atol=1e-5)
    # DPO with the same adapters: its reference is the policy with them off, equal to it at step 1 (B = 0)
    dpo = dpo_train.main(dpo_args(tmp_path / "sft", stages["root"] / "pairs.jsonl", tmp_path / "dpo", "--max_steps",
                                  "3", "--save_strategy", "no", "--lora_target_parameters", *experts,
                                  "--lora_dropout", "0"))
    first = history(dpo)[0]
    assert first["loss"] == pytest.approx(math.log(2) + COEF * first["aux_loss"], abs=1e-5)
    with safe_open(tmp_path / "sft" / "model.safetensors", "pt") as before, \
            safe_open(tmp_path / "dpo" / "model.safetensors", "pt") as after:
        assert not torch.equal(before.get_tensor(expert_weights[0]), after.get_tensor(expert_weights[0]))


def test_lora_on_the_experts_refuses_what_peft_cannot_do(stages):
    """Dropout, DoRA, PiSSA with bare parameters, and a name the model lacks (the fix names what there is)."""
    for extra in ({}, {"use_dora": True}, {"lora_init": "pissa"}):
        with pytest.raises(ValueError, match="--lora_target_parameters cannot go with"):
            PeftArguments(peft="lora", lora_target_parameters=["mlp.experts.down_proj"],
                          lora_dropout=0.0 if extra else 0.05, **extra)
    model = AutoModelForCausalLM.from_pretrained(stages["root"] / "pretrain")
    wrong = PeftArguments(peft="lora", lora_target_parameters=["mlp.experts.w1"], lora_dropout=0.0)
    with pytest.raises(UserError, match="mlp.experts.w1") as refused:
        wrong.config_for(model)
    assert "mlp.experts.gate_up_proj" in refused.value.fix and "mlp.experts.down_proj" in refused.value.fix


@pytest.mark.parametrize("teacher", [False, True], ids=["plain", "distilled"])
def test_the_loss_weighs_the_load_balancing_loss_once_per_step(tiny_corpus, tiny_tokenizer, tiny_llama, tmp_path,
                                                                teacher):
    """The same first step as 1 micro-batch of 4 and as 4 accumulated micro-batches of 1: the logged loss minus
    coef x the logged aux_loss (the LM part) is the same, with or without a teacher (the tiny Llama; logit
    distillation, alpha 0.5: the LM part is then half cross-entropy, half T^2 KL). HF's Mixtral alone would add
    coef x aux per micro-batch, 4 x coef x aux ~ 0.08 at 1x1x4 against 0.02 at 1x4. Why a tolerance: the LM part
    is one mean of the same 256 float32 token losses (~7 each) summed in a different grouping (4 partial sums,
    then their sum); the rounding of such a sum is at most n x 2^-24 x its magnitude, 256 x 6e-8 x 7 ~ 1e-4
    (seen: 3e-7). The aux part itself is defined per micro-batch (the share of its tokens each expert gets), so it
    differs between the two."""
    parts = []
    distill = ["--teacher_model_name_or_path", tiny_llama, "--kd_alpha", "0.5"] if teacher else []
    for batch, accumulation in ((4, 1), (1, 4)):
        trainer = pre_train.main(pretrain_args(tiny_corpus, tiny_tokenizer, tmp_path / f"{batch}x{accumulation}",
                                               "--max_steps", "1", "--logging_steps", "1",
                                               "--per_device_train_batch_size", batch,
                                               "--gradient_accumulation_steps", accumulation, *distill))
        assert (trainer.teacher is not None) == teacher
        first = history(trainer)[0]
        parts.append((first["loss"] - COEF * first["aux_loss"], first["aux_loss"]))
    (lm_a, aux_a), (lm_b, aux_b) = parts
    assert lm_a == pytest.approx(lm_b, abs=1e-4)
    assert aux_a != aux_b


def test_plain_transformers_loads_it_and_generates_the_toolkits_reply(stages):
    """No remote code: AutoModelForCausalLM reads the directory as MixtralForCausalLM, and its generate (with an
    attention mask, which fails when the saved config asks for router logits) gives the reply the toolkit's own
    decoding loop (chat.py, serve.py) gives."""
    path = stages["root"] / "dpo"
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False).eval()
    assert type(model).__name__ == "MixtralForCausalLM" and not model.config.output_router_logits
    served, tokenizer = load_for_inference(str(path), device="cpu", dtype="fp32")
    for text in SENTENCES[:3]:
        ids = render_prompt(tokenizer, [{"role": "user", "content": text}], 200).ids
        config = GenerationConfig.from_dict({**model.generation_config.to_dict(), "do_sample": False,
                                             "max_new_tokens": 12, "repetition_penalty": 1.0})
        reply = LiveReply(tokenizer, ids, config)
        decode_alone(ModelRows(served, tokenizer), reply)
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([ids]), generation_config=config,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        assert reply.token_ids == out[0, len(ids):].tolist()


def test_gguf_export_holds_the_experts(stages, tmp_path):
    """llama.cpp's converter writes a Mixtral as its llama architecture with stacked expert tensors; every value of
    the checkpoint is there, and where llama.cpp is installed it continues the prompt as transformers does."""
    model_dir = stages["root"] / "dpo"
    path = export.main(["--model_name_or_path", str(model_dir), "--output", str(tmp_path / "moe.gguf")])
    _, reader, meta = read(path)
    assert meta["general.architecture"] == "llama"
    assert (meta["llama.expert_count"], meta["llama.expert_used_count"]) == (4, 2)
    tensors = {t.name: sorted(int(n) for n in t.shape) for t in reader.tensors}
    assert tensors["blk.0.ffn_gate_inp.weight"] == [4, 64]  # the router
    assert tensors["blk.0.ffn_up_exps.weight"] == tensors["blk.0.ffn_gate_exps.weight"] == [4, 64, 88]
    with safe_open(model_dir / "model.safetensors", "pt") as weights:
        hf_values = sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())  # noqa: SIM118
    assert sum(int(t.n_elements) for t in reader.tensors) == hf_values
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make llama-cpp-python)")
    result = round_trip(model_dir, path, PROMPT, REPLY, max_new_tokens=24)
    assert result.same_prompt and result.identical, result
    assert result.forced_same_argmax == result.forced_tokens and result.max_logit_difference < 0.05, result


def test_sigint_then_resume_equals_the_uninterrupted_run(tiny_corpus, tiny_tokenizer, tmp_path):
    """ctrl+c at step 3 of 10 (accumulation 2), then the same command: every step's loss and aux_loss and the final
    weights equal the uninterrupted run's bit for bit. transformers 5 saves the experts in the hub's layout (each
    expert's w1 / w2 / w3 apart) and the Trainer's resume reads the file with a plain load_state_dict, which left
    every expert and router weight at its initial value (transformers#48805); the loss then left the uninterrupted
    run's at the first step after the stop."""
    args = lambda out: common(tiny_corpus, tiny_tokenizer, "mixtral-tiny", out, "--max_steps", "10",  # noqa: E731
                              "--gradient_accumulation_steps", "2", "--save_steps", "10")
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    subprocess.run([sys.executable, "pre_train.py", *args(reference)], cwd=REPO, check=True, capture_output=True)
    code, log = run_until_interrupted(args(resumed), stop_at=3)
    stopped = latest_checkpoint(resumed)
    assert code == 0 and stopped is not None and 3 <= int(stopped.name.split("-")[1]) < 10, log
    second = subprocess.run([sys.executable, "pre_train.py", *args(resumed)], cwd=REPO, capture_output=True,
                            text=True)
    assert second.returncode == 0 and f"resuming from {stopped}" in second.stderr
    logged = []
    for run in (reference, resumed):
        state = json.loads((run / "checkpoint-10" / "trainer_state.json").read_text())
        logged.append([(e["step"], e["loss"], e["aux_loss"]) for e in state["log_history"] if "loss" in e])
    assert len(logged[0]) == 10 and logged[0] == logged[1]
    before, after = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
