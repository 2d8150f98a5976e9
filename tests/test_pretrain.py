"""Pretraining: objectives are well formed, tiny T5 / Llama learn and reload, ctrl+c resume is bit-exact
(also with gradient accumulation and under two processes), continued pretraining grows embeddings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, make_documents, run_script, run_until_interrupted
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import pre_train
from model.build import load_model
from model.training.outputs import latest_checkpoint
from utils.errors import UserError
from utils.examples.pretrain_data import PackedBlocks, SpanCorruptionBlocks, TokenStream, span_corruption_lengths

pytestmark = pytest.mark.slow


def common(tiny_corpus, tiny_tokenizer, model, output, *extra):
    return ["--config", "none", "--model_config", model, "--tokenizer_name_or_path", str(tiny_tokenizer),
            "--train_files", str(tiny_corpus), "--validation_files", str(tiny_corpus),
            "--output_dir", str(output), "--block_size", "64", "--max_source_length", "64",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--eval_strategy", "no",
            "--report_to", "none", "--seed", "5", "--preprocessing_num_workers", "1", "--learning_rate", "3e-3",
            *map(str, extra)]


def losses(output, step):
    state = json.loads((output / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def stream(tiny_corpus, tiny_tokenizer, tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    return TokenStream.build([str(tiny_corpus)], "train", tokenizer, tmp_path_factory.mktemp("cache"), 1), tokenizer


def test_span_corruption_examples_are_well_formed(stream):
    tokens, tokenizer = stream
    data = SpanCorruptionBlocks(tokens, tokenizer, 64, 0.15, 3.0, seed=1)
    raw, target = span_corruption_lengths(64, 0.15, 3.0)
    sentinel_ids = set(data.sentinels)
    for index in range(5):
        example = data[index]
        inputs, labels = example["input_ids"], example["labels"]
        assert len(inputs) == 64 and len(labels) == target  # lengths as configured
        in_sentinels = [t for t in inputs if t in sentinel_ids]
        label_sentinels = [t for t in labels if t in sentinel_ids]
        assert in_sentinels == label_sentinels == data.sentinels[:len(in_sentinels)]  # paired, in order
        assert inputs[-1] == labels[-1] == tokenizer.eos_token_id
        # filling each sentinel of the input with its span from the labels gives back the raw block
        spans, current = {}, None
        for t in labels[:-1]:
            if t in sentinel_ids:
                current = t
                spans[current] = []
            else:
                spans[current].append(t)
        rebuilt = [x for t in inputs[:-1] for x in (spans[t] if t in sentinel_ids else [t])]
        assert rebuilt == tokens.tokens[index * raw:(index + 1) * raw].tolist()
        noise = sum(len(s) for s in spans.values())
        assert abs(noise / raw - 0.15) < 0.03
    assert data[3] == data[3]
    assert SpanCorruptionBlocks(tokens, tokenizer, 64, 0.15, 3.0, seed=2)[3] != data[3]


def test_packing_has_no_padding_and_separates_documents_with_eos(stream, tiny_corpus):
    tokens, tokenizer = stream
    blocks = PackedBlocks(tokens, 64)
    assert len(blocks) == len(tokens) // 64
    for index in (0, len(blocks) - 1):
        ids = blocks[index]["input_ids"]
        assert ids.shape == (64,) and tokenizer.pad_token_id not in ids.tolist()
    documents = tiny_corpus.read_text(encoding="utf-8").count("\n")
    assert int(np.sum(tokens.tokens == tokenizer.eos_token_id)) == documents
    first = json.loads(tiny_corpus.read_text(encoding="utf-8").splitlines()[0])["text"]
    first_ids = tokenizer(first, add_special_tokens=False)["input_ids"]
    assert tokens.tokens[:len(first_ids) + 1].tolist() == first_ids + [tokenizer.eos_token_id]
    assert tokens.tokens.dtype == np.uint16


def assert_learns_and_reloads(trainer, output, auto):
    history = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(np.isfinite(history)) and np.mean(history[-3:]) < np.mean(history[:3]) - 0.5
    assert not (output / ".staging").exists() and not (output / ".final-staging").exists()
    for name in ("config.yaml", "training_summary.json", "generation_config.json", "tokenizer.json"):
        assert (output / name).exists(), name
    model = auto.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    prompt = tokenizer("春天的早晨", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[-1] > (1 if auto is AutoModelForSeq2SeqLM else prompt["input_ids"].shape[-1])


def test_t5_span_corruption_learns_and_reloads(tiny_corpus, tiny_tokenizer, tmp_path):
    output = tmp_path / "t5"
    trainer = pre_train.main(common(tiny_corpus, tiny_tokenizer, "t5-tiny", output, "--max_steps", "40"))
    assert_learns_and_reloads(trainer, output, AutoModelForSeq2SeqLM)
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["objective"] == "span_corruption" and summary["eval_span_bpc"] > 0


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    docs = make_documents(120, seed=9, sentences_per_doc=2)
    rows = [{"prompt": f"请复述：{d}", "response": d} for d in docs]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_t5_text_to_text_pairs_learn(tiny_corpus, tiny_tokenizer, pair_file, tmp_path):
    output = tmp_path / "t5pairs"
    trainer = pre_train.main(common(tiny_corpus, tiny_tokenizer, "t5-tiny", output, "--max_steps", "40",
                                    "--objective", "text_to_text", "--pair_files", pair_file))
    assert_learns_and_reloads(trainer, output, AutoModelForSeq2SeqLM)


def test_t5_mixed_objectives_evaluate_both(tiny_corpus, tiny_tokenizer, pair_file, tmp_path):
    output = tmp_path / "t5mix"
    pre_train.main(common(tiny_corpus, tiny_tokenizer, "t5-tiny", output, "--max_steps", "6",
                          "--pair_files", pair_file, "--mix_weights", "3", "1"))
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["objective"] == "mix"
    assert {"eval_span_loss", "eval_pairs_loss", "eval_span_bpc", "eval_pairs_bpc"} <= set(summary)


def test_llama_learns_and_reloads(tiny_corpus, tiny_tokenizer, tmp_path):
    output = tmp_path / "llama"
    trainer = pre_train.main(common(tiny_corpus, tiny_tokenizer, "llama-tiny", output, "--max_steps", "40"))
    assert_learns_and_reloads(trainer, output, AutoModelForCausalLM)
    assert AutoModelForCausalLM.from_pretrained(output).config._attn_implementation == "sdpa"


def test_a_run_ends_with_its_summary_on_a_quiet_console_and_evaluates_the_last_step_once(tiny_corpus, tiny_tokenizer,
                                                                                       tmp_path):
    """The command's console (a pipe, as under nohup or CI): log lines each on a line of their own (no progress bar
    glued to them), no DeepSpeed accelerator notice and no FutureWarning (activation checkpointing is on, the
    recipes' spelling), and a table of the run's figures at the end. The Trainer evaluated at the last step
    (max_steps a multiple of eval_steps), so that evaluation is the final one, not run and logged again."""
    output = tmp_path / "run"
    result = run_script("pre_train.py", *common(tiny_corpus, tiny_tokenizer, "llama-tiny", output, "--max_steps", "4",
                                               "--eval_strategy", "steps", "--eval_steps", "2", "--save_steps", "2",
                                               "--activation_checkpointing", "true"))
    console = result.stdout + result.stderr
    assert "Setting accelerator" not in console and "Warning" not in console and "\r" not in console, console
    for line in console.splitlines():
        if re.search(r"\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ", line):
            assert re.match(r"\d\d:\d\d:\d\d ", line), line
    summary = json.loads((output / "training_summary.json").read_text())
    table = console[console.index("training summary"):].splitlines()[1:]
    rows = {line[:23].strip(): line[23:] for line in table}
    assert rows == {"train loss": f"{summary['train_loss']:.4f} (mean over the run)",
                    "held-out loss": f"{summary['eval_loss']:.4f}", "held-out bits/char": f"{summary['eval_bpc']:.3f}",
                    "steps": "4", "time": summary["train_runtime_human"], "model": str(output)}, table
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "eval_loss" in h] == [2, 4]
    assert summary["eval_loss"] == next(h["eval_loss"] for h in history if h.get("step") == 4 and "eval_loss" in h)


def test_torch_compile_trains_and_reports_graph_breaks_once(tiny_corpus, tiny_tokenizer, tmp_path, capsys):
    """--torch_compile true (dynamo with its eager backend here: the same graphs and breaks, no C++ build)
    trains, and what dynamo did is logged once, at the first progress line."""
    trainer = pre_train.main(common(tiny_corpus, tiny_tokenizer, "llama-tiny", tmp_path / "compiled",
                                    "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no",
                                    "--torch_compile", "true", "--torch_compile_backend", "eager"))
    reports = re.findall(r"torch.compile after .*", capsys.readouterr().err)
    assert len(reports) == 1 and re.fullmatch(r"torch.compile after 1 steps: [1-9]\d* graphs \| \d+ graph breaks.* \| "
                                              r"\d+ recompilations", reports[0]), reports
    assert trainer.args.torch_compile and all(np.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize("model, steps, stop_at, extra", [
    ("llama-tiny", 10, 3, []), ("t5-tiny", 10, 3, []),
    # length-grouped pairs (the text-to-text recipe), stopped in the second epoch (15 steps per epoch)
    ("t5-tiny", 30, 17, ["--objective", "text_to_text", "--train_sampling_strategy", "group_by_length"])],
    ids=["llama", "t5-span", "t5-pairs-grouped"])
def test_sigint_then_resume_equals_uninterrupted_run(model, steps, stop_at, extra, tiny_corpus, tiny_tokenizer,
                                                      pair_file, tmp_path):
    extra = [*extra, "--pair_files", pair_file] if extra else []
    args = lambda out: common(tiny_corpus, tiny_tokenizer, model, out, "--max_steps", steps,  # noqa: E731
                              "--gradient_accumulation_steps", "2", "--save_steps", steps, *extra)
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "pre_train.py", *args(reference)], cwd=REPO, check=True, capture_output=True)
    resumed = tmp_path / "resumed"
    code, log = run_until_interrupted(args(resumed), stop_at=stop_at)
    assert code == 0, log
    assert "Run the same command again to resume" in log
    stopped = latest_checkpoint(resumed)
    assert stopped is not None and stop_at <= int(stopped.name.split("-")[1]) < steps
    second = subprocess.run([sys.executable, "pre_train.py", *args(resumed)], cwd=REPO, capture_output=True,
                            text=True)
    assert second.returncode == 0 and f"resuming from {stopped}" in second.stderr
    assert losses(resumed, steps) == losses(reference, steps)  # every step's loss, bit-exact
    before, after = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_length_grouped_batches_cut_padding_and_cover_every_pair_once_per_epoch(tiny_tokenizer, tmp_path):
    """`--train_sampling_strategy group_by_length` on text-to-text pairs: each epoch is a permutation of the
    pairs, a different one per epoch, and batches pad far less than random ones."""
    from model.training.trainer import EpochLengthGroupedSampler
    from utils.examples.pretrain_data import TextToTextPairs

    # pairs of 1 to 8 sentences: the tokenizer merges a sentence of the tiny corpus into a token or two, so
    # pairs of equal sentence counts (pair_file) hardly differ in length and there would be no padding to cut
    docs = [make_documents(1, seed=i, sentences_per_doc=1 + i % 8)[0] for i in range(120)]
    pair_file = tmp_path / "pairs.jsonl"
    pair_file.write_text("".join(json.dumps({"prompt": f"请复述：{d}", "response": d}, ensure_ascii=False) + "\n"
                                 for d in docs), encoding="utf-8")
    pairs = TextToTextPairs([str(pair_file)], "train", AutoTokenizer.from_pretrained(tiny_tokenizer), 64, 64, 1)
    assert len(pairs.lengths) == len(pairs) == 120
    assert all(pairs.lengths[i] == max(len(pairs[i]["input_ids"]), len(pairs[i]["labels"])) for i in range(120))
    sampler = EpochLengthGroupedSampler(8, pairs.lengths.tolist(), seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == sorted(second) == list(range(120)) and first != second
    sampler.set_epoch(0)
    assert list(sampler) == first  # what a resumed run replays

    def padded(order):
        return sum(8 * max(pairs.lengths[order[i:i + 8]]) for i in range(0, 120, 8))

    shuffled = np.random.default_rng(0).permutation(120)
    assert padded(first) < 0.9 * padded(shuffled)


def test_two_processes_stop_together_and_resume(tiny_corpus, tiny_tokenizer, tmp_path):
    """accelerate launch with 2 CPU processes (DDP over gloo): one signal stops both ranks at one step with
    one checkpoint; the resumed run equals a single process with accumulation 2 (same global batches)."""
    # 6 steps of 8 blocks stay inside the first epoch (the tiny corpus packs into 57 blocks of 64): at an
    # epoch's end the 2 ranks' shards (57 padded to 2 x 29) batch differently from one process's 57
    reference = tmp_path / "single"
    subprocess.run([sys.executable, "pre_train.py",
                    *common(tiny_corpus, tiny_tokenizer, "llama-tiny", reference, "--max_steps", "6",
                            "--save_steps", "6", "--gradient_accumulation_steps", "2")],
                   cwd=REPO, check=True, capture_output=True)
    output = tmp_path / "ddp"
    args = common(tiny_corpus, tiny_tokenizer, "llama-tiny", output, "--max_steps", "6", "--save_steps", "6")
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(29500 + os.getpid() % 1000))
    _, log = run_until_interrupted(args, stop_at=2, launcher=launcher)
    assert log.count("SIGINT received") >= 1 and log.count("stopped at step") == 1, log
    checkpoints = [p.name for p in output.iterdir() if p.name.startswith("checkpoint-")]
    assert len(checkpoints) == 1 and not (output / "model.safetensors").exists()
    finish = subprocess.run([*launcher, "pre_train.py", *args], cwd=REPO, capture_output=True, text=True)
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert "(batch 4 x accum 1 x 2 processes x 64)" in finish.stderr
    assert losses(output, 6) == pytest.approx(losses(reference, 6), abs=1e-5)
    before, after = load_file(reference / "model.safetensors"), load_file(output / "model.safetensors")
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)


def test_continued_pretraining_grows_embeddings_and_keeps_old_rows(tiny_corpus, tiny_tokenizer, tmp_path):
    import train_tokenizer

    base = tmp_path / "base"
    pre_train.main(common(tiny_corpus, tiny_tokenizer, "llama-tiny", base, "--max_steps", "2"))
    extra = tmp_path / "new.jsonl"
    rare = [chr(0x4E00 + 7 * i) for i in range(300)]  # many characters the base vocabulary lacks
    words = ["".join(rare[i:i + 3]) for i in range(0, 300, 3)]
    extra.write_text("".join(json.dumps({"text": "，".join(words[j:j + 10]) + "。"}, ensure_ascii=False) + "\n"
                             for j in range(0, 100, 2)), encoding="utf-8")
    extended = tmp_path / "extended"
    train_tokenizer.main(["--config", "none", "--input", str(extra), "--extend", str(tiny_tokenizer),
                          "--vocab_size", "2000", "--min_frequency", "1", "--output_dir", str(extended)])
    old = AutoModelForCausalLM.from_pretrained(base).get_input_embeddings().weight.detach().clone()
    tokenizer = AutoTokenizer.from_pretrained(extended)
    assert len(tokenizer) > old.shape[0]
    model = load_model(str(base), tokenizer)
    grown = model.get_input_embeddings().weight.detach()
    assert grown.shape[0] >= len(tokenizer) and grown.shape[0] % 64 == 0
    assert torch.equal(grown[:old.shape[0]], old)
    assert torch.allclose(grown[old.shape[0]:len(tokenizer)], old.mean(0).expand(len(tokenizer) - old.shape[0], -1),
                          atol=0.2)
    output = tmp_path / "continued"
    pre_train.main(common(tiny_corpus, extended, "llama-tiny", output, "--max_steps", "2",
                          "--model_name_or_path", base))
    assert AutoModelForCausalLM.from_pretrained(output).get_input_embeddings().weight.shape[0] == grown.shape[0]


def test_kill_9_during_saves_never_leaves_an_unusable_latest_checkpoint(tiny_corpus, tiny_tokenizer, tmp_path):
    output = tmp_path / "killed"
    args = common(tiny_corpus, tiny_tokenizer, "t5-tiny", output, "--max_steps", "30", "--save_steps", "1",
                  "--save_total_limit", "2")
    process = subprocess.Popen([sys.executable, "pre_train.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (output / ".staging").exists():  # a save is in progress
        time.sleep(0.01)
    while time.time() < deadline and latest_checkpoint(output) is None:
        time.sleep(0.01)
    time.sleep(0.5)
    process.kill()  # SIGKILL, most likely in the middle of one of the per-step saves
    process.wait()
    resumed = subprocess.run([sys.executable, "pre_train.py", *args], cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-3000:]
    assert len([p for p in output.iterdir() if p.name.startswith("checkpoint-")]) <= 2  # save_total_limit


def test_latest_checkpoint_ignores_partial_saves(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", ".staging/checkpoint-20", "checkpoint-x"):
        (tmp_path / name).mkdir(parents=True)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_bad_model_and_objective_are_refused(tiny_corpus, tiny_tokenizer, tmp_path):
    with pytest.raises(UserError, match="unknown model config"):
        pre_train.main(common(tiny_corpus, tiny_tokenizer, "t5-huge", tmp_path / "x", "--max_steps", "1"))
    with pytest.raises(UserError, match="does not fit"):
        pre_train.main(common(tiny_corpus, tiny_tokenizer, "llama-tiny", tmp_path / "y", "--max_steps", "1",
                              "--objective", "span_corruption"))
    assert not (tmp_path / "y").exists()  # refused before the output directory is claimed


def test_a_missing_data_file_is_refused_before_anything_is_written(tiny_tokenizer, tmp_path):
    """pre_train.py and sft_train.py claimed the output directory (run.json) before reading the data, and named
    prepare_data.py's --input with its advice to download a Wikipedia dump."""
    out = tmp_path / "out"
    for args, field in ((["pre_train.py", "--tokenizer_name_or_path", str(tiny_tokenizer), "--train_files"],
                         "train_files"),
                        (["sft_train.py", "--model_name_or_path", "model_save/anything", "--train_files"], None)):
        result = run_script(*args, str(tmp_path / "corpus"), "--config", "none", "--output_dir", str(out), check=False)
        assert result.returncode == 2, result.stderr
        assert f"error: {tmp_path / 'corpus'}" + (f", field '{field}'" if field else "") + ": no such file" \
            in result.stderr and "wikimedia" not in result.stderr
        assert not out.exists()


@pytest.mark.parametrize("preset", ["t5-tiny", "llama-tiny"])
def test_eager_and_sdpa_attention_compute_the_same_loss(preset, tiny_tokenizer):
    """--attn_implementation only changes the kernel: T5's position bias enters SDPA as an additive mask."""
    from model.build import build_model, model_config

    config = model_config(preset, AutoTokenizer.from_pretrained(tiny_tokenizer))
    inputs = torch.randint(10, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": inputs, "labels": inputs[:, :8].contiguous() if config.is_encoder_decoder else inputs}
    losses = {impl: build_model(config, seed=0, attn_implementation=impl)(**batch).loss for impl in ("eager", "sdpa")}
    assert build_model(config, attn_implementation="sdpa").config._attn_implementation == "sdpa"
    torch.testing.assert_close(losses["eager"], losses["sdpa"], atol=1e-5, rtol=1e-5)


def test_flex_attention_computes_what_sdpa_computes(tiny_tokenizer):
    """--attn_implementation flex_attention: T5's position bias as a FlexAttention score_mod gives SDPA's
    outputs in the encoder (padded inputs), the decoder's self- and cross-attention (padded labels) and
    cached generation. FlexAttention is run eagerly here (compiling it on CPU takes minutes); it has no CPU
    backward, so training with it on CPU is refused before anything runs."""
    from model.build import AttentionArguments, build_model, check_attention_for_training, model_config

    config = model_config("t5-tiny", AutoTokenizer.from_pretrained(tiny_tokenizer))
    models = {impl: build_model(config, seed=0, attn_implementation=impl).eval() for impl in ("sdpa", "flex_attention")}
    inputs = torch.randint(10, 500, (3, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(inputs)
    mask[1, 17:], mask[2, 5:] = 0, 0
    labels = inputs[:, :9].clone()
    labels[2, 4:] = -100
    batch = {"input_ids": inputs, "attention_mask": mask, "labels": labels}
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        out = {impl: model(**batch, output_hidden_states=True) for impl, model in models.items()}
        generated = {impl: model.generate(input_ids=inputs, attention_mask=mask, max_new_tokens=6, do_sample=False)
                     for impl, model in models.items()}
    assert models["flex_attention"].config._attn_implementation == "flex_attention"
    for name in ("encoder_last_hidden_state", "logits"):  # logits: decoder self- and cross-attention
        torch.testing.assert_close(out["flex_attention"][name], out["sdpa"][name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["flex_attention"].loss, out["sdpa"].loss)
    assert torch.equal(generated["flex_attention"], generated["sdpa"])
    with pytest.raises(ValueError, match="no FlexAttention backward pass"):
        AttentionArguments(attn_implementation="flex_attention")
    check_attention_for_training(models["flex_attention"])  # t5-tiny has no dropout
    config.dropout_rate = 0.1
    with pytest.raises(UserError, match="no attention dropout, and this model's dropout_rate is 0.1"):
        check_attention_for_training(build_model(config, attn_implementation="flex_attention"))


@pytest.mark.parametrize("scaled", [True, False])
def test_adafactor_optim_args_scale_updates_to_each_parameter(scaled, tiny_corpus, tiny_tokenizer, tmp_path):
    """`--optim adafactor --optim_args scale_parameter=true` (HF's own handler ignores optim_args and turns
    scaling off): one step moves every weight by about the same share of its RMS, so T5's small query
    weights (std (d_model * d_kv)^-0.5) move as gently as its unit-scale embeddings."""
    from model.build import build_model, model_config

    output = tmp_path / "adafactor"
    pre_train.main(common(tiny_corpus, tiny_tokenizer, "t5-tiny", output, "--max_steps", "1", "--optim", "adafactor",
                          "--optim_args", f"scale_parameter={str(scaled).lower()}", "--learning_rate", "1e-2",
                          "--warmup_steps", "0", "--lr_scheduler_type", "constant"))
    before = build_model(model_config("t5-tiny", AutoTokenizer.from_pretrained(tiny_tokenizer)), seed=5)
    after = AutoModelForSeq2SeqLM.from_pretrained(output)

    def relative_change(name):
        old, new = before.get_parameter(name).detach(), after.get_parameter(name).detach()
        return float((new - old).pow(2).mean().sqrt() / old.pow(2).mean().sqrt())

    query = relative_change("encoder.block.0.layer.0.SelfAttention.q.weight")
    embedding = relative_change("shared.weight")
    if scaled:
        assert 0.5 < query / embedding < 2
    else:
        assert query / embedding > 10


def test_bad_adafactor_options_are_refused(tiny_corpus, tiny_tokenizer, tmp_path):
    for bad, message in (("relative_step=true", "not an Adafactor option"), ("scale_parameter=yes", "true or false"),
                         ("beta1=high", "must be a number")):
        with pytest.raises(UserError, match=message):
            pre_train.main(common(tiny_corpus, tiny_tokenizer, "t5-tiny", tmp_path / "x", "--max_steps", "1",
                                  "--optim", "adafactor", "--optim_args", bad))
    from model.training.arguments import TrainArguments  # other optimizers' optim_args are HF's to read, untouched

    assert TrainArguments(output_dir=str(tmp_path / "g"), optim="galore_adafactor", optim_args="rank=64",
                          report_to=[]).optim_args == "rank=64"

