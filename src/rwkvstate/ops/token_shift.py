"""Token shift and mixing over a packed batch, reading and writing the pool's shift state in place.

For every row t of x [T, C] the previous row is x[t-1] within the same sequence;
the first token of a sequence reads the slot's stored shift vector instead. The
slot's shift vector is then replaced by the sequence's last row. The mixes are

    out[m, t] = x[t] + (prev[t] - x[t]) * mix[m]        m = 0 .. K-1

(K = 6 for the time mix: r, w, k, v, a, g; K = 1 for the channel mix).

In the model x is a layer norm's output, and before the channel mix's norm comes the residual
add; `norm_shift_mix` does add, norm and mixes in one launch for decode batches (the norm of a
single row is otherwise a kernel of 3-8 us on an H200, twice per layer).
"""

from __future__ import annotations

from typing import Callable

import torch

import torch.nn.functional as F

from ._triton import HAS_TRITON, pdl_args, pick_backend, tl, triton

LAYER_NORM_EPS = 1e-5  # F.layer_norm's default, which the model uses


def token_shift_reference(x: torch.Tensor, shift_state: torch.Tensor, packed) -> torch.Tensor:
    """x [T, C]; shift_state [S, C] (a view into the pool). Returns prev [T, C] in x's dtype."""
    prev = torch.empty_like(x)
    prev[1:] = x[:-1]
    prev[packed.first_rows] = shift_state.index_select(0, packed.live_slots).to(x.dtype)
    shift_state.index_copy_(0, packed.live_slots, x.index_select(0, packed.last_rows).to(shift_state.dtype))
    return prev


def token_shift_mix_reference(x: torch.Tensor, shift_state: torch.Tensor, packed, mix: torch.Tensor) -> torch.Tensor:
    """x [T, C], mix [K, C]. Returns [K, T, C] in x's dtype and updates shift_state."""
    delta = token_shift_reference(x, shift_state, packed) - x
    return torch.addcmul(x.unsqueeze(0), delta.unsqueeze(0), mix.unsqueeze(1))


# ---- Triton ------------------------------------------------------------------------------------
# Grid (channel blocks, row blocks) over the packed token axis: a program owns rows
# o_t = i_t*BLOCK_T .. +BLOCK_T-1 and channels o_c = i_c*BLOCK_C .. +BLOCK_C-1. It reads x once
# (plus the row above its first row), the state row of every sequence whose FIRST row it owns,
# and each mix row once, and writes all K outputs of its rows.
#
# Race: the program reading slot s's old shift row (the sequence's first row) and the one that
# would write its new row (the last row) differ as soon as a sequence spans two row blocks. So
# - decode (every sequence is one row, first == last): the program that reads a slot's row is the
#   only one touching it: one launch, the state row is read and written once. Inside the program
#   the thread that stores an element need not be the one that loaded it (the compiler may lay
#   the stored value out differently from the load, as after a reduction), so every thread's load
#   is waited for (tl.debug_barrier, one __syncthreads) before any thread stores: without it, a
#   program of several warps sometimes read the new row instead of the old (seen as CUDA-graph
#   decode drifting from eager decode in _norm_shift_mix_kernel). Padding rows may all point at
#   the scratch slot; only padding outputs can see that.
# - prefill: the mixes kernel only reads the state, and a second small launch, ordered after it
#   on the stream, copies each live sequence's last row into its slot.
if HAS_TRITON:
    from ._triton import pdl_enter, pdl_exit  # first and last statements of the kernels launched with pdl_args

    @triton.jit
    def _token_shift_mix_kernel(
        x, state, slots, token_seq, cu_seqlens, mix, out,
        T, C, stride_x, stride_s, stride_m, stride_ok, stride_ot,
        K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, IS_DECODE: tl.constexpr,
    ):  # fmt: skip
        i_c, i_t = tl.program_id(0), tl.program_id(1)
        o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
        o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m_t, m_c = o_t < T, o_c < C
        m_tc = m_t[:, None] & m_c[None, :]
        b_seq = tl.load(token_seq + o_t, mask=m_t, other=0)
        b_first = m_t & (tl.load(cu_seqlens + b_seq, mask=m_t, other=0) == o_t)
        b_slot = tl.load(slots + b_seq, mask=b_first, other=0).to(tl.int64)
        o_x = o_t.to(tl.int64)[:, None] * stride_x + o_c[None, :]
        p_s = state + b_slot[:, None] * stride_s + o_c[None, :]
        b_x = tl.load(x + o_x, mask=m_tc, other=0).to(tl.float32)
        b_above = tl.load(x + o_x - stride_x, mask=m_tc & ~b_first[:, None], other=0).to(tl.float32)
        b_old = tl.load(p_s, mask=m_tc & b_first[:, None], other=0).to(tl.float32)
        b_d = tl.where(b_first[:, None], b_old, b_above) - b_x
        o_o = o_t.to(tl.int64)[:, None] * stride_ot + o_c[None, :]
        for i_m in tl.static_range(K):
            b_mix = tl.load(mix + i_m * stride_m + o_c, mask=m_c, other=0).to(tl.float32)
            b_o = b_x + b_d * b_mix[None, :]
            tl.store(out + i_m * stride_ok + o_o, b_o.to(out.dtype.element_ty), mask=m_tc)
        if IS_DECODE:  # every row is first and last of its sequence; see the race note above
            tl.debug_barrier()  # every old row is read before any new one is written
            tl.store(p_s, b_x.to(state.dtype.element_ty), mask=m_tc)

    # state[slots[i]] = x[cu_seqlens[i+1] - 1] for the B live sequences; grid (channel blocks, sequence blocks).
    @triton.jit
    def _token_shift_store_kernel(
        x, state, slots, cu_seqlens, B, C, stride_x, stride_s, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr
    ):
        i_c, i_b = tl.program_id(0), tl.program_id(1)
        o_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)
        o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m_b, m_c = o_b < B, o_c < C
        m_bc = m_b[:, None] & m_c[None, :]
        b_last = tl.load(cu_seqlens + o_b + 1, mask=m_b, other=1).to(tl.int64) - 1
        b_slot = tl.load(slots + o_b, mask=m_b, other=0).to(tl.int64)
        b_x = tl.load(x + b_last[:, None] * stride_x + o_c[None, :], mask=m_bc, other=0)
        tl.store(state + b_slot[:, None] * stride_s + o_c[None, :], b_x.to(state.dtype.element_ty), mask=m_bc)


