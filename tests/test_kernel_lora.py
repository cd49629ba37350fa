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
    # the first three chains padded to 32 rows cost 96 <= 1.5 x 64 rows: one group; the fourth alone
    assert pack.groups == ((0, 3, 32), (3, 1, 16)) and pack.starts == (0, 32, 64, 96)
    assert pack.down.shape == (3 * 32 + 16, 40) and pack.bounds.tolist() == [[0, 16], [32, 48], [64, 96], [96, 112]]
    # (row block, mix * 4 + activation) for every block holding weights; blocks 1 and 3 are padding
    assert pack.block_codes.tolist() == [[0, 1 * 4 + 1], [2, 4 * 4], [4, 5 * 4 + 2], [5, 5 * 4 + 2], [6, 3 * 4]]
    assert pack.group_rows(pack.down, 0).shape == (3, 32, 40)
    assert pack.gathers[0].tolist() == [1, 4, 5] and pack.gathers[1] is None  # mixes 1, 4, 5 are gathered
    assert torch.equal(pack.group_rows(pack.up_t, 0)[1, :16], chains[1][3].t())
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
    # wider steps: over C (32 and 64 channels, the last step partial) and over a chain's rows (32
    # and 64: steps that run past a 16-row chain into the next chain's rows, which must be masked)
    for down_c, up_r in ((32, 32), (64, 64)):
        for g, w in zip(lo.lora_triton(x, pack, down_block_c=down_c, up_block_r=up_r), lo.lora_reference(x, pack)):
            assert rel_err(g, w) <= 1e-5
    with pytest.raises(ValueError, match="mixed must be"):
        lo.lora_triton(x[:3], pack)
    with pytest.raises(ValueError, match="mixed must be"):
        lo.lora_triton(mixes(17, 72, torch.float32, seed=5)[:3], pack)  # the many-rows path checks too


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("T,C,ranks,splits", [(17, 40, (5, 16, 21, 3), None), (37, 72, (9, 12, 40, 20), 3),
                                              (33, 48, (12, 12, 40), 1)])  # fmt: skip
def test_many_rows_match_reference(T, C, ranks, splits, dtype, poisoned_empty):
    """More than 16 rows (lora_rows_triton: token tiles, C split, the down program that completes
    a tile adding the splits and activating): several token tiles (the last partial), row tiles past a chain's end (masked
    against the next chain's rows), splits that end mid-step, and the default launch."""
    _, pack = make_pack(C, ranks, dtype, seed=T + C + 2)
    x = mixes(T, C, dtype, seed=T * C + 3)
    want = lo.lora_reference(x, pack)
    configs = [{}] if splits is None else [{"block_t": 16, "block_r": 32, "block_k": 16, "splits": splits,
                                            "up_block_c": 16, "up_block_r": 16}]  # fmt: skip
    for config in configs:
        got = lo.lora_rows_triton(x, pack, **config)
        assert len(got) == len(ranks)
        for g, w in zip(got, want):
            assert g.dtype == dtype and g.shape == (T, C) and not g.isnan().any()
            assert rel_err(g, w) <= TOL[dtype]
    # lora_triton and the "triton" backend hand more than 16 rows to the same launches
    for g, w in zip(lo.lora(x, pack, backend="triton"), lo.lora_rows_triton(x, pack)):
        assert torch.equal(g, w)


def test_many_rows_splits():
    """rows_splits: about two programs per SM for few rows, never finer than split_k channels, one
    split once the token tiles fill the GPU; and split results equal the unsplit up to rounding."""
    _, pack = make_pack(64, (16, 16, 32, 16), torch.float32, seed=8)  # 5 row tiles of 32 (g: 2)
    dev = torch.device("cpu")  # the interpreter's 4 "SMs" (gemv._num_sms)
    assert lo.rows_splits(20, 64, pack, dev, 16, 32, 16) == 1  # 2 token tiles x 5 = 10 programs >= 8
    assert lo.rows_splits(10, 4096, pack, dev, 16, 32, 512) == 2  # 5 programs: 2 splits give 10
    assert lo.rows_splits(10, 256, pack, dev, 16, 32, 512) == 1  # C has one split of 512
    x = mixes(20, 64, torch.float32, seed=9)
    one, two = (lo.lora_rows_triton(x, pack, block_t=16, block_k=16, splits=s) for s in (1, 4))
    for a, b in zip(one, two):
        assert rel_err(a, b) <= 1e-6


