"""Continuous batching (model/inference/batching.py, decoding.py): a reply that arrives while a batch decodes joins
it at the next step, a finished or cancelled one leaves without waiting for the rest, a queued one cancelled
never runs, one bad prompt fails alone. The scheduling is checked on a fake model (a test double of the model's
next-token function, where nothing depends on the model); what depends on the model (caches padded and merged,
T5's cross-attention, each row's own decoding options) on the tiny Llama, T5 and Mixtral (mixture of experts):
greedy replies in a batch are the tokens of the same request served alone, which are `model.generate`'s."""

from __future__ import annotations

import asyncio
import copy
import threading
import time

import pytest
import torch
from transformers import GenerationConfig

import model.inference.decoding as decoding
from model.inference.batching import ContinuousBatcher, RunningBatch, decode_alone
from model.inference.decoding import ModelRows
from model.inference.generation import load_for_inference
from model.inference.reply import LiveReply, Phase
from model.inference.service import ChatService, DecodingOptions
from utils.tokenization.chat_format import render_prompt

EOS = 2
# The largest difference allowed between a row's logits in a batch and the same request's alone (see
# test_batched_greedy_replies_equal_the_same_requests_alone); seen: below 1e-6.
TOLERANCE = 1e-4


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=False, **kwargs) -> str:
        return "".join(chr(0x4E00 + i) for i in ids if i != EOS)


def next_token(prompt: list[int], made: int) -> int:
    """The fake model: a row's next token depends on its prompt and how many tokens it has, nothing else."""
    return 3 + (prompt[0] * 7 + made) % 50


class FakeRows:
    """The model's side of a batch as a test double. `log` records each pass: ("join", prompts) or ("step",
    the prompts of the rows it decoded). With `gate`, each step waits for the test to release it."""

    def __init__(self, gate: threading.Semaphore | None = None, fail_step: bool = False):
        self.replies: list[LiveReply] = []
        self.log: list[tuple[str, list[int]]] = []
        self.gate, self.fail_step = gate, fail_step
        self.stepping = threading.Event()  # set while a step waits at the gate

    def join(self, replies):
        if any(reply.prompt_ids[0] < 0 for reply in replies):
            raise IndexError("no such token")
        self.log.append(("join", [r.prompt_ids[0] for r in replies]))
        self.replies += replies
        return [next_token(r.prompt_ids, 0) for r in replies]

    def step(self):
        if self.gate is not None:
            self.stepping.set()
            assert self.gate.acquire(timeout=30), "the test never released the step"
            self.stepping.clear()
        if self.fail_step:
            self.fail_step = False
            raise RuntimeError("out of memory")
        self.log.append(("step", [r.prompt_ids[0] for r in self.replies]))
        return [next_token(r.prompt_ids, len(r.token_ids)) for r in self.replies]

    def leave(self, keep):
        self.replies = [self.replies[i] for i in keep]


def fake_reply(first: int, max_new_tokens: int = 4) -> LiveReply:
    return LiveReply(CharTokenizer(), [first, 9], GenerationConfig(eos_token_id=EOS, max_new_tokens=max_new_tokens))


def solo_tokens(first: int, max_new_tokens: int) -> list[int]:
    return [next_token([first], n) for n in range(max_new_tokens)]


