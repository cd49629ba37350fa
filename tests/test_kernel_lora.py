"""The stacked LoRA chains (two launches) against the torch chains (interpreted on CPU, tiny odd
shapes): ranks that are not multiples of the row block, every activation, NaN-poisoned outputs,
and the model's views into the stacks."""

import pytest
import torch

pytest.importorskip("triton")

# tests/conftest.py sets TRITON_INTERPRET=1 before rwkvstate is imported when there is no GPU
from conftest import poison_empty, rel_err  # noqa: E402
from rwkvstate.ops import lora as lo  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # 16-bit: a neighbouring value carried on


def make_pack(C: int, ranks, dtype, seed: int):
    """Chains w (tanh), a, g (sigmoid)[, v] of the given ranks, as the model builds them."""
    gen = torch.Generator().manual_seed(seed)
    chains = []
    for (mix, act), rank in zip([(1, "tanh"), (4, "none"), (5, "sigmoid"), (3, "none")], ranks):
        down = torch.randn(rank, C, generator=gen) * C**-0.5 * 2
        up = torch.randn(C, rank, generator=gen) * rank**-0.5
        chains.append((mix, act, down.to(DEVICE, dtype), up.to(DEVICE, dtype)))
    return chains, lo.pack_lora(chains)


def mixes(T: int, C: int, dtype, seed: int):
    return torch.randn(6, T, C, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@pytest.fixture
def poisoned_empty(monkeypatch):
    poison_empty(monkeypatch, lo)


def test_pack_keeps_the_chains_and_pads_with_zeros():
    chains, pack = make_pack(40, (5, 16, 21, 3), torch.float32, seed=1)
    assert pack.down.shape == (16 + 16 + 32 + 16, 40) and pack.bounds.tolist() == [0, 16, 32, 64, 80]
    assert pack.block_codes.tolist() == [1 * 4 + 1, 4 * 4, 5 * 4 + 2, 5 * 4 + 2, 3 * 4]
    for s, (_, _, down, up) in enumerate(chains):
        assert torch.equal(pack.down_weight(s), down) and torch.equal(pack.up_weight(s), up)
    used = torch.zeros(pack.down.shape[0], dtype=torch.bool)
    for start, rank in zip(pack.starts, pack.ranks):
        used[start : start + rank] = True
    assert not pack.down[~used].any() and not pack.up_t[~used].any()
    with pytest.raises(ValueError, match="activation"):
        lo.pack_lora([(1, "relu", chains[0][2], chains[0][3])])


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("T,C,ranks", [(1, 48, (4, 4, 8, 4)), (5, 40, (5, 16, 21)), (16, 136, (32, 17, 48, 9))])
def test_matches_reference(T, C, ranks, dtype, poisoned_empty):
    _, pack = make_pack(C, ranks, dtype, seed=T + C)
    x = mixes(T, C, dtype, seed=T * C)
    want = lo.lora(x, pack, backend="torch")
    got = lo.lora(x, pack, backend="triton")
    assert len(got) == len(want) == len(ranks)
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == (T, C) and not g.isnan().any()
        assert rel_err(g, w) <= TOL[dtype]


def test_several_channel_blocks_and_bad_input():
    _, pack = make_pack(72, (7, 9, 20, 4), torch.float32, seed=3)
    x = mixes(3, 72, torch.float32, seed=4)
    for g, w in zip(lo.lora_triton(x, pack, block_c=16), lo.lora_reference(x, pack)):  # 5 blocks, the last partial
        assert rel_err(g, w) <= 1e-5
    with pytest.raises(ValueError, match="at most 16 rows"):
        lo.lora_triton(mixes(17, 72, torch.float32, seed=5), pack)
    with pytest.raises(ValueError, match="mixed must be"):
        lo.lora_triton(x[:3], pack)


def test_default_backend_by_rows():
    _, pack = make_pack(24, (4, 4, 4), torch.float32, seed=6)
    x = mixes(17, 24, torch.float32, seed=7)
    assert all(torch.equal(g, w) for g, w in zip(lo.lora(x, pack), lo.lora_reference(x, pack)))  # CPU or > 16 rows
