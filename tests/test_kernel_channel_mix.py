"""The sparse channel-mix kernels against the torch reference (interpreted on CPU, tiny odd
shapes): dense and sparse activations, with and without the residual, several channel blocks
and F slices, NaN-poisoned outputs."""

import pytest
import torch

pytest.importorskip("triton")

# tests/conftest.py sets TRITON_INTERPRET=1 before rwkvstate is imported when there is no GPU
from conftest import poison_empty  # noqa: E402
from rwkvstate.ops import channel_mix as cm  # noqa: E402

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
    poison_empty(monkeypatch, cm)


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


def test_many_channel_blocks_and_slices(poisoned_empty):
    k, key, value, residual = _args(5, 72, 200, torch.float32, seed=7, zero_rows=0.3)
    want = cm.channel_mix_reference(k, key, value, residual)
    got = cm.channel_mix_triton(k, key, value, residual, block_c=16)  # 5 channel blocks, the last partial
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture
def poisoned_all(monkeypatch):
    """As poisoned_empty, and integer buffers (the lists of needed rows) filled with a huge index,
    so reading an entry past a block's count would gather far outside the weights."""
    poison_empty(monkeypatch, cm, int_fill=2**30)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_rows_of_zero_activations_are_never_read(poison, poisoned_all):
    """Rows of value^T whose activations are zero for every token may hold anything: NaN or Inf
    there must not reach the output (0 * Inf would), which stays exact. Rows dead for some tokens
    only are read (their zeros multiply finite values)."""
    k, key, value, residual = _args(4, 48, 128, torch.float32, seed=3, zero_rows=0.5)
    k[1, :7] = -3.0  # per-token differences: some rows live for a few tokens only
    act = torch.relu(k @ key.t()).square()
    dead = (act == 0).all(0)
    assert dead.any() and not dead.all() and ((act == 0).any(0) & ~dead).any()
    value_t = value.t().clone()
    value_t[dead] = poison
    got = cm.channel_mix_triton(k, key, value_t.t(), residual)
    assert got.isfinite().all()
    value_t[dead] = 0
    torch.testing.assert_close(got, cm.channel_mix_reference(k, key, value_t.t(), residual), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T,F,zero_rows", [(1, 200, 0.9), (3, 97, 0.0), (2, 300, 1.0)])
def test_lists_of_needed_rows_are_exact(T, F, zero_rows):
    """The key kernel lists, block by block and in order, exactly the rows with a non-zero stored
    activation: the value kernel reads those rows of V^T and no others."""
    k, key, _, _ = _args(T, 40, F, torch.float16, seed=F + T, zero_rows=zero_rows)
    act, idx, counts, block_f = cm._key_launch(k, key, ieee=False)
    want = act.ne(0).any(0).nonzero().flatten().int()
    listed = [idx[b * block_f : b * block_f + int(n)] for b, n in enumerate(counts.tolist())]
    assert torch.equal(torch.cat(listed), want)
    assert counts.sum().item() == want.numel()


@pytest.mark.parametrize("num_splits", [1, 3, 64])
@pytest.mark.parametrize("zero_rows", [0.0, 0.8, 1.0])
def test_any_split_of_the_needed_rows_agrees(num_splits, zero_rows, poisoned_all):
    """One program per channel block, a few, or more programs than BLOCK_J steps of work (most
    exit with zeros); no needed rows at all gives the residual exactly."""
    k, key, value, residual = _args(3, 40, 230, torch.float32, seed=11, zero_rows=zero_rows)
    got = cm.channel_mix_triton(k, key, value, residual, num_splits=num_splits)
    torch.testing.assert_close(got, cm.channel_mix_reference(k, key, value, residual), rtol=1e-5, atol=1e-5)
    if zero_rows == 1.0:
        assert torch.equal(got, residual)


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
