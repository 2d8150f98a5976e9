"""SFT: T5 trains its decoder with embeddings + encoder bit-equal, Llama sees labels only on assistant tokens,
length limits truncate or drop as chosen (and count), outputs reload, ctrl+c resume equals an uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, SENTENCES, SummaryTable, run_until_interrupted
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import sft_train
from model.training.outputs import latest_checkpoint
from utils.config import parse_config
from utils.errors import UserError
from utils.examples.sft_data import OVERLONG, seq2seq_examples, tokenize_conversations
from utils.tokenization.chat_format import ChatPrompts, RenderedPrompt, render_prompt

pytestmark = pytest.mark.slow

SYSTEM = "你是一个复述助手。"


def conversation(i: int) -> list[dict]:
    first, second = SENTENCES[i % len(SENTENCES)], SENTENCES[(i + 5) % len(SENTENCES)]
    messages = [{"role": "user", "content": f"请复述：{first}"}, {"role": "assistant", "content": first}]
    if i % 3 == 0:  # some multi-turn conversations with a system turn
        messages = [{"role": "system", "content": SYSTEM}, *messages,
                    {"role": "user", "content": f"再复述：{second}"}, {"role": "assistant", "content": second}]
    return messages


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": conversation(i)}, ensure_ascii=False) + "\n"
                            for i in range(48)), encoding="utf-8")
    return path


def args_for(model, data, output, *extra):
    return ["--config", "none", "--model_name_or_path", str(model), "--train_files", str(data),
            "--output_dir", str(output), "--max_source_length", "64", "--max_target_length", "48",
            "--max_length", "128", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3",
            "--logging_steps", "1", "--report_to", "none", "--seed", "7", "--validation_ratio", "0.1",
            "--eval_strategy", "no", "--save_strategy", "no", "--eval_samples", "2",
            "--sample_max_new_tokens", "8", *map(str, extra)]


def loss_history(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def assert_loss_falls(trainer):
    history = loss_history(trainer)
    assert all(np.isfinite(history)) and np.mean(history[-3:]) < np.mean(history[:3]) - 0.3, history


@pytest.fixture(scope="module")
def t5_run(tiny_t5, sft_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("sft_t5") / "out"
    with SummaryTable() as table:
        trainer = sft_train.main(args_for(tiny_t5, sft_file, output, "--max_steps", "25"))
    return trainer, output, table


def test_t5_sft_trains_the_decoder_only_and_reloads(t5_run, tiny_t5):
    trainer, output, table = t5_run
    assert_loss_falls(trainer)
    before = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).state_dict()
    after = AutoModelForSeq2SeqLM.from_pretrained(output)
    assert after.lm_head.weight is after.shared.weight  # still tied after the round trip
    after = after.state_dict()
    frozen = [k for k in before if k.startswith(("shared.", "encoder.", "lm_head."))]
    trained = [k for k in before if k.startswith("decoder.") and "embed_tokens" not in k]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # embeddings (= LM head) + encoder bit-equal
    assert all(not torch.equal(before[k], after[k]) for k in trained)  # every decoder tensor moved
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["frozen"] == ["embeddings", "encoder"]
    assert 0 < summary["trainable_parameters"] < summary["parameters"]
    decoder = sum(v.numel() for k, v in before.items() if k.startswith("decoder.") and "embed_tokens" not in k)
    assert summary["trainable_parameters"] == decoder
    assert len(summary["samples"]) == 2 and summary["eval_loss"] > 0  # eval loss + logged sample replies
    assert table["held-out loss"] == f"{summary['eval_loss']:.4f}" and table["model"] == str(output)
    assert summary["data"]["examples"] > summary["data"]["conversations"]  # one example per assistant turn
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.chat_template and (output / "generation_config.json").exists()


def test_freeze_choices(tiny_t5, tiny_llama):
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5)
    assert sft_train.freeze_parameters(model, "encoder") == ["encoder"]
    assert model.shared.weight.requires_grad  # the tied embeddings stay trainable unless named
    assert not any(p.requires_grad for n, p in model.encoder.named_parameters() if "embed_tokens" not in n)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5)
    assert sft_train.freeze_parameters(model, "none") == [] and all(p.requires_grad for p in model.parameters())
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert sft_train.freeze_parameters(llama, "auto") == []
    with pytest.raises(UserError, match="cannot freeze 'encoder'"):
        sft_train.freeze_parameters(llama, "embeddings,encoder")


def test_llama_batches_carry_labels_only_on_assistant_tokens(tiny_llama, sft_file, tmp_path):
    output = tmp_path / "llama"
    trainer = sft_train.main(args_for(tiny_llama, sft_file, output, "--max_steps", "25"))
    assert_loss_falls(trainer)
    tokenizer = AutoTokenizer.from_pretrained(output)
    answers = {"".join(m["content"] + "<|end|>" for m in conversation(i) if m["role"] == "assistant")
               for i in range(48)}
    seen = 0
    for batch in trainer.get_train_dataloader():  # the batches the trainer trains on
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            trained = labels != -100
            assert torch.equal(ids[trained], labels[trained])
            assert tokenizer.decode(ids[trained]) in answers  # exactly the assistant turns (+ <|end|>)
            text = tokenizer.decode(ids[mask.bool()])
            first_answer = int(trained.nonzero()[0])
            assert text.startswith(("<|user|>", "<|system|>"))
            assert tokenizer.decode(ids[:first_answer]).endswith("<|assistant|>\n")  # the prompt is all -100
            seen += 1
    assert seen > 30
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.model_type == "llama" and (output / "config.yaml").exists()


def test_overlong_examples_are_truncated_or_dropped_and_counted(tiny_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    # far over the limits below (x4: the tiny tokenizer, trained on these sentences, has most of them as tokens)
    long_text = "".join(SENTENCES) * 4
    conversations = [conversation(1), conversation(2),
                     [{"role": "user", "content": long_text}, {"role": "assistant", "content": "好的。"}],
                     [{"role": "user", "content": "请写长一点。"}, {"role": "assistant", "content": long_text}]]
    args = dict(seq2seq=True, max_source_length=40, max_target_length=24, max_length=48)
    kept, stats = tokenize_conversations(conversations, tokenizer, overlong="truncate", **args)
    assert (stats.examples, stats.over_source, stats.over_target, stats.truncated, stats.dropped) == (4, 1, 1, 2, 0)
    assert max(len(x) for x in kept["input_ids"]) == 40 and max(len(x) for x in kept["labels"]) == 24
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    source = next(x for x in kept["input_ids"] if len(x) == 40)
    assert tokenizer.decode(source).endswith("<|end|>\n<|assistant|>\n")  # still a generation prompt
    target = next(x for x in kept["labels"] if len(x) == 24)
    assert end not in target  # a cut answer does not teach stopping
    assert all(x[-2:] == [end, tokenizer.eos_token_id] for x in kept["labels"] if len(x) < 24)
    # the encoder reads the prompt exactly as chat / serving render it
    assert kept["input_ids"][0] == render_prompt(tokenizer, conversation(1)[:1], 10**6).ids
    dropped, stats = tokenize_conversations(conversations, tokenizer, overlong="drop", **args)
    assert (stats.examples, stats.truncated, stats.dropped, len(dropped)) == (2, 0, 2, 2)

    args["seq2seq"] = False
    kept, stats = tokenize_conversations(conversations, tokenizer, overlong="truncate", **args)
    assert (stats.over_length, stats.truncated, stats.dropped) == (2, 1, 1)  # the long prompt leaves no answer
    assert max(len(x) for x in kept["input_ids"]) == 48
    _, stats = tokenize_conversations(conversations, tokenizer, overlong="drop", **args)
    assert (stats.examples, stats.dropped) == (2, 2)


def long_conversation(system: bool) -> list[dict]:
    """Many turns of uneven length, with what could upset a cut between messages: an empty user turn, chat
    tokens and leading spaces / newlines inside the text, and a newest question longer than any budget."""
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    for i in range(12):
        question = ["请复述：" + SENTENCES[i], "", " 空格开头，<|end|>不是结尾", "\n\n<|assistant|>换行开头"][i % 4]
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": "".join(SENTENCES[i:i + 1 + i % 3])}]
    return messages + [{"role": "user", "content": "".join(SENTENCES)}, {"role": "assistant", "content": "好的。"}]


def rendered(tokenizer, messages: list[dict]) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def reference_prompt(tokenizer, messages: list[dict], limit: int) -> RenderedPrompt:
    """render_prompt's rule spelled out: the first of (system + turns from the oldest on, system + turns
    from the next on, ..., the newest turn alone) that fits, each rendered whole; else the last cut. With
    the number of messages left out and of tokens cut."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    candidates = [(system + turns[oldest:], oldest) for oldest in range(len(turns))] + [(turns[-1:], len(messages) - 1)]
    for candidate, dropped in candidates:
        ids = rendered(tokenizer, candidate)
        if len(ids) <= limit:
            return RenderedPrompt(ids, dropped)
    return RenderedPrompt(ids[-limit:], dropped, len(ids) - limit)


