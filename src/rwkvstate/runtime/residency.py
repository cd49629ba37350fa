"""Residency: which session's state sits in which pool slot, and where the others are.

Sessions are not tied to slots. A session takes a slot when it is touched; when every slot
is taken, the least recently used idle session moves to the host tier and its slot is
reused; touching it again brings it back, unchanged. Sessions an operation in progress needs
resident together are pinned, so bringing one back never evicts another. Next to the pool
lives the logits table: the next-token logits of every slot (float32 [slots, vocab] on the
model's device), valid per slot once the slot has been fed; a session on the host keeps its
logits in its host-tier entry. When every slot holds a generating session, a slot is waited
for (`wait`: the engine steps its streams until one ends) rather than refused.

Only this module moves a session between slot and host (it sets `Session._slot`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from ..errors import RwkvStateError, SlotError
from ..state.convert import zero_state
from ..state.host import HostTier, TierEntry, to_float32
from ..state.layout import CANONICAL_KEYS
from ..state.pool import StatePool
from ..state.snapshot import Encoded

if TYPE_CHECKING:
    from .session import Session


class Residency:
    def __init__(self, pool: StatePool, tier: HostTier, vocab_size: int, device: torch.device,
                 on_free: Callable[[int], None] = lambda slot: None,
                 wait: Callable[[], bool] = lambda: False):  # fmt: skip
        self.pool = pool
        self.tier = tier
        # one row per slot and one for the scratch slot, where a decode step's masked rows write
        self.logits = torch.zeros(pool.num_slots + 1, vocab_size, dtype=torch.float32, device=device)
        self.has_logits = [False] * pool.num_slots
        self.owner: list[Session | None] = [None] * pool.num_slots
        self.pinned: set[int] = set()  # ids of sessions an operation in progress needs resident
        self._on_free = on_free  # a slot is given up: what was kept about it goes too (its history)
        self._wait = wait  # makes progress towards a free slot; False when nothing can
        self._tick = 0

    @property
    def slots_in_use(self) -> int:
        return sum(s is not None for s in self.owner)

    # ---- slots --------------------------------------------------------------------------------
    def resident(self, session: Session) -> int:
        """The session's slot, bringing the session back from the host tier (or giving it a
        fresh slot) if it has none."""
        if session._slot is None:
            slot = self._acquire_slot()
            if session.id in self.tier:
                try:
                    entry = self.tier.load(session.id, slot)  # the entry stays if the write fails
                except BaseException:
                    self.pool.free(slot)
                    raise
                self.set_logits(slot, entry.logits)
            session._slot = slot
            self.owner[slot] = session
        self._tick += 1
        session.last_used = self._tick
        return session._slot

    @contextmanager
    def pinned_slots(self, *sessions: Session) -> Iterator[list[int]]:
        """The sessions' slots, all resident together (none evicts another) while the block runs."""
        for s in sessions:
            self.pinned.add(s.id)
        try:
            yield [self.resident(s) for s in sessions]
        finally:
            for s in sessions:
                self.pinned.discard(s.id)

    def _acquire_slot(self) -> int:
        while not self.pool.can_allocate():
            victim = self._victim()
            if victim is not None:
                self.evict(victim)
            elif not self._wait():
                raise SlotError(
                    f"all {self.pool.num_slots} slots hold sessions that are generating; "
                    "wait for a generation to finish or create the Engine with more slots"
                )
        slot = self.pool.allocate()
        self.has_logits[slot] = False
        return slot

    def _evictable(self, session: Session | None) -> bool:
        return session is not None and not session.is_generating and session.id not in self.pinned

    def can_acquire(self) -> bool:
        """Whether a slot can be had now, without waiting (free, or held by an idle session)."""
        return self.pool.can_allocate() or any(self._evictable(s) for s in self.owner)

    def _victim(self) -> Session | None:
        """The least recently used idle session, None if every slot's session is busy."""
        idle = [s for s in self.owner if s is not None and self._evictable(s)]
        return min(idle, key=lambda s: s.last_used) if idle else None

    def second_slot_available(self, session: Session) -> bool:
        """Whether a slot other than session's can be had (free, or held by an idle session)."""
        return self.pool.can_allocate() or any(s is not session and self._evictable(s) for s in self.owner)

    def evict(self, session: Session) -> None:
        """Moves a resident session's state and logits to the host tier and frees its slot."""
        slot = session._slot
        assert slot is not None, "only a resident session can be evicted"
        self.tier.store(session.id, slot, self.logits_of(slot))
        self._free_slot(slot)
        session._slot = None

    def _free_slot(self, slot: int) -> None:
        self._on_free(slot)
        self.pool.free(slot)
        self.owner[slot] = None
        self.has_logits[slot] = False

    def release(self, session: Session) -> None:
        """Gives the session's slot or host entry back."""
        if session._slot is not None:
            self._free_slot(session._slot)
            session._slot = None
        self.tier.drop(session.id)

    def host_entry(self, session: Session) -> TierEntry | None:
        """The session's host-tier entry while it has no slot, else None."""
        return self.tier.entries.get(session.id) if session._slot is None else None

    def copy_host_entry(self, session: Session, child: Session) -> None:
        """Gives child its own copy of session's host entry (no slot needed until it is used)."""
        entry = self.tier.entries[session.id]
        state = entry.state if isinstance(entry.state, Encoded) else entry.state.clone()
        self.tier.put(child.id, TierEntry(state, entry.logits, entry.stored_at))

    # ---- logits table -------------------------------------------------------------------------
    def set_logits(self, slot: int, logits: torch.Tensor | None) -> None:
        """Copies logits into the slot's row (None: the slot has no logits)."""
        if logits is not None:
            self.logits[slot].copy_(logits)
        self.has_logits[slot] = logits is not None

    def forget_logits(self, slot: int) -> None:
        self.has_logits[slot] = False

    def logits_of(self, slot: int) -> torch.Tensor | None:
        """The slot's row of the logits table (a view), None before the slot was fed."""
        return self.logits[slot] if self.has_logits[slot] else None

    def slot_logits(self, slot: int) -> torch.Tensor:
        logits = self.logits_of(slot)
        if logits is None:
            raise RwkvStateError("no logits yet: feed at least one token first")
        return logits

    def session_logits(self, session: Session) -> torch.Tensor | None:
        """The session's next-token logits wherever it lives (read from the host tier without
        bringing it back); None before its first token."""
        if session.location == "none":  # never used: no logits, and no slot taken to say so
            return None
        entry = self.host_entry(session)
        if entry is not None:
            return entry.logits
        return self.logits_of(self.resident(session))

    # ---- reading a state wherever it lives ----------------------------------------------------
    def export(self, session: Session) -> dict[str, torch.Tensor]:
        """The session's state in the canonical format (new CPU float32 tensors), read from the
        pool or the host tier without bringing the session back."""
        lay = self.pool.layout
        if session.location == "none":  # never used: the zero state, without taking a slot
            return zero_state(lay.n_layer, lay.n_embd, lay.head_size)
        entry = self.host_entry(session)
        if entry is None:
            return self.pool.export(self.resident(session))
        parts = lay.split_layer(to_float32(entry.state).view(lay.n_layer, lay.layer_numel))
        return {name: part.clone(memory_format=torch.contiguous_format) for name, part in zip(CANONICAL_KEYS, parts)}

