"""The decode batch: the streams that sample a token every step, and their tensors on the device.

Per-slot tables (on the model's device, one row per pool slot plus the scratch slot) hold each
stream's sampling parameters and stop ids; a stream writes its slot's rows once, when it joins.
The batch's per-row tensors (slot indices, the parameters gathered from the tables, the stream
positions the random draws are keyed by) are rebuilt only when a stream joins or leaves; in
between, a step only advances the positions on the device. So the Python work of a step is
the per-stream bookkeeping of the sampled ids, nothing that grows with the vocabulary or the
parameters.

A stream may join while it still reads a short prompt ("prompting"): its prompt is written once
into a per-slot table on the device, and each step feeds its next prompt token instead of a
sampled one (`force_prompts`, on the device: a count of tokens left per row goes down by one).
Its draws are thrown away, count for no penalty and move no random position; once its prompt
is read (`prompt_done`) the row is rebuilt as an ordinary sampling row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..ops import sampling as ops
from .sampling import TokenCounts, logit_bias_rows, sampling_rows
from .transfer import to_device

if TYPE_CHECKING:
    from .session import GenerationStream


class DecodeBatch:
    def __init__(self, num_slots: int, vocab_size: int, device: torch.device, counts: TokenCounts,
                 prompt_width: int = 0):  # fmt: skip
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
        # prompting rows: their prompts right-aligned in a [rows, prompt_width] table (made on first
        # use), and per batch row the prompt tokens still to feed (0: the row samples)
        self.prompt_width = prompt_width
        self.prompting: set[GenerationStream] = set()
        self._prompt_table: torch.Tensor | None = None
        self._left: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.streams)

    def __contains__(self, stream) -> bool:
        return stream in self.streams

    def join(self, stream: GenerationStream) -> None:
        """The stream samples from the next step on, or, while its prompt is not read yet (at
        most prompt_width tokens left in stream.pending), feeds its prompt first."""
        if stream.pending:
            assert len(stream.pending) <= self.prompt_width, "a prompting row's prompt fits its table row"
            self.prompting.add(stream)
        self.streams.append(stream)
        self._joined.append(stream)
        self._changed = True

    def leave(self, stream: GenerationStream) -> None:
        if stream in self.streams:
            self.streams.remove(stream)
            self._changed = True
        if stream in self._joined:
            self._joined.remove(stream)
        self.prompting.discard(stream)

    def prompt_done(self, stream: GenerationStream) -> None:
        """The stream's prompt is read: its row samples from the next step on."""
        self.prompting.discard(stream)
        self._changed = True

    def resync(self) -> None:
        """A step fed prompt tokens on the host (not through force_prompts): the rows' counts of
        tokens left are rebuilt from the streams' pending prompts before the next step."""
        self._changed = True

    def count_tensor(self) -> torch.Tensor:
        """What the sampler reads for penalties (a dummy while no stream has any)."""
        return self._no_counts if self.counts.data is None else self.counts.data

    def prepare(self) -> None:
        """Brings the per-row tensors up to date after joins and leaves (nothing otherwise)."""
        if not self._changed:
            return
        if self._joined:
            self._write_slot_rows(self._joined)
            self._write_prompts([s for s in self._joined if s in self.prompting])
            self._joined = []
        self.slot_list = [resident_slot(s) for s in self.streams]
        positions = [len(s.token_ids) for s in self.streams]
        prompting = self.prompting
        left = [len(s.pending) if s in prompting else 0 for s in self.streams] if prompting else None
        host = torch.tensor([self.slot_list, positions] + ([left] if left else []), dtype=torch.int64)
        moved = to_device(host, self.device)
        self.slots = moved[0]
        ints = self.ints.index_select(1, self.slots)
        ints[ops.I_POSITION] = moved[1]
        self._left = None
        if left:
            self._left = moved[2]
            ints[ops.I_COUNT_ROW].masked_fill_(self._left > 0, -1)  # a thrown-away draw counts for nothing
        bias = logit_bias_rows([s.params for s in self.streams], self.device)
        self.rows = ops.SamplingRows(self.floats.index_select(1, self.slots), ints, bias)
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

    def force_prompts(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ids to feed this step (on the device): a prompting row's next prompt token replaces
        its draw, and its count of tokens left goes down by one. Returns (ids, the prompting rows'
        mask or None when there are none)."""
        left = self._left
        if left is None:
            return ids, None
        assert self._prompt_table is not None
        width = self.prompt_width
        prompting = left > 0
        tokens = self._prompt_table[self.slots, (width - left).clamp(0, width - 1)]
        left.sub_(prompting.to(left.dtype))
        return torch.where(prompting, tokens, ids), prompting

    def feed_mask(self, ids: torch.Tensor, prompting: torch.Tensor | None = None) -> torch.Tensor:
        """The slots to feed the ids into: a row whose sample failed or hit a stop id points at the
        scratch slot instead, so its state is left as it was (the same rule the host applies to
        the ids afterwards); a prompting row is always fed."""
        keep = (ids >= 0) & (ids < self.vocab_size)
        if self.stops is not None:
            keep &= ~self.stops[self.slots, ids.clamp(0, self.vocab_size - 1)]
        if prompting is not None:
            keep |= prompting
        return torch.where(keep, self.slots, self.floats.shape[1] - 1)

    # ---- per-slot rows, written once per joining stream ------------------------------------
    def _write_slot_rows(self, streams: list[GenerationStream]) -> None:
        slots = [resident_slot(s) for s in streams]
        params = [s.params for s in streams]
        count_rows = [slot if p.has_penalties() else -1 for slot, p in zip(slots, params)]
        rows = sampling_rows(params, [s.seed for s in streams], [0] * len(streams), count_rows, self.device)
        index = to_device(torch.tensor(slots, dtype=torch.int64), self.device)
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
        self.stops[index] = to_device(table, self.device)

    def _write_prompts(self, streams: list[GenerationStream]) -> None:
        """Each joining prompting stream's prompt, right-aligned in its slot's table row: the next
        token of a row with n tokens left is at column width - n."""
        if not streams:
            return
        width = self.prompt_width
        if self._prompt_table is None:
            self._prompt_table = torch.zeros(self.floats.shape[1], width, dtype=torch.int64, device=self.device)
        table = torch.zeros(len(streams), width, dtype=torch.int64)
        for row, stream in enumerate(streams):
            table[row, width - len(stream.pending) :] = torch.tensor(stream.pending, dtype=torch.int64)
        index = torch.tensor([resident_slot(s) for s in streams], dtype=torch.int64)
        self._prompt_table[to_device(index, self.device)] = to_device(table, self.device)


def resident_slot(stream: GenerationStream) -> int:
    slot = stream.session._slot
    assert slot is not None, "a stream of the decode batch keeps its session resident"
    return slot
