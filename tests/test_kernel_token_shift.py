"""Fused and per-mix Triton token-shift kernels against the torch reference (interpreted on CPU)."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

# tests/conftest.py sets TRITON_INTERPRET=1 before rwkvstate is imported when there is no GPU
from rwkvstate.model.packing import pack, pack_decode  # noqa: E402
from rwkvstate.ops import token_shift as ts  # noqa: E402
from rwkvstate.state.layout import StateLayout  # noqa: E402
from rwkvstate.state.pool import new_pool  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"

FUNCS = {"fused": ts.token_shift_mix_triton, "per-mix": ts.token_shift_mix_per_mix}
BATCHES = {  # pool slot -> sequence length
    "uneven": {3: 3, 0: 0, 5: 7, 1: 1},
    "empty-ends": {2: 0, 4: 5, 0: 2, 1: 0},
    "decode": {2: 1, 5: 1, 0: 1},
    "long": {4: 13},
    "one-token": {1: 1},
}
NUM_SLOTS, N_LAYER, HEAD = 6, 2, 8


def _pool(C, state_dtype, kind, seed):
    pool = new_pool(StateLayout(N_LAYER, C, HEAD), NUM_SLOTS, state_dtype, kind, DEVICE)
    gen = torch.Generator().manual_seed(seed)
    for l in range(N_LAYER):
        for part in pool.layer(l):
            part.copy_(torch.randn(part.shape, generator=gen))
    return pool


def _snapshot(pool):
    return [part.clone() for l in range(N_LAYER) for part in pool.layer(l)]


def _inputs(batch, C, K, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = BATCHES[batch]
    packed = pack(list(lengths), [torch.randint(0, 10, (n,), generator=gen) for n in lengths.values()], 10, DEVICE)
    x = torch.randn(packed.num_tokens, C, generator=gen).to(DEVICE, dtype)
    mix = torch.rand(K, C, generator=gen).to(DEVICE, dtype)
    return packed, x, mix


def _truncated_bf16(t):
    """fp32 -> bf16 rounding toward zero: what the interpreter's cast does (the GPU rounds to nearest)."""
    return (t.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _expected(pool, view, x, packed, mix):
    """fp32 reference on a copy of the pool: (out [K, T, C] float32, every state tensor afterwards)."""
    shift = pool.layer(1)[view]
    out = ts.token_shift_mix_reference(x.float(), shift, packed, mix.float())
    if INTERPRETED and shift.dtype == torch.bfloat16 and x.dtype != torch.bfloat16:
        shift.index_copy_(0, packed.live_slots, _truncated_bf16(x.index_select(0, packed.last_rows)))
    return out, _snapshot(pool)


def _run(func, x, shift, packed, mix, **blocks):
    """Runs a kernel into a NaN-poisoned output with a NaN guard row above and below it."""
    K, (T, C) = mix.shape[0], x.shape
    buf = torch.full((K, T + 2, C), float("nan"), dtype=x.dtype, device=x.device)
    out = func(x, shift, packed, mix, out=buf[:, 1 : T + 1], **blocks)
    assert out.data_ptr() == buf[:, 1:].data_ptr()
    assert buf[:, 0].isnan().all() and buf[:, T + 1].isnan().all(), "wrote outside the output"
    assert not out.isnan().any(), "left output elements unwritten"
    return out


def _check(func, batch, C, K, dtype, state_dtype=torch.float32, kind="contiguous", view=0, seed=0, **blocks):
    packed, x, mix = _inputs(batch, C, K, dtype, seed)
    pool = _pool(C, state_dtype, kind, seed)
    want_out, want_state = _expected(_copy_pool(pool), view, x, packed, mix)
    out = _run(func, x, pool.layer(1)[view], packed, mix, **blocks)
    for got, want in zip(_snapshot(pool), want_state):  # written shift rows exact, all else untouched
        assert torch.equal(got, want)
    if dtype == torch.float32:
        torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    else:  # one rounding of the fp32 result (truncation in the interpreter for bf16)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(out.float(), want_out.to(dtype).float(), rtol=eps, atol=1e-6)
    return out


def _copy_pool(pool):
    twin = new_pool(pool.layout, pool.num_slots, pool.dtype, pool.layout_name, DEVICE)
    for l in range(N_LAYER):
        for a, b in zip(twin.layer(l), pool.layer(l)):
            a.copy_(b)
    return twin


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("C", [40, 96, 200])
def test_batches_and_widths(func, batch, C):
    _check(FUNCS[func], batch, C, K=6, dtype=torch.float32, seed=C)


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("batch", ["uneven", "decode", "long"])
@pytest.mark.parametrize("K", [1, 3, 6])
def test_small_blocks(func, batch, K):
    """Many row and channel blocks, the last of each partial; sequences straddle row blocks."""
    _check(FUNCS[func], batch, 40, K=K, dtype=torch.float32, block_t=4, block_c=16)


@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("batch", ["uneven", "decode"])
@pytest.mark.parametrize(
    "state_dtype, kind", [(torch.float32, "contiguous"), (torch.float32, "fragmented"),
                          (torch.float16, "contiguous"), (torch.bfloat16, "contiguous")],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_pools(func, batch, state_dtype, kind, dtype):
    for K, view in ((6, 0), (1, 2)):  # time mix on att_shift, channel mix on ffn_shift
        _check(FUNCS[func], batch, 96, K=K, dtype=dtype, state_dtype=state_dtype, kind=kind, view=view)


def test_fused_equals_per_mix_bitwise():
    a = _check(ts.token_shift_mix_triton, "uneven", 200, K=6, dtype=torch.bfloat16, state_dtype=torch.float16)
    b = _check(ts.token_shift_mix_per_mix, "uneven", 200, K=6, dtype=torch.bfloat16, state_dtype=torch.float16)
    assert torch.equal(a, b)


@pytest.mark.parametrize("func", FUNCS)
def test_no_tokens(func):
    packed = pack([0, 3], [[], []], 10, DEVICE)
    pool = _pool(40, torch.float32, "contiguous", 1)
    before = _snapshot(pool)
    out = FUNCS[func](torch.empty(0, 40, device=DEVICE), pool.layer(0)[0], packed, torch.rand(6, 40, device=DEVICE))
    assert out.shape == (6, 0, 40)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(pool), before))


