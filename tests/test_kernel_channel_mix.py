"""The sparse channel mix (GEMV key + sparse-input GEMV value, ops/gemv.py) against the torch
reference (interpreted on CPU, tiny odd shapes): dense and sparse activations, one row and
several, with and without the residual, several channel blocks and F slices, NaN-poisoned
outputs, and rows of zero activations that are never read."""

import pytest
import torch

pytest.importorskip("triton")

# tests/conftest.py sets TRITON_INTERPRET=1 before rwkvstate is imported when there is no GPU
from conftest import poison_empty  # noqa: E402
from rwkvstate.ops import channel_mix as cm  # noqa: E402
from rwkvstate.ops import gemv as gm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _tol(dtype):
    """fp32: float32 rounding; 16-bit: the reference rounds at the same steps, but a GEMM summed in
    another order can land on the neighbouring value, which the next steps carry."""
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def _args(T, C, F, dtype, seed, zero_rows=0.0):
    """k [T, C], key [F, C], value [C, F] as the model stores it (a view of [F, C]), residual.
    zero_rows: the fraction of K's rows made strongly negative-biased, so those activations are
    exact zeros for every row (whole masked tiles of value^T)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(T, C, generator=gen).abs()  # positive, so that a constant negative row of K ...
    key = torch.randn(F, C, generator=gen) * C**-0.5
    key[torch.rand(F, generator=gen) < zero_rows] = -1.0 / C  # ... gives k K^T < 0: an exact zero
    value = (torch.randn(F, C, generator=gen) * F**-0.5).t()
    residual = torch.randn(T, C, generator=gen)
    return [t.to(DEVICE, dtype) for t in (k, key, value, residual)]


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty inside the ops returns NaN-filled memory, so unwritten outputs show."""
    poison_empty(monkeypatch, gm)  # the kernels' outputs are allocated in ops/gemv.py


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("T,C,F,zero_rows", [(1, 48, 160, 0.0), (3, 96, 300, 0.5), (13, 40, 97, 0.9), (16, 24, 64, 1.0)])
def test_matches_reference(T, C, F, zero_rows, dtype, poisoned_empty):
    k, key, value, residual = _args(T, C, F, dtype, seed=T * 1000 + C + F, zero_rows=zero_rows)
    for res in (residual, None):
        want = cm.channel_mix(k, key, value, res, backend="torch")
        got = cm.channel_mix(k, key, value, res, backend="triton")
        assert got.dtype == dtype and got.shape == (T, C)
        assert not got.isnan().any(), "elements left unwritten"
        torch.testing.assert_close(got, want, **_tol(dtype))


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("num_splits", [1, 3, 64])
@pytest.mark.parametrize("zero_rows", [0.0, 0.8, 1.0])
def test_any_split_and_channel_block_agrees(T, num_splits, zero_rows, poisoned_empty):
    """One program per channel block, a few splits of F, or more splits than steps (empty ranges
    store zeros); partial channel blocks; no live rows at all gives the residual exactly."""
    k, key, value, residual = _args(T, 72, 230, torch.float32, seed=11 + T, zero_rows=zero_rows)
    act = gm.gemv_triton(k, key, activation="relu2")
    for block_n in (16, 32):  # 72 channels: 5 or 3 blocks, the last one partial
        got = gm.gemv_sparse_input(act, value, residual, num_splits=num_splits, block_n=block_n, block_k=16)
        torch.testing.assert_close(got, cm.channel_mix_reference(k, key, value, residual), rtol=1e-5, atol=1e-5)
        if zero_rows == 1.0:
            assert torch.equal(got, residual)


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_rows_of_zero_activations_are_never_read(T, poison, poisoned_empty):
    """Rows of value^T whose activations are zero for every token may hold anything: NaN or Inf
    there must not reach the output (0 * Inf would), which stays exact. Rows dead for some tokens
    only are read (their zeros multiply finite values)."""
    k, key, value, residual = _args(T, 48, 128, torch.float32, seed=3, zero_rows=0.5)
    k[T - 1, :7] = -3.0  # per-token differences: some rows live for a few tokens only
    act = torch.relu(k @ key.t()).square()
    dead = (act == 0).all(0)
    assert dead.any() and not dead.all() and (T == 1 or ((act == 0).any(0) & ~dead).any())
    value_t = value.t().clone()
    value_t[dead] = poison
    got = cm.channel_mix_triton(k, key, value_t.t(), residual)
    assert got.isfinite().all()
    value_t[dead] = 0
    torch.testing.assert_close(got, cm.channel_mix_reference(k, key, value_t.t(), residual), rtol=1e-5, atol=1e-5)


