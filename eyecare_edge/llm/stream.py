"""Turning generated token bytes into text that is safe to show: whole UTF-8 characters, never
the beginning of a stop string. Pure Python (no llama.cpp), so the rules are tested on their own."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


def _stop_prefix_len(text: str, start: int, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text[start:] that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text) - start), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class TextStream:
    """Turns token pieces (bytes) into text pieces that are safe to show.

    A piece is released once it is complete UTF-8 and cannot be the beginning of a stop string;
    on the first stop string the text is cut before it and the stream stops. The released
    pieces always concatenate to `text`, so a streaming client and the final answer agree.
    Pure Python (no llama.cpp) so the rules are tested on their own.
    """

    def __init__(self, stop_strings: Sequence[str] = ()) -> None:
        self.stops = [s for s in stop_strings if s]
        self.text = ""
        self.stopped = False
        self._emitted = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the newly safe text ("" if none)."""
        if self.stopped:
            raise ValueError("TextStream already stopped at a stop string")
        self.text += self._decoder.decode(piece)
        if not self.stops:
            return self._release(len(self.text))
        # Nothing released can be part of a stop string, so a match starts at or after it.
        hits = [i for i in (self.text.find(s, self._emitted) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._release(len(self.text))
        return self._release(len(self.text) - _stop_prefix_len(self.text, self._emitted, self.stops))

    def finish(self) -> str:
        """End of generation: release what was held back (a partial stop string is text now)."""
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        out = self.text[self._emitted : upto]
        self._emitted = upto
        return out
