"""Ring-buffer state history: per slot, the last few snapshots, for exact rollback.

One preallocated buffer holds `capacity` periodic entries and `marks` undo-point
entries for every slot, in any snapshot format, plus the float32 next-token logits of
each entry. Undo points (where a feed or a reply starts) have entries of their own, so a
token-by-token feed cannot push the periodic ones out, and undo/regenerate land exactly
on an entry. Recording writes a free
entry (or, when none is free, the oldest) in place (encode straight into the ring's memory), so it never
allocates and never moves other entries. An entry remembers the token position
(how many tokens the slot had been fed) its state belongs to.

Rolling back restores the newest entry at or before the target position; the caller
re-feeds the few tokens between that entry and the target from its token log, which
makes the result equal the state at the target exactly (lossless formats) or within
the format's measured error.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from .snapshot import Encoded, default_group, empty_encoded, is_quantized

GATHER_ROWS = 32  # slots a deferred write gathers at once


@dataclass
class HistoryEntry:
    """A view of one ring entry: valid until the ring overwrites it."""

    position: int
    state: Encoded
    logits: torch.Tensor | None  # float32 [vocab] view, None when the slot had no logits yet


class StateHistory:
    def __init__(self, pool, every: int, capacity: int, fmt: str, vocab_size: int, marks: int = 0):
        if capacity < 1 or every < 1 or marks < 0:
            raise ValueError(f"history needs capacity >= 1, every >= 1, marks >= 0, got {capacity}, {every}, {marks}")
        self.pool = pool
        self.every = every
        self.capacity = capacity  # entries recorded every `every` tokens
        self.marks = marks  # further entries for undo points (the starts of feeds and replies)
        self.entries = capacity + marks
        self.fmt = fmt
        count = pool.num_slots * self.entries
        self.states = empty_encoded(fmt, pool.layout.slot_numel, default_group(pool.layout), pool.device, count=count)
        self.logits = torch.zeros(count, vocab_size, dtype=torch.float32, device=pool.device)
        # host-side bookkeeping: positions[slot][i] is entry i's position, -1 when empty
        self.positions = [[-1] * self.entries for _ in range(pool.num_slots)]
        self.has_logits = [[False] * self.entries for _ in range(pool.num_slots)]
        self.records = 0
        self.restores = 0
        # records whose bytes are not written yet (inside `deferred`): (slot, index, logits or None)
        self._pending: list[tuple[int, int, torch.Tensor | None]] | None = None

    @property
    def nbytes(self) -> int:
        return self.states.nbytes + self.logits.numel() * self.logits.element_size()

    def _index(self, slot: int, i: int) -> int:
        return slot * self.entries + i

    def due(self, old_position: int, new_position: int) -> bool:
        """Whether a forward from old to new position crossed a multiple of `every`."""
        return new_position // self.every > old_position // self.every

    def newest_position(self, slot: int) -> int:
        return max(self.positions[slot])

    def record(self, slot: int, position: int, logits: torch.Tensor | None, mark: bool = False) -> None:
        """Snapshots the slot's current state, which belongs to `position`, into the ring: into
        the undo-point entries with mark (when there are any), else into the periodic ones."""
        if position in self.positions[slot]:  # already recorded (e.g. a mark right after a boundary)
            return
        own = range(self.capacity, self.entries) if mark and self.marks else range(self.capacity)
        i = self._victim(slot, own)
        index = self._index(slot, i)
        if self._pending is not None:
            self._pending.append((slot, index, logits))
        else:
            self.pool.encode_slot(slot, self.fmt, out=self.states[index])
            if logits is not None:
                self.logits[index].copy_(logits)
        self.positions[slot][i] = position
        self.has_logits[slot][i] = logits is not None
        self.records += 1

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Records made inside the block are booked at once but their bytes are copied when it
        ends, all of them in one gather and one scatter (and one for their logits) instead of
        two copies per record: for a step in which many streams pass a cut. The recorded slots'
        states must not change inside the block (reading an entry back writes what is pending
        first). Formats that quantise, and pools that keep a slot in several blocks, copy one
        record at a time as outside the block."""
        if self._pending is not None or is_quantized(self.fmt) or self.pool.layout_name != "contiguous":
            yield  # nested, or nothing to gain
            return
        self._pending = []
        try:
            yield
        finally:
            pending, self._pending = self._pending, None
            self._write(pending)

    def _write(self, pending: list[tuple[int, int, torch.Tensor | None]]) -> None:
        """Copies booked records' states (and logits) into their ring entries."""
        if not pending:
            return
        slots = self._on_device([p[0] for p in pending])
        index = self._on_device([p[1] for p in pending])
        rows = self.pool.data.view(self.pool.data.shape[0], -1)
        for start in range(0, len(pending), GATHER_ROWS):  # bounded scratch: a slot can be megabytes
            part = slice(start, start + GATHER_ROWS)
            self.states.data.index_copy_(0, index[part], rows.index_select(0, slots[part]).to(self.states.data.dtype))
        with_logits = [(i, logits) for _, i, logits in pending if logits is not None]
        if with_logits:
            where = self._on_device([i for i, _ in with_logits])
            self.logits.index_copy_(0, where, torch.stack([logits for _, logits in with_logits]).float())

    def _on_device(self, values: list[int]) -> torch.Tensor:
        """An index tensor on the ring's device, without waiting for the work queued there: staged
        in pinned memory and copied asynchronously (a plain copy from pageable memory would
        synchronise with the queued forward). PyTorch's pinned allocator keeps the staging
        buffer until the copy has run."""
        host = torch.tensor(values, dtype=torch.int64)
        device = self.states.data.device
        if device.type != "cuda":
            return host.to(device)
        return host.pin_memory().to(device, non_blocking=True)

    def _settle(self) -> None:
        """Writes pending records before an entry is read (inside `deferred`)."""
        if self._pending:
            pending, self._pending = self._pending, []
            self._write(pending)

    def _victim(self, slot: int, own: range) -> int:
        """The entry of `own` a record overwrites: a free one (never used, or freed by a
        rollback), else the oldest position."""
        positions = self.positions[slot]
        return min(own, key=lambda i: (positions[i] >= 0, positions[i]))

    def find(self, slot: int, position: int) -> int | None:
        """Entry number of the newest entry at or before position, or None."""
        best = None
        for i, p in enumerate(self.positions[slot]):
            if 0 <= p <= position and (best is None or p > self.positions[slot][best]):
                best = i
        return best

    def restore(self, slot: int, i: int) -> tuple[int, torch.Tensor | None]:
        """Writes entry i back into the slot; returns (position, logits view or None)."""
        self._settle()
        index = self._index(slot, i)
        self.pool.load_encoded(slot, self.states[index])
        self.restores += 1
        logits = self.logits[index] if self.has_logits[slot][i] else None
        return self.positions[slot][i], logits

    def truncate(self, slot: int, position: int) -> None:
        """Forgets entries after position (they belong to a future that was rolled back)."""
        for i, p in enumerate(self.positions[slot]):
            if p > position:
                self.positions[slot][i] = -1

    def clear(self, slot: int) -> None:
        self.positions[slot] = [-1] * self.entries

    def get_recent(self, slot: int, n: int | None = None) -> list[HistoryEntry]:
        """Views of the slot's newest n entries (all when n is None), newest first."""
        self._settle()
        order = sorted((p, i) for i, p in enumerate(self.positions[slot]) if p >= 0)[::-1]
        out = []
        for p, i in order[:n]:
            index = self._index(slot, i)
            logits = self.logits[index] if self.has_logits[slot][i] else None
            out.append(HistoryEntry(p, self.states[index], logits))
        return out
