"""The channel mix (feed-forward) after its token shift, with the residual add:

    out = residual + relu(k K^T)^2 V^T          k [T, C], K [F, C], V [C, F]

Squared-ReLU activations are mostly exact zeros in trained models (91% in the bundled one,
docs/benchmarks/ffn-sparsity.md; about 50% with random weights), and a zero activation's row of
V^T contributes nothing. For a few rows (decode of 1-16 sequences) the Triton path ("triton")
reads only the rows of V^T that some row's activation needs, which is exact: skipped terms are
exact zeros. It takes V^T as a contiguous [F, C] tensor (the model stores the value weight that
way and hands F.linear its transposed view), so a needed row is C contiguous elements.

Launches (ops/gemv.py has the kernels):
    gemv_triton(k, K, "relu2")          act = relu(k K^T)^2 in k's dtype, K unsplit (KEY_SPLITS)
    gemv_sparse_input(act, V, residual) residual + act V^T; a program owns a block of output
                                        channels and a range of F, and loads row f of V^T only
                                        where act[:, f] != 0 (a masked load fetches nothing), so the
                                        bytes read follow the density; a split adds a reduce
"triton-gemv" is the dense GEMV kernel for both projections. "cublas" (any number of rows) keeps
the cuBLAS GEMMs and folds the elementwise work: relu^2 in one in-place pass (relu2_), the residual
add into the value GEMM (addmm).
Rounding follows the torch reference step by step: k K^T is rounded to the compute dtype before
the relu, its square is rounded, the value GEMM's result is rounded, then added to the residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, is_interpreting, pick_backend, tl, triton
from .gemv import gemv_sparse_input, gemv_triton

# the key projection unsplit: F / 32 column tiles already give every SM work, and on an H200 the
# unsplit launch took 4.5 / 11.1 / 36.7 us at C = 768 / 2048 / 4096, batch 1, against 5.7 / 13.3 /
# 36.8 us split in two plus the reduce (docs/benchmarks/ffn-first-h200.md)
KEY_SPLITS = 1
MAX_SPARSE_ROWS = 16  # the Triton path pads rows to one 16-row tl.dot tile


def channel_mix_reference(k, key, value, residual=None):
    """k [T, C], key [F, C], value [C, F] (any strides), residual [T, C] or None -> [T, C]."""
    out = F.linear(torch.relu(F.linear(k, key)).square(), value)
    return out if residual is None else residual + out


if HAS_TRITON:
    from .wkv7 import _round_nearest  # float32 -> fp16/bf16 to nearest, also in the interpreter

    @triton.jit
    def _relu2_kernel(h, n, BLOCK: tl.constexpr):
        """h = relu(h)^2 in place, rounded as torch's relu then square (the square of a rounded
        value, computed in float32 and rounded once)."""
        o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = o < n
        b_h = tl.maximum(tl.load(h + o, mask=m, other=0).to(tl.float32), 0)
        tl.store(h + o, _round_nearest(b_h * b_h, h.dtype.element_ty), mask=m)


RELU2_BLOCK = 2048  # elements per program of the in-place relu^2


def relu2_(h: torch.Tensor) -> torch.Tensor:
    """relu(h)^2 in place: one Triton pass for a contiguous CUDA tensor (or interpreted), else torch's
    relu_ and square_ (two passes, the same values)."""
    if HAS_TRITON and h.is_contiguous() and (h.is_cuda or is_interpreting()):
        if h.numel():
            _relu2_kernel[(triton.cdiv(h.numel(), RELU2_BLOCK),)](h, h.numel(), BLOCK=RELU2_BLOCK, num_warps=4)
        return h
    return h.relu_().square_()


def channel_mix_cublas(k, key, value, residual=None, in_place=False):
    """cuBLAS GEMMs with the elementwise work folded, any number of rows: the key GEMM, relu^2 in
    one in-place pass, and the value GEMM with the residual as its C input (addmm, beta = 1):
    three launches (four with a split-K reduce) instead of five or six. The value GEMM's output and
    the residual add are rounded once, not twice as in the reference, so results can differ from
    it in the last bit. value must be the [C, F] view of a contiguous [F, C] tensor (as the model
    stores it), so that value.t() is the contiguous [F, C] matrix addmm takes. in_place: the value
    GEMM accumulates into residual itself (addmm_), which saves the copy of the residual into a
    new output that addmm makes first (a device-to-device copy of [T, C] per call)."""
    h = relu2_(F.linear(k, key))
    if residual is None:
        return F.linear(h, value)
    if in_place:
        return residual.addmm_(h, value.t())
    return torch.addmm(residual, h, value.t())


def channel_mix_triton(k, key, value, residual=None):
    """Two or three launches; same arguments and result as channel_mix_reference for T <= 16 rows
    (up to the order of float32 sums). The key projection is the GEMV kernel with relu^2 in its
    epilogue; the value projection is the sparse-input GEMV, which reads a row of V^T only if
    some row's activation is non-zero, with the residual add in its epilogue. value must be the
    [C, F] view of a contiguous [F, C] tensor."""
    _check(k, key, value.t(), residual)
    return gemv_sparse_input(_key_relu2(k, key), value, residual)


def _key_relu2(k, key):
    """relu(k key^T)^2: the GEMV kernel with relu^2 in its epilogue, K unsplit (KEY_SPLITS)."""
    return gemv_triton(k, key, activation="relu2", num_splits=KEY_SPLITS)


def _check(k, key, value_t, residual) -> None:
    T, C = k.shape
    if T > MAX_SPARSE_ROWS:
        raise ValueError(f"the Triton channel mix takes at most {MAX_SPARSE_ROWS} rows, got {T}")
    if key.dim() != 2 or key.shape[1] != C or value_t.shape != key.shape:
        raise ValueError(f"expected key and value^T [F, {C}], got {list(key.shape)} and {list(value_t.shape)}")
    if key.stride(1) != 1 or value_t.stride(1) != 1:
        raise ValueError("key and value^T need unit stride along C (value: pass the [C, F] view of a [F, C] tensor)")
    if residual is not None and residual.shape != k.shape:
        raise ValueError(f"residual must be {list(k.shape)}, got {list(residual.shape)}")


def channel_mix_gemv(k, key, value, residual=None):
    """Two launches of the GEMV kernel (ops/gemv.py; at most 16 rows, dense; more when K is split):
    relu^2 in the key projection's epilogue, the residual add in the value projection's. Same
    result as channel_mix_reference, rounding for rounding."""
    return gemv_triton(_key_relu2(k, key), value, residual)


_BACKENDS = {"torch": channel_mix_reference, "triton": channel_mix_triton, "triton-gemv": channel_mix_gemv,
             "cublas": channel_mix_cublas}


def channel_mix(k, key, value, residual=None, backend=None, *, in_place=False):
    """residual + relu(k key^T)^2 value^T, [T, C] in k's dtype (residual None: no add).
    in_place: the caller gives up residual, and the "cublas" backend writes the result into it
    (the others return a new tensor and leave it as it was); use the returned tensor either way.
    backend: None picks "torch" (cuBLAS; the model makes its own choice per pass, Model._channel_mix);
    "triton" the sparse feed-forward (at most 16 rows, the value weight a [C, F] view of a
    contiguous [F, C] tensor: rows of zero activations are not read), "triton-gemv" the dense GEMV
    kernels (at most 16 rows), "cublas" the GEMMs with relu^2 in one pass and the residual add in
    the value GEMM (any number of rows), "torch" the reference."""
    if backend is None:
        backend = "torch"
    name = pick_backend(backend, k, tuple(_BACKENDS), native=("torch", "cublas"))
    if name == "cublas" and in_place:
        return _BACKENDS[name](k, key, value, residual, in_place=True)
    return _BACKENDS[name](k, key, value, residual)