def test_sparse_input_gemv_checks_its_weight():
    x = torch.randn(2, 24, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous \\[K, N\\]"):
        gm.gemv_sparse_input(x, torch.randn(40, 24, device=DEVICE))  # row-major [N, K]: rows of W^T strided
    with pytest.raises(ValueError, match="one projection"):
        gm.gemv_sparse_input(x.expand(2, 2, 24), torch.randn(2, 24, 40, device=DEVICE).transpose(1, 2))
    with pytest.raises(ValueError, match="at most 16 rows"):
        gm.gemv_sparse_input(torch.randn(17, 24, device=DEVICE), torch.randn(24, 40, device=DEVICE).t())
    assert gm.gemv_sparse_input(x[:0], torch.randn(24, 40, device=DEVICE).t()).shape == (0, 40)


def test_backend_choice_and_errors():
    k, key, value, residual = _args(17, 32, 64, torch.float32, seed=1)
    with pytest.raises(ValueError, match="at most 16 rows"):
        cm.channel_mix(k, key, value, residual, backend="triton")
    with pytest.raises(ValueError, match="unit stride"):
        cm.channel_mix(k[:2], key, value.t().contiguous().t().contiguous(), residual[:2], backend="triton")
    with pytest.raises(ValueError, match="residual must be"):
        cm.channel_mix(k[:2], key, value, residual, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        cm.channel_mix(k, key, value, residual, backend="bogus")
    # None: the torch reference off CUDA, and for more than 16 rows anywhere
    torch.testing.assert_close(cm.channel_mix(k, key, value, residual), cm.channel_mix_reference(k, key, value, residual))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("C", [768, 2048, 4096])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_cuda_release_shapes(C, T):
    """The sparse-input value projection at the released widths (F = 4C), default launch
    configuration, activations of density 1 / 0.5 / 0.1, fp16 and bf16: against the fp32 product
    of the same inputs, cuBLAS, and itself run to run (the sums' order is fixed)."""
    gen = torch.Generator(device="cuda").manual_seed(C + T)
    for dtype in (torch.float16, torch.bfloat16):
        value = (torch.randn(4 * C, C, device="cuda", generator=gen) * (4 * C) ** -0.5).to(dtype).t()
        residual = torch.randn(T, C, device="cuda", generator=gen).to(dtype)
        for density in (1.0, 0.5, 0.1):
            keep = torch.rand(T, 4 * C, device="cuda", generator=gen) < density
            act = (torch.randn(T, 4 * C, device="cuda", generator=gen).square() * keep).to(dtype)
            got = gm.gemv_sparse_input(act, value, residual)
            want = residual.float() + act.float() @ value.float().t()
            tol = 1e-2 if dtype == torch.float16 else 3e-2  # two roundings (product, residual add)
            torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
            torch.testing.assert_close(got, gm.gemv_reference(act, value, residual), rtol=tol, atol=tol)
            assert torch.equal(got, gm.gemv_sparse_input(act, value, residual))


def test_sparse_input_gemv_takes_a_strided_residual():
    """A residual whose channels are not contiguous (a transposed view) is read correctly."""
    k, key, value, residual = _args(3, 40, 96, torch.float32, seed=13, zero_rows=0.3)
    act = torch.relu(k @ key.t()).square()
    strided = residual.t().contiguous().t()  # same values, stride (1, T)
    assert strided.stride(1) != 1
    got = gm.gemv_sparse_input(act, value, strided)
    torch.testing.assert_close(got, gm.gemv_reference(act, value, residual), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("T,C,F", [(1, 40, 96), (37, 24, 100), (300, 16, 72)])
def test_cublas_backend_folds_the_elementwise_work(T, C, F, dtype):
    """"cublas": relu^2 in one pass (the Triton kernel, interpreted here) with the reference's
    roundings, bit for bit, and the residual added inside the value GEMM (one rounding instead of
    two: within one step of the dtype of the reference)."""
    k, key, value, residual = _args(T, C, F, dtype, seed=T + C + F, zero_rows=0.3)
    h = torch.nn.functional.linear(k, key)
    want_h = torch.relu(h).square()
    got_h = cm.relu2_(h.clone())
    assert torch.equal(got_h, want_h)
    assert torch.equal(cm.relu2_(h[:, :0].contiguous()), want_h[:, :0])  # empty: nothing to launch
    for res in (residual, None):
        got = cm.channel_mix(k, key, value, res, backend="cublas")
        want = cm.channel_mix(k, key, value, res, backend="torch")
        assert got.dtype == dtype and got.shape == (T, C)
        torch.testing.assert_close(got, want, **_tol(dtype))
    exact = residual.double() + torch.relu(k.double() @ key.double().t()).square() @ value.double().t()
    torch.testing.assert_close(cm.channel_mix(k, key, value, residual, backend="cublas").double(), exact,
                               **({"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else _tol(dtype)))
    # in_place: the same result, written into the residual given up; the other backends leave it
    new = cm.channel_mix(k, key, value, residual, backend="cublas")
    for backend in ("torch", "triton-gemv", "triton") if T <= cm.MAX_SPARSE_ROWS else ("torch",):
        mine = residual.clone()
        got = cm.channel_mix(k, key, value, mine, backend=backend, in_place=True)
        assert got.data_ptr() != mine.data_ptr() and torch.equal(mine, residual)
    mine = residual.clone()
    got = cm.channel_mix(k, key, value, mine, backend="cublas", in_place=True)
    assert got.data_ptr() == mine.data_ptr() and torch.equal(got, new)
    assert cm.channel_mix(k, key, value, None, backend="cublas", in_place=True).shape == (T, C)
