"""The parameter-efficient methods beside LoRA (model/training/peft_methods.py) and LoRA's variants: for each of
IA3, prefix tuning (P-tuning v2), P-tuning and prompt tuning on a tiny Llama and a tiny T5, the base stays
bit-equal, the loss falls, IA3 merges into a plain model with the adapter's logits, and the prompt methods'
output directory is an adapter that chat, serve and generate_rejected load and reply with (export refuses it);
LoRA+ gives B its learning rate, DoRA / rsLoRA / PiSSA / OLoRA reach LoRA's config and still merge exactly,
and a resumed prompt-tuning, P-tuning or prefix-tuning run equals the uninterrupted one."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import SENTENCES, run_script
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationConfig

import export
import generate_rejected
import sft_train
from model.inference import virtual_tokens
from model.inference.generation import generate_replies, load_for_inference
from model.inference.service import ChatService
from model.inference.streaming import generate_reply
from model.inference.virtual_tokens import has_virtual_tokens
from model.training.lora import PeftArguments, add_adapter
from model.training.merge import merge_adapter
from model.training.outputs import OUTPUT_FILES, PROMPT_ENCODER_FILE, RUN_FILE, clear_run
from utils.cli import run_main
from utils.errors import UserError

pytestmark = pytest.mark.slow

METHODS = ("ia3", "prefix", "ptuning", "prompt")


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("peft_methods") / "sft.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"请复述：{s}"}, {"role": "assistant", "content": s}]}
            for s in SENTENCES * 2]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def sft_args(model, data, output, method, *extra):
    return ["--config", "none", "--model_name_or_path", str(model), "--train_files", str(data),
            "--output_dir", str(output), "--max_length", "96", "--max_source_length", "64",
            "--max_target_length", "48", "--per_device_train_batch_size", "4", "--learning_rate", "3e-2",
            "--lr_scheduler_type", "constant", "--logging_steps", "1", "--report_to", "none", "--seed", "5",
            "--validation_ratio", "0", "--eval_strategy", "no", "--eval_samples", "0", "--peft", method,
            "--num_virtual_tokens", "8", "--max_steps", "8", "--save_strategy", "no", *map(str, extra)]


@pytest.fixture(scope="module")
def trained(tiny_llama, tiny_t5, sft_file, tmp_path_factory):
    """{(family, method): (trainer, output)}, trained once for the module (8 steps each)."""
    runs = {}
    for family, base in (("llama", tiny_llama), ("t5", tiny_t5)):
        for method in METHODS:
            output = tmp_path_factory.mktemp(f"{family}_{method}") / "out"
            runs[family, method] = sft_train.main(sft_args(base, sft_file, output, method)), output
    return runs


def bases(tiny_llama, tiny_t5):
    return {"llama": (tiny_llama, AutoModelForCausalLM), "t5": (tiny_t5, AutoModelForSeq2SeqLM)}


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_its_adapter_only_and_the_loss_falls(trained, tiny_llama, tiny_t5, family, method):
    trainer, output = trained[family, method]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(np.isfinite(losses)) and np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    path, auto = bases(tiny_llama, tiny_t5)[family]
    base = auto.from_pretrained(path).state_dict()
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["peft"] == method and 0 < summary["trainable_parameters"] < summary["parameters"] / 10
    if method == "ia3":  # merged: a plain model, only the scaled modules differ from the base
        merged = auto.from_pretrained(output)
        assert not (output / "adapter_config.json").exists()
        assert not any("ia3" in name for name, _ in merged.named_parameters())
        targets = json.loads((output / "adapter" / "adapter_config.json").read_text())["target_modules"]
        targets = {t.rsplit(".", 1)[-1] for t in targets}
        changed = {name for name, weight in merged.state_dict().items() if not torch.equal(weight, base[name])}
        assert changed and all(name.split(".")[-2] in targets for name in changed), changed
        adapted = PeftModel.from_pretrained(auto.from_pretrained(path), output / "adapter").eval()
        ids = torch.tensor([list(range(5, 40))])
        extra = {"decoder_input_ids": ids[:, :9]} if family == "t5" else {}
        with torch.no_grad():
            expected = adapted(input_ids=ids, **extra).logits
            assert torch.allclose(merged.eval()(input_ids=ids, **extra).logits, expected, atol=1e-5)
    else:  # the adapter itself, beside nothing to merge: the trained model's base is the base, bit for bit
        assert (output / "adapter_config.json").is_file() and not (output / "config.json").exists()
        assert (output / "generation_config.json").is_file() and (output / "tokenizer.json").is_file()
        state = trainer.model.get_base_model().state_dict()
        assert state.keys() == base.keys() and all(torch.equal(state[k], base[k]) for k in base)
        first = load_file(output / "adapter" / "adapter_model.safetensors")
        assert first and all(torch.isfinite(w).all() for w in first.values())


def forward_logits(model, prompt: list[int], reply: list[int]) -> torch.Tensor:
    """[len(reply), vocab]: the logits PEFT's forward pass (the one training ran; PEFT adds the virtual tokens)
    gives for each token of `reply` after `prompt` and the reply before it, in one teacher-forced pass."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        if model.config.is_encoder_decoder:
            decoder = torch.tensor([[model.config.decoder_start_token_id, *reply[:-1]]])  # T5's decoder start
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=decoder).logits[0]
        ids = torch.tensor([prompt + reply])
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -len(reply) - 1:-1]


