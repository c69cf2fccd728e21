"""Token-by-token generation as a stream of steps: the text each token adds, stop strings, and
why a generation ended. Model.stream yields these; generate, `edgemoe chat` and the server
read them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One generated token: its id, the text it adds (may be "" while a UTF-8 character or a
    possible stop string is incomplete; the held-back text comes with a later step), and
    finish: None while generation goes on, else "stop" (EOS or a stop string), "length"
    (max_new_tokens) or "cancelled" (the cancel callback said so; that last Step has no
    token, only the text held back)."""

    token: int | None
    text: str
    finish: str | None = None


class TextStream:
    """Turns token ids into text pieces as they arrive: holds back a piece that ends inside a
    UTF-8 character (the decoder gives U+FFFD for it) or that could be the start of a stop
    string, and cuts the text before the first stop string."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # the text so far, stop string excluded
        self.emitted = ""  # the text given out so far
        self.stopped = False

    def push(self, token: int) -> str:
        """The text `token` lets out; sets .stopped when a stop string appeared."""
        self.ids.append(token)
        text = self._decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        for s in self.stop:
            # a stop string can only end in the new text, but start before it
            at = text.find(s, max(0, len(self.emitted) - len(s) + 1))
            if at >= 0:
                self.text, self.stopped = text[:at], True
        return self._release(final=self.stopped)

    def flush(self) -> str:
        """Whatever was held back, at the end of generation."""
        if not self.stopped and self.ids:
            text = self._decode(self.ids)
            self.text = text.rstrip("\ufffd") if text.endswith("\ufffd") else text
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.text.startswith(self.emitted):  # a decoder that rewrote its past: wait
            return ""
        start, end = len(self.emitted), len(self.text)
        if not final:
            for s in self.stop:  # keep back a tail that is a prefix of a stop string
                for n in range(min(len(s) - 1, end - start), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        if end <= start:
            return ""
        piece = self.text[start:end]
        self.emitted += piece
        return piece
