"""The channel mix (feed-forward) after its token shift, with the residual add:

    out = residual + relu(k K^T)^2 V^T          k [T, C], K [F, C], V [C, F]

Squared-ReLU activations are mostly exact zeros in trained models (91% in the bundled one,
docs/benchmarks/ffn-sparsity.md; about 50% with random weights), and a zero activation's row of
V^T contributes nothing. For a few rows (decode of 1-16 sequences) the Triton path reads only
the rows of V^T that some row's activation needs, which is exact: skipped terms are exact zeros.
It takes V^T as a contiguous [F, C] tensor (the model stores the value weight that way and
hands F.linear its transposed view), so a needed row is C contiguous elements.
The Triton path is opt-in (backend "triton"): on an H200 it is slower than the two cuBLAS GEMMs
at every activation density measured, 0.1 included (docs/benchmarks/decode-recheck-h200.md).

Three launches instead of five (GEMM, relu, square, GEMM, add):
    _ffn_key_kernel     act = relu(k K^T)^2, [T, F] in k's dtype; a GEMV-shaped GEMM (rows padded
                        to 16 for tl.dot), grid over blocks of BLOCK_F rows of K. Each program also
                        lists, in order, the rows f of its block with some act[:, f] != 0 (the
                        stored, rounded value): idx[block * BLOCK_F + j] for j < counts[block]
    _ffn_value_kernel   fp32 partial sums of act V^T, grid (C blocks, num_splits). The non-zero
                        rows, numbered 0 .. total-1 across blocks (a prefix sum of counts, in each
                        program), are split evenly over the num_splits programs of a C block; a
                        program gathers BLOCK_J of them at a time and loads only those rows of V^T
                        (contiguous along C). Rows of zero activations are never read, and the
                        loop runs density * F / BLOCK_J times, not F / BLOCK_J times
    _ffn_reduce_kernel  out = residual + round(sum of the partials), in k's dtype
The grid is fixed (CUDA graphs replay it whatever the density): programs past the work exit
after storing zeros. The order of every sum depends only on the activations, never on
scheduling, so results are deterministic.
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
        k, key, act, idx, counts, T, C, NF, stride_k, stride_w, stride_a,
        BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        i_f = tl.program_id(0)
        o_t = tl.arange(0, BLOCK_T)
        o_f = i_f * BLOCK_F + tl.arange(0, BLOCK_F)
        m_t, m_f = o_t < T, o_f < NF
        b_acc = _rows_times_weight_t(k, stride_k, o_t, m_t, key, stride_w, o_f, m_f, C, BLOCK_T, BLOCK_F, BLOCK_C, IEEE)
        b_h = tl.maximum(_round_nearest(b_acc, act.dtype.element_ty).to(tl.float32), 0)
        b_act = _round_nearest(b_h * b_h, act.dtype.element_ty)
        m_a = m_t[:, None] & m_f[None, :]
        tl.store(act + o_t[:, None] * stride_a + o_f[None, :], b_act, mask=m_a)
        # this block's needed rows, compacted in order: row f is needed iff a stored act[:, f] != 0
        b_need = (tl.sum((m_a & (b_act != 0)).to(tl.int32), axis=0) > 0).to(tl.int32)  # [BLOCK_F]
        b_pos = tl.cumsum(b_need, axis=0) - 1
        tl.store(idx + i_f * BLOCK_F + b_pos, o_f, mask=b_need > 0)
        tl.store(counts + i_f, tl.sum(b_need, axis=0))

    @triton.jit
    def _needed_rows(idx, b_cnt, b_incl, o_q, m_q, BLOCK_F: tl.constexpr):
        """Rows f of the non-zero rows numbered o_q [BLOCK_J] (0 .. total-1 across key blocks):
        entry q lies in the block after every block whose inclusive count b_incl is <= q, at the
        position q minus those blocks' counts."""
        b_before = b_incl[None, :] <= o_q[:, None]  # [BLOCK_J, NB_PAD]: blocks wholly before entry q
        b_blk = tl.sum(b_before.to(tl.int32), axis=1)
        b_base = tl.sum(tl.where(b_before, b_cnt[None, :], 0), axis=1)
        return tl.load(idx + b_blk * BLOCK_F + o_q - b_base, mask=m_q, other=0)

    @triton.jit
    def _ffn_value_kernel(
        act, value_t, idx, counts, partial, T, C, NB, stride_a, stride_v, num_splits,
        BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_J: tl.constexpr,
        BLOCK_C: tl.constexpr, NB_PAD: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        i_c, i_s = tl.program_id(0), tl.program_id(1)
        o_t = tl.arange(0, BLOCK_T)
        o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m_t, m_c = o_t < T, o_c < C
        o_b = tl.arange(0, NB_PAD)
        b_cnt = tl.load(counts + o_b, mask=o_b < NB, other=0)
        b_incl = tl.cumsum(b_cnt, axis=0)
        total = tl.sum(b_cnt, axis=0)
        per = (total + num_splits * BLOCK_J - 1) // (num_splits * BLOCK_J) * BLOCK_J  # whole BLOCK_J steps
        q_start = i_s * per
        q_end = tl.minimum(q_start + per, total)
        b_acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for q0 in range(q_start, q_end, BLOCK_J):
            o_q = q0 + tl.arange(0, BLOCK_J)
            m_q = o_q < q_end
            b_f = _needed_rows(idx, b_cnt, b_incl, o_q, m_q, BLOCK_F)  # [BLOCK_J] rows of V^T
            b_a = tl.load(act + o_t[:, None] * stride_a + b_f[None, :], mask=m_t[:, None] & m_q[None, :], other=0)
            p_v = value_t + b_f[:, None].to(tl.int64) * stride_v + o_c[None, :]
            b_v = tl.load(p_v, mask=m_q[:, None] & m_c[None, :], other=0)
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


VALUE_PROGRAMS = 512  # programs of the value kernel: enough loads in flight for a sparse gather
BLOCK_J = 32  # needed rows of V^T gathered per step (a tl.dot depth)


def _key_blocks(NF: int) -> int:
    """BLOCK_F: at most 256 programs over F (two per SM on an H200) and at most 256 blocks (the
    value kernel's prefix sum over the blocks' counts is one [256] tile), 16 rows of K or more."""
    return max(16, triton.next_power_of_2(triton.cdiv(NF, 256)))


def _value_splits(C: int, NF: int, block_c: int) -> int:
    """Programs per C block, VALUE_PROGRAMS in all (each stores a [T, BLOCK_C] float32 partial
    sum, so more splits cost more partial traffic), no more than there are BLOCK_J steps of F."""
    return max(1, min(triton.cdiv(NF, BLOCK_J), VALUE_PROGRAMS // triton.cdiv(C, block_c)))


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


def channel_mix_triton(k, key, value, residual=None, *, block_c=None, num_splits=None):
    """Three launches; same arguments and result as channel_mix_reference for T <= 16 rows.
    value must be the transposed view of a contiguous [F, C] tensor. block_c and num_splits
    override the value kernel's channel block and programs per channel block (tests use them)."""
    value_t = value.t()
    _check(k, key, value_t, residual)
    T, C = k.shape
    NF = key.shape[0]
    out = torch.empty(T, C, dtype=k.dtype, device=k.device)
    if T == 0:
        return out
    k = k if k.stride(1) == 1 else k.contiguous()
    ieee = k.dtype == torch.float32 or (k.dtype == torch.bfloat16 and is_interpreting())
    act, idx, counts, block_f = _key_launch(k, key, ieee)
    block_c = block_c or min(128, triton.next_power_of_2(C))
    splits = num_splits or _value_splits(C, NF, block_c)
    partial = torch.empty(splits, MAX_SPARSE_ROWS, C, dtype=torch.float32, device=k.device)
    _ffn_value_kernel[(triton.cdiv(C, block_c), splits)](
        act, value_t, idx, counts, partial, T, C, counts.numel(), act.stride(0), value_t.stride(0), splits,
        BLOCK_T=MAX_SPARSE_ROWS, BLOCK_F=block_f, BLOCK_J=BLOCK_J, BLOCK_C=block_c,
        NB_PAD=triton.next_power_of_2(counts.numel()), IEEE=ieee, num_warps=4, num_stages=3,
    )  # fmt: skip
    res = residual if residual is not None else out  # unread without a residual
    _ffn_reduce_kernel[(triton.cdiv(C, 128),)](
        partial, res, out, T, C, res.stride(0), out.stride(0),
        NUM_SPLITS=splits, BLOCK_T=MAX_SPARSE_ROWS, BLOCK_C=128, HAS_RESIDUAL=residual is not None, num_warps=4,
    )  # fmt: skip
    return out


def _key_launch(k, key, ieee: bool):
    """act [T, F], the needed rows per block (idx [blocks * BLOCK_F], counts [blocks]), BLOCK_F."""
    T, C = k.shape
    NF = key.shape[0]
    block_f = _key_blocks(NF)
    blocks = triton.cdiv(NF, block_f)
    act = torch.empty(T, NF, dtype=k.dtype, device=k.device)
    idx = torch.empty(blocks * block_f, dtype=torch.int32, device=k.device)  # read only below counts
    counts = torch.empty(blocks, dtype=torch.int32, device=k.device)
    _ffn_key_kernel[(blocks,)](
        k, key, act, idx, counts, T, C, NF, k.stride(0), key.stride(0), act.stride(0),
        BLOCK_T=MAX_SPARSE_ROWS, BLOCK_F=block_f, BLOCK_C=128, IEEE=ieee, num_warps=4, num_stages=3,
    )  # fmt: skip
    return act, idx, counts, block_f


def channel_mix_gemv(k, key, value, residual=None):
    """Two launches of the GEMV kernel (ops/gemv.py; at most 16 rows, dense): relu^2 in the key
    projection's epilogue, the residual add in the value projection's. Same result as
    channel_mix_reference, rounding for rounding."""
    from .gemv import gemv_triton  # gemv.py imports this module's _dot

    return gemv_triton(gemv_triton(k, key, activation="relu2"), value, residual)


_BACKENDS = {"torch": channel_mix_reference, "triton": channel_mix_triton, "triton-gemv": channel_mix_gemv}


def channel_mix(k, key, value, residual=None, backend=None):
    """residual + relu(k key^T)^2 value^T, [T, C] in k's dtype (residual None: no add).
    backend: None picks "torch" (cuBLAS): on an H200 the sparse kernel is slower than the two dense
    GEMMs at every activation density measured, 0.1 included (docs/benchmarks/decode.md,
    decode-recheck-h200.json); "triton" forces the sparse kernel (at most 16 rows, the value
    weight a [C, F] view of a contiguous [F, C] tensor), "triton-gemv" the dense GEMV kernel
    (at most 16 rows; the model's choice for decode batches of at most 8 on CUDA), "torch" the
    reference."""
    if backend is None:
        backend = "torch"
    return _BACKENDS[pick_backend(backend, k, tuple(_BACKENDS))](k, key, value, residual)