def log_probability(model, prompt: list[int], reply: list[int]) -> float:
    """log p(reply | prompt) by PEFT's forward pass."""
    logits = forward_logits(model, prompt, reply).log_softmax(dim=-1)
    return float(logits[torch.arange(len(reply)), torch.tensor(reply)].sum())


def assert_greedy(model, prompt: list[int], reply: list[int], stop: set[int], steps: int) -> None:
    """`reply` is what greedy decoding by PEFT's forward pass gives: each token its argmax after the tokens before
    it, and the reply ends at a stop token or after `steps`. Up to 1e-4 of a logit: the replies come from cached
    keys and values (and padded batches), the reference from a whole recompute, fp32 logits of size ~10 summed in
    another order differ by ~1e-6, while a token chosen wrongly (virtual tokens missing or misplaced) loses by far
    more."""
    assert reply and (reply[-1] in stop or len(reply) == steps) and not stop & set(reply[:-1])
    logits = forward_logits(model, prompt, reply)
    chosen = logits[torch.arange(len(reply)), torch.tensor(reply)]
    assert torch.all(chosen >= logits.max(dim=-1).values - 1e-4), (reply, logits.argmax(dim=-1).tolist())


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("method", ["prefix", "ptuning", "prompt"])
def test_prompt_adapters_load_and_reply_in_chat_serve_and_generate(trained, family, method):
    """The output directory loads on its base (`load_for_inference`), stays a PeftModel, and every consumer's
    greedy reply is the one PEFT's forward pass gives (what the adapter trained in), not the base's: the terminal
    chat, generate_rejected's padded batches (a longer conversation beside it) and serve's service, batched or not
    (the batcher's own decoding loop is bypassed). PEFT's own `generate` fails this with transformers 5.25 /
    PEFT 0.21: a prefix-tuned Llama or T5 replies as its base."""
    _, output = trained[family, method]
    model, tokenizer = load_for_inference(str(output), "cpu")
    assert has_virtual_tokens(model) and model.generation_config.eos_token_id is not None
    # Eight steps leave the virtual tokens too weak to change a tiny model's greedy reply; made stronger, they
    # must (else the test could not tell a reply with them from one without).
    model.prompt_encoder["default"].embedding.weight.data *= 4
    config = model.generation_config
    config.max_new_tokens, config.do_sample, config.repetition_penalty = 12, False, 1.0  # argmax, as the reference
    stop = set(np.atleast_1d(config.eos_token_id).tolist())
    render = lambda c: tokenizer.apply_chat_template(c, add_generation_prompt=True,  # noqa: E731
                                                     return_dict=True)["input_ids"]
    conversations = [[{"role": "user", "content": "请复述：天气很好。"}],
                     [{"role": "user", "content": "请复述：我们明天一起去公园散步，好吗？"}]]
    prompt = render(conversations[0])
    reply = generate_reply(model, tokenizer, prompt, config)
    assert_greedy(model, prompt, reply.token_ids, stop, 12)
    ids = torch.tensor([prompt])
    base = model.get_base_model().generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    assert (base[0, 1:] if family == "t5" else base[0, len(prompt):]).tolist() != reply.token_ids
    longer = generate_reply(model, tokenizer, render(conversations[1]), config)
    assert_greedy(model, render(conversations[1]), longer.token_ids, stop, 12)
    text = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    assert generate_replies(model, tokenizer, conversations, config, progress=False) == \
        [text(reply.token_ids), text(longer.token_ids)]  # together in a padded batch as each alone
    for batched in (False, True):
        service = ChatService(model, tokenizer, max_concurrent=2, batched=batched)
        served = service.reply_stream(service.prepare(conversations[0], service.generation_config(max_new_tokens=12)))
        assert served.wait().token_ids == reply.token_ids


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("method", ["prefix", "ptuning", "prompt"])
def test_generation_puts_virtual_tokens_where_training_had_them(tiny_llama, tiny_t5, family, method):
    """`model.inference.virtual_tokens.generate` on each method's adapter (PEFT's initial virtual tokens, made
    strong) over the tiny bases: a padded batch of prompts of different lengths decodes greedily as PEFT's forward
    pass does, 16 tokens (PEFT's own `generate` leaves it: a prefix-tuned model replies as its base, a prompt-tuned
    or P-tuned Llama's replies part from its forward pass after a few tokens), and beam search scores its beams
    by the forward pass's log-probabilities (the virtual tokens in every beam)."""
    path, auto = bases(tiny_llama, tiny_t5)[family]
    torch.manual_seed(0)
    model = add_adapter(auto.from_pretrained(path), PeftArguments(peft=method, num_virtual_tokens=6)).eval()
    model.prompt_encoder["default"].embedding.weight.data *= 8
    model.generation_config.repetition_penalty = 1.0  # the saved 1.1 would fill in below: argmax, as the reference
    seq2seq, steps = family == "t5", 16
    prompts = [[5, 40, 41, 42, 43, 44, 45], [5, 60, 61]]
    width = max(map(len, prompts))
    padding = lambda p: [0] * (width - len(p))  # noqa: E731
    ids = torch.tensor([p + padding(p) if seq2seq else padding(p) + p for p in prompts])
    mask = torch.tensor([[1] * len(p) + padding(p) if seq2seq else padding(p) + [1] * len(p) for p in prompts])
    start = getattr(model.config, "decoder_start_token_id", None)
    greedy = GenerationConfig(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
                              eos_token_id=1, decoder_start_token_id=start)
    output = virtual_tokens.generate(model, ids, mask, greedy)
    new = output[:, 1:] if seq2seq else output[:, width:]
    for prompt, reply in zip(prompts, new.tolist()):
        assert_greedy(model, prompt, reply, set(), steps)
    beams = GenerationConfig(max_new_tokens=6, min_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False,
                             length_penalty=0.0, pad_token_id=0, eos_token_id=1, output_scores=True,
                             return_dict_in_generate=True, decoder_start_token_id=start)
    found = virtual_tokens.generate(model, ids[:1], mask[:1], beams)
    for sequence, score in zip(found.sequences, found.sequences_scores):
        reply = (sequence[1:] if seq2seq else sequence[width:]).tolist()
        assert log_probability(model, prompts[0], reply) == pytest.approx(float(score), abs=1e-3)
        with model.disable_adapter():  # without the virtual tokens the score is 10x the tolerance off or more
            assert abs(log_probability(model, prompts[0], reply) - float(score)) > 1e-2


