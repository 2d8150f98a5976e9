"""A reply's tokens in, its text out piece by piece: released after every token, cut before a stop string.

    streamer = ChineseTextStreamer(tokenizer, stop=["。"])
    streamer.put(torch.tensor([token]))     # from the generating thread, one token at a time
    streamer.end()                          # the reply ended: flush what was held back
    for piece in streamer: ...              # the reader's side (a queue); streamer.text is all released
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from transformers import TextIteratorStreamer


class ChineseTextStreamer(TextIteratorStreamer):
    """A `TextIteratorStreamer` that hands out text after every token and cuts it before a stop string.

    transformers' streamer waits for a space or a CJK ideograph before releasing text, so Chinese
    punctuation, digits and Latin words without spaces arrive late. Here every decoded character is
    released at once, except an incomplete UTF-8 sequence (byte-fallback tokens decode to U+FFFD until
    the character is complete), which waits for its remaining bytes, and text that could be the start of
    one of the `stop` strings, which waits until it is known not to be one. Once a stop string appears,
    the text before it is the whole reply (`stopped` turns True). `text` is everything released.
    `wake`, when set, is called after each piece (and the end) is queued: an async reader's doorbell.
    `closes_at_end` False leaves telling the reader that the text ended (`close`) to the owner, which may have
    more to settle first (`LiveReply` finishes its `Reply`).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self.text = ""  # released so far
        self.pending = ""  # decoded but held back: it may begin a stop string
        self.stopped = False
        self.wake: Callable[[], object] | None = None
        self.closes_at_end = True

    def put(self, value):
        if self.stopped:
            return
        self.token_cache.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\n"):
            # As transformers does: a finished line restarts the cache, keeping decoding cost per token flat.
            printable, self.token_cache, self.print_len = text[self.print_len:], [], 0
        else:
            stable = len(text.rstrip("\ufffd"))
            printable = text[self.print_len:stable]
            self.print_len = max(self.print_len, stable)
        if printable:
            self.on_finalized_text(printable)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if not self.stopped:
            self.pending += text
            cuts = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
            if cuts:
                self._release(self.pending[:min(cuts)])
                self.pending, self.stopped = "", True
            elif stream_end:
                self._release(self.pending)
                self.pending = ""
            else:
                held = max((n for s in self.stop for n in range(min(len(s) - 1, len(self.pending)), 0, -1)
                            if self.pending.endswith(s[:n])), default=0)
                self._release(self.pending[:len(self.pending) - held])
                self.pending = self.pending[len(self.pending) - held:]
        if stream_end and self.closes_at_end:
            self.close()

    def close(self) -> None:
        """Tell the reader there is no more text (after `end`, or when generation failed)."""
        self._queue(self.stop_signal)

    def _release(self, text: str) -> None:
        if text:
            self.text += text
            self._queue(text)

    def _queue(self, item: str | None) -> None:
        self.text_queue.put(item, timeout=self.timeout)
        if self.wake is not None:
            self.wake()