def _block_sizes(num_rows: int, C: int) -> tuple[int, int]:
    """BLOCK_C up to 512 channels, BLOCK_T rows so that a program holds about 2048 elements
    (16 per thread at 4 warps); tiny T gets a tiny BLOCK_T so decode spreads over channels."""
    block_c = min(triton.next_power_of_2(C), 512)
    block_t = min(max(2048 // block_c, 1), triton.next_power_of_2(max(num_rows, 1)))
    return block_t, block_c


def _check(x: torch.Tensor, shift_state: torch.Tensor, mix: torch.Tensor) -> None:
    if x.dim() != 2 or mix.dim() != 2 or shift_state.dim() != 2:
        raise ValueError(f"expected x [T, C], shift_state [S, C], mix [K, C]; got {list(x.shape)}, "
                         f"{list(shift_state.shape)}, {list(mix.shape)}")  # fmt: skip
    if not x.shape[1] == shift_state.shape[1] == mix.shape[1]:
        raise ValueError(f"channel counts differ: x {x.shape[1]}, shift_state {shift_state.shape[1]}, "
                         f"mix {mix.shape[1]}")  # fmt: skip
    if shift_state.stride(1) != 1:
        raise ValueError("shift_state must have unit stride along channels (it is written in place)")


def _launch_mixes(x, shift_state, packed, mix, out, is_decode, block_t=None, block_c=None) -> None:
    """One launch computing out[k] = mix k for all K rows of `mix`; writes the state iff is_decode."""
    (T, C), K = x.shape, mix.shape[0]
    bt, bc = _block_sizes(T, C)
    block_t, block_c = block_t or bt, block_c or bc
    grid = (triton.cdiv(C, block_c), triton.cdiv(T, block_t))
    _token_shift_mix_kernel[grid](
        x, shift_state, packed.live_slots, packed.token_seq, packed.cu_seqlens, mix, out,
        T, C, x.stride(0), shift_state.stride(0), mix.stride(0), out.stride(0), out.stride(1),
        K=K, BLOCK_T=block_t, BLOCK_C=block_c, IS_DECODE=is_decode, num_warps=4,
    )  # fmt: skip


def _launch_store(x, shift_state, packed, block_c=None) -> None:
    """The prefill state update: each live slot gets its sequence's last row of x."""
    B, C = packed.live_slots.numel(), x.shape[1]
    block_b, bc = _block_sizes(B, C)
    block_c = block_c or bc
    grid = (triton.cdiv(C, block_c), triton.cdiv(B, block_b))
    _token_shift_store_kernel[grid](
        x, shift_state, packed.live_slots, packed.cu_seqlens, B, C, x.stride(0), shift_state.stride(0),
        BLOCK_B=block_b, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip


def _prepare(x, shift_state, mix, out):
    """Checks shapes; x and mix get unit channel stride; out [K, T, C] is allocated unless given."""
    _check(x, shift_state, mix)
    x, mix = x.contiguous(), mix.contiguous()
    if out is None:
        return x, mix, torch.empty(mix.shape[0], *x.shape, dtype=x.dtype, device=x.device)
    if out.shape != (mix.shape[0], *x.shape) or out.dtype != x.dtype or out.stride(2) != 1:
        raise ValueError(f"out must be [K, T, C] = {[mix.shape[0], *x.shape]} {x.dtype} with unit channel stride")
    return x, mix, out


def token_shift_mix_triton(x, shift_state, packed, mix, *, out=None, block_t=None, block_c=None) -> torch.Tensor:
    """Fused: one launch for decode, two (mixes, then state rows) for prefill; see the race note.
    out: optional [K, T, C] destination (rows may be strided). block_t / block_c override the
    heuristic block sizes (tests use them to cover many blocks)."""
    x, mix, out = _prepare(x, shift_state, mix, out)
    if x.shape[0] == 0:
        return out
    _launch_mixes(x, shift_state, packed, mix, out, packed.is_decode, block_t, block_c)
    if not packed.is_decode:
        _launch_store(x, shift_state, packed, block_c)
    return out


def token_shift_mix_per_mix(x, shift_state, packed, mix, *, out=None, block_t=None, block_c=None) -> torch.Tensor:
    """The seed's design, kept as the benchmark baseline: one launch per mix, each re-reading x
    and the state rows, then one launch writing the new state rows (K + 1 launches)."""
    x, mix, out = _prepare(x, shift_state, mix, out)
    if x.shape[0] == 0:
        return out
    for k in range(mix.shape[0]):
        _launch_mixes(x, shift_state, packed, mix[k : k + 1], out[k : k + 1], False, block_t, block_c)
    _launch_store(x, shift_state, packed, block_c)
    return out


_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "torch": token_shift_mix_reference,
    "triton": token_shift_mix_triton,
    "triton-per-mix": token_shift_mix_per_mix,
}


def token_shift_mix(x: torch.Tensor, shift_state: torch.Tensor, packed, mix: torch.Tensor, backend=None):
    """x [T, C], shift_state [S, C] pool view, mix [K, C] -> [K, T, C] in x's dtype; updates shift_state.
    backend: None ("triton" for CUDA tensors when triton imports, else "torch"), "torch", "triton",
    "triton-per-mix"."""
    return _BACKENDS[pick_backend(backend, x, tuple(_BACKENDS))](x, shift_state, packed, mix)


# ---- residual add + layer norm + token shift (decode) -------------------------------------------
def norm_shift_mix_reference(x, delta, ln_w, ln_b, shift_state, packed, mix, shift_backend=None):
    """x [T, C] the residual stream, delta [T, C] or None (added to x first), ln_w, ln_b [C].
    Returns (x + delta, the mixes [K, T, C] of LayerNorm(x + delta)) and updates shift_state with
    the norm's output, as the model's separate add, F.layer_norm and token_shift_mix do."""
    if delta is not None:
        x = x + delta
    xx = F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps=LAYER_NORM_EPS)
    return x, token_shift_mix(xx, shift_state, packed, mix, backend=shift_backend)


# Grid (row blocks,): a program owns BLOCK_T whole rows (BLOCK_C = next_pow2(C) >= C channels), so
# the norm's moments stay in the program. Decode only: every row is its sequence's first and
# last, so the program reads the slot's old shift row and stores the new one (the norm's output)
# through the same pointers, after a barrier, as _token_shift_mix_kernel does with IS_DECODE.
# Every load comes before the first store: the compiler may not move a load past a store it cannot
# prove apart, so loads placed after a store (the norm's weights after the residual's store, each
# mix after the previous mix's store) each cost a trip to memory of their own, and at batch 1 the
# kernel is those trips. The K mixes are one [K_P2, BLOCK_T, BLOCK_C] tile and one store.
if HAS_TRITON:
    from .wkv7 import _round_nearest

    @triton.jit
    def _norm_shift_mix_kernel(
        x, delta, ln_w, ln_b, state, slots, x_out, out, T, C, eps,
        stride_x, stride_d, stride_s, stride_m, stride_xo, stride_ok, stride_ot, mix,
        K: tl.constexpr, K_P2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HAS_DELTA: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        pdl_enter(PDL)
        i_t = tl.program_id(0)
        o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
        o_c = tl.arange(0, BLOCK_C)
        o_k = tl.arange(0, K_P2)
        m_t, m_c = o_t < T, o_c < C
        m_tc = m_t[:, None] & m_c[None, :]
        m_ktc = (o_k < K)[:, None, None] & m_tc[None, :, :]
        o_r = o_t.to(tl.int64)[:, None]
        # loads: the slot indices first (the old shift rows wait on them), then everything else
        b_slot = tl.load(slots + o_t, mask=m_t, other=0).to(tl.int64)
        b_x = tl.load(x + o_r * stride_x + o_c[None, :], mask=m_tc, other=0).to(tl.float32)
        if HAS_DELTA:
            b_delta = tl.load(delta + o_r * stride_d + o_c[None, :], mask=m_tc, other=0).to(tl.float32)
        b_w = tl.load(ln_w + o_c, mask=m_c, other=0).to(tl.float32)
        b_b = tl.load(ln_b + o_c, mask=m_c, other=0).to(tl.float32)
        b_mix = tl.load(mix + o_k[:, None] * stride_m + o_c[None, :], mask=(o_k < K)[:, None] & m_c[None, :],
                        other=0).to(tl.float32)  # [K_P2, BLOCK_C]  # fmt: skip
        p_s = state + b_slot[:, None] * stride_s + o_c[None, :]
        b_old = tl.load(p_s, mask=m_tc, other=0).to(tl.float32)
        if HAS_DELTA:  # the residual add, rounded to the stream's dtype as torch's add is
            b_x = _round_nearest(b_x + b_delta, x_out.dtype.element_ty)
            tl.store(x_out + o_r * stride_xo + o_c[None, :], b_x, mask=m_tc)
            b_x = b_x.to(tl.float32)
        b_mean = tl.sum(b_x, axis=1) / C
        b_d = tl.where(m_c[None, :], b_x - b_mean[:, None], 0.0)
        b_rstd = 1 / tl.sqrt(tl.sum(b_d * b_d, axis=1) / C + eps)
        b_xx = _round_nearest(b_d * b_rstd[:, None] * b_w[None, :] + b_b[None, :], out.dtype.element_ty).to(tl.float32)
        tl.debug_barrier()  # every old row is read before any new one is written (the race note above)
        tl.store(p_s, _round_nearest(b_xx, state.dtype.element_ty), mask=m_tc)
        b_o = b_xx[None, :, :] + (b_old - b_xx)[None, :, :] * b_mix[:, None, :]  # [K_P2, BLOCK_T, BLOCK_C]
        p_o = out + o_k[:, None, None] * stride_ok + o_r[None, :, :] * stride_ot + o_c[None, None, :]
        tl.store(p_o, _round_nearest(b_o, out.dtype.element_ty), mask=m_ktc)
        pdl_exit(PDL)


def norm_shift_mix_triton(x, delta, ln_w, ln_b, shift_state, packed, mix, shift_backend=None):
    """One launch for a decode batch (every live sequence one row, rows in slot order as
    pack_decode lays them out); same arguments and results as norm_shift_mix_reference."""
    if not packed.is_decode:
        raise ValueError("the fused norm + token shift kernel handles decode batches (one token per sequence)")
    _check(x, shift_state, mix)
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"delta must be {list(x.shape)}, got {list(delta.shape)}")
    (T, C), K = x.shape, mix.shape[0]
    mix = mix.contiguous()
    out = torch.empty(K, T, C, dtype=x.dtype, device=x.device)
    x_out = x if delta is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    if T == 0:
        return x_out, out
    block_c, k_p2 = triton.next_power_of_2(C), triton.next_power_of_2(K)
    block_t = min(max(4096 // block_c, 1), triton.next_power_of_2(T))  # rows: a [BLOCK_T, BLOCK_C] tile of <= 4096
    # the warps of the norm's tile, as before the loads were reordered: the moments are summed in
    # the same order, so the results are the same bits (the mix tile then holds up to 128 per thread)
    num_warps = 4 if block_t * block_c <= 2048 else 8
    d = x if delta is None else delta  # unread without a delta
    _norm_shift_mix_kernel[(triton.cdiv(T, block_t),)](
        x, d, ln_w, ln_b, shift_state, packed.live_slots, x_out, out, T, C, LAYER_NORM_EPS,
        x.stride(0), d.stride(0), shift_state.stride(0), mix.stride(0), x_out.stride(0), out.stride(0), out.stride(1), mix,
        K=K, K_P2=k_p2, BLOCK_T=block_t, BLOCK_C=block_c, HAS_DELTA=delta is not None, num_warps=num_warps,
        **pdl_args(x),
    )  # fmt: skip
    return x_out, out


def norm_shift_mix(x, delta, ln_w, ln_b, shift_state, packed, mix, backend=None, shift_backend=None):
    """-> (x + delta, mixes [K, T, C] of LayerNorm(x + delta)); updates shift_state. backend: None
    picks "triton" for CUDA tensors; "triton" is one fused launch for decode batches; "torch",
    and "triton" for other batches, are the add, F.layer_norm and token_shift_mix with
    `shift_backend`, as separate ops."""
    if pick_backend(backend, x) == "triton" and packed.is_decode:
        return norm_shift_mix_triton(x, delta, ln_w, ln_b, shift_state, packed, mix)
    return norm_shift_mix_reference(x, delta, ln_w, ln_b, shift_state, packed, mix, shift_backend)