def test_chat_generate_rejected_and_export_as_commands(trained, tmp_path):
    """The scripts themselves on a prompt-tuning output: chat answers one message, generate_rejected writes its
    triples, export refuses with one error and exit status 2."""
    _, output = trained["llama", "prompt"]
    result = run_script("chat.py", "--model_name_or_path", str(output), "--message", "你好", "--device", "cpu",
                        "--max_new_tokens", "8")
    assert result.returncode == 0 and "Traceback" not in result.stderr
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"请复述：{s}", "response": s}, ensure_ascii=False) + "\n"
                            for s in SENTENCES[:3]), encoding="utf-8")
    counts = generate_rejected.main(["--config", "none", "--model_name_or_path", str(output), "--input", str(data),
                                     "--output", str(tmp_path / "rejected.jsonl"), "--batch_size", "3",
                                     "--max_new_tokens", "8", "--device", "cpu"])
    assert counts["written"] + counts.get("same_as_dataset", 0) + counts.get("empty", 0) >= 1, counts
    with pytest.raises(SystemExit) as done:
        run_main(export.main, ["--config", "none", "--model_name_or_path", str(output),
                               "--output", str(tmp_path / "m.gguf")])
    assert done.value.code == 2 and not (tmp_path / "m.gguf").exists()


def test_eval_model_scores_a_prompt_tuning_adapter_without_its_virtual_tokens(trained, tmp_path):
    """eval_model's bits per character on a prompt-tuning Llama: its logits begin with the virtual tokens', which
    predict no text. The figure equals PEFT's own loss, which pads the labels over the virtual tokens."""
    import eval_model

    _, output = trained["llama", "prompt"]
    text = tmp_path / "text.txt"
    text.write_text("他在山顶上用 Python 统计了湖泊和群山的数量。\n", encoding="utf-8")
    results = eval_model.main(["--config", "none", "--model_name_or_path", str(output), "--task", "bpc",
                               "--bpc_files", str(text), "--output_dir", str(tmp_path / "eval"), "--device", "cpu"])
    bpc = results["bpc"]
    model, tokenizer = load_for_inference(str(output), "cpu")
    eos = tokenizer.eos_token_id  # the metric's stream: EOS, then each document and its EOS
    ids = torch.tensor([[eos, *tokenizer(text.read_text().strip())["input_ids"], eos]])
    labels = ids.clone()
    labels[0, 0] = -100  # PEFT's labels would have the last virtual token predict the first real one
    with torch.no_grad():
        nats = model(input_ids=ids, labels=labels).loss.item() * (ids.shape[1] - 1)
    assert bpc["tokens"] == ids.shape[1] - 1
    assert bpc["bits"] == pytest.approx(nats / np.log(2), rel=1e-5)  # one window, one fp32 sum order apart