def test_decode_padding_rows_share_the_scratch_slot():
    """The CUDA-graph decode batch: padding rows all point at the scratch slot. Live rows and
    slots come out right; only the scratch slot may hold anything afterwards."""
    pool = _pool(40, torch.float16, "contiguous", 2)
    scratch = pool.scratch_slot
    slots = torch.tensor([4, scratch, 1, scratch, scratch], device=DEVICE)
    packed = pack_decode(slots, torch.zeros(5, dtype=torch.long, device=DEVICE))
    x, mix = torch.randn(5, 40, device=DEVICE), torch.rand(6, 40, device=DEVICE)
    twin = _copy_pool(pool)
    live = torch.tensor([0, 2], device=DEVICE)
    want = ts.token_shift_mix_reference(x[live], twin.layer(1)[0], pack([4, 1], [[0], [0]], 10, DEVICE), mix)
    out = ts.token_shift_mix_triton(x, pool.layer(1)[0], packed, mix)
    torch.testing.assert_close(out[:, live], want, rtol=1e-6, atol=1e-6)
    for got, exp in zip(_snapshot(pool), _snapshot(twin)):
        assert torch.equal(got[:scratch], exp[:scratch])


def test_public_function_picks_and_checks_backends():
    packed, x, mix = _inputs("uneven", 40, 6, torch.float32, 3)
    pools = [_pool(40, torch.float32, "contiguous", 3) for _ in range(4)]
    outs = [ts.token_shift_mix(x, p.layer(0)[0], packed, mix, backend=b)
            for p, b in zip(pools, [None, "torch", "triton", "triton-per-mix"])]  # fmt: skip
    for out, pool in zip(outs[1:], pools[1:]):
        torch.testing.assert_close(out, outs[0], rtol=1e-6, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(_snapshot(pool), _snapshot(pools[0])))
    assert ts.pick_backend(None, x) == ("triton" if x.is_cuda else "torch")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ts.token_shift_mix(x, pools[0].layer(0)[0], packed, mix, backend="cuda")


def test_imports_and_runs_torch_path_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, pytest\n"
        "from rwkvstate.model.packing import pack\n"
        "from rwkvstate.ops import token_shift as ts\n"
        "assert not ts.HAS_TRITON\n"
        "p = pack([1], [[1, 2]], 10, 'cpu'); st = torch.zeros(3, 8); x = torch.randn(2, 8)\n"
        "out = ts.token_shift_mix(x, st, p, torch.zeros(1, 8))\n"
        "assert torch.equal(out[0], x) and torch.equal(st[1], x[1])\n"
        "with pytest.raises(RuntimeError, match='not installed'):\n"
        "    ts.token_shift_mix(x, st, p, torch.ones(1, 8), backend='triton')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ---- residual add + layer norm + token shift in one launch (decode) ----------------------------
NORM_BATCHES = {"decode": ([2, 5, 0], [1, 1, 1]), "with-empty": ([4, 3, 1], [1, 0, 1])}


@pytest.mark.parametrize("batch", NORM_BATCHES)
@pytest.mark.parametrize("C, K, dtype, with_delta", [(40, 6, torch.float32, True), (104, 1, torch.float32, False),
                                                     (96, 6, torch.float16, True), (200, 1, torch.bfloat16, True),
                                                     (4096, 6, torch.float16, False)])  # fmt: skip
