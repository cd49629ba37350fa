"""Sessions and generation streams.

A Session owns one pool slot and holds plain Python data (slot id, token log);
its state lives in the engine's pool and its next-token logits in the engine's
logits table. A GenerationStream is one generate() call: it registers with the
engine on creation, so all streams alive at the same time advance together, one
packed forward per step, whichever stream the caller happens to iterate.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ..errors import RwkvStateError
from ..tokenizer import StreamDecoder
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .engine import Engine


@dataclass
class SessionSnapshot:
    """A session's full resumable state: canonical state dict, token log, next-token logits."""

    state: dict[str, torch.Tensor]
    tokens: list[int]
    logits: torch.Tensor | None  # float32 [vocab] on CPU, None before the first token


class Session:
    def __init__(self, engine: "Engine", slot: int, tokens: Sequence[int] = ()):
        self.engine = engine
        self.slot = slot
        self.tokens: list[int] = list(tokens)
        self._stream: GenerationStream | None = None
        self._closed = False

    # ---- feeding ----------------------------------------------------------------------
    def feed(self, data: str | Sequence[int]) -> list[int]:
        """Feeds text (tokenized with the model's tokenizer) or token ids; returns the ids."""
        self._check_usable()
        ids = self.engine.tokenizer.encode(data) if isinstance(data, str) else [int(t) for t in data]
        self.engine.feed(self.slot, ids)
        self.tokens.extend(ids)
        return ids

    @property
    def logits(self) -> torch.Tensor:
        """float32 [vocab]: the next-token logits after the last fed token."""
        self._check_open()
        return self.engine.slot_logits(self.slot).clone()

    # ---- generation -------------------------------------------------------------------
    def generate(self, max_tokens: int = 256, sampling: SamplingParams | None = None) -> "GenerationStream":
        """A streaming iterator of text pieces; `.token_ids` and `.finish_reason` once done."""
        self._check_usable()
        if not self.tokens:
            raise RwkvStateError("feed a prompt (at least one token) before generating")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        self._stream = GenerationStream(self, max_tokens, sampling or SamplingParams())
        return self._stream

    # ---- state operations ---------------------------------------------------------------
    def fork(self) -> "Session":
        """A new session (new slot) with a copy of this one's state, logits and token log."""
        self._check_usable()
        return self.engine.fork(self)

    def reset(self) -> None:
        self._check_usable()
        self.engine.reset_slot(self.slot)
        self.tokens = []

    def snapshot(self) -> SessionSnapshot:
        self._check_usable()
        return self.engine.snapshot(self)

    def restore(self, snap: SessionSnapshot) -> None:
        self._check_usable()
        self.engine.restore(self, snap)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Starts the session from a canonical state (e.g. a state-tuning file) with no tokens.

        Feed a prompt afterwards: a bare state has no next-token logits."""
        self._check_usable()
        self.engine.pool.load(self.slot, state)  # validates before writing
        self.engine.forget_logits(self.slot)
        self.tokens = []

    def close(self) -> None:
        """Gives the slot back. The session cannot be used afterwards."""
        if not self._closed:
            if self._stream is not None:
                self._stream.close()
            self.engine.release(self)
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self._closed:
            raise RwkvStateError("this session is closed")

    def _check_usable(self):
        self._check_open()
        if self._stream is not None and not self._stream.done:
            raise RwkvStateError("this session is generating; finish or close its stream first")

    def __repr__(self):
        return f"Session(slot={self.slot}, tokens={len(self.tokens)}, closed={self._closed})"


@dataclass
class GenerationStream:
    session: Session
    max_tokens: int
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    text: str = ""  # everything yielded so far

    def __post_init__(self):
        engine = self.session.engine
        self.generator = self.params.make_generator()
        self.counts: Counter = Counter()
        self.decoder = StreamDecoder(engine.tokenizer)
        self.stop_ids = set(engine.stop_token_ids if self.params.stop_token_ids is None else self.params.stop_token_ids)
        self._pending = ""  # decoded text held back while it may be the start of a stop string
        self._out: deque[str] = deque()
        engine.register(self)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while not self._out and not self.done:
            self.session.engine.step()
        if self._out:
            piece = self._out.popleft()
            self.text += piece
            return piece
        raise StopIteration

    def close(self) -> None:
        """Stops generating (the state keeps every token fed so far)."""
        if not self.done:
            self.finish("cancelled")

    # ---- called by the engine -------------------------------------------------------------
    def accept(self, token: int) -> bool:
        """Takes a sampled token; returns True if it must be fed into the state."""
        if token in self.stop_ids:
            self.finish("stop")
            return False
        self.token_ids.append(token)
        self.counts[token] += 1
        self._pending += self.decoder.push(token)
        self._emit_safe_text()
        if not self.done and len(self.token_ids) >= self.max_tokens:
            self.finish("length")
        return True

    def _emit_safe_text(self) -> None:
        stops = self.params.stop
        for stop in stops:
            at = self._pending.find(stop)
            if at >= 0:
                self._push(self._pending[:at])
                self._pending = ""
                self.finish("stop", flush=False)
                return
        hold = max((_overlap(self._pending, s) for s in stops), default=0)
        self._push(self._pending[: len(self._pending) - hold])
        self._pending = self._pending[len(self._pending) - hold :]

    def finish(self, reason: str, flush: bool = True) -> None:
        if flush:
            self._push(self._pending + self.decoder.flush())
            self._pending = ""
        self.finish_reason = reason
        self.session.engine.unregister(self)

    def _push(self, text: str) -> None:
        if text:
            self._out.append(text)


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for size in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:size]):
            return size
    return 0
