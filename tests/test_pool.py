"""State pools: allocator, layout, reset/copy/export/load, and bad input changing nothing."""

from __future__ import annotations

import pytest
import torch

from rwkvstate.errors import SlotError, StateError
from rwkvstate.state.convert import zero_state
from rwkvstate.state.layout import StateLayout, dtype_name
from rwkvstate.state.pool import ContiguousPool, FragmentedPool, new_pool

LAYOUT = StateLayout(n_layer=3, n_embd=40, head_size=8)  # C not a power of two, H = 5
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
POOLS = [("contiguous", torch.float32), ("contiguous", torch.float16), ("contiguous", torch.bfloat16), ("fragmented", torch.float32)]


def random_state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in zero_state(3, 40, 8).items()}


def assert_state_equal(a, b, tol=0.0):
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=tol, atol=tol), key


@pytest.fixture(params=[(kind, dt, dev) for kind, dt in POOLS for dev in DEVICES], ids=str)
def pool(request):
    kind, dtype, device = request.param
    return new_pool(LAYOUT, 5, dtype, kind, device)


def test_layout_sizes():
    assert LAYOUT.layer_numel == (8 + 2) * 40
    assert LAYOUT.slot_numel == 3 * 10 * 40
    assert LAYOUT.slot_nbytes(torch.float16) == 3 * 10 * 40 * 2
    with pytest.raises(ValueError, match="multiple of head_size"):
        StateLayout(2, 30, 8)


def test_contiguous_pool_is_one_slot_major_block():
    p = ContiguousPool(LAYOUT, 4, torch.float16)
    assert p.data.shape == (5, 3, LAYOUT.layer_numel) and p.data.is_contiguous()
    assert p.nbytes == 5 * LAYOUT.slot_nbytes(torch.float16)
    blocks = p._slot_blocks(2)
    assert len(blocks) == 1 and blocks[0].is_contiguous()
    att, wkv, ffn = p.layer(1)
    assert att.shape == (5, 40) and wkv.shape == (5, 5, 8, 8) and ffn.shape == (5, 40)
    # the views alias the single buffer, at the documented offsets
    wkv[2, 1, 3, 4] = 7
    assert p.data[2, 1, LAYOUT.wkv_offset + 1 * 64 + 3 * 8 + 4] == 7


def test_fragmented_pool_is_float32_per_layer():
    p = FragmentedPool(LAYOUT, 4)
    assert len(p.tensors) == 3 and all(t.shape == (5, LAYOUT.layer_numel) for t in p.tensors)
    assert p.nbytes == 5 * LAYOUT.slot_nbytes(torch.float32)
    with pytest.raises(StateError, match="float32 only"):
        FragmentedPool(LAYOUT, 4, torch.float16)


def test_export_load_round_trip(pool):
    state = random_state(1)
    pool.load(3, state)
    tol = {torch.float32: 0, torch.float16: 1e-3, torch.bfloat16: 8e-3}[pool.dtype] * 4
    assert_state_equal(pool.export(3), state, tol)
    exported = pool.export(3)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in exported.values())
    assert_state_equal(pool.export(0), zero_state(3, 40, 8))  # neighbours untouched


def test_copy_and_reset(pool):
    pool.load(1, random_state(2))
    pool.copy(1, 4)
    assert_state_equal(pool.export(4), pool.export(1))
    pool.reset(1)
    assert_state_equal(pool.export(1), zero_state(3, 40, 8))
    assert pool.export(4)["wkv"].abs().sum() > 0


def test_allocator(pool):
    slots = [pool.allocate() for _ in range(5)]
    assert sorted(slots) == [0, 1, 2, 3, 4] and pool.free_slots == 0
    assert not pool.can_allocate()
    with pytest.raises(SlotError, match="all 5 slots"):
        pool.allocate()
    pool.load(2, random_state(3))
    pool.free(2)
    with pytest.raises(SlotError, match="already free"):
        pool.free(2)
    assert pool.allocate() == 2
    assert_state_equal(pool.export(2), zero_state(3, 40, 8))  # a new owner starts from zero
    assert pool.scratch_slot == 5


@pytest.mark.parametrize("slot", [-1, 5, 1.0, True, "0"])
def test_bad_slot_index(pool, slot):
    with pytest.raises(SlotError, match="out of range"):
        pool.reset(slot)


def test_bad_state_is_rejected_and_changes_nothing(pool):
    pool.load(0, random_state(4))
    before = pool.export(0)
    good = random_state(5)
    bad_states = [
        ({k: v for k, v in good.items() if k != "wkv"}, "missing"),
        ({**good, "extra": good["wkv"]}, "unknown"),
        ({**good, "wkv": good["wkv"][:, :, :, :7]}, "shape"),
        ({**good, "att_shift": good["att_shift"].clone().index_fill_(1, torch.tensor([3]), float("nan"))}, "non-finite"),
        ([good], "dict"),
    ]
    for state, message in bad_states:
        with pytest.raises(StateError, match=message):
            pool.load(0, state)
    if pool.dtype == torch.float16:
        with pytest.raises(StateError, match="beyond the range"):
            pool.load(0, random_state(6, scale=1e5))
    assert_state_equal(pool.export(0), before)


def test_pool_rejects_bad_construction():
    with pytest.raises(SlotError, match="at least one slot"):
        new_pool(LAYOUT, 0)
    with pytest.raises(StateError, match="storage dtype"):
        new_pool(LAYOUT, 1, torch.float64)
    with pytest.raises(StateError, match="'contiguous' or 'fragmented'"):
        new_pool(LAYOUT, 1, kind="paged")


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8"])
def test_every_layout_encodes_and_loads_a_slot(pool, fmt):
    """One interface: encode_slot / load_encoded / slot_view work on every layout, and load_encoded
    writes exactly what the same snapshot decodes to in a contiguous pool."""
    state = random_state(3)
    pool.load(1, state)
    enc = pool.encode_slot(1, fmt)
    assert torch.equal(pool.slot_view(1), pool.host_copy(1).to(pool.device).reshape(-1))
    pool.load_encoded(4, enc)
    reference = ContiguousPool(LAYOUT, 1, pool.dtype, pool.device)
    reference.load_encoded(0, enc)
    assert_state_equal(pool.export(4), reference.export(0))
    if fmt in ("fp32", dtype_name(pool.dtype)):
        assert_state_equal(pool.export(4), pool.export(1))  # a lossless round trip


def test_the_pool_bumps_its_own_write_generations(pool):
    """Every writer bumps the slot's generation inside the pool, so a stale host copy is never reused."""
    before = list(pool.generation)
    pool.load(0, random_state(1))
    pool.copy(0, 1)
    pool.reset(2)
    pool.load_encoded(3, pool.encode_slot(0, "fp32"))
    assert pool.begin_write([4]) == [4]
    assert all(pool.generation[s] > before[s] for s in range(5))
    with pytest.raises(SlotError):
        pool.begin_write([4, 4])  # checked like a forward's slots
    host = pool.host_copy(0).clone()
    pool.begin_write([0])
    pool.layer(0)[0][0].fill_(1.0)  # the forward's write, after begin_write
    assert not torch.equal(pool.host_copy(0), host)
