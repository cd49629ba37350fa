"""Snapshot formats: the quantisation kernels against their torch reference (interpreted on CPU),
round-trip error bounds, edge values, and the Encoded buffers (batches, views, sizes, errors)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# tests/conftest.py sets TRITON_INTERPRET=1 before rwkvstate is imported when there is no GPU
from rwkvstate.errors import StateError
from rwkvstate.ops import quantize as qz
from rwkvstate.ops._triton import HAS_TRITON
from rwkvstate.state import snapshot as sn
from rwkvstate.state.layout import SNAPSHOT_FORMATS, STORAGE_DTYPES, StateLayout
from rwkvstate.state.pool import new_pool

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
needs_fp8 = pytest.mark.skipif(not qz.fp8_supported(DEVICE), reason=f"no fp8 on {DEVICE}")
KINDS = ["int8", pytest.param("fp8", marks=needs_fp8)]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# a value never produced by quantising finite data: int8 -128, fp8 NaN (0x7f), fp16 NaN
SENTINEL = {"int8": -128, "fp8": 0x7F}
GUARD = 3


def grouped_data(num_groups: int, group: int, dtype=torch.float32, seed=0) -> torch.Tensor:
    """Normal values with a per-group magnitude over ~10 decades (at most ~1e4, inside float16
    and the range where scales do not saturate), group 0 all zeros."""
    gen = torch.Generator().manual_seed(seed)
    mag = torch.exp(torch.randn(num_groups, 1, generator=gen) * 5).clamp(max=1e3)
    x = torch.randn(num_groups, group, generator=gen) * mag
    x[0] = 0
    return x.flatten().to(DEVICE, dtype)


def raw(q: torch.Tensor) -> torch.Tensor:
    """Bit pattern of q, so fp8 tensors compare exactly (NaN included)."""
    return q.view(torch.uint8) if q.dtype == torch.float8_e4m3fn else q


def guarded_buffers(n: int, num_groups: int, kind: str):
    """q and scale outputs as views into bigger sentinel-filled buffers with guard elements."""
    qbuf = torch.full((n + 2 * GUARD,), SENTINEL[kind], dtype=torch.uint8 if kind == "fp8" else torch.int8, device=DEVICE)
    if kind == "fp8":
        qbuf = qbuf.view(torch.float8_e4m3fn)
    sbuf = torch.full((num_groups + 2 * GUARD,), float("nan"), dtype=torch.float16, device=DEVICE)
    return qbuf, sbuf


def assert_guards(buf: torch.Tensor, n: int, fill) -> None:
    """The GUARD elements on each side of buf[GUARD : GUARD + n] still hold fill, the inside does not."""
    b = raw(buf)
    inside, outside = b[GUARD : GUARD + n], torch.cat([b[:GUARD], b[GUARD + n :]])
    if b.is_floating_point():
        assert outside.isnan().all(), "wrote outside the output"
        assert not inside.isnan().any(), "left output elements unwritten"
    else:
        assert (outside == fill).all(), "wrote outside the output"
        assert not (inside == fill).any(), "left output elements unwritten"


# ---- kernels against the reference ------------------------------------------------------------
CASES = [(torch.float32, g) for g in (1, 5, 64)] + [(torch.float16, 24), (torch.bfloat16, 24)]


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,group", CASES, ids=[f"{str(d)[6:]}-g{g}" for d, g in CASES])
def test_kernels_match_reference(kind, dtype, group):
    num_groups = 7  # odd, with block_g=2 the last program is half masked
    x = grouped_data(num_groups, group, dtype, seed=group)
    n = x.numel()
    ref_q, ref_s = qz.quantize_groups(x, group, kind, backend="torch")
    qbuf, sbuf = guarded_buffers(n, num_groups, kind)
    q, s = qz.quantize_groups(x, group, kind, qbuf[GUARD : GUARD + n], sbuf[GUARD : GUARD + num_groups],
                              backend="triton", block_g=2)  # fmt: skip
    assert q.data_ptr() == qbuf[GUARD:].data_ptr() and s.data_ptr() == sbuf[GUARD:].data_ptr()
    assert_guards(qbuf, n, SENTINEL[kind])
    assert_guards(sbuf, num_groups, None)
    assert torch.equal(raw(q), raw(ref_q)) and torch.equal(s, ref_s)
    for out_dtype in {dtype, torch.float32}:
        ref = qz.dequantize_groups(q, s, group, torch.empty(n, dtype=out_dtype, device=DEVICE), backend="torch")
        buf = torch.full((n + 2 * GUARD,), float("nan"), dtype=out_dtype, device=DEVICE)
        out = qz.dequantize_groups(q, s, group, buf[GUARD : GUARD + n], backend="triton", block_g=4)
        assert_guards(buf, n, None)
        assert torch.equal(out, ref), out_dtype


@needs_triton
@needs_fp8
def test_fp8_kernel_rounds_like_torch_at_ties_and_subnormals():
    """A group holding 448 has scale 1, so x / scale = x: every midpoint between neighbouring
    e4m3 values (ties to even), every subnormal, and values just off the midpoints."""
    grid = torch.arange(0, 127, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mid = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([grid, mid, mid * (1 + 2**-20), mid * (1 - 2**-20), torch.tensor([2.0**-10, 3 * 2.0**-11])])
    vals = torch.cat([vals, -vals])
    group = 64
    vals = torch.cat([vals, torch.zeros(-vals.numel() % (group - 1))]).view(-1, group - 1)
    x = torch.cat([torch.full((vals.shape[0], 1), 448.0), vals], 1).flatten().to(DEVICE)
    q_ref, s_ref = qz.quantize_groups(x, group, "fp8", backend="torch")
    assert (s_ref == 1).all()
    assert torch.equal(raw(q_ref), raw(x.to(torch.float8_e4m3fn)))  # the reference is torch's own cast
    q, s = qz.quantize_groups(x, group, "fp8", backend="triton")
    assert torch.equal(raw(q), raw(q_ref)) and torch.equal(s, s_ref)


# ---- round-trip error bounds ------------------------------------------------------------------
def roundtrip(x, group, kind, backend="torch"):
    q, s = qz.quantize_groups(x, group, kind, backend=backend)
    out = qz.dequantize_groups(q, s, group, torch.empty(x.numel(), device=x.device), backend=backend)
    return out, s.float().repeat_interleave(group)


def assert_within_bound(x, out, scale, kind):
    """int8: |error| <= scale / 2; fp8: half an e4m3 spacing, 2^-4 relative (normal range) or
    2^-10 * scale (subnormal range). float32 arithmetic adds a few ulps."""
    err = (out.double() - x.double()).abs()
    bound = scale.double() / 2 if kind == "int8" else x.double().abs() / 16 + scale.double() / 1024
    assert (err <= bound * (1 + 1e-6) + 1e-45).all(), (err - bound).max().item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_roundtrip_error_bound(kind, dtype):
    x = grouped_data(40, 16, dtype, seed=1)
    out, scale = roundtrip(x, 16, kind)
    assert_within_bound(x.float(), out, scale, kind)


@settings(max_examples=40, deadline=None)
@given(
    group=st.sampled_from([1, 3, 8, 33]),
    num_groups=st.integers(1, 6),
    log_scale=st.floats(-30, 20),  # amax below qmax * 65504, where scales saturate
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(["int8", "fp8"] if qz.fp8_supported(DEVICE) else ["int8"]),
)
def test_roundtrip_bound_property(group, num_groups, log_scale, seed, kind):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(num_groups * group, generator=gen) * 2.0**log_scale).to(DEVICE)
    out, scale = roundtrip(x, group, kind)
    assert_within_bound(x, out, scale, kind)


BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_zero_huge_and_tiny_groups(kind, backend):
    qmax = qz.QMAX[kind]
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0],  # all zero: scale 0, q 0
                      [1e-30, -1e-31, 0.0, 1e-30],  # amax / qmax underflows float16: smallest subnormal
                      [1e-6, -3e-7, 2e-7, 0.0],  # float16-subnormal scale, still within scale / 2
                      [1e9, -1e9, 5e5, 1.0],  # beyond qmax * 65504: the scale saturates, q clamps
                      [qmax, 1.0, -3.0, 2.0]], device=DEVICE).flatten()  # fmt: skip
    q, s = qz.quantize_groups(x, 4, kind, backend=backend)
    out = qz.dequantize_groups(q, s, 4, torch.empty_like(x), backend=backend).view(5, 4)
    s = s.float()
    assert s[0] == 0 and (q.view(5, 4)[0].float() == 0).all() and (out[0] == 0).all()
    assert s[1] == 2.0**-24 and (out[1] == 0).all()
    assert 0 < s[2] < 2.0**-14
    assert_within_bound(x[8:12], out[2], s[2].expand(4), kind)
    assert s[3] == qz.FP16_MAX and out[3, 0] == qmax * qz.FP16_MAX and out[3, 1] == -qmax * qz.FP16_MAX
    assert s[4] == 1 and torch.equal(out[4], x[16:])


def test_fp8_supported():
    assert qz.fp8_supported("cpu")
    if torch.cuda.is_available():
        assert qz.fp8_supported("cuda") == (HAS_TRITON and torch.cuda.get_device_capability() >= (8, 9))


def test_quantize_argument_errors():
    x = torch.zeros(12, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of the group"):
        qz.quantize_groups(x, 5, "int8")
    with pytest.raises(ValueError, match="kind"):
        qz.quantize_groups(x, 4, "int4")
    with pytest.raises(ValueError, match="out_q"):
        qz.quantize_groups(x, 4, "int8", out_q=torch.empty(11, dtype=torch.int8, device=DEVICE))
    with pytest.raises(ValueError, match="out_scales"):
        qz.quantize_groups(x, 4, "int8", out_scales=torch.empty(3, device=DEVICE))
    with pytest.raises(ValueError, match="src"):
        qz.quantize_groups(x.long(), 4, "int8")


# ---- snapshot formats -------------------------------------------------------------------------
LAYOUT = StateLayout(n_layer=2, n_embd=48, head_size=16)  # a slot is 2 * 18 * 48 = 1728 elements
FORMATS = ["fp32", "fp16", "bf16", "int8", pytest.param("fp8", marks=needs_fp8)]


def random_pool(dtype, seed=0):
    pool = new_pool(LAYOUT, 3, dtype, "contiguous", DEVICE)
    gen = torch.Generator().manual_seed(seed)
    pool.data.copy_(torch.randn(pool.data.shape, generator=gen) * torch.exp(torch.randn(pool.data.shape[:-1] + (1,), generator=gen)))  # fmt: skip
    return pool


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_snapshot_roundtrip_every_storage_dtype(fmt, dtype):
    pool = random_pool(dtype)
    group = sn.default_group(LAYOUT)
    enc = sn.encode(pool.data[0], fmt, group)
    assert enc.data.dim() == 1 and enc.nbytes == sn.encoded_nbytes(fmt, LAYOUT.slot_numel, group)
    pool.data[1].fill_(float("nan"))
    dest = pool.data[1]
    assert sn.decode(enc, dest) is dest
    src, out = pool.data[0].float().flatten(), pool.data[1].float().flatten()
    assert not out.isnan().any()
    if fmt in STORAGE_DTYPES:
        assert torch.equal(out, src.to(STORAGE_DTYPES[fmt]).to(dtype).float())
    else:
        scale = enc.scales.float().repeat_interleave(group)
        exact = qz.dequantize_groups(enc.data, enc.scales, group, torch.empty_like(src))
        assert_within_bound(src, exact, scale, fmt)
        assert torch.equal(out, exact.to(dtype).float())  # one rounding from float32 to the storage dtype


@needs_triton
@pytest.mark.parametrize("fmt", ["int8", pytest.param("fp8", marks=needs_fp8)])
def test_snapshot_kernel_path_matches_torch(fmt):
    pool = random_pool(torch.bfloat16, seed=3)
    layout = StateLayout(1, 32, 16)  # 576 elements: keep the interpreter fast
    src = pool.data[0].flatten()[: layout.slot_numel]
    a, b = sn.encode(src, fmt, 16, backend="torch"), sn.encode(src, fmt, 16, backend="triton")
    assert torch.equal(raw(a.data), raw(b.data)) and torch.equal(a.scales, b.scales)
    outs = [torch.full_like(src, float("nan")) for _ in range(2)]
    sn.decode(a, outs[0], backend="torch")
    sn.decode(b, outs[1], backend="triton")
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_batched_entries_alias_one_buffer(fmt):
    count, group, numel = 4, 16, LAYOUT.slot_numel
    ring = sn.empty_encoded(fmt, numel, group, DEVICE, count=count)
    assert ring.count == count and ring.data.shape == (count, numel)
    assert ring.nbytes == count * sn.encoded_nbytes(fmt, numel, group)
    raw(ring.data).zero_()
    if ring.scales is not None:
        assert ring.scales.shape == (count, numel // group)
        ring.scales.zero_()
    pool = random_pool(torch.float32)
    entry = ring[2]
    assert entry.count is None and entry.data.data_ptr() == ring.data[2].data_ptr()
    ptrs = (entry.data.data_ptr(), None if entry.scales is None else entry.scales.data_ptr())
    result = sn.encode(pool.data[1], fmt, group, out=entry)
    assert result is entry and (entry.data.data_ptr(), None if entry.scales is None else entry.scales.data_ptr()) == ptrs
    fresh = sn.encode(pool.data[1], fmt, group)
    assert torch.equal(raw(ring.data[2]), raw(fresh.data))  # written through the view into the shared buffer
    for i in (0, 1, 3):
        assert not raw(ring.data[i]).any(), "touched another entry"
    if ring.scales is not None:
        assert torch.equal(ring.scales[2], fresh.scales) and not ring.scales[[0, 1, 3]].any()
    sn.decode(ring[2], pool.data[0])
    assert torch.equal(pool.data[0], sn.decode(fresh, torch.empty_like(pool.data[0])))


@pytest.mark.parametrize("fmt", FORMATS)
def test_nbytes(fmt):
    numel, group = 1728, 16
    expected = {"fp32": 4 * numel, "fp16": 2 * numel, "bf16": 2 * numel}.get(fmt, numel + 2 * numel // group)
    assert sn.encoded_nbytes(fmt, numel, group) == expected
    assert sn.empty_encoded(fmt, numel, group, DEVICE).nbytes == expected


def test_to_and_copy():
    pool = random_pool(torch.float16)
    enc = sn.encode(pool.data[0], "int8", 16)
    host = enc.to("cpu")
    assert host.device.type == "cpu" and host.fmt == "int8" and torch.equal(host.data.cpu(), enc.data.cpu())
    dst = sn.empty_encoded("int8", LAYOUT.slot_numel, 16, DEVICE)
    assert dst.copy_(host) is dst and torch.equal(dst.data, enc.data) and torch.equal(dst.scales, enc.scales)
    with pytest.raises(StateError, match="cannot copy"):
        dst.copy_(sn.encode(pool.data[0], "fp16", 16))
    with pytest.raises(StateError, match="cannot copy"):
        dst.copy_(sn.encode(pool.data[0], "int8", 8))


def test_format_and_size_errors():
    assert SNAPSHOT_FORMATS == ("fp32", "fp16", "bf16", "int8", "fp8")
    with pytest.raises(StateError, match="fp32, fp16, bf16, int8, fp8"):
        sn.check_format("int4")
    pool = random_pool(torch.float32)
    with pytest.raises(StateError, match="format"):
        sn.encode(pool.data[0], "float32", 16)
    with pytest.raises(StateError, match="group"):
        sn.encode(pool.data[0], "int8", 7)  # 1728 is not a multiple of 7
    with pytest.raises(StateError, match="group"):
        sn.empty_encoded("int8", 10, 0, DEVICE)
    enc = sn.encode(pool.data[0], "int8", 16)
    with pytest.raises(StateError, match="needed"):
        sn.encode(pool.data[0], "fp16", 16, out=enc)  # wrong format
    with pytest.raises(StateError, match="needed"):
        sn.encode(pool.data[0], "int8", 32, out=enc)  # wrong group
    with pytest.raises(StateError, match="needed"):
        sn.decode(enc, pool.data[0, :1])  # wrong size
    with pytest.raises(StateError, match="contiguous"):
        sn.decode(enc, pool.data[:2, 0].t())
    with pytest.raises(StateError, match="index a batch"):
        sn.encode(pool.data[0], "int8", 16, out=sn.empty_encoded("int8", LAYOUT.slot_numel, 16, DEVICE, count=2))
    with pytest.raises(StateError, match="batched"):
        enc[0]
