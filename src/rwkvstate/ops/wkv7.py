"""The WKV-7 recurrence over a packed batch, on the pool's state in place.

Per token and head, with state S [N(value), N(key)] in float32:
    S = S * w[None, :] + (S @ a)[:, None] * b[None, :] + v[:, None] * k[None, :]
    y = S @ r
RWKV-7 calls it with a = -kk and b = kk * in_context_lr (see ops/README.md).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ._triton import HAS_TRITON, pick_backend, tl, triton

ROUNDINGS = ("nearest", "stochastic")
HEAD_SIZES = (16, 32, 64, 128)


def _neutral_rows(t: torch.Tensor, value: float) -> torch.Tensor:
    """Appends one row that leaves the state unchanged, for padding steps."""
    return torch.cat([t, t.new_full((1, *t.shape[1:]), value)])


def wkv7_reference(state: torch.Tensor, packed, r, w, k, v, a, b) -> torch.Tensor:
    """state [S, H, N, N] (pool view, any float dtype); r, w, k, v, a, b [T, H, N].

    w is the decay factor in (0, 1). Returns y [T, H, N] float32. Sequences of
    different lengths advance together; padding steps use w = 1 and zero k, v, a,
    b, which leave a state bit-identical, so no masks are needed.
    """
    T, H, N = r.shape
    y = torch.empty(T + 1, H, N, dtype=torch.float32, device=r.device)
    if T == 0:
        return y[:0]
    S = state.index_select(0, packed.live_slots).float()  # [B', H, N, N]
    inputs = [_neutral_rows(t.float(), 1.0 if t is w else 0.0) for t in (r, w, k, v, a, b)]
    r_, w_, k_, v_, a_, b_ = (t[packed.pad_rows] for t in inputs)  # [B', max_len, H, N]
    for step in range(packed.max_len):
        sa = S @ a_[:, step, :, :, None]  # [B', H, N, 1]
        S = S * w_[:, step, :, None, :] + sa * b_[:, step, :, None, :] + v_[:, step, :, :, None] * k_[:, step, :, None, :]
        y[packed.pad_rows[:, step]] = (S @ r_[:, step, :, :, None]).squeeze(-1)
    state.index_copy_(0, packed.live_slots, S.to(state.dtype))
    return y[:T]


def stochastic_round_reference(x: torch.Tensor, dtype: torch.dtype, u: torch.Tensor) -> torch.Tensor:
    """Rounds float32 x to fp16/bf16, up (in magnitude) with probability equal to the distance to
    the lower neighbour in ulps, using uniform noise u in [0, 1) of x's shape: E[out] = x exactly.

    lo <= |x| < hi are the two neighbours; out = hi iff u < (|x| - lo) / (hi - lo), a ratio that
    is exact in float32 (the differences are exact and hi - lo is a power of two). Representable
    values come back unchanged, values beyond the format's range become inf as in nearest mode.
    The Triton kernel does the same with Philox noise (see _stochastic_round).
    """
    ax = x.float().abs()
    m = ax.to(dtype)  # nearest: one of the two neighbours
    below = m.float() <= ax
    other = (m.view(torch.int16) + torch.where(below, 1, -1).to(torch.int16)).view(dtype)
    lo, hi = torch.where(below, m, other), torch.where(below, other, m)
    p = (ax - lo.float()) / (hi.float() - lo.float())
    out = torch.where(m.isinf(), m, torch.where(u < p, hi, lo))
    return torch.where(torch.signbit(x), -out, out)


# ---- Triton ------------------------------------------------------------------------------------
# Grid (live sequence i_n, head i_h, value-row block i_v). Rows i of S are independent (S @ a
# and S @ r reduce over keys j only), so a program owns S[o_v, :] for o_v = i_v*BLOCK_V ..
# +BLOCK_V-1 of one head of one sequence: a [BLOCK_V, N] float32 tile held in registers for all
# tokens cu_seqlens[i_n] .. cu_seqlens[i_n+1]-1 (decode and packed prefill alike). It loads the
# tile straight from its pool slot (state + live_slots[i_n] * stride_slot, no gather), and
# stores it back once, in the pool's dtype, after the last token. Per token it reads r, w, k, a,
# b [N] and v [BLOCK_V] (prefetched one token ahead) and writes y [BLOCK_V]. No two programs
# touch the same state or y element, so there are no races and no atomics.
if HAS_TRITON:

    @triton.jit
    def _round_nearest(x, DTYPE: tl.constexpr):
        """float32 -> DTYPE, to nearest even. bf16 by integer arithmetic because Triton's CPU
        interpreter truncates fp32 -> bf16 casts; on the GPU this equals cvt.rn (torch's .to)."""
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = tl.where(x == x, (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16, 0x7FC0)  # NaN stays NaN
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return x.to(DTYPE)

    @triton.jit
    def _uniform_tile(key, i_h, o_v, BLOCK_V: tl.constexpr, N: tl.constexpr):
        """[BLOCK_V, N] uniform floats in [0, 1) with 24 random bits each. Philox keyed by (slot,
        seed), counter = (head, row, column group): one randint4x call feeds 4 columns, 4x less
        work than tl.rand per element."""
        o_c = (i_h * N + o_v[:, None]) * (N // 4) + tl.arange(0, N // 4)[None, :]
        i_0, i_1, i_2, i_3 = tl.randint4x(key, o_c)
        bits = tl.reshape(tl.join(tl.join(i_0, i_1), tl.join(i_2, i_3)), [BLOCK_V, N])
        return ((bits >> 8) & 0xFFFFFF).to(tl.float32) * (1.0 / 16777216)

    @triton.jit
    def _stochastic_round(x, u, DTYPE: tl.constexpr):
        """Triton twin of stochastic_round_reference: x float32, u uniform [0, 1) -> DTYPE (16-bit)."""
        ax = tl.abs(x)
        m = _round_nearest(ax, DTYPE)
        m_f = m.to(tl.float32)
        below = m_f <= ax
        step = tl.where(below, 1, -1).to(tl.int16)
        other = (m.to(tl.int16, bitcast=True) + step).to(DTYPE, bitcast=True)
        lo = tl.where(below, m, other).to(tl.float32)
        hi = tl.where(below, other, m).to(tl.float32)
        out = tl.where(u < (ax - lo) / (hi - lo), hi, lo)
        out = tl.where(m_f == float("inf"), m_f, out)
        return tl.where(x.to(tl.int32, bitcast=True) < 0, -out, out).to(DTYPE)

    @triton.jit
    def _load_token(r, w, k, v, a, b, o_t, o_k, o_v):
        """Row o_t (token, head) of the six [T, H, N] inputs, in their own dtypes."""
        return (
            tl.load(r + o_t + o_k), tl.load(w + o_t + o_k), tl.load(k + o_t + o_k),
            tl.load(v + o_t + o_v), tl.load(a + o_t + o_k), tl.load(b + o_t + o_k),
        )  # fmt: skip

    @triton.jit(do_not_specialize=["seed"])
    def _wkv7_kernel(
        state, live_slots, cu_seqlens, r, w, k, v, a, b, y, stride_slot, seed,
        H: tl.constexpr, N: tl.constexpr, BLOCK_V: tl.constexpr, STOCHASTIC: tl.constexpr,
    ):  # fmt: skip
        i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        i_slot = tl.load(live_slots + i_n).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)  # > bos: only live sequences are launched
        o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
        o_k = tl.arange(0, N)
        o_s = i_h * N * N + o_v[:, None] * N + o_k[None, :]  # int32: < H * N * N
        p_s = state + i_slot * stride_slot + o_s
        b_s = tl.load(p_s).to(tl.float32)  # [BLOCK_V, N], on chip until the last token
        n_r, n_w, n_k, n_v, n_a, n_b = _load_token(r, w, k, v, a, b, (bos * H + i_h) * N, o_k, o_v)
        for t in range(bos, eos):
            o_t = (t * H + i_h) * N  # row t, head i_h of the [T, H, N] inputs
            b_r, b_w, b_k = n_r.to(tl.float32), n_w.to(tl.float32), n_k.to(tl.float32)
            b_v, b_a, b_b = n_v.to(tl.float32), n_a.to(tl.float32), n_b.to(tl.float32)
            # Issue token t+1's loads before token t's arithmetic: the chain through b_s is serial,
            # the inputs are not, so their latency hides behind it.
            # The last token reloads itself instead of masking (always in bounds, value unused).
            o_next = (tl.minimum(t + 1, eos - 1) * H + i_h) * N
            n_r, n_w, n_k, n_v, n_a, n_b = _load_token(r, w, k, v, a, b, o_next, o_k, o_v)
            b_sa = tl.sum(b_s * b_a[None, :], axis=1)  # [BLOCK_V] = (S @ a)[o_v]
            b_s = b_s * b_w[None, :] + b_sa[:, None] * b_b[None, :] + b_v[:, None] * b_k[None, :]
            tl.store(y + o_t + o_v, tl.sum(b_s * b_r[None, :], axis=1))
        if STOCHASTIC:
            b_u = _uniform_tile(i_slot * 4294967296 + seed, i_h, o_v, BLOCK_V, N)
            tl.store(p_s, _stochastic_round(b_s, b_u, state.dtype.element_ty))
        else:
            tl.store(p_s, _round_nearest(b_s, state.dtype.element_ty))


def _launch_config(N: int, num_seqs: int, num_heads: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps). Large tiles when there are many (sequence, head) pairs (fewer
    programs, fewer repeated loads of the key vectors), small ones when there are few, so a lone
    long prefill still spreads over the SMs. The tile stays <= 4096 float32, 64 per thread at 2
    warps. Measured on an H200 at H = 32, N = 64 (docs in ops/README.md)."""
    block_v = max(min(16, N), min(N, 4096 // N))
    while block_v > 16 and num_seqs * num_heads * (N // block_v) < 512:
        block_v //= 2
    return block_v, 2


def _check(state: torch.Tensor, r: torch.Tensor, inputs) -> None:
    if r.dim() != 3:
        raise ValueError(f"r, w, k, v, a, b must be [T, H, N], got r {list(r.shape)}")
    T, H, N = r.shape
    if N not in HEAD_SIZES:
        raise ValueError(f"the Triton WKV-7 kernel supports head sizes {HEAD_SIZES}, got N = {N}")
    for name, t in zip("rwkvab", inputs):
        if t.shape != r.shape or t.device != r.device:
            raise ValueError(f"{name} is {list(t.shape)} on {t.device}, expected {list(r.shape)} on {r.device}")
    if state.dim() != 4 or state.shape[1:] != (H, N, N):
        raise ValueError(f"state must be a [S, {H}, {N}, {N}] pool view, got {list(state.shape)}")
    if state.stride()[1:] != (N * N, N, 1):
        raise ValueError(f"state heads must be contiguous [N, N] row-major blocks, got strides {state.stride()}")


def wkv7_triton(
    state, packed, r, w, k, v, a, b, rounding="nearest", seed=0, *, out=None, block_v=None, num_warps=None
) -> torch.Tensor:
    """One launch over all live sequences; reads and writes each live slot's state once, in
    place. rounding="stochastic" (fp16/bf16 storage) rounds the stored state with noise from
    (seed, slot, element): pass a new seed every call, or the same noise repeats step after step.
    out: an optional float32 [T, H, N] tensor for y. block_v / num_warps override the heuristic
    (tests and benchmarks)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    inputs = (r, w, k, v, a, b)
    _check(state, r, inputs)
    T, H, N = r.shape
    y = torch.empty(T, H, N, dtype=torch.float32, device=r.device) if out is None else out
    if y.shape != r.shape or y.dtype != torch.float32 or not y.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 {list(r.shape)} tensor")
    num_live = packed.live_slots.numel()
    if T == 0 or num_live == 0:
        return y
    bv, nw = _launch_config(N, num_live, H)
    block_v, num_warps = block_v or bv, num_warps or nw
    if N % block_v or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two dividing N = {N}, got {block_v}")
    stochastic = rounding == "stochastic" and state.dtype != torch.float32
    _wkv7_kernel[(num_live, H, N // block_v)](
        state, packed.live_slots, packed.cu_seqlens, *(t.contiguous() for t in inputs), y,
        state.stride(0), seed & 0xFFFFFFFF, H=H, N=N, BLOCK_V=block_v, STOCHASTIC=stochastic, num_warps=num_warps,
    )  # fmt: skip
    return y


def _wkv7_torch(state, packed, r, w, k, v, a, b, rounding="nearest", seed=0) -> torch.Tensor:
    """The reference; stochastic rounding runs it on a float32 copy of the live slots."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if rounding == "nearest" or state.dtype == torch.float32:
        return wkv7_reference(state, packed, r, w, k, v, a, b)
    slots = packed.live_slots
    S = state.index_select(0, slots).float()  # [B', H, N, N]: slot i of S is live sequence i
    rows = dataclasses.replace(packed, live_slots=torch.arange(len(slots), device=slots.device))
    y = wkv7_reference(S, rows, r, w, k, v, a, b)
    u = torch.rand(S.shape, generator=torch.Generator(S.device).manual_seed(seed), device=S.device)
    state.index_copy_(0, slots, stochastic_round_reference(S, state.dtype, u))
    return y


def wkv7_fla(state, packed, r, w, k, v, a, b, rounding="nearest", seed=0) -> torch.Tensor:
    """Chunked-parallel prefill through fla-core's `chunk_rwkv7` (optional, CUDA only).

    fla keeps its state key-major ([N, H, K, V], the transpose of ours) in separate tensors, so
    the live slots are gathered and transposed before the call and transposed and scattered back
    after it: the layout adaptation that the in-place kernel does not need (its cost is measured in
    benchmarks/bench_prefill.py). fla takes the log decay and computes in chunks, so it agrees
    with the recurrence to about 1e-3, not to float32 rounding."""
    if rounding != "nearest":
        raise ValueError("the fla backend stores the state with nearest rounding only")
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except ImportError as e:
        raise RuntimeError("backend 'fla' needs fla-core (pip install fla-core==0.6.0)") from e
    slots = packed.live_slots
    if r.shape[0] == 0 or slots.numel() == 0:
        return torch.empty(r.shape, dtype=torch.float32, device=r.device)
    s0 = state.index_select(0, slots).float().transpose(-1, -2).contiguous()
    inputs = [t.unsqueeze(0).contiguous() for t in (r, k, v, a, b)]
    y, s1 = chunk_rwkv7(
        inputs[0], w.float().log().unsqueeze(0), *inputs[1:], scale=1.0, initial_state=s0,
        output_final_state=True, cu_seqlens=packed.cu_seqlens.long(),
    )  # fmt: skip
    state.index_copy_(0, slots, s1.transpose(-1, -2).to(state.dtype))
    return y[0].float()


_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"torch": _wkv7_torch, "triton": wkv7_triton, "fla": wkv7_fla}


def wkv7(state, packed, r, w, k, v, a, b, backend=None, rounding="nearest", seed=0) -> torch.Tensor:
    """state [S, H, N, N] pool view, r, w, k, v, a, b [T, H, N] -> y [T, H, N] float32; updates
    the live slots' state. backend: None ("triton" for CUDA tensors when triton imports, else
    "torch"), "torch", "triton". rounding: "nearest" or "stochastic" (fp16/bf16 storage; seed
    picks the noise)."""
    fn = _BACKENDS[pick_backend(backend, r, tuple(_BACKENDS))]
    return fn(state, packed, r, w, k, v, a, b, rounding=rounding, seed=seed)
