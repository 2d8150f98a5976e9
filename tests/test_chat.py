"""chat.py and model/inference/streaming.py: streamed replies equal plain generation, the whole conversation is sent
(oldest turns dropped to fit), decoding options reach generation, and the CLI works in a real terminal."""

from __future__ import annotations

import os
import sys

import pexpect
import pytest
import torch
from conftest import REPO

import chat
from model.inference.generation import load_for_inference
from model.inference.streaming import (
    DecodingOptions,
    PromptTooLong,
    ReplyStream,
    fit_prompt,
    generate_reply,
    prompt_budget,
)
from utils.config import parse_config
from utils.errors import UserError

MESSAGES = ["春天的早晨", "他用 Python 写了一个小程序", "老师说：“学习语言最重要的是坚持每天练习。”", "hello 😀"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy CI machine OpenMP's waiting makes
    them several times slower; the previous setting is restored for the other test modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def models(tiny_t5, tiny_llama):
    return {"t5": load_for_inference(str(tiny_t5)), "llama": load_for_inference(str(tiny_llama))}


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_stream_pieces_join_to_the_plain_reply(models, kind):
    model, tokenizer = models[kind]
    greedy = DecodingOptions(max_new_tokens=24).generation_config(model.generation_config)
    beams = DecodingOptions(max_new_tokens=12, num_beams=3).generation_config(model.generation_config)
    for message in MESSAGES:
        ids, trimmed = fit_prompt(tokenizer, [{"role": "user", "content": message}], 200)
        assert not trimmed
        stream = ReplyStream(model, tokenizer, ids, greedy)
        pieces = list(stream)
        plain = generate_reply(model, tokenizer, ids, greedy)
        assert len(pieces) > 1, "a reply arrives in several pieces, not at the end"
        assert "".join(pieces) == stream.reply.text == plain.text
        assert stream.reply.completion_tokens == plain.completion_tokens
        assert stream.reply.finish_reason == plain.finish_reason
        # transformers cannot stream beam search: the reply arrives whole, and equals model.generate's.
        stream = ReplyStream(model, tokenizer, ids, beams)
        assert list(stream) in ([stream.reply.text], [])
        direct = model.generate(input_ids=torch.tensor([ids]), num_beams=3, max_new_tokens=12)
        new = direct[0, 1:] if kind == "t5" else direct[0, len(ids):]
        assert stream.reply.text == tokenizer.decode(new, skip_special_tokens=True)


def test_leaving_a_stream_early_stops_its_generation(models):
    model, tokenizer = models["llama"]
    config = DecodingOptions(max_new_tokens=200, repetition_penalty=1.0).generation_config(model.generation_config)
    ids, _ = fit_prompt(tokenizer, [{"role": "user", "content": MESSAGES[0]}], 50)
    stream = ReplyStream(model, tokenizer, ids, config)
    for number, _ in enumerate(stream):
        if number == 2:
            break
    assert stream.reply.finish_reason == "cancelled"
    assert stream.reply.completion_tokens < 200


def test_decoding_options_map_onto_the_generation_config(models):
    model, _ = models["llama"]
    base = model.generation_config
    default = DecodingOptions().generation_config(base)
    assert not default.do_sample and (default.num_beams or 1) == 1 and default.repetition_penalty == 1.1  # the model's
    sampled = DecodingOptions(temperature=0.7, top_p=0.9).generation_config(base)
    assert (sampled.do_sample, sampled.temperature, sampled.top_p) == (True, 0.7, 0.9)
    assert DecodingOptions(temperature=0, top_k=5).generation_config(base).do_sample is False
    assert DecodingOptions(num_beams=4, repetition_penalty=1.3).generation_config(base).num_beams == 4
    request = DecodingOptions(max_new_tokens=30, top_p=0.8).updated(max_new_tokens=9, top_p=None)
    assert (request.max_new_tokens, request.top_p) == (9, 0.8)  # None in a request keeps the default
    for bad in ({"top_p": 1.5}, {"temperature": -1}, {"max_new_tokens": 0}, {"num_beams": 0}):
        with pytest.raises(ValueError, match=f"--{next(iter(bad))}"):
            DecodingOptions(**bad)
    assert not base.do_sample and base.temperature is None, "the model's own config is never modified"


def test_sampling_follows_the_seed_and_differs_from_greedy(models):
    model, tokenizer = models["llama"]
    ids, _ = fit_prompt(tokenizer, [{"role": "user", "content": MESSAGES[0]}], 50)
    sampled = DecodingOptions(max_new_tokens=16, temperature=1.5, top_k=50).generation_config(model.generation_config)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append("".join(ReplyStream(model, tokenizer, ids, sampled)))
    greedy = generate_reply(model, tokenizer, ids, DecodingOptions(max_new_tokens=16).generation_config(
        model.generation_config))
    assert runs[0] == runs[1]
    assert runs[0] != greedy.text


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_the_whole_conversation_is_sent_and_reset_clears_it(models, kind):
    model, tokenizer = models[kind]
    session = chat.ChatSession(model, tokenizer, DecodingOptions(max_new_tokens=8), system="你是一个助手。")
    system = {"role": "system", "content": "你是一个助手。"}
    first = "".join(session.send("第一个问题")).strip()
    assert session.last_prompt_ids == tokenizer.apply_chat_template(
        [system, {"role": "user", "content": "第一个问题"}], add_generation_prompt=True, return_dict=False)
    "".join(session.send("第二个问题"))
    expected = [system, {"role": "user", "content": "第一个问题"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "第二个问题"}]
    assert session.last_prompt_ids == tokenizer.apply_chat_template(expected, add_generation_prompt=True,
                                                                    return_dict=False)
    assert len(session.history) == 4 and not session.trimmed
    session.reset()
    "".join(session.send("第三个问题"))
    assert session.last_prompt_ids == tokenizer.apply_chat_template(
        [system, {"role": "user", "content": "第三个问题"}], add_generation_prompt=True, return_dict=False)


def test_long_conversations_drop_the_oldest_turns_and_keep_the_system(models):
    model, tokenizer = models["llama"]  # 256 positions: with 200 new tokens a prompt has 56
    session = chat.ChatSession(model, tokenizer, DecodingOptions(max_new_tokens=200), system="助手")
    assert session.budget == prompt_budget(model, tokenizer, 200) == 56
    for turn in range(4):
        "".join(session.send(f"第{turn}轮：图书馆里很安静"))
    assert session.trimmed and len(session.history) == 8
    prompt = tokenizer.decode(session.last_prompt_ids)
    assert len(session.last_prompt_ids) <= 56
    assert prompt.startswith("<|system|>\n助手<|end|>") and "第3轮：图书馆里很安静<|end|>\n<|assistant|>\n" in prompt
    assert "第0轮" not in prompt
    with pytest.raises(PromptTooLong):
        "".join(session.send("很长的消息" * 40))
    assert len(session.history) == 8, "a refused turn is not added"


def test_one_message_mode_prints_the_reply(models, tiny_t5, capsys):
    model, tokenizer = models["t5"]
    expected = "".join(chat.ChatSession(model, tokenizer, DecodingOptions(max_new_tokens=10)).send("你好")).strip()
    chat.main(["--config", "none", "--model_name_or_path", str(tiny_t5), "--message", "你好", "--max_new_tokens", "10"])
    assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(UserError, match="message"):
        chat.main(["--config", "none", "--model_name_or_path", str(tiny_t5), "--message", "长" * 2000])


def test_chat_in_a_terminal_streams_keeps_history_resets_and_exits(models, tiny_llama):
    model, tokenizer = models["llama"]
    reference = chat.ChatSession(model, tokenizer, DecodingOptions(max_new_tokens=12))
    expected = ["".join(reference.send(text)).strip() for text in ("春天的早晨", "小明每天骑自行车")]
    reference.reset()
    fresh = "".join(reference.send("小明每天骑自行车")).strip()

    env = {**os.environ, "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "TERM": "dumb", "OMP_NUM_THREADS": "1"}
    child = pexpect.spawn(sys.executable, ["chat.py", "--config", "none", "--model_name_or_path", str(tiny_llama),
                                           "--max_new_tokens", "12"], cwd=str(REPO), env=env, encoding="utf-8",
                          timeout=120, dimensions=(40, 200))
    try:
        child.expect_exact("user> ")
        replies = []
        for text in ("春天的早晨", "小明每天骑自行车", "/reset", "小明每天骑自行车"):
            child.sendline(text)
            if text == "/reset":
                child.expect_exact("[conversation cleared]\r\nuser> ")
                continue
            child.expect_exact("assistant> ")
            child.expect_exact("\r\nuser> ")
            replies.append(child.before.strip())
        assert replies == [*expected, fresh]
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("script", ["chat", "serve"])
def test_recipes_parse_and_help_lists_the_decoding_flags(script, capsys):
    import importlib

    module = importlib.import_module(script)
    arguments = module.ChatArguments if script == "chat" else module.ServeArguments
    parsed, decoding = parse_config([arguments, DecodingOptions], ["--config", str(REPO / "config" / f"{script}.yaml")])
    assert parsed.model_name_or_path == "model_save" and decoding == DecodingOptions()
    parsed, decoding = parse_config([arguments, DecodingOptions],
                                    ["--config", str(REPO / "config" / "demo" / f"{script}.yaml")])
    assert parsed.model_name_or_path == "model_save/demo" and decoding.max_new_tokens == 64
    with pytest.raises(SystemExit):
        module.main(["--help"])
    shown = capsys.readouterr().out
    assert all(flag in shown for flag in ("--model_name_or_path", "--temperature", "--top_p", "--top_k",
                                          "--num_beams", "--repetition_penalty", "--max_new_tokens"))