def wait_until(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_replies_join_between_steps_and_leave_when_they_end():
    rows = FakeRows()
    batch = RunningBatch(rows)
    a, b, c = fake_reply(1, 5), fake_reply(2, 2), fake_reply(3, 3)
    batch.join([a])
    batch.step()
    batch.join([b, c])  # arrive while a decodes: one pass reads both prompts, then the next step has three rows
    while batch:
        batch.step()
    assert rows.log == [("join", [1]), ("step", [1]), ("join", [2, 3]), ("step", [1, 2, 3]), ("step", [1, 3]),
                        ("step", [1])]  # b leaves after 2 tokens, c after 3, without waiting for a
    for reply, first, length in ((a, 1, 5), (b, 2, 2), (c, 3, 3)):
        assert reply.token_ids == solo_tokens(first, length) and reply.reply.finish_reason == "length"
    alone = fake_reply(1, 5)
    decode_alone(FakeRows(), alone)
    assert alone.token_ids == a.token_ids


def test_a_cancelled_row_leaves_before_the_next_step_and_a_bad_prompt_fails_alone():
    rows = FakeRows()
    batch = RunningBatch(rows)
    a, b, bad = fake_reply(1, 9), fake_reply(2, 9), fake_reply(-1, 9)
    batch.join([a, b, bad])  # the pass fails: each is read alone, so only the bad prompt's reply fails
    assert isinstance(bad.error, IndexError) and a.phase is b.phase is Phase.STREAMING
    batch.step()
    a.cancel()
    batch.step()
    assert rows.log[-1] == ("step", [2]) and a.reply.finish_reason == "cancelled"
    assert a.reply.completion_tokens == 2  # no token was computed for it after the cancel


def test_the_batcher_takes_arrivals_into_the_running_batch_and_lets_finished_ones_go():
    gate = threading.Semaphore(0)
    rows = FakeRows(gate)
    batcher = ContinuousBatcher(rows, max_batch=2)
    try:
        long, short, third, queued = fake_reply(1, 6), fake_reply(2, 2), fake_reply(3, 2), fake_reply(4, 2)
        batcher.submit(long)
        wait_until(rows.stepping.is_set, "the first step did not start")
        batcher.submit(short)
        batcher.submit(third)  # beyond max_batch: waits in line while two rows decode
        gate.release()  # long's step ends; short joins at the next turn, third waits
        wait_until(lambda: short.phase is Phase.STREAMING and rows.stepping.is_set(), "short did not join")
        assert long.phase is Phase.STREAMING and third.phase is Phase.QUEUED
        batcher.submit(queued)
        queued.cancel()  # cancelled while queued: ends at once, never joins
        assert queued.done.is_set() and queued.reply.completion_tokens == 0
        while not (long.done.is_set() and third.done.is_set()):
            gate.release()
            time.sleep(0.005)
        assert short.done.is_set() and not any(4 in prompts for _, prompts in rows.log)
        assert [prompts for kind, prompts in rows.log if kind == "join"] == [[1], [2], [3]]
        assert max(len(prompts) for _, prompts in rows.log) == 2
        short_left = next(i for i, (kind, prompts) in enumerate(rows.log) if kind == "step" and 2 not in prompts
                          and i > rows.log.index(("join", [2])))
        assert rows.log.index(("join", [3])) < short_left + 2, "third took short's row as soon as it left"
        assert batcher.joined_running == 2 and batcher.largest == 2
        for reply, first, length in ((long, 1, 6), (short, 2, 2), (third, 3, 2)):
            assert reply.token_ids == solo_tokens(first, length)
    finally:
        for _ in range(50):
            gate.release()
        batcher.close()


def test_a_failed_step_fails_its_rows_and_the_batcher_keeps_serving():
    rows = FakeRows(fail_step=True)
    batcher = ContinuousBatcher(rows, max_batch=4)
    first = fake_reply(1, 3)
    batcher.submit(first)
    assert first.done.wait(30) and isinstance(first.error, RuntimeError)
    later = fake_reply(2, 3)
    batcher.submit(later)
    assert later.done.wait(30) and later.token_ids == solo_tokens(2, 3)
    batcher.close()
    assert not batcher._thread.is_alive()


@pytest.fixture(scope="module")
def models(tiny_t5, tiny_llama, tiny_mixtral):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from intra-op threads
    yield {"t5": load_for_inference(str(tiny_t5)), "llama": load_for_inference(str(tiny_llama)),
           "mixtral": load_for_inference(str(tiny_mixtral))}
    torch.set_num_threads(previous)


PROMPTS = ["春天的早晨", "小明每天骑自行车去学校", "图书馆里很安静", "他用 Python 写了一个小程序", "茶叶的种类很多",
           "老师说：“学习语言最重要的是坚持每天练习。”"]


def requests(model, tokenizer):
    """(prompt ids, generation config) of each request: different lengths, options and reply lengths."""
    options = [dict(max_new_tokens=12), dict(max_new_tokens=20, repetition_penalty=1.0), dict(max_new_tokens=7),
               dict(max_new_tokens=16, repetition_penalty=1.3), dict(max_new_tokens=20), dict(max_new_tokens=9)]
    sentinels = [i for t, i in tokenizer.get_vocab().items() if t.startswith("<extra_id_")]
    out = []
    for text, option in zip(PROMPTS, options):
        config = DecodingOptions(**option).generation_config(model.generation_config)
        # the tiny models often end at once: keep them writing, so that rows overlap for several steps
        config.suppress_tokens = sentinels + sorted(LiveReply(tokenizer, [], config).eos)
        out.append((render_prompt(tokenizer, [{"role": "user", "content": text}], 100).ids, config))
    return out


@pytest.fixture
def logits_of(monkeypatch):
    """reply -> [the float32 logits each of its tokens was chosen from], as `choose_tokens` receives them."""
    seen: dict[LiveReply, list[torch.Tensor]] = {}  # the replies themselves: their ids could be reused
    last: list[torch.Tensor] = []
    choose, join, step = decoding.choose_tokens, ModelRows.join, ModelRows.step

    def recording(logits, *rest):
        last[:] = [logits.clone()]
        return choose(logits, *rest)

    def record(replies):
        for row, reply in enumerate(replies):
            seen.setdefault(reply, []).append(last[0][row])

    def joining(self, replies):
        tokens = join(self, replies)
        record(replies)  # the pass's rows are the joining replies
        return tokens

    def stepping(self):
        replies = list(self.replies)
        tokens = step(self)
        record(replies)
        return tokens

    monkeypatch.setattr(decoding, "choose_tokens", recording)
    monkeypatch.setattr(ModelRows, "join", joining)
    monkeypatch.setattr(ModelRows, "step", stepping)
    return seen.__getitem__


@pytest.mark.parametrize("kind", ["llama", "t5", "mixtral"])
def test_alone_a_reply_is_model_generate_bit_for_bit(models, kind, logits_of):
    model, tokenizer = models[kind]
    for ids, config in requests(model, tokenizer)[:3]:
        reply = LiveReply(tokenizer, ids, config)
        decode_alone(ModelRows(model, tokenizer), reply)
        config = copy.deepcopy(config)
        config.output_logits = config.return_dict_in_generate = True
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([ids]), generation_config=config)
        new = out.sequences[0, 1:] if kind == "t5" else out.sequences[0, len(ids):]
        assert reply.token_ids == new.tolist()
        assert all(torch.equal(mine, theirs[0]) for mine, theirs in zip(logits_of(reply), out.logits, strict=True))