def test_loraplus_gives_b_ratio_times_the_learning_rate(tiny_llama, sft_file, tmp_path):
    """The optimizer SFT trains with (`use_loraplus`, checked before the merge removes the adapter): every
    lora_B at 16 x the learning rate, every lora_A at the learning rate; the Trainer keeps it, and its
    checkpoint holds the optimizer state of those groups."""
    args = sft_args(tiny_llama, sft_file, tmp_path / "out", "lora", "--max_steps", "2", "--loraplus_lr_ratio",
                    "16", "--learning_rate", "1e-3", "--save_strategy", "steps", "--save_steps", "2")
    seen = {}
    original = sft_train.use_loraplus

    def recording(trainer, ratio):
        original(trainer, ratio)
        names = {id(p): name for name, p in trainer.model.named_parameters()}
        seen.update({names[id(p)]: group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]})
        seen["optimizer"] = trainer.optimizer
        trainer.create_optimizer()
        assert trainer.optimizer is seen["optimizer"]

    sft_train.use_loraplus = recording
    try:
        trainer = sft_train.main(args)
    finally:
        sft_train.use_loraplus = original
    a = {name: lr for name, lr in seen.items() if ".lora_A." in name}
    b = {name: lr for name, lr in seen.items() if ".lora_B." in name}
    assert len(a) == len(b) == 14 and set(a.values()) == {1e-3} and set(b.values()) == {16 * 1e-3}
    assert [g["lr"] for g in trainer.optimizer.param_groups if g["params"]] == [1e-3, 16e-3]  # constant schedule
    state = torch.load(tmp_path / "out" / "adapter" / "checkpoint-2" / "optimizer.pt", weights_only=False)
    assert [g["lr"] for g in state["param_groups"] if g["params"]] == [1e-3, 16e-3]


@pytest.mark.parametrize("flags", [{"use_dora": True}, {"use_rslora": True}, {"lora_init": "pissa"},
                                   {"lora_init": "olora", "use_dora": True}, {"lora_init": "gaussian"}])
