"""The decode batch: the streams that sample a token every step, and their tensors on the device.

Per-slot tables (on the model's device, one row per pool slot plus the scratch slot) hold each
stream's sampling parameters and stop ids; a stream writes its slot's rows once, when it joins.
The batch's per-row tensors (slot indices, the parameters gathered from the tables, the stream
positions the random draws are keyed by) are rebuilt only when a stream joins or leaves; in
between, a step only advances the positions on the device. So the Python work of a step is
the per-stream bookkeeping of the sampled ids, nothing that grows with the vocabulary or the
parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..ops import sampling as ops
from .sampling import TokenCounts, sampling_rows

if TYPE_CHECKING:
    from .session import GenerationStream


class DecodeBatch:
    def __init__(self, num_slots: int, vocab_size: int, device: torch.device, counts: TokenCounts):
        rows = num_slots + 1  # the scratch slot has rows too: masked rows point there
        self.device, self.counts, self.vocab_size = torch.device(device), counts, vocab_size
        self.floats = torch.zeros(ops.NUM_FLOATS, rows, dtype=torch.float32, device=device)
        self.ints = torch.zeros(ops.NUM_INTS, rows, dtype=torch.int64, device=device)
        self.stops: torch.Tensor | None = None  # bool [rows, vocab]: a slot's stop ids; allocated on first use
        self.streams: list[GenerationStream] = []
        self.slot_list: list[int] = []
        self.slots = torch.zeros(0, dtype=torch.int64, device=device)
        self.rows = ops.SamplingRows(self.floats[:, :0], self.ints[:, :0])
        self._joined: list[GenerationStream] = []
        self._changed = False
        self._no_counts = torch.zeros(1, 1, dtype=torch.int32, device=device)

    def __len__(self) -> int:
        return len(self.streams)

    def __contains__(self, stream) -> bool:
        return stream in self.streams

    def join(self, stream: GenerationStream) -> None:
        self.streams.append(stream)
        self._joined.append(stream)
        self._changed = True

    def leave(self, stream: GenerationStream) -> None:
        if stream in self.streams:
            self.streams.remove(stream)
            self._changed = True
        if stream in self._joined:
            self._joined.remove(stream)

    def count_tensor(self) -> torch.Tensor:
        """What the sampler reads for penalties (a dummy while no stream has any)."""
        return self._no_counts if self.counts.data is None else self.counts.data

    def prepare(self) -> None:
        """Brings the per-row tensors up to date after joins and leaves (nothing otherwise)."""
        if not self._changed:
            return
        if self._joined:
            self._write_slot_rows(self._joined)
            self._joined = []
        self.slot_list = [resident_slot(s) for s in self.streams]
        positions = [len(s.token_ids) for s in self.streams]
        host = torch.tensor([self.slot_list, positions], dtype=torch.int64)
        moved = _to_device(host, self.device)
        self.slots = moved[0]
        ints = self.ints.index_select(1, self.slots)
        ints[ops.I_POSITION] = moved[1]
        self.rows = ops.SamplingRows(self.floats.index_select(1, self.slots), ints, self._bias())
        self._changed = False

    def row(self, i: int) -> ops.SamplingRows:
        """Row i's parameters alone (to draw it alone when the batched draw fails)."""
        bias = self.rows.bias
        if bias is not None:
            mine = bias[0] == i
            bias = (torch.zeros_like(bias[0][mine]), bias[1][mine], bias[2][mine])
        return ops.SamplingRows(self.rows.floats[:, i : i + 1], self.rows.ints[:, i : i + 1], bias)

    def advance(self) -> None:
        """Every row sampled one token: the next draw of each stream is keyed one position on."""
        self.rows.ints[ops.I_POSITION] += 1

    def feed_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """The slots to feed the sampled ids into: a row whose sample failed or hit a stop id points
        at the scratch slot instead, so its state is left as it was (the same rule the host
        applies to the ids afterwards)."""
        keep = (ids >= 0) & (ids < self.vocab_size)
        if self.stops is not None:
            keep &= ~self.stops[self.slots, ids.clamp(0, self.vocab_size - 1)]
        return torch.where(keep, self.slots, self.floats.shape[1] - 1)

    # ---- per-slot rows, written once per joining stream ------------------------------------
    def _write_slot_rows(self, streams: list[GenerationStream]) -> None:
        slots = [resident_slot(s) for s in streams]
        params = [s.params for s in streams]
        count_rows = [slot if p.has_penalties() else -1 for slot, p in zip(slots, params)]
        rows = sampling_rows(params, [s.seed for s in streams], [0] * len(streams), count_rows, self.device)
        index = _to_device(torch.tensor(slots, dtype=torch.int64), self.device)
        self.floats[:, index] = rows.floats
        self.ints[:, index] = rows.ints
        if any(s.stop_ids for s in streams) or self.stops is not None:
            self._write_stops(streams, index)

    def _write_stops(self, streams: list[GenerationStream], index: torch.Tensor) -> None:
        if self.stops is None:
            self.stops = torch.zeros(self.floats.shape[1], self.vocab_size, dtype=torch.bool, device=self.device)
        table = torch.zeros(len(streams), self.vocab_size, dtype=torch.bool)
        for row, stream in enumerate(streams):
            ids = [t for t in stream.stop_ids if 0 <= t < self.vocab_size]
            table[row, ids] = True
        self.stops[index] = _to_device(table, self.device)

    def _bias(self):
        """The logit bias of the rows that have one, as (rows, ids, values) tensors, or None."""
        entries = [(row, t, v) for row, s in enumerate(self.streams) for t, v in (s.params.logit_bias or {}).items()]
        if not entries:
            return None
        rows, ids, values = zip(*entries)
        return (_to_device(torch.tensor(rows), self.device), _to_device(torch.tensor(ids), self.device),
                _to_device(torch.tensor(values, dtype=torch.float32), self.device))  # fmt: skip


def resident_slot(stream: GenerationStream) -> int:
    slot = stream.session._slot
    assert slot is not None, "a stream of the decode batch keeps its session resident"
    return slot


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One host-to-device copy (from pinned memory, asynchronous, on a GPU)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
