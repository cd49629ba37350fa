"""The channel mix (feed-forward) after its token shift, with the residual add:

    out = residual + relu(k K^T)^2 V^T          k [T, C], K [F, C], V [C, F]

Squared-ReLU activations are mostly exact zeros in trained models (91% in the bundled one,
docs/benchmarks/ffn-sparsity.md; about 50% with random weights), and a zero activation's row of
V^T contributes nothing. For a few rows (decode of 1-16 sequences) the Triton path reads only
the rows of V^T that some row's activation needs, which is exact: skipped terms are exact zeros.
It takes V^T as a contiguous [F, C] tensor (the model stores the value weight that way and
hands F.linear its transposed view), so a needed row is C contiguous elements.

Three launches instead of five (GEMM, relu, square, GEMM, add):
    _ffn_key_kernel     act = relu(k K^T)^2, [T, F] in k's dtype; a GEMV-shaped GEMM (rows padded
                        to 16 for tl.dot), grid over blocks of F
    _ffn_value_kernel   fp32 partial sums of act V^T over slices of F, grid (C blocks, F slices):
                        a [BLOCK_F, BLOCK_C] tile of V^T is loaded only for rows f where some
                        act[:, f] != 0 (masked-off rows move no memory)
    _ffn_reduce_kernel  out = residual + round(sum of the partials), in k's dtype
Rounding follows the torch reference step by step: k K^T is rounded to the compute dtype before
the relu, its square is rounded, the value GEMM's result is rounded, then added to the residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, is_interpreting, pick_backend, tl, triton

MAX_SPARSE_ROWS = 16  # the Triton path pads rows to one 16-row tl.dot tile


def channel_mix_reference(k, key, value, residual=None):
    """k [T, C], key [F, C], value [C, F] (any strides), residual [T, C] or None -> [T, C]."""
    out = F.linear(torch.relu(F.linear(k, key)).square(), value)
    return out if residual is None else residual + out


# ---- Triton ------------------------------------------------------------------------------------
if HAS_TRITON:
    from .wkv7 import _round_nearest  # float32 -> fp16/bf16 to nearest, also in the interpreter

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """a @ b in float32. IEEE: full float32 products (float32 inputs, which would otherwise
        go through tf32; and bf16 inputs in the CPU interpreter, whose bf16 dot is wrong: the
        products of bf16 values are exact in float32, so the result is the same)."""
        if IEEE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _rows_times_weight_t(
        p_x, stride_x, o_t, m_t, w, stride_w, o_f, m_f, C,
        BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """float32 [BLOCK_T, BLOCK_F] = x[o_t, :C] @ w[o_f, :C]^T: the GEMV-shaped product of a few
        token rows (padded to a tl.dot tile) with rows o_f of a [F, C] weight, stepping over C."""
        b_acc = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            o_c = c0 + tl.arange(0, BLOCK_C)
            m_c = o_c < C
            b_x = tl.load(p_x + o_t[:, None] * stride_x + o_c[None, :], mask=m_t[:, None] & m_c[None, :], other=0)
            b_w = tl.load(w + o_f[:, None].to(tl.int64) * stride_w + o_c[None, :], mask=m_f[:, None] & m_c[None, :], other=0)
            b_acc += _dot(b_x, tl.trans(b_w), IEEE)
        return b_acc

    @triton.jit
    def _ffn_key_kernel(
        k, key, act, T, C, NF, stride_k, stride_w, stride_a,
        BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        i_f = tl.program_id(0)
        o_t = tl.arange(0, BLOCK_T)
        o_f = i_f * BLOCK_F + tl.arange(0, BLOCK_F)
        m_t, m_f = o_t < T, o_f < NF
        b_acc = _rows_times_weight_t(k, stride_k, o_t, m_t, key, stride_w, o_f, m_f, C, BLOCK_T, BLOCK_F, BLOCK_C, IEEE)
        b_h = tl.maximum(_round_nearest(b_acc, act.dtype.element_ty).to(tl.float32), 0)
        p_a = act + o_t[:, None] * stride_a + o_f[None, :]
        tl.store(p_a, _round_nearest(b_h * b_h, act.dtype.element_ty), mask=m_t[:, None] & m_f[None, :])

    @triton.jit
    def _ffn_value_kernel(
        act, value_t, partial, T, C, NF, stride_a, stride_v, F_PER_SPLIT,
        BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        i_c, i_s = tl.program_id(0), tl.program_id(1)
        o_t = tl.arange(0, BLOCK_T)
        o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m_t, m_c = o_t < T, o_c < C
        b_acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        f_start = i_s * F_PER_SPLIT
        for f0 in range(f_start, f_start + F_PER_SPLIT, BLOCK_F):
            o_f = f0 + tl.arange(0, BLOCK_F)
            b_a = tl.load(act + o_t[:, None] * stride_a + o_f[None, :], mask=m_t[:, None] & (o_f < NF)[None, :], other=0)
            b_need = tl.sum((b_a != 0).to(tl.int32), axis=0) > 0  # [BLOCK_F]: row f of V^T is used
            p_v = value_t + o_f[:, None].to(tl.int64) * stride_v + o_c[None, :]
            b_v = tl.load(p_v, mask=b_need[:, None] & m_c[None, :], other=0)
            b_acc += _dot(b_a, b_v, IEEE)
        p_p = partial + (i_s * BLOCK_T + o_t[:, None]) * C + o_c[None, :]
        tl.store(p_p, b_acc, mask=m_t[:, None] & m_c[None, :])

    @triton.jit
    def _ffn_reduce_kernel(
        partial, residual, out, T, C, stride_r, stride_o,
        NUM_SPLITS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ):  # fmt: skip
        i_c = tl.program_id(0)
        o_t = tl.arange(0, BLOCK_T)
        o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m = (o_t < T)[:, None] & (o_c < C)[None, :]
        b_sum = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for i_s in range(NUM_SPLITS):  # a fixed order: the result does not depend on scheduling
            b_sum += tl.load(partial + (i_s * BLOCK_T + o_t[:, None]) * C + o_c[None, :], mask=m, other=0)
        b_o = _round_nearest(b_sum, out.dtype.element_ty)
        if HAS_RESIDUAL:
            b_r = tl.load(residual + o_t[:, None] * stride_r + o_c[None, :], mask=m, other=0).to(tl.float32)
            b_o = _round_nearest(b_r + b_o.to(tl.float32), out.dtype.element_ty)
        tl.store(out + o_t[:, None] * stride_o + o_c[None, :], b_o, mask=m)


def _key_blocks(NF: int) -> int:
    """BLOCK_F: about 256 programs over F (two per SM on an H200), 16 to 64 rows of K each."""
    return max(16, min(64, triton.next_power_of_2(max(NF // 256, 1))))


def _value_splits(C: int, NF: int, block_c: int, block_f: int) -> tuple[int, int]:
    """(number of F slices, rows per slice): about 256 programs in all, whole BLOCK_F steps."""
    c_blocks = triton.cdiv(C, block_c)
    steps = triton.cdiv(NF, block_f)
    splits = max(1, min(steps, 256 // c_blocks))
    per_split = triton.cdiv(steps, splits) * block_f
    return triton.cdiv(NF, per_split), per_split


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


def channel_mix_triton(k, key, value, residual=None, *, block_c=None):
    """Three launches; same arguments and result as channel_mix_reference for T <= 16 rows.
    value must be the transposed view of a contiguous [F, C] tensor. block_c overrides the
    value kernel's channel block (tests use it to cover several blocks)."""
    value_t = value.t()
    _check(k, key, value_t, residual)
    T, C = k.shape
    NF = key.shape[0]
    out = torch.empty(T, C, dtype=k.dtype, device=k.device)
    if T == 0:
        return out
    k = k if k.stride(1) == 1 else k.contiguous()
    ieee = k.dtype == torch.float32 or (k.dtype == torch.bfloat16 and is_interpreting())
    act = torch.empty(T, NF, dtype=k.dtype, device=k.device)
    block_f = _key_blocks(NF)
    _ffn_key_kernel[(triton.cdiv(NF, block_f),)](
        k, key, act, T, C, NF, k.stride(0), key.stride(0), act.stride(0),
        BLOCK_T=MAX_SPARSE_ROWS, BLOCK_F=block_f, BLOCK_C=128, IEEE=ieee, num_warps=4, num_stages=3,
    )  # fmt: skip
    block_c = block_c or min(128, triton.next_power_of_2(C))
    splits, per_split = _value_splits(C, NF, block_c, 32)
    partial = torch.empty(splits, MAX_SPARSE_ROWS, C, dtype=torch.float32, device=k.device)
    _ffn_value_kernel[(triton.cdiv(C, block_c), splits)](
        act, value_t, partial, T, C, NF, act.stride(0), value_t.stride(0), per_split,
        BLOCK_T=MAX_SPARSE_ROWS, BLOCK_F=32, BLOCK_C=block_c, IEEE=ieee, num_warps=4, num_stages=3,
    )  # fmt: skip
    res = residual if residual is not None else out  # unread without a residual
    _ffn_reduce_kernel[(triton.cdiv(C, 128),)](
        partial, res, out, T, C, res.stride(0), out.stride(0),
        NUM_SPLITS=splits, BLOCK_T=MAX_SPARSE_ROWS, BLOCK_C=128, HAS_RESIDUAL=residual is not None, num_warps=4,
    )  # fmt: skip
    return out


_BACKENDS = {"torch": channel_mix_reference, "triton": channel_mix_triton}


def channel_mix(k, key, value, residual=None, backend=None):
    """residual + relu(k key^T)^2 value^T, [T, C] in k's dtype (residual None: no add).
    backend: None picks "triton" for CUDA tensors with at most 16 rows (decode of 1-16
    sequences) when the value weight is a [C, F] view of a contiguous [F, C] tensor, else
    "torch"; "torch" and "triton" force one."""
    if backend is None and (k.shape[0] > MAX_SPARSE_ROWS or value.stride(0) != 1):
        backend = "torch"
    return _BACKENDS[pick_backend(backend, k, tuple(_BACKENDS))](k, key, value, residual)
