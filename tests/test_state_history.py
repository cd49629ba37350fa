"""The history ring's deferred records (StateHistory.deferred): a step's records booked at once
and written together when the block ends give the ring exactly what one copy per record gives."""

from __future__ import annotations

import pytest
import torch

from rwkvstate.state.history import StateHistory
from rwkvstate.state.layout import StateLayout
from rwkvstate.state.pool import new_pool

LAYOUT = StateLayout(3, 48, 16)
VOCAB = 37


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def ring(fmt: str, seed: int, device: str = "cpu") -> StateHistory:
    pool = new_pool(LAYOUT, 5, torch.float16, device=device)
    pool.data.copy_(torch.randn(pool.data.shape, generator=torch.Generator().manual_seed(seed)))
    return StateHistory(pool, every=4, capacity=2, fmt=fmt, vocab_size=VOCAB, marks=1)


def records(history: StateHistory) -> list[tuple]:
    """Slot, position, entry, mark?, logits? of a fixed sequence of records (one slot twice, one
    position twice: booked once)."""
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(VOCAB, generator=g).to(history.pool.device) for _ in range(4)]
    return [(4, 8, logits[0], False), (1, 4, None, False), (4, 12, logits[1], True), (0, 4, logits[2], False),
            (4, 12, logits[3], True), (2, 16, logits[3], False)]  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", ["fp16", "fp32", "bf16", "int8"])
def test_deferred_records_equal_one_copy_per_record(fmt, device):
    """On CUDA the index tensors are staged through pinned memory and copied asynchronously."""
    now, later = ring(fmt, 1, device), ring(fmt, 1, device)
    for slot, position, logits, mark in records(now):
        now.record(slot, position, logits, mark=mark)
    with later.deferred():
        for slot, position, logits, mark in records(later):
            later.record(slot, position, logits, mark=mark)
        if fmt != "int8":  # booked, not yet written (int8 quantises one record at a time)
            assert later._pending
    assert later._pending is None and later.positions == now.positions and later.has_logits == now.has_logits
    written = [(slot * now.entries + i, now.has_logits[slot][i]) for slot, row in enumerate(now.positions)
               for i, p in enumerate(row) if p >= 0]  # the rest of the ring is never-written memory
    assert len(written) == 5
    for index, has_logits in written:
        assert torch.equal(later.states[index].data, now.states[index].data)
        if now.states.scales is not None:
            assert torch.equal(later.states[index].scales, now.states[index].scales)
        if has_logits:
            assert torch.equal(later.logits[index], now.logits[index])


def test_reading_an_entry_inside_the_block_writes_the_pending_ones_first():
    history = ring("fp16", 2)
    rows = history.pool.data.view(history.pool.data.shape[0], -1)
    with history.deferred():
        history.record(3, 4, None)
        assert torch.equal(history.get_recent(3)[0].state.data, rows[3])  # written before the read
        assert history._pending == []  # and the block still defers
        history.record(2, 4, None)
        assert len(history._pending) == 1
    assert history._pending is None and torch.equal(history.get_recent(2)[0].state.data, rows[2])
    position, _ = history.restore(3, history.find(3, 4))
    assert position == 4
