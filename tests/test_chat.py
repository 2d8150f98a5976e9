"""chat.py, model/inference/streaming.py and the inference service (model/inference/service.py, without HTTP):
streamed replies equal plain generation, the whole conversation is sent (oldest turns dropped to fit), decoding
options reach generation, the service's slots are given back after a cancel, and the CLI works in a real terminal."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
import time

import pexpect
import pytest
import torch
from conftest import REPO, served_copy
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

import chat
from model.inference.generation import load_for_inference
from model.inference.reply import why_empty
from model.inference.service import ChatService, DecodingOptions, PromptTooLong, ReplyTooLong
from model.inference.streaming import ReplyStream, generate_reply
from utils.config import parse_config
from utils.errors import UserError
from utils.tokenization.chat_format import render_prompt

pytestmark = pytest.mark.slow

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
    # a tiny T5 pretrained only on span corruption may answer in sentinels alone (an empty reply): leave
    # them out, so there is text to stream
    greedy.suppress_tokens = [i for t, i in tokenizer.get_vocab().items() if t.startswith("<extra_id_")] or None
    beams = DecodingOptions(max_new_tokens=12, num_beams=3).generation_config(model.generation_config)
    for message in MESSAGES:
        prompt = render_prompt(tokenizer, [{"role": "user", "content": message}], 200)
        assert not prompt.trimmed
        ids = prompt.ids
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
    ids = render_prompt(tokenizer, [{"role": "user", "content": MESSAGES[0]}], 50).ids
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
    ids = render_prompt(tokenizer, [{"role": "user", "content": MESSAGES[0]}], 50).ids
    sampled = DecodingOptions(max_new_tokens=16, temperature=1.5, top_k=50).generation_config(model.generation_config)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append("".join(ReplyStream(model, tokenizer, ids, sampled)))
    greedy = generate_reply(model, tokenizer, ids, DecodingOptions(max_new_tokens=16).generation_config(
        model.generation_config))
    assert runs[0] == runs[1]
    assert runs[0] != greedy.text


def greedy_reply(model, tokenizer, messages, max_new_tokens):
    """The greedy reply by model.generate through the streaming layer, without the service."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    return generate_reply(model, tokenizer, ids, DecodingOptions(max_new_tokens=max_new_tokens).generation_config(
        model.generation_config))


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_service_completes_and_streams_the_greedy_reply(models, kind):
    model, tokenizer = models[kind]
    service = ChatService(model, tokenizer, DecodingOptions(max_new_tokens=20), max_concurrent=2)
    messages = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": MESSAGES[1]}]
    expected = greedy_reply(model, tokenizer, messages, 20)
    prepared = service.prepare(messages, service.generation_config())
    assert prepared.ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert not prepared.trimmed and prepared.config.max_new_tokens == 20

    async def both():
        reply = await service.complete(prepared)
        async with service.stream(prepared) as stream:
            pieces = [piece async for piece in stream]
        return reply, pieces, stream.reply

    reply, pieces, streamed = asyncio.run(both())
    assert reply == expected
    assert len(pieces) > 1 and "".join(pieces) == streamed.text == expected.text
    assert streamed.finish_reason == expected.finish_reason
    deadline = time.monotonic() + 30
    while service.active:  # a stream is counted until its generation thread has ended
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert list(service.recent) == [expected, expected] and service.peak_active == 1
    # A request's options override the defaults, and the synchronous stream gives the same reply.
    config = service.generation_config(max_new_tokens=6, repetition_penalty=1.0)
    assert (config.max_new_tokens, config.repetition_penalty) == (6, 1.0) and not config.do_sample
    assert "".join(service.reply_stream(prepared)) == expected.text


