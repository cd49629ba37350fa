"""The timeline: the points a session can go back to, and the saved states that get it there.

A session's undo points are the positions where each feed and each generation started. The
states to return to come from, newest first: the prefix cache (states of token prefixes fed
from the zero state, shared between sessions), the ring-buffer history of the session's slot
(a snapshot every `history_every` tokens plus entries of their own for undo points), and the
origin of a loaded session (the state it was loaded from: it cannot go back further). Going
back restores the newest such state at or before the target; the stepper re-feeds the few
tokens after it from the token log.

Only this module changes a session's undo points, origin and last generation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from ..config import EngineConfig
from ..errors import RwkvStateError
from ..state.cache import PrefixCache
from ..state.history import StateHistory
from ..state.pool import StatePool
from ..state.snapshot import Encoded
from .residency import Residency
from .session import Origin, SessionSnapshot

if TYPE_CHECKING:
    from .session import GenerationStream, Session


class Timeline:
    def __init__(self, pool: StatePool, residency: Residency, config: EngineConfig, vocab_size: int):
        self.pool = pool
        self.residency = residency
        self.config = config
        self.history: StateHistory | None = None
        if config.history_capacity:
            self.history = StateHistory(pool, config.history_every, config.history_capacity,
                                        config.history_fmt, vocab_size, marks=config.history_marks)  # fmt: skip
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes) if config.prefix_cache_bytes else None

    # ---- a session's whole timeline ---------------------------------------------------------
    def start_over(self, session: Session, snap: SessionSnapshot | None = None) -> None:
        """The session's state was replaced (reset: snap None; restore: snap): no undo points, no
        generation to take back; a state that is not the zero state fed with the token log
        becomes the origin, the earliest point rollbacks reach."""
        session._marks, session._last_generation = [], None
        session.from_zero = snap is None or snap.from_zero
        session._origin = None if snap is None or snap.from_zero else Origin(len(snap.tokens), _own_copy(snap))

    def copy(self, session: Session, child: Session) -> None:
        """A fork's child gets the parent's timeline (undo points, origin, last generation)."""
        child.from_zero, child._origin = session.from_zero, session._origin
        child._marks = list(session._marks)
        child._last_generation = session._last_generation

    def set_undo_points(self, session: Session, positions: Sequence[int]) -> None:
        """Undo points for a session that was just loaded from its token log (a saved session)."""
        session._marks = sorted(set(positions))

    def forget(self, slot: int) -> None:
        """The slot's ring entries no longer belong to its state."""
        if self.history is not None:
            self.history.clear(slot)

    # ---- moving forward ---------------------------------------------------------------------
    def mark(self, session: Session, slot: int) -> None:
        """Remembers the session's position as an undo point (and may snapshot it)."""
        position = len(session.tokens)
        if not session._marks or session._marks[-1] != position:
            session._marks.append(position)
        self.record_mark(session, slot)

    def record_mark(self, session: Session, slot: int) -> None:
        """Snapshots an undo point: into the ring's own entries for undo points when it has them;
        else only if the ring has nothing from the last `every` tokens (so a token-by-token feed
        cannot flood the periodic entries, yet undo never re-feeds more than that)."""
        history, position = self.history, len(session.tokens)
        if history is None or (position == 0 and session.from_zero):
            return
        logits = self.residency.logits_of(slot)
        if history.marks:
            history.record(slot, position, logits, mark=True)
        elif position - max(history.newest_position(slot), 0) >= history.every:
            history.record(slot, position, logits)

    def generation_started(self, session: Session, stream: GenerationStream) -> None:
        """The stream is the session's last generation (what regenerate() takes back)."""
        session._last_generation = stream

    def reply_started(self, session: Session, slot: int, stream: GenerationStream) -> None:
        """A generation's prompt is read: sampling starts here, where regenerate() returns to."""
        stream.start_position = len(session.tokens)
        self.record_mark(session, slot)

    def use_prefix_cache(self, session: Session, slot: int, ids: list[int]) -> list[int]:
        """Restores the longest cached prefix that goes beyond the session's position; returns
        the ids still to feed."""
        if self.prefix_cache is None or not session.from_zero or not ids:
            return ids
        full = session.tokens + ids
        entry = self.prefix_cache.lookup(full, min_length=len(session.tokens) + 1)
        if entry is None:
            return ids
        self.pool.load_encoded(slot, entry.state)
        self.residency.set_logits(slot, entry.logits)
        session.tokens = full[: entry.length]
        return full[entry.length :]

    def chunk_size(self, position: int, remaining: int, cache: bool, cut: int | None = None) -> int:
        """Tokens for the next prompt chunk; with the prefix cache on, chunks end at its
        multiples, and at `cut`, so the cache can store the shared parts of prompts."""
        size = min(remaining, self.config.max_prefill_chunk)
        if cache and self.prefix_cache is not None:
            every = self.config.prefix_cache_every
            size = min(size, every - position % every)
            if cut is not None and position < cut:
                size = min(size, cut - position)
        return size

    def next_cut(self, session: Session, position: int) -> int | None:
        """The first position after `position` where after_forward has work to do (a history
        boundary, or a prefix-cache boundary for a session fed from the zero state); None: none."""
        cuts = []
        if self.history is not None:
            cuts.append((position // self.history.every + 1) * self.history.every)
        if self.prefix_cache is not None and session.from_zero:
            every = self.config.prefix_cache_every
            cuts.append((position // every + 1) * every)
        return min(cuts, default=None)

    def after_forward(self, session: Session, slot: int, old: int, cache_end: bool = False) -> None:
        """History and prefix-cache bookkeeping after the slot moved from position old."""
        new = len(session.tokens)
        logits = self.residency.logits[slot]
        if self.history is not None and self.history.due(old, new):
            self.history.record(slot, new, logits)
        cache = self.prefix_cache
        at_cut = new % self.config.prefix_cache_every == 0 or cache_end
        if cache is not None and session.from_zero and at_cut and not cache.contains(session.tokens):
            state = self.pool.encode_slot(slot, self.config.prefix_cache_fmt)
            cache.insert(list(session.tokens), state, logits.clone())

    # ---- going back ---------------------------------------------------------------------------
    def check_rollback(self, session: Session, n_tokens: int) -> int:
        """The position n_tokens back; a ValueError or RwkvStateError if it cannot be reached."""
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or not 0 <= n_tokens <= len(session.tokens):
            raise ValueError(f"can roll back 0 to {len(session.tokens)} tokens, got {n_tokens!r}")
        target = len(session.tokens) - n_tokens
        if session._origin is not None and target < session._origin.position:
            raise RwkvStateError(
                f"cannot roll back to position {target}: the session starts from a loaded state at "
                f"position {session._origin.position}"
            )
        return target

    def undo_length(self, session: Session, n: int) -> int:
        """Tokens that undoing the last n feeds or generations removes."""
        # an undo point at the end marks a feed or a reply that added nothing: nothing to take back
        session._marks = session.undo_points
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(session._marks):
            raise ValueError(f"can undo 1 to {len(session._marks)} steps, got {n!r}")
        return len(session.tokens) - session._marks[-n]

    def restore_nearest(self, session: Session, slot: int, target: int) -> tuple[int, torch.Tensor | None]:
        """Writes the newest known state at or before target into the slot and forgets ring
        entries after target; returns (its position, its logits or None)."""
        position, logits = self._restore_nearest(session, slot, target)
        if self.history is not None:
            self.history.truncate(slot, target)
        return position, logits

    def _restore_nearest(self, session: Session, slot: int, target: int) -> tuple[int, torch.Tensor | None]:
        hit = self.history.find(slot, target) if self.history is not None else None
        best = self.history.positions[slot][hit] if self.history is not None and hit is not None else -1
        cached = None
        if self.prefix_cache is not None and session.from_zero:
            cached = self.prefix_cache.lookup(session.tokens[:target], min_length=best + 1)
        if cached is not None:
            self.pool.load_encoded(slot, cached.state)
            return cached.length, cached.logits
        if self.history is not None and hit is not None:
            return self.history.restore(slot, hit)
        if session._origin is not None:
            origin = session._origin.snapshot
            self.write_state(slot, origin.state)
            return session._origin.position, origin.logits
        self.pool.reset(slot)
        return 0, None

    def rolled_back(self, session: Session, target: int) -> None:
        """Forgets undo points and the last generation beyond target."""
        session._marks = [m for m in session._marks if m < target]
        last = session._last_generation
        if last is not None and (last.start_position is None or last.start_position > target):
            session._last_generation = None

    def write_state(self, slot: int, state: dict[str, torch.Tensor] | Encoded) -> None:
        """Writes a canonical dict (validated first) or an encoded snapshot into the slot."""
        if isinstance(state, Encoded):
            self.pool.load_encoded(slot, state)
        else:
            self.pool.load(slot, state)


def _own_copy(snap: SessionSnapshot) -> SessionSnapshot:
    """A snapshot sharing no tensor with the caller's (who may change theirs afterwards)."""
    state = snap.state.clone() if isinstance(snap.state, Encoded) else {k: v.clone() for k, v in snap.state.items()}
    logits = None if snap.logits is None else snap.logits.clone()
    return SessionSnapshot(state, list(snap.tokens), logits, from_zero=snap.from_zero)