@pytest.mark.parametrize("kind", ["llama", "t5", "mixtral"])
def test_batched_greedy_replies_equal_the_same_requests_alone(models, kind, logits_of):
    """Replies join a running batch at different steps, with their own options and lengths; one is cancelled
    midway. Each is the token sequence it gets alone, and its logits stay within `TOLERANCE` of those alone.
    Every pass mixes rows of different widths (padded caches, and for T5 padded encoder outputs).

    Why a tolerance and not equality: in a batch, a row's matrix products run with other rows (M = rows, not 1)
    and its attention runs over the padded width; masked columns weigh exactly 0, but the BLAS kernels may group
    the float32 sums of a row differently. Each such sum of n terms then differs by at most ~n * 2^-24 of the
    sum of its terms' magnitudes; over the tiny models' 2 layers (widths <= 256, logits of magnitude < 20) that
    is far below 1e-3, while a greedy choice flips only where the two best logits are closer than the
    difference. Where the computation is the same (a request read alone, then decoded in a batch of one), the
    logits are equal bit for bit (test above)."""
    model, tokenizer = models[kind]
    wanted = requests(model, tokenizer)
    alone = [LiveReply(tokenizer, ids, config) for ids, config in wanted]
    for reply in alone:
        decode_alone(ModelRows(model, tokenizer), reply)
    replies = [LiveReply(tokenizer, ids, copy.deepcopy(config)) for ids, config in wanted]
    batch = RunningBatch(ModelRows(model, tokenizer))
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4], 6: [5]}  # step -> the requests that arrive before it
    for step in range(40):
        batch.join([replies[index] for index in arrivals.get(step, [])])
        if step == 8:
            replies[4].cancel()
        batch.step()
    assert not batch and max(len(r.token_ids) for r in replies) > 10
    for index, (reply, solo) in enumerate(zip(replies, alone)):
        assert reply.token_ids == solo.token_ids[:len(reply.token_ids)], index
        worst = max(float((a - b).abs().max()) for a, b in zip(logits_of(reply), logits_of(solo)))
        assert worst <= TOLERANCE, (index, worst)
    assert [r.reply.finish_reason for r in replies] == ["length"] * 4 + ["cancelled", "length"]
    assert replies[4].reply.completion_tokens < alone[4].reply.completion_tokens


@pytest.mark.parametrize("kind", ["llama", "t5", "mixtral"])
def test_a_request_joins_a_running_batch_and_leaves_before_it_ends(models, kind):
    """Through the service, as the server runs it: a short request sent while a long one streams joins its batch
    at once (it does not wait for the long reply to end), finishes first, and both equal their replies alone."""
    model, tokenizer = models[kind]
    (long_ids, long_config), (short_ids, short_config) = requests(model, tokenizer)[1:3]
    long_config.max_new_tokens = 100  # long enough to be streaming still when the short one has come and gone
    service = ChatService(model, tokenizer, max_concurrent=4, batched=True)
    finished = []

    async def read(ids, config, after: asyncio.Event | None, started: asyncio.Event | None):
        if after is not None:
            await after.wait()
        async with service.stream(service.prepare_prompt(ids, config)) as stream:
            async for _ in stream:
                if started is not None:
                    started.set()
        finished.append(ids)
        return stream.reply

    async def both():
        streaming = asyncio.Event()
        return await asyncio.gather(read(long_ids, long_config, None, streaming),
                                    read(short_ids, short_config, streaming, None))

    long, short = asyncio.run(both())
    service.batcher.close()
    assert finished == [short_ids, long_ids] and service.batcher.joined_running == 1
    assert service.batcher.largest == 2 and short.completion_tokens < long.completion_tokens
    for reply, ids, config in ((long, long_ids, long_config), (short, short_ids, short_config)):
        alone = LiveReply(tokenizer, ids, config)
        decode_alone(ModelRows(model, tokenizer), alone)
        assert reply == alone.reply
