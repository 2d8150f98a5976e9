"""Continuous batching: concurrent replies decode together, one token each per step; a reply that arrives
while the batch is decoding joins it at the next step, and one that ends leaves at once.

    batcher = ContinuousBatcher(ModelRows(model, tokenizer), max_batch=16)
    batcher.submit(reply)                     # a LiveReply: QUEUED until the next step takes it in
    decode_alone(ModelRows(model, tokenizer), reply)   # the same loop for one reply, in the caller's thread

One worker thread owns the model. Each turn of its loop: replies asked to stop leave; the queued replies (up
to `max_batch` rows in all) are admitted and their prompts read in one forward pass, which gives each its
first token; then one decoding step gives every row its next token. The model's side (caches, token choice)
is `model.inference.decoding.ModelRows`; the reply's side (phases, finish reasons, text) is
`model.inference.reply.LiveReply`. Anything with `replies`, `join`, `step` and `leave` can stand in for
`ModelRows` (the tests' fake model). Replies with different decoding options (temperature, top_p,
repetition_penalty, ...) share the batch; each row's next token is chosen with its own.

Why not transformers' continuous batching (`generate_batch`, `init_continuous_batching`): its manager takes
one generation config for every request (no per-request temperature, top_p or repetition_penalty, which the
API lets each request choose), it supports decoder-only models only (not T5), and its paged attention
computes a reply differently from `model.generate`, whose greedy replies the ones here equal.
"""

from __future__ import annotations

import atexit
import collections
import logging
import queue
import threading
from typing import Protocol

from model.inference.reply import LiveReply

logger = logging.getLogger(__name__)


class Rows(Protocol):
    """The model's side of a running batch (`ModelRows`, or a test's fake)."""

    replies: list[LiveReply]

    def join(self, replies: list[LiveReply]) -> list[int]: ...

    def step(self) -> list[int]: ...

    def leave(self, keep: list[int]) -> None: ...


class RunningBatch:
    """The loop's moves on `rows`: admit and join replies, step, and let finished replies leave."""

    def __init__(self, rows: Rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows.replies)

    def join(self, replies: list[LiveReply]) -> int:
        """Admit `replies` (those cancelled while queued are finished already) and give each its first token;
        how many were admitted."""
        admitted = [reply for reply in replies if reply.admit()]
        if not admitted:
            return 0
        try:
            tokens = self.rows.join(admitted)
        except Exception as err:
            if len(admitted) == 1:
                admitted[0].fail(err)
            else:  # read alone, so that one bad prompt fails only its own reply
                for reply in admitted:
                    self._join_alone(reply)
            self.retire()
            return len(admitted)
        for reply, token in zip(admitted, tokens):
            reply.take(token)
        self.retire()
        return len(admitted)

    def _join_alone(self, reply: LiveReply) -> None:
        try:
            token = self.rows.join([reply])[0]
        except Exception as err:
            reply.fail(err)
        else:
            reply.take(token)

    def step(self) -> None:
        """Replies asked to stop leave; every other row gets its next token; rows whose reply ended leave."""
        self.retire()
        if not self.rows.replies:
            return
        try:
            tokens = self.rows.step()
        except Exception as err:
            for reply in self.rows.replies:
                reply.fail(err)
            self.rows.leave([])
            return
        for reply, token in zip(self.rows.replies, tokens):
            reply.take(token)
        self.retire()

    def retire(self) -> None:
        keep = [row for row, reply in enumerate(self.rows.replies) if not reply.end_if_cancelled()]
        if len(keep) < len(self.rows.replies):
            self.rows.leave(keep)


def decode_alone(rows: Rows, reply: LiveReply) -> None:
    """Generate `reply` by itself (blocking): the batch loop with one row."""
    batch = RunningBatch(rows)
    batch.join([reply])
    while batch:
        batch.step()


class ContinuousBatcher:
    """Generates submitted replies in one continuous batch of at most `max_batch` rows on a worker thread.

    `steps` counts decoding steps, `largest` the most rows one step decoded, `joined_running` the replies
    that joined a batch already decoding (rather than starting one).
    """

    def __init__(self, rows: Rows, max_batch: int):
        assert max_batch >= 1
        self.batch, self.max_batch = RunningBatch(rows), max_batch
        self._queue: queue.Queue[LiveReply | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.steps = self.largest = self.joined_running = 0

    def submit(self, reply: LiveReply) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="batches", daemon=True)
                self._thread.start()
                atexit.register(self.close)
        self._queue.put(reply)

    def close(self) -> None:
        """Stop the worker once the replies it holds are done (at exit: a process that exits under a thread
        still inside torch aborts)."""
        with self._lock:
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join()

    def _work(self) -> None:
        waiting: collections.deque[LiveReply] = collections.deque()
        closing = False
        while not (closing and not self.batch and not waiting):
            try:
                closing = self._gather(waiting, block=not self.batch and not waiting) or closing
                room = self.max_batch - len(self.batch)
                joining = [waiting.popleft() for _ in range(min(room, len(waiting)))]
                if joining:
                    running = bool(self.batch)
                    admitted = self.batch.join(joining)
                    self.joined_running += admitted if running else 0
                if self.batch:
                    self.largest = max(self.largest, len(self.batch))
                    self.steps += 1
                    self.batch.step()
            except BaseException as err:  # never leave a reader waiting, never let the worker die
                logger.exception("batch failed")
                for reply in [*self.batch.rows.replies, *waiting]:
                    reply.fail(err)
                waiting.clear()
                self.batch.rows.leave([])

    def _gather(self, waiting: collections.deque, block: bool) -> bool:
        """Move what was submitted into `waiting` (waiting for the first when `block`); True once closed."""
        try:
            item = self._queue.get(block=block)
            while True:
                if item is None:
                    return True
                waiting.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            return False
