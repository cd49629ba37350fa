"""The text of a generation: incremental detokenisation and stop strings, outside the step loop.

The engine emits token ids and finish reasons. Whoever reads text (a GenerationStream's
iterator, an API server process) turns ids into text with a StopText, which finds a stop
string at the token that completes it and returns only the text before it. The engine runs
ahead of its readers, so a reader that finds a stop string tells the engine how many tokens
the stream should have had (`GenerationStream.stop_at`, the core's StopAt message) and the
engine takes the extra ones back.
"""

from __future__ import annotations

from typing import Sequence

from ..tokenizer import StreamDecoder, Tokenizer


class StopText:
    """Token ids in, text out, stopping at the first stop string (which is not returned)."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()):
        self.decoder = StreamDecoder(tokenizer)
        self.stops = tuple(stops)
        self.tokens = 0  # ids pushed
        self.stopped_at: int | None = None  # ids up to and including the one that completed a stop string
        self._held = ""  # text that may be the start of a stop string

    def push(self, token: int) -> str:
        """The text that is safe to show after this token ('' once stopped)."""
        if self.stopped_at is not None:
            return ""
        self.tokens += 1
        self._held += self.decoder.push(token)
        if not self.stops:
            out, self._held = self._held, ""
            return out
        found = [at for at in (self._held.find(s) for s in self.stops) if at >= 0]
        if found:
            out, self._held = self._held[: min(found)], ""
            self.stopped_at = self.tokens
            return out
        hold = max(_overlap(self._held, s) for s in self.stops)
        out, self._held = self._held[: len(self._held) - hold], self._held[len(self._held) - hold :]
        return out

    def push_many(self, tokens: Sequence[int]) -> str:
        return "".join([self.push(t) for t in tokens])

    def flush(self) -> str:
        """The held text at the end of the stream (nothing after a stop string)."""
        if self.stopped_at is not None:
            return ""
        out, self._held = self._held + self.decoder.flush(), ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