def test_service_reply_and_prompt_lengths(models):
    model, tokenizer = models["llama"]  # 256 positions
    service = ChatService(model, tokenizer)
    assert service.reply_limit == 248 and service.generation_config().max_new_tokens == 128  # half the context
    assert service.generation_config(max_new_tokens=248).max_new_tokens == 248
    for asked in (0, 249):
        with pytest.raises(ReplyTooLong) as caught:
            service.generation_config(max_new_tokens=asked)
        assert (caught.value.asked, caught.value.limit) == (asked, 248)
    with pytest.raises(ReplyTooLong):
        ChatService(model, tokenizer, DecodingOptions(max_new_tokens=250))
    # The budget is what the reply leaves; the oldest turns go first, the system message stays.
    config = service.generation_config(max_new_tokens=200)
    system = {"role": "system", "content": "助手"}
    turns = [{"role": role, "content": f"第{n}轮：图书馆里很安静"} for n in range(4) for role in ("user", "assistant")]
    prepared = service.prepare([system, *turns[:-1]], config)
    assert prepared.budget == 56 and prepared.trimmed
    fitting = [start for start in range(len(turns) - 1) if len(tokenizer.apply_chat_template(
        [system, *turns[start:-1]], add_generation_prompt=True, return_dict=False)) <= 56]
    assert fitting and fitting[0] > 0
    assert prepared.ids == tokenizer.apply_chat_template([system, *turns[fitting[0]:-1]], add_generation_prompt=True,
                                                         return_dict=False)
    with pytest.raises(PromptTooLong) as caught:
        service.prepare([system, {"role": "user", "content": "很长的消息" * 40}], config)
    assert caught.value.budget == 56 and caught.value.prompt_tokens > 56
    # A system message that fits alone but not with the last message is refused too, not dropped: a reply
    # without it would ignore the instructions (or rag_chat.py's passages) it holds.
    long_system = {"role": "system", "content": "资料：图书馆里很安静。" * 6}
    last = {"role": "user", "content": "安静吗"}
    assert len(tokenizer.apply_chat_template([last], add_generation_prompt=True, return_dict=False)) <= 56
    needed = len(tokenizer.apply_chat_template([long_system, last], add_generation_prompt=True, return_dict=False))
    assert needed > 56
    with pytest.raises(PromptTooLong, match="the system message with the last message needs") as caught:
        service.prepare([long_system, *turns[:3], last], config)
    assert (caught.value.prompt_tokens, caught.value.budget) == (needed, 56)
    t5 = ChatService(*models["t5"])
    assert t5.prompt_budget(200) == t5.context_length == t5.reply_limit  # an encoder reads the whole context


def test_service_slots_are_released_after_a_cancel(models):
    model, tokenizer = models["llama"]
    service = ChatService(model, tokenizer, DecodingOptions(max_new_tokens=200, repetition_penalty=1.0),
                          max_concurrent=1)
    prepared = service.prepare([{"role": "user", "content": MESSAGES[0]}], service.generation_config())
    short = service.prepare([{"role": "user", "content": MESSAGES[0]}], service.generation_config(max_new_tokens=4))

    async def client_gone():
        return True

    async def run():
        async with service.stream(prepared) as stream:  # a client that leaves after two pieces
            async for number, _ in aenumerate(stream):
                if number == 1:
                    break
        # The one slot is free again: a request waiting in line would otherwise wait forever.
        assert (await asyncio.wait_for(service.complete(short), 60)).completion_tokens == 4
        gone = await asyncio.wait_for(service.complete(prepared, client_gone), 60)
        waiting = asyncio.create_task(service.complete(short))  # gives up while in line for the slot
        async with service.stream(prepared) as stream:
            await asyncio.sleep(0.05)
            waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return gone, await asyncio.wait_for(service.complete(short), 60)

    gone, last = asyncio.run(run())
    assert gone.finish_reason == "cancelled" and gone.completion_tokens < 200
    assert last.completion_tokens == 4 and not service.slots.locked()
    deadline = time.monotonic() + 30
    while service.active:
        assert time.monotonic() < deadline, "a cancelled generation did not end"
        time.sleep(0.01)
    cancelled = [reply for reply in service.recent if reply.finish_reason == "cancelled"]
    assert len(cancelled) == 2 and all(reply.completion_tokens < 200 for reply in cancelled)
    assert service.peak_active <= 2  # a cancelled stream's last token may overlap the next generation