def test_norm_shift_matches_reference(batch, C, K, dtype, with_delta, monkeypatch):
    from conftest import poison_empty, rel_err

    poison_empty(monkeypatch, ts)
    slots, lengths = NORM_BATCHES[batch]
    gen = torch.Generator().manual_seed(C + K)
    packed = pack(slots, [[1] * n for n in lengths], 10, DEVICE)
    x, delta = (torch.randn(packed.num_tokens, C, generator=gen).to(DEVICE, dtype) for _ in range(2))
    ln_w, ln_b = (torch.randn(C, generator=gen).to(DEVICE, dtype) for _ in range(2))
    mix = torch.rand(K, C, generator=gen).to(DEVICE, dtype)
    delta = delta if with_delta else None
    pool = _pool(C, torch.float32, "contiguous", 5)
    twin = _copy_pool(pool)
    f32 = [None if t is None else t.float() for t in (x, delta, ln_w, ln_b, mix)]
    want_x, want = ts.norm_shift_mix_reference(*f32[:4], twin.layer(1)[0], packed, f32[4], shift_backend="torch")
    got_x, got = ts.norm_shift_mix_triton(x, delta, ln_w, ln_b, pool.layer(1)[0], packed, mix)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]  # a rounding or two of 16 bits
    assert got.dtype == dtype and not got.isnan().any()
    assert rel_err(got, want) <= tol and rel_err(got_x, want_x) <= tol
    if delta is None:
        assert got_x is x
    live = packed.live_slots
    for l, (a, b) in enumerate(zip(_snapshot(pool), _snapshot(twin))):
        if l == 3:  # layer 1's att shift: the live slots hold the norm's output, all else untouched
            assert rel_err(a[live], b[live]) <= tol
            rest = torch.ones(NUM_SLOTS + 1, dtype=torch.bool)
            rest[live.cpu()] = False
            assert torch.equal(a[rest.to(DEVICE)], b[rest.to(DEVICE)])
        else:
            assert torch.equal(a, b)


def test_norm_shift_backends():
    packed = pack([1, 0], [[1, 2], [3]], 10, DEVICE)  # a prefill: the fused kernel refuses it
    x, ln_w, ln_b = torch.randn(3, 40, device=DEVICE), torch.ones(40, device=DEVICE), torch.zeros(40, device=DEVICE)
    mix = torch.rand(6, 40, device=DEVICE)
    with pytest.raises(ValueError, match="decode batches"):
        ts.norm_shift_mix_triton(x, None, ln_w, ln_b, _pool(40, torch.float32, "contiguous", 1).layer(0)[0], packed, mix)
    pools = [_pool(40, torch.float32, "contiguous", 1) for _ in range(2)]
    outs = [ts.norm_shift_mix(x, None, ln_w, ln_b, p.layer(0)[0], packed, mix, backend=b, shift_backend=b)
            for p, b in zip(pools, ("triton", "torch"))]  # fmt: skip
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(INTERPRETED, reason="a race between warps: needs a GPU")
@pytest.mark.parametrize("C, rows", [(192, 6), (2048, 8)])
def test_norm_shift_reads_every_old_row_before_writing_new_ones(C, rows):
    """The fused kernel reads each slot's old shift row and writes its new one in place; 300 replays
    of a CUDA graph (kernels back to back, as decode runs them) each restore the state, run the
    kernel and must give the outputs of the first, checked run. A thread that wrote before another
    had read (the compiler lays the stored value out apart from the load) shows as a replay whose
    mixes took a new row for an old one."""
    gen = torch.Generator().manual_seed(C)
    slots = [4, 0, 2, 1, 3, 5][: min(rows, 6)]
    slots += [NUM_SLOTS] * (rows - len(slots))  # padding rows on the scratch slot, as the graphs feed
    packed = pack_decode(torch.tensor(slots, device=DEVICE), torch.zeros(rows, dtype=torch.long, device=DEVICE))
    x, delta = (torch.randn(rows, C, generator=gen).to(DEVICE, torch.float16) for _ in range(2))
    ln_w, ln_b = torch.randn(C, generator=gen).to(DEVICE, torch.float16), torch.randn(C, generator=gen).to(DEVICE, torch.float16)
    mix = torch.rand(6, C, generator=gen).to(DEVICE, torch.float16)
    pool = _pool(C, torch.float32, "contiguous", 7)
    shift = pool.layer(1)[0]
    before = shift.clone()
    _, want = ts.norm_shift_mix_triton(x, delta, ln_w, ln_b, shift, packed, mix)
    want, state_after = want.clone(), shift.clone()
    stream, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        shift.copy_(before)
        ts.norm_shift_mix_triton(x, delta, ln_w, ln_b, shift, packed, mix)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph, stream=stream):
        shift.copy_(before)
        _, out = ts.norm_shift_mix_triton(x, delta, ln_w, ln_b, shift, packed, mix)
    live = torch.tensor(slots[: min(rows, 6)], device=DEVICE)
    bad = 0
    for _ in range(300):
        graph.replay()
        bad += int(not torch.equal(out[:, : len(live)], want[:, : len(live)]) or
                   not torch.equal(shift[live], state_after[live]))  # fmt: skip
    assert bad == 0, f"{bad} of 300 replays differ"
