"""New tokens to text as they come, with stop strings: what streaming chat prints.

    stream = TextStream(tokenizer, stop=["Human:"], write=print_now)
    lowrank.generate(model, ids, 256, on_token=stream.push)   # push returns True at a stop string
    answer = stream.text

Text is decoded from all the new ids each time (a token may end in the middle of a UTF-8
character, or merge with the next when decoded), and only the part that can no longer change
is written: nothing while the text ends in an incomplete character, and not the tail that could
still grow into a stop string. The stop string itself is never written nor kept in `text`.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = (), write=None):
        self.tokenizer, self.stop, self.write = tokenizer, [s for s in stop if s], write
        self.ids: list[int] = []
        self.text = ""  # the answer so far, stop string excluded
        self.written = 0  # characters of it passed to `write`
        self.stopped = False

    def push(self, token) -> bool:
        """Take the next token (an int or a one-element tensor); True once a stop string appeared."""
        if self.stopped:
            return True
        self.ids.append(int(token.reshape(-1)[0]) if hasattr(token, "reshape") else int(token))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            self.text, self.stopped = text[:min(hits)], True
            self._emit(len(self.text))
            return True
        self.text = text
        if not text.endswith("\ufffd"):  # a character still incomplete
            self._emit(len(text) - self._stop_prefix(text))
        return False

    def close(self) -> str:
        """Write what is left (generation ended without a stop string); returns the text."""
        self._emit(len(self.text))
        return self.text

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest end of `text` that begins a stop string (held back)."""
        return max((n for s in self.stop for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)

    def _emit(self, upto: int) -> None:
        if upto > self.written:
            if self.write is not None:
                self.write(self.text[self.written:upto])
            self.written = upto