@pytest.fixture(scope="module", params=["tiny_t5", "tiny_llama", "byte_bpe", "sentencepiece"])
def any_tokenizer(request, tiny_corpus, tmp_path_factory):
    """The tokenizers of the tiny T5 and Llama, and tokenizers of the two other model types."""
    if request.param.startswith("tiny_"):
        return AutoTokenizer.from_pretrained(request.getfixturevalue(request.param))
    import train_tokenizer

    out = tmp_path_factory.mktemp(request.param) / "tokenizer"
    train_tokenizer.main(["--config", "none", "--input", str(tiny_corpus), "--vocab_size", "600", "--model_type",
                          request.param, "--output_dir", str(out), "--num_sentinels", "8", "--min_frequency", "1"])
    return AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize("system", [True, False])
def test_prompts_from_one_rendering_equal_rendering_each_trimmed_prompt(any_tokenizer, system):
    tokenizer, messages = any_tokenizer, long_conversation(system)
    prompts = ChatPrompts(tokenizer, messages)
    assert prompts.tokens is not None  # the one-rendering path, not the fallback
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    full_length = len(rendered(tokenizer, messages[:answers[-1]]))
    for limit in (6, 30, 90, full_length // 2, 10**6):  # from cutting the newest turn to keeping everything
        for end in range(1 + system, len(messages) + 1):  # at least one turn
            expected = reference_prompt(tokenizer, messages[:end], limit)
            assert prompts.render(end, limit) == expected, (limit, end)  # ids, messages dropped, tokens cut
            assert render_prompt(tokenizer, messages[:end], limit) == expected, (limit, end)
            assert expected.trimmed == (len(rendered(tokenizer, messages[:end])) > limit)
        for overlong in OVERLONG:  # the T5 SFT examples: one per answer
            examples = seq2seq_examples(messages, tokenizer, limit, 10**6, overlong)
            for index, example in zip(answers, examples, strict=True):
                whole = rendered(tokenizer, messages[:index])
                assert example["over_source"] == (len(whole) > limit)
                assert example["input_ids"] == (reference_prompt(tokenizer, messages[:index], limit).ids
                                                if example["kept"] else whole)


def test_other_chat_templates_are_rendered_prompt_by_prompt(tiny_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    # a template that is not a sequence of independent messages: the system text goes into the first turn
    tokenizer.chat_template = ("{%- for m in messages if m['role'] != 'system' -%}{{ '<|' + m['role'] + '|>' }}"
                               "{%- if loop.first and messages[0]['role'] == 'system' -%}{{ messages[0]['content'] }}"
                               "{%- endif -%}{{ m['content'] + '<|end|>' }}{%- endfor -%}"
                               "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}")
    messages = long_conversation(system=True)
    assert ChatPrompts(tokenizer, messages).tokens is None
    for limit in (6, 60, 10**6):
        assert render_prompt(tokenizer, messages, limit) == reference_prompt(tokenizer, messages, limit)


def test_sigint_then_resume_equals_uninterrupted_run(tiny_t5, sft_file, tmp_path):
    args = lambda out: args_for(tiny_t5, sft_file, out, "--max_steps", "8", "--save_steps", "8",  # noqa: E731
                                "--save_strategy", "steps", "--gradient_accumulation_steps", "2")
    reference = tmp_path / "reference"
    sft_train.main(args(reference))  # the uninterrupted run, in this process
    resumed = tmp_path / "resumed"
    code, log = run_until_interrupted(args(resumed), stop_at=3, script="sft_train.py")
    assert code == 0 and "Run the same command again to resume" in log, log[-3000:]
    stopped = latest_checkpoint(resumed)
    assert stopped is not None and int(stopped.name.split("-")[1]) < 8
    second = subprocess.run([sys.executable, "sft_train.py", *args(resumed)], cwd=REPO, capture_output=True,
                            text=True)
    assert second.returncode == 0 and f"resuming from {stopped}" in second.stderr, second.stderr[-3000:]
    losses = lambda out: [h["loss"] for h in json.loads(  # noqa: E731
        (out / "checkpoint-8" / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert losses(resumed) == losses(reference)  # every step's loss, bit-exact
    before, after = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_recipes_parse_and_script_answers_help(tmp_path, capsys):
    for recipe in ("config/sft.yaml", "config/demo/sft.yaml"):
        model_args, data, args = parse_config([sft_train.ModelArguments, sft_train.DataArguments,
                                               sft_train.TrainArguments], ["--config", str(REPO / recipe)])
        assert data.train_files and args.output_dir.endswith("sft")
    with pytest.raises(SystemExit) as done:  # in-process: the script's own entry runs in the resume test
        sft_train.main(["--help"])
    assert done.value.code == 0 and "--overlong" in capsys.readouterr().out
    with pytest.raises(UserError, match="--overlong must be truncate or drop"):
        sft_train.main(["--config", "none", "--output_dir", str(tmp_path), "--overlong", "cut"])
