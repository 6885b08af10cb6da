"""Token ids arriving in chunks -> text pieces that are safe to show: the one streaming helper of the
Python API and the server.

A piece never ends in half a UTF-8 character (the tokenizer decodes it as U+FFFD) nor in what may be the
start of a stop string; text from the first stop string on is never shown.
"""

from __future__ import annotations

from typing import Callable, Sequence


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` before the first of `stops` it contains (unchanged if none)."""
    cuts = [text.index(s) for s in stops if s and s in text]
    return text[:min(cuts)] if cuts else text


class TextStream:
    """One row's decoded text; `feed(new_ids)` returns the newly certain piece."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self.decode, self.stops = decode, [s for s in stops if s]
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False  # a stop string appeared: nothing after it is ever shown

    def feed(self, new_ids: Sequence[int], final: bool = False) -> str:
        """Add tokens; `final` (the row ended) releases everything held back."""
        if not self.stopped:
            self.ids += list(new_ids)
        full = self.decode(self.ids)
        text = cut_at_stop(full, self.stops)
        self.stopped = self.stopped or text != full
        if not (final or self.stopped):
            text = text.rstrip("\ufffd")  # half a UTF-8 character: wait for the rest
            held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - held]
        piece = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown += piece
        return piece
