"""Sessions and generation streams.

A Session holds plain Python data (id, token log, undo points); its state lives in
the engine's pool (or, evicted, in the engine's host tier) and its next-token logits
in the engine's logits table. Its private fields (`_slot`, `_marks`, `_origin`,
`_last_generation`, ...) belong to runtime/ (Residency sets the slot, Timeline the undo
points, origin and last generation); everything else reads a session through its public
methods and properties (`undo_points`, `can_regenerate`, `location`, `is_resident`, ...). A GenerationStream is one generate() call: it registers with the
engine on creation, so all streams alive at the same time advance together, one
packed forward per step, whichever stream the caller happens to iterate.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from ..errors import RwkvStateError
from ..state.snapshot import Encoded
from ..tokenizer import check_token_ids
from .sampling import SamplingParams
from .text import StopText

if TYPE_CHECKING:
    from .engine import Engine


@dataclass
class SessionSnapshot:
    """A session's full resumable state: its state, token log and next-token logits.

    `state` is the canonical float32 dict on the host, or an encoded snapshot (any format,
    on the host or the GPU). from_zero says the state is the zero state fed with `tokens`
    (so rolling back before the snapshot can re-feed from scratch)."""

    state: dict[str, torch.Tensor] | Encoded
    tokens: list[int]
    logits: torch.Tensor | None  # float32 [vocab], None before the first token
    from_zero: bool = False

    @property
    def fmt(self) -> str:
        return self.state.fmt if isinstance(self.state, Encoded) else "canonical"

    @property
    def nbytes(self) -> int:
        state = self.state.nbytes if isinstance(self.state, Encoded) else sum(
            t.numel() * t.element_size() for t in self.state.values()
        )
        return state + (0 if self.logits is None else self.logits.numel() * self.logits.element_size())


@dataclass(frozen=True)
class Origin:
    """The state a session was loaded from (a snapshot or file whose state is not the zero state
    fed with its token log), at a token position: rollbacks cannot go before it."""

    position: int
    snapshot: SessionSnapshot


class Session:
    """A conversation: a token log and a state that lives in a pool slot or, when the pool is
    full and the session idle, on the host. `slot` brings it back."""

    def __init__(self, engine: "Engine", session_id: int):
        self.engine = engine
        self.id = session_id
        self.tokens: list[int] = []
        self.from_zero = True  # the state is the zero state fed with self.tokens
        self.last_used = 0
        self._slot: int | None = None
        self._origin: Origin | None = None
        self._marks: list[int] = []  # positions where each feed or generation started (undo points)
        self._last_generation: GenerationStream | None = None
        self._stream: GenerationStream | None = None
        self._closed = False
        self._lost = False  # a failed forward left the state half-written and it could not be rebuilt

    @property
    def slot(self) -> int:
        """The pool slot holding the state (taking one, and bringing the state back, if needed)."""
        self._check_open()
        return self.engine.resident(self)

    @property
    def is_resident(self) -> bool:
        return self._slot is not None

    @property
    def location(self) -> str:
        """"pool" (in a slot), "host" (in the engine's host tier) or "none" (never used)."""
        if self._slot is not None:
            return "pool"
        return "host" if self.id in self.engine.tier else "none"

    @property
    def undo_points(self) -> list[int]:
        """Token positions where the feeds and generations that undo() can take back started,
        oldest first (undo(n) returns to the n-th from the end)."""
        return [m for m in self._marks if m < len(self.tokens)]

    @property
    def can_regenerate(self) -> bool:
        """Whether regenerate() has a finished generation to take back."""
        last = self._last_generation
        return last is not None and last.start_position is not None

    @property
    def is_generating(self) -> bool:
        return self._stream is not None and not self._stream.done

    # ---- feeding ----------------------------------------------------------------------
    def feed(self, data: str | Sequence[int]) -> list[int]:
        """Feeds text (tokenized with the model's tokenizer) or token ids; returns the ids."""
        self._check_usable()
        ids = self._ids(data)
        self.engine.feed(self, ids)
        return ids

    def _ids(self, data: str | Sequence[int]) -> list[int]:
        ids = self.engine.tokenizer.encode(data) if isinstance(data, str) else [int(t) for t in data]
        return check_token_ids(ids, self.engine.model.config.vocab_size)

    @property
    def logits(self) -> torch.Tensor:
        """float32 [vocab]: the next-token logits after the last fed token."""
        self._check_open()
        return self.engine.session_logits(self).clone()

    # ---- generation -------------------------------------------------------------------
    def generate(self, max_tokens: int = 256, sampling: SamplingParams | None = None,
                 prompt: str | Sequence[int] | None = None, cache_prefix: int = 0) -> "GenerationStream":  # fmt: skip
        """A streaming iterator of text pieces; `.token_ids` and `.finish_reason` once done.

        With `prompt`, the prompt is read inside the engine's batched steps, packed with
        the tokens of other streams (continuous batching). `cache_prefix`: the prompt's first
        tokens are a prefix other prompts share (a system prompt): a chunk ends there, and the
        prefix cache keeps the state at that point."""
        self._check_usable()
        ids = self._ids(prompt) if prompt is not None else []
        if isinstance(cache_prefix, bool) or not isinstance(cache_prefix, int) or not 0 <= cache_prefix <= len(ids):
            raise ValueError(f"cache_prefix must be 0 to {len(ids)} (the prompt's length), got {cache_prefix!r}")
        if not self.tokens and not ids:
            raise RwkvStateError("feed a prompt (at least one token) before generating")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        cut = len(self.tokens) + cache_prefix if cache_prefix else None
        self._stream = GenerationStream(self, max_tokens, sampling or SamplingParams(), pending=ids, cut_at=cut)
        return self._stream

    def regenerate(self, max_tokens: int | None = None, sampling: SamplingParams | None = None) -> GenerationStream:
        """Takes back the last generation's tokens and generates again from the same point
        (same limits and sampling unless given); returns the new stream."""
        self._check_usable()
        if not self.can_regenerate:
            raise RwkvStateError("nothing to regenerate: this session has no finished generation to take back")
        last = self._last_generation
        assert last is not None and last.start_position is not None  # can_regenerate
        self.engine.rollback(self, len(self.tokens) - last.start_position)
        return self.generate(max_tokens or last.max_tokens, sampling or last.params)

    # ---- state operations ---------------------------------------------------------------
    def fork(self) -> "Session":
        """A new session with a copy of this one's state, logits and token log."""
        self._check_usable()
        return self.engine.fork(self)

    def reset(self) -> None:
        self._check_usable(replacing=True)
        self.engine.reset(self)
        self._lost = False

    def rollback(self, n_tokens: int) -> None:
        """Takes back the last n_tokens tokens (state, logits and token log)."""
        self._check_usable()
        self.engine.rollback(self, n_tokens)

    def undo(self, n: int = 1) -> int:
        """Takes back the last n feeds or generations; returns how many tokens were removed."""
        self._check_usable()
        return self.engine.undo(self, n)

    def snapshot(self, fmt: str | None = None, device: torch.device | str | None = None) -> SessionSnapshot:
        """The session's state; fmt None gives the canonical float32 dict, else an encoded
        snapshot ("fp32", "fp16", "bf16", "int8", "fp8") on `device` (default: the pool's)."""
        self._check_usable()
        return self.engine.snapshot(self, fmt, device)

    def restore(self, snap: SessionSnapshot) -> None:
        self._check_usable(replacing=True)
        self.engine.restore(self, snap)
        self._lost = False

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Starts the session from a canonical state (e.g. a state-tuning file) with no tokens.

        Feed a prompt afterwards: a bare state has no next-token logits."""
        self._check_usable(replacing=True)
        self.engine.load_state(self, state)
        self._lost = False

    def save(self, path: str | Path) -> None:
        """Writes the session (state, token log, logits) to a state file, atomically."""
        from .persist import save_session

        self._check_usable()
        save_session(self, path)

    def load(self, path: str | Path, allow_other_weights: bool = False) -> None:
        """Replaces the session's state with a state file's; a bad file changes nothing. A file
        saved from other weights of the same shape is refused unless allow_other_weights."""
        from .persist import load_session

        self._check_usable(replacing=True)
        load_session(self, path, allow_other_weights=allow_other_weights)
        self._lost = False

    def close(self) -> None:
        """Gives the slot (or host memory) back. The session cannot be used afterwards."""
        if not self._closed:
            if self._stream is not None:
                self._stream.close()
            self.engine.release(self)
            self._closed = True

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RwkvStateError("this session is closed")

    def _check_usable(self, replacing: bool = False) -> None:
        """Open and not generating; and, unless the call replaces the whole state, not lost."""
        self._check_open()
        if self._lost and not replacing:
            raise RwkvStateError("this session's state was lost in a failed forward; reset or restore it")
        if self.is_generating:
            raise RwkvStateError("this session is generating; finish or close its stream first")

    def __repr__(self) -> str:
        return f"Session(id={self.id}, {self.location}, tokens={len(self.tokens)}, closed={self._closed})"


@dataclass(eq=False)
class GenerationStream:
    """One generate() call. The engine fills `token_ids` and sets `finish_reason`; iterating
    the stream reads them as text (the engine never decodes). A new stream starts at once when
    a slot can be had, else it waits for one; iterating steps the engine meanwhile."""

    session: Session
    max_tokens: int
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    # "stop", "length", "cancelled", or "error" (a failed forward or sample, or a start that failed)
    finish_reason: str | None = None
    text: str = ""  # everything yielded so far
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet fed
    start_position: int | None = None  # the session's position when sampling began
    cut_at: int | None = None  # a position where a prompt chunk must end and the prefix cache keeps the state

    def __post_init__(self) -> None:
        engine = self.session.engine
        self.seed = self.params.stream_seed()  # keys the stream's uniforms with its position
        self.stop_ids = frozenset(engine.stop_token_ids if self.params.stop_token_ids is None
                                  else self.params.stop_token_ids)  # fmt: skip
        self._text: StopText | None = None  # the reader's side, made on first read
        self._read = 0  # token_ids turned into text so far
        self._flushed = False
        self._out: deque[str] = deque()
        engine.register(self)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        engine = self.session.engine
        while not self._out:
            if self._read < len(self.token_ids) or (self.done and not self._flushed):
                self._read_text()
            elif self.done:
                raise StopIteration
            elif not engine.step():
                raise RwkvStateError("the engine cannot advance this stream")  # nothing runs and nothing can start
        piece = self._out.popleft()
        self.text += piece
        return piece

    def read(self) -> str:
        """The text of the tokens produced so far and not read yet, without stepping the engine
        (for a loop that calls engine.step() itself)."""
        if self._read < len(self.token_ids) or (self.done and not self._flushed):
            self._read_text()
        piece = "".join(self._out)
        self._out.clear()
        self.text += piece
        return piece

    def close(self) -> None:
        """Stops generating (the state keeps every token fed so far)."""
        if not self.done:
            self.finish("cancelled")

    def _read_text(self) -> None:
        """Turns the tokens not read yet into text; a stop string ends the stream where it ends."""
        if self._text is None:
            self._text = StopText(self.session.engine.tokenizer, self.params.stop)
        text, new = self._text, self.token_ids[self._read :]
        self._read = len(self.token_ids)
        piece = text.push_many(new)
        if text.stopped_at is not None and (not self.done or len(self.token_ids) > text.stopped_at
                                            or self.finish_reason != "stop"):  # fmt: skip
            self.session.engine.stop_at(self, text.stopped_at)
            self._read = len(self.token_ids)
        if self.done and self._read == len(self.token_ids) and not self._flushed:
            piece += text.flush()
            self._flushed = True
        if piece:
            self._out.append(piece)

    # ---- called by the engine -------------------------------------------------------------
    def finish(self, reason: str) -> None:
        """Ends the stream. A stream with stop strings reads its remaining tokens first, so it
        ends at a stop string its reader has not reached yet (and the tokens after it are taken
        back)."""
        if self.done:
            return
        self.finish_reason = reason
        self.session.engine.unregister(self)
        if self.params.stop:
            self._read_text()
