"""The reply state machine (model/inference/reply.py) on its own, without a model: a fake tokenizer spells each
token as one character, and the test plays the engine, admitting the reply and feeding it tokens. Every way a
reply ends (end-of-sequence token, stop string, max_new_tokens, cancel while queued or running, an error), the
moves that are refused, and what its reader sees (pieces, the end, the finished Reply) in what order."""

from __future__ import annotations

import threading

import pytest
from transformers import GenerationConfig

from model.inference.reply import MOVES, LiveReply, Phase

END, EOS = 1, 2  # end of turn, end of sequence
VOCAB = {END: "<|end|>", EOS: "</s>", 3: "春", 4: "天", 5: "的", 6: "早", 7: "晨", 8: "。"}


class CharTokenizer:
    """Each id is one character; special tokens decode to nothing (as skip_special_tokens=True does)."""

    def decode(self, ids, skip_special_tokens=False, **kwargs) -> str:
        return "".join(VOCAB[i] for i in ids if not (skip_special_tokens and i in (END, EOS)))


def live(max_new_tokens=8, stop=(), on_finish=None) -> LiveReply:
    config = GenerationConfig(eos_token_id=[EOS, END], max_new_tokens=max_new_tokens)
    return LiveReply(CharTokenizer(), [3, 4], config, stop, on_finish=on_finish)


def feed(reply: LiveReply, tokens: list[int]) -> list[bool]:
    assert reply.admit()
    return [reply.take(token) for token in tokens]


def test_a_reply_goes_queued_prefilling_streaming_finished_and_its_reader_sees_the_pieces():
    reply = live()
    assert reply.phase is Phase.QUEUED
    assert reply.admit() and reply.phase is Phase.PREFILLING
    assert reply.take(5) is False and reply.phase is Phase.STREAMING  # the first token, from the prompt's pass
    assert [reply.take(t) for t in (6, 7, END)] == [False, False, True]
    assert reply.phases == [Phase.QUEUED, Phase.PREFILLING, Phase.STREAMING, Phase.FINISHED]
    assert list(reply.streamer) == ["的", "早", "晨"]  # one piece per token, the end of turn spelled nowhere
    assert reply.done.is_set() and reply.error is None
    assert (reply.reply.text, reply.reply.finish_reason) == ("的早晨", "stop")
    assert (reply.reply.prompt_tokens, reply.reply.completion_tokens, reply.reply.token_ids) == (2, 4, [5, 6, 7, END])


@pytest.mark.parametrize("tokens, stop, max_new_tokens, reason, text, counted", [
    ([5, 6, EOS, 7], (), 8, "stop", "的早", 3),  # EOS ends it and counts; nothing after it is taken
    ([5, 6, 7, 8], ("早晨",), 8, "stop", "的", 3),  # a stop string: the text ends before it
    ([5, 6, 7, 8], ("晨。x",), 4, "length", "的早晨。", 4),  # held back while it may begin one, released at the end
    ([5, 6, 7, 8, 5], (), 3, "length", "的早晨", 3),  # max_new_tokens
    ([END], (), 8, "stop", "", 1),  # an end of turn at once: an empty reply
])
def test_what_ends_a_reply(tokens, stop, max_new_tokens, reason, text, counted):
    reply = live(max_new_tokens, stop)
    ended = feed(reply, tokens)
    assert ended.index(True) == counted - 1 and all(ended[counted - 1:])  # once finished, later tokens change nothing
    assert (reply.reply.finish_reason, reply.reply.text, reply.reply.completion_tokens) == (reason, text, counted)
    assert "".join(reply.streamer) == text and reply.phase is Phase.FINISHED


def test_cancel_while_queued_ends_at_once_and_the_engine_never_takes_it():
    reply = live()
    reply.cancel()
    assert reply.done.is_set() and reply.phase is Phase.FINISHED  # its reader waits for nothing
    assert (reply.reply.finish_reason, reply.reply.completion_tokens) == ("cancelled", 0)
    assert not reply.admit() and reply.phases == [Phase.QUEUED, Phase.FINISHED]


def test_cancel_while_running_ends_at_the_next_step():
    between = live()
    feed(between, [5, 6])
    between.cancel()
    assert not between.done.is_set()  # the engine holds it: it ends at its next step, not at once
    assert between.end_if_cancelled() and (between.reply.finish_reason, between.reply.completion_tokens) == (
        "cancelled", 2)  # between steps: no further token is computed
    during = live()
    feed(during, [5])
    during.cancel()  # during the step that computes its next token: that token counts, then it ends
    assert during.take(6) and (during.reply.finish_reason, during.reply.text) == ("cancelled", "的早")
    running = live()
    feed(running, [5])
    assert not running.end_if_cancelled() and running.phase is Phase.STREAMING  # not asked to stop: stays


def test_a_failed_generation_ends_the_reader_with_the_error():
    reply = live()
    feed(reply, [5])
    reply.fail(RuntimeError("out of memory"))
    assert list(reply.streamer) == ["的"] and reply.done.is_set()  # the reader's loop ends
    assert isinstance(reply.error, RuntimeError) and reply.reply is None and reply.phase is Phase.FINISHED
    queued = live()
    queued.fail(ValueError("bad prompt"))  # a prompt that fails while queued (or in its prefill)
    assert queued.phases == [Phase.QUEUED, Phase.FINISHED] and isinstance(queued.error, ValueError)


def test_moves_the_machine_refuses():
    assert MOVES[Phase.FINISHED] == set() and Phase.QUEUED not in set().union(*MOVES.values())
    reply = live()
    with pytest.raises(AssertionError, match="from queued to streaming"):
        reply.take(5)  # a token before the engine took it
    reply.admit()
    with pytest.raises(AssertionError, match="from prefilling to prefilling"):
        reply.admit()  # taken twice
    reply.take(END)
    reply.cancel()
    reply.fail(RuntimeError("late"))
    assert (reply.reply.finish_reason, reply.error) == ("stop", None)  # a finished reply stays as it ended


def test_the_reply_is_final_and_counted_before_its_reader_sees_the_end():
    seen = []
    reply = live(on_finish=lambda finished: seen.append((finished, reply.done.is_set())))
    reader = threading.Thread(target=lambda: seen.append(("".join(reply.streamer), reply.reply)))
    reader.start()
    feed(reply, [5, 6, EOS])
    reader.join(timeout=10)
    (counted, done_then), (text, final) = seen
    assert counted == final and not done_then and text == final.text == "的早"


def test_a_whole_reply_arrives_as_one_piece():
    reply = live(max_new_tokens=4)
    reply.admit()
    reply.take_whole([5, 6, 7, END, 8])  # beam search: everything after the first end is dropped
    assert list(reply.streamer) == ["的早晨"]
    assert (reply.reply.finish_reason, reply.reply.token_ids) == ("stop", [5, 6, 7, END])
    cut = live(max_new_tokens=3)
    cut.admit()
    cut.take_whole([5, 6, 7])
    assert cut.reply.finish_reason == "length"