async def aenumerate(iterable):
    number = 0
    async for item in iterable:
        yield number, item
        number += 1


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
    assert session.budget == session.service.prompt_budget(200) == 56
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
    session = chat.ChatSession(model, tokenizer, DecodingOptions(max_new_tokens=10))
    # the tiny T5 may answer with a sentinel alone (decoded away): then the command says why its reply is empty
    expected = "".join(session.send("你好")).strip() or f"[empty reply: {why_empty(session.last_reply, tokenizer)}]"
    chat.main(["--config", "none", "--model_name_or_path", str(tiny_t5), "--message", "你好", "--max_new_tokens", "10"])
    assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(UserError, match="message"):
        chat.main(["--config", "none", "--model_name_or_path", str(tiny_t5), "--message", "长" * 2000])


def test_an_empty_reply_says_why(tiny_llama, tmp_path, capsys):
    """A model that writes only special tokens (decoded away) until the length limit, or ends its turn at once:
    chat.py says so instead of printing an empty line."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ends = GenerationConfig.from_pretrained(tiny_llama).eos_token_id
    ends = set(ends if isinstance(ends, list) else [ends])
    vocab = range(AutoConfig.from_pretrained(tiny_llama).vocab_size)
    only_special = served_copy(tiny_llama, tmp_path / "special",
                               [i for i in vocab if i not in tokenizer.all_special_ids or i in ends])
    only_end = served_copy(tiny_llama, tmp_path / "end", [i for i in vocab if i not in ends])
    for model, expected in (
            (only_special, r"\[empty reply: the model wrote only special tokens \(<.+>\) until the limit of 5 new "
                           r"tokens \(max_new_tokens\)\]\n"),
            (only_end, r"\[empty reply: the model ended its turn at once\]\n")):
        chat.main(["--config", "none", "--model_name_or_path", str(model), "--message", "你好",
                   "--max_new_tokens", "5"])
        shown = capsys.readouterr().out
        assert re.fullmatch(expected, shown), shown


@pytest.mark.parametrize("script", ["chat", "serve"])
def test_a_reply_longer_than_the_model_can_give_is_refused_at_start(script, tiny_llama):
    import importlib

    module = importlib.import_module(script)  # 256 positions: replies of at most 248 tokens
    with pytest.raises(UserError, match="max_new_tokens") as caught:
        module.main(["--config", "none", "--model_name_or_path", str(tiny_llama), "--max_new_tokens", "249"])
    assert "1 to 248 tokens" in str(caught.value) and "--max_new_tokens to 248" in str(caught.value)


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


def test_generation_threads_end_before_the_process_does(models, monkeypatch):
    """A reply is finished before `generate` returns, and a process exiting under a thread still inside torch
    aborts (chat.py --message did, about one run in two): a reply's own thread is one the interpreter waits for,
    and the server's batch worker is closed (registered at exit) once its batch is done."""
    model, tokenizer = models["llama"]
    solo = ChatService(model, tokenizer, DecodingOptions(max_new_tokens=8))
    prepared = solo.prepare([{"role": "user", "content": MESSAGES[0]}], solo.generation_config())
    started, start = [], threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda thread: (started.append(thread), start(thread))[1])
    expected = "".join(solo.reply_stream(prepared))
    assert [thread.name for thread in started] == ["generate"] and not started[0].daemon

    batched = ChatService(model, tokenizer, DecodingOptions(max_new_tokens=8), max_concurrent=2, batched=True)
    assert asyncio.run(batched.complete(prepared)).text == expected
    worker = batched.batcher._thread
    assert worker is not None and worker.is_alive()
    batched.batcher.close()
    assert not worker.is_alive()
    batched.batcher.close()  # closing again has nothing to stop


def test_a_device_torch_cannot_use_is_refused_before_the_model_loads(tiny_t5):
    """`--device cuda` on a machine without CUDA (or a GPU index past the last) ended in torch's traceback
    from inside the load; an unknown name too."""
    from conftest import run_script

    past_the_last = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
    for device, message in ((past_the_last, f"--device {past_the_last}: torch sees"),
                            ("gpu", "--device must be cpu, cuda or cuda:N, not 'gpu'")):
        result = run_script("chat.py", "--model_name_or_path", str(tiny_t5), "--message", "你好", "--device", device,
                            check=False)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert "Loading weights" not in result.stderr