def test_lora_variants_reach_the_config_and_merge_exactly(tiny_llama, flags, tmp_path):
    """Each variant starts at the base's function, trains, merges into the adapter's logits, and its saved
    adapter (what --output_dir/adapter holds) on the original base gives them too: PiSSA / OLoRA take their
    start out of the base weights, and PEFT's load redoes that on the base it is given."""
    peft = PeftArguments(peft="lora", lora_r=4, lora_embeddings="none", **flags)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    config = peft.config_for(model)
    assert config.use_dora == flags.get("use_dora", False) and config.use_rslora == flags.get("use_rslora", False)
    assert config.init_lora_weights == {"default": True}.get(flags.get("lora_init", "default"),
                                                             flags.get("lora_init"))
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        before = model.eval()(input_ids=ids).logits
    adapted = add_adapter(model, peft)
    with torch.no_grad():  # every initialisation starts at the base's function (PiSSA / OLoRA: W - BA + BA)
        assert torch.allclose(adapted.eval()(input_ids=ids).logits, before, atol=1e-4)
    optimizer = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.1)
    adapted.train()(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    with torch.no_grad():
        expected = adapted.eval()(input_ids=ids).logits
        assert not torch.allclose(expected, before, atol=1e-4)
        adapted.save_pretrained(tmp_path / "adapter")
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "adapter")
        assert torch.allclose(reloaded.eval()(input_ids=ids).logits, expected, atol=1e-4)
        assert torch.allclose(merge_adapter(adapted)(input_ids=ids).logits, expected, atol=1e-4)


def test_refusals(tiny_llama):
    with pytest.raises(UserError, match="reference model is the base"):
        PeftArguments(peft="lora", lora_init="pissa").check_base_kept("DPO")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PeftArguments(peft="prompt", num_virtual_tokens=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with pytest.raises(UserError, match="--peft prompt cannot train the embedding rows"):
        add_adapter(model, PeftArguments(peft="prompt"), [500], added_tokens=[500])


@pytest.mark.parametrize("method", [("prompt",), ("ptuning", "--ptuning_encoder", "lstm"),
                                    ("prefix", "--prefix_projection", "true")], ids=lambda m: "-".join(m))
def test_prompt_learning_resumed_equals_uninterrupted(tiny_llama, sft_file, tmp_path, method):
    """A copy of a finished prompt-learning run cut back to what a stop at step 2 leaves (checkpoint-2, no final
    adapter) goes on to the same losses and the same adapter, bit for bit: for prompt tuning (the virtual tokens
    are all it trains) and for the methods whose virtual tokens an encoder network makes (P-tuning's LSTM, prefix
    tuning's MLP), whose checkpoints must hold the encoder and not only its output."""
    args = lambda out: sft_args(tiny_llama, sft_file, out, *method, "--max_steps", "6",  # noqa: E731
                                "--save_strategy", "steps", "--save_steps", "2")
    reference, cut = tmp_path / "reference", tmp_path / "cut"
    sft_train.main(args(reference))
    shutil.copytree(reference, cut)
    clear_run(cut, model_files=True)
    for checkpoint in ("checkpoint-4", "checkpoint-6"):
        shutil.rmtree(cut / "adapter" / checkpoint)
    for name in set(OUTPUT_FILES) - {RUN_FILE}:
        (cut / "adapter" / name).unlink(missing_ok=True)
    assert not (cut / "adapter_model.safetensors").exists()
    assert sft_train.main(args(cut)).state.global_step == 6
    losses = lambda run: [h["loss"] for h in json.loads(  # noqa: E731
        (run / "adapter" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert losses(cut) == losses(reference)
    before, after = load_file(reference / "adapter_model.safetensors"), load_file(cut / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    checkpoint = load_file(reference / "adapter" / "checkpoint-2" / "adapter_model.safetensors")
    assert any(not torch.equal(checkpoint[k], before[k]) for k in before)  # the virtual tokens moved
    encoded = method[0] != "prompt"  # prompt tuning's saved vectors are its whole encoder
    assert (reference / "adapter" / "checkpoint-2" / PROMPT_ENCODER_FILE).is_file() == encoded
    model, _ = load_for_inference(str(cut), "cpu")  # the output (PEFT's file of virtual tokens) loads to reply
    assert has_virtual_tokens(model) and model.active_peft_config.inference_mode