def test_groups_of_model_ranks():
    """The released shapes' ranks (v, w, a, g): v, w and a share a group, g is alone."""
    assert lo._group([64, 96, 96, 256]) == [(0, 3, 96), (3, 1, 256)]
    assert lo._group([96, 128, 128, 480]) == [(0, 3, 128), (3, 1, 480)]
    assert lo._group([96, 96, 256]) == [(0, 2, 96), (2, 1, 256)]  # layer 0: no v chain


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("T,C,ranks,mix_order", [(1, 40, (5, 16, 21, 3), (1, 4, 5, 3)), (37, 24, (9, 12, 12, 40), (2, 3, 4, 5)),
                                                 (20, 56, (12, 12, 40), (3, 4, 5))])  # fmt: skip
def test_batched_gemms_match_reference(T, C, ranks, mix_order, dtype):
    """The bmm backend (groups of chains in batched GEMMs; consecutive mixes read as a view, others
    gathered) against the torch chains, at any number of rows."""
    gen = torch.Generator().manual_seed(T + C)
    acts = {1: "tanh", 2: "none", 3: "tanh", 4: "none", 5: "sigmoid"}
    chains = [(m, acts[m], (torch.randn(r, C, generator=gen) * C**-0.5 * 2).to(DEVICE, dtype),
               (torch.randn(C, r, generator=gen) * r**-0.5).to(DEVICE, dtype)) for m, r in zip(mix_order, ranks)]  # fmt: skip
    pack = lo.pack_lora(chains)
    x = mixes(T, C, dtype, seed=T * C + 1)
    want, got = lo.lora_reference(x, pack), lo.lora(x, pack, backend="bmm")
    assert len(got) == len(ranks)
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == (T, C)
        assert rel_err(g, w) <= TOL[dtype]


def test_default_backend_by_rows():
    _, pack = make_pack(24, (4, 4, 4), torch.float32, seed=6)
    x = mixes(17, 24, torch.float32, seed=7)
    want = lo.lora_bmm(x, pack) if x.is_cuda else lo.lora_reference(x, pack)  # CUDA, > 16 rows: batched GEMMs
    assert all(torch.equal(g, w) for g, w in zip(lo.lora(x, pack), want))
    if x.is_cuda:  # at most 16 rows: the two kernels
        assert all(torch.equal(g, w) for g, w in zip(lo.lora(x[:, :16], pack), lo.lora_triton(x[:, :16], pack)))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("T,C,G,ranks", [(1, 48, 3, (4, 4, 8, 4)), (5, 40, 3, (5, 16, 21)), (16, 72, 2, (32, 17, 48, 9))])
def test_downs_in_the_projection_launch(T, C, G, ranks, dtype, poisoned_empty):
    """lora_down_with_projection: one launch whose programs are the down stack's row blocks and the
    grouped projection's tiles. The projection equals the GEMV kernel's unsplit result, and the
    ups of its h (lora_up_triton) the two-launch chains (up to the order of the float32 sums)."""
    from rwkvstate.ops.gemv import gemv_reference, gemv_triton

    _, pack = make_pack(C, ranks, dtype, seed=T + C + 1)
    x = mixes(T, C, dtype, seed=T * C + 2)
    gen = torch.Generator().manual_seed(C)
    weight = (torch.randn(G, C + 8, C, generator=gen) * C**-0.5).to(DEVICE, dtype)  # N = C + 8: a partial tile
    out, h = lo.lora_down_with_projection(x, weight, pack, block_n=16, block_k=16)  # several tiles and K steps
    assert out.shape == (G, T, C + 8) and h.shape == (T, pack.down.shape[0])
    assert torch.equal(out, gemv_triton(x[:G], weight, num_splits=1, block_n=16, block_k=16))
    assert rel_err(out, gemv_reference(x[:G], weight)) <= TOL[dtype]
    for got, want_triton, want in zip(lo.lora_up_triton(h, pack), lo.lora_triton(x, pack), lo.lora_reference(x, pack)):
        assert rel_err(got, want_triton) <= TOL[dtype] and rel_err(got, want) <= TOL[dtype]
    with pytest.raises(ValueError, match="weight must be"):
        lo.lora_down_with_projection(x, weight[:, :, :-1], pack)
    with pytest.raises(ValueError, match="at most 16 rows"):
        lo.lora_down_with_projection(mixes(17, C, dtype, seed=1), weight, pack)
