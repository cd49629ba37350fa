"""The host tier: states of sessions that were moved out of the GPU pool.

When every slot is taken, the least recently used idle session is written to host
memory and its slot reused; touching the session again brings it back. An entry
holds either the slot's lossless host copy (the pool's storage dtype, handed over by
the pool's lazy host copy, so an unchanged slot is never copied twice) or an encoded
snapshot (int8, fp8, a narrower float). Entries older than a configurable age are
re-compressed into a colder format.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .snapshot import Encoded, decode, default_group, encode


@dataclass
class TierEntry:
    state: torch.Tensor | Encoded  # host copy [L, (N+2)C] in the storage dtype, or an encoded snapshot
    logits: torch.Tensor | None  # float32 [vocab] on the host, None before the first token
    stored_at: float

    @property
    def fmt(self) -> str:
        return self.state.fmt if isinstance(self.state, Encoded) else "storage"

    @property
    def nbytes(self) -> int:
        size = self.state.nbytes if isinstance(self.state, Encoded) else self.state.numel() * self.state.element_size()
        return size + (0 if self.logits is None else self.logits.numel() * 4)


class HostTier:
    def __init__(self, pool, fmt: str | None = None, cold_format: str | None = None, cold_after_s: float = 0.0,
                 clock=time.monotonic):  # fmt: skip
        self.pool = pool
        self.fmt = fmt  # None: the pool's storage dtype, lossless
        self.cold_format = cold_format
        self.cold_after_s = cold_after_s
        self.clock = clock
        self.entries: dict[int, TierEntry] = {}
        self.evictions = 0
        self.restores = 0
        self.recompressions = 0
        self.logits_bytes_moved = 0  # next-token logits copied to the host (state bytes: the pool counts)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def __contains__(self, key) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def store(self, key, slot: int, logits: torch.Tensor | None) -> TierEntry:
        """Writes the slot's state (and logits) to the host under key."""
        if self.fmt is None:
            state = self.pool.take_host_copy(slot)
        else:
            state = self.pool.encode_slot(slot, self.fmt).to("cpu")
            self.pool.bytes_to_host += state.nbytes
        host_logits = None
        if logits is not None:
            host_logits = logits.to("cpu", copy=True)
            self.logits_bytes_moved += host_logits.numel() * 4
        entry = self.entries[key] = TierEntry(state, host_logits, self.clock())
        self.evictions += 1
        return entry

    def load(self, key, slot: int) -> TierEntry:
        """Writes key's state back into the slot and removes the entry; returns it."""
        entry = self.entries[key]
        if isinstance(entry.state, Encoded):
            self.pool.load_encoded(slot, entry.state)
        else:
            self.pool.load_host(slot, entry.state, keep=True)
        del self.entries[key]  # only once the state is back in the pool
        self.restores += 1
        return entry

    def put(self, key, entry: TierEntry) -> None:
        self.entries[key] = entry

    def drop(self, key) -> None:
        self.entries.pop(key, None)

    def recompress_old(self, now: float | None = None) -> int:
        """Re-encodes entries older than cold_after_s into cold_format (on the host); returns how many."""
        cold = self.cold_format
        if cold is None:
            return 0
        now = self.clock() if now is None else now
        count = 0
        for key, entry in self.entries.items():
            if entry.fmt != cold and now - entry.stored_at >= self.cold_after_s:
                entry.state = encode(to_float32(entry.state), cold, default_group(self.pool.layout))
                count += 1
        self.recompressions += count
        return count


def to_float32(state: torch.Tensor | Encoded) -> torch.Tensor:
    """A host entry's state as a flat float32 CPU tensor (a view of the entry when it already is one)."""
    if isinstance(state, Encoded):
        flat = torch.empty(state.numel, dtype=torch.float32)
        decode(state, flat)
        return flat
    return state.reshape(-1).float()
