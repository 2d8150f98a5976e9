"""Dynamic batching: concurrent replies generated together, each with its own stream, stop and cancel.

    scheduler = BatchScheduler(model, tokenizer, max_batch=16)
    stream = ReplyStream(model, tokenizer, prompt_ids, config, scheduler=scheduler)
    for piece in stream: ...                    # generated in a batch with whatever else is waiting

One worker thread owns the model. Streams that arrive while it is busy, or soon after the first one when it
is idle (within `wait_s`, or up to `max_wait_s` while streams that were announced, i.e. admitted to a slot
but not yet asked to generate, are still on their way: a burst of requests starts as one batch), form the
next batch: replies with the same decoding options (all but max_new_tokens) go into
one `model.generate` over the padded prompts (`run_batch`), where each row stops on its own. A batch runs
until its longest reply ends; streams arriving meanwhile wait for the next one (static batches, no joining
mid-flight). Beam search runs one reply at a time.

Why not transformers' continuous batching (`generate_batch`, `init_continuous_batching`): its manager takes
one generation config for every request (no per-request temperature, top_p or repetition_penalty, which the
API lets each request choose), it supports decoder-only models only (not T5), and its paged attention
computes a reply differently from `model.generate`, so a batched reply would not equal the same request
generated alone.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time

from model.inference.streaming import ReplyStream, run_batch

logger = logging.getLogger(__name__)


def batch_key(stream: ReplyStream) -> str:
    """Streams with equal keys can share one `model.generate`: equal decoding options but max_new_tokens.
    Beam search never shares."""
    if (stream.config.num_beams or 1) > 1:
        return f"beams-{id(stream)}"
    options = stream.config.to_dict()
    options.pop("max_new_tokens", None)
    return repr(sorted(options.items(), key=lambda item: item[0]))


class BatchScheduler:
    """Generates submitted `ReplyStream`s in batches of at most `max_batch` on one worker thread.

    `context` (the model's positions; None for an encoder-decoder) keeps a decoder-only batch within it: a
    left-padded batch is as wide as its longest prompt plus its longest reply. `batches` counts the
    `model.generate` calls run and `largest` the most streams one of them took.
    """

    def __init__(self, model, tokenizer, max_batch: int, wait_s: float = 0.005, max_wait_s: float = 0.05,
                 context: int | None = None):
        assert max_batch >= 1
        self.model, self.tokenizer, self.max_batch, self.context = model, tokenizer, max_batch, context
        self.wait_s, self.max_wait_s = wait_s, max_wait_s
        self._announced = 0  # streams admitted that have not been submitted (nor withdrawn) yet
        self._queue: queue.Queue[ReplyStream] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0
        self.largest = 0

    def announce(self, stream: ReplyStream) -> None:
        """A stream was admitted and will be submitted soon (or withdrawn): a batch may wait for it."""
        with self._lock:
            self._announced += 1
        stream.announced = True

    def withdraw(self, stream: ReplyStream) -> None:
        """An announced stream will not be submitted (its client left first)."""
        with self._lock:
            if stream.announced:
                stream.announced = False
                self._announced -= 1

    def submit(self, stream: ReplyStream) -> None:
        with self._lock:
            if stream.announced:
                stream.announced = False
                self._announced -= 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="batches", daemon=True)
                self._thread.start()
                atexit.register(self.close)
        self._queue.put(stream)

    def close(self) -> None:
        """Stop the worker once the batch it runs is done (at exit: streams end before `generate` returns,
        and a process that exits under a thread still inside torch aborts)."""
        with self._lock:
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join()

    def _gather(self) -> list[ReplyStream] | None:
        """The next streams to generate: the first waits for the worker, the rest arrived with it or are
        announced and on their way. None once `close` asked the worker to stop."""
        first = self._queue.get()
        if first is None:
            return None
        waiting = [first]
        began = time.monotonic()
        while len(waiting) < self.max_batch:
            limit = self.max_wait_s if self._announced > 0 else self.wait_s
            try:
                stream = self._queue.get(timeout=max(0.0, began + limit - time.monotonic()))
            except queue.Empty:
                if self._announced <= 0 or time.monotonic() - began >= self.max_wait_s:
                    break
                continue
            if stream is None:  # closing: run what was gathered, then stop
                self._queue.put(None)
                break
            waiting.append(stream)
        return waiting

    def group(self, streams: list[ReplyStream]) -> list[list[ReplyStream]]:
        """`streams` (in arrival order) as batches that can run together, the oldest stream's first."""
        groups: dict[str, list[list[ReplyStream]]] = {}
        order: list[list[ReplyStream]] = []
        for stream in streams:
            batches = groups.setdefault(batch_key(stream), [])
            batch = batches[-1] if batches else None
            if batch is None or not self._fits(batch + [stream]):
                batch = []
                batches.append(batch)
                order.append(batch)
            batch.append(stream)
        return order

    def _fits(self, batch: list[ReplyStream]) -> bool:
        if self.context is None:
            return True
        return max(len(s.prompt_ids) for s in batch) + max(s.max_new_tokens for s in batch) <= self.context

    def _work(self) -> None:
        while True:
            streams = self._gather()
            if streams is None:
                return
            try:
                live = []
                for stream in streams:
                    if not stream.claim():  # cancelled (and finished) while it waited
                        continue
                    if stream.cancel_event.is_set():  # its client left while it waited
                        stream.finish("cancelled")
                    else:
                        live.append(stream)
                for batch in self.group(live):
                    self.batches += 1
                    self.largest = max(self.largest, len(batch))
                    run_batch(self.model, self.tokenizer, batch)
            except BaseException as err:  # never leave a reader waiting, never let the worker die
                logger.exception("batch failed")
                for stream in streams:
                    stream.finish(error=err)
