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

from ._triton import HAS_TRITON, pdl_args, pick_backend, tl, triton

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
    from ._triton import pdl_enter, pdl_exit  # first and last statements of the kernels launched with pdl_args

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

    @triton.jit
    def _wkv7_token(b_s, n_r, n_w, n_k, n_v, n_a, n_b, y, o_t, o_v):
        """One token's update of a [BLOCK_V, N] float32 state tile from its loaded inputs; stores
        y[o_t + o_v] and returns the new tile."""
        b_r, b_w, b_k = n_r.to(tl.float32), n_w.to(tl.float32), n_k.to(tl.float32)
        b_v, b_a, b_b = n_v.to(tl.float32), n_a.to(tl.float32), n_b.to(tl.float32)
        b_sa = tl.sum(b_s * b_a[None, :], axis=1)  # [BLOCK_V] = (S @ a)[o_v]
        b_s = b_s * b_w[None, :] + b_sa[:, None] * b_b[None, :] + b_v[:, None] * b_k[None, :]
        tl.store(y + o_t + o_v, tl.sum(b_s * b_r[None, :], axis=1))
        return b_s

    @triton.jit(do_not_specialize=["seed"])
    def _wkv7_kernel(
        state, live_slots, cu_seqlens, r, w, k, v, a, b, y, stride_slot, seed,
        H: tl.constexpr, N: tl.constexpr, BLOCK_V: tl.constexpr, STOCHASTIC: tl.constexpr, PDL: tl.constexpr,
        ONE_TOKEN: tl.constexpr,
    ):  # fmt: skip
        """ONE_TOKEN: every sequence feeds exactly one token (decode): no token loop, nothing
        loaded ahead, so fewer registers per program."""
        pdl_enter(PDL)
        i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        i_slot = tl.load(live_slots + i_n).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
        o_k = tl.arange(0, N)
        o_s = i_h * N * N + o_v[:, None] * N + o_k[None, :]  # int32: < H * N * N
        p_s = state + i_slot * stride_slot + o_s
        b_s = tl.load(p_s).to(tl.float32)  # [BLOCK_V, N], on chip until the last token
        n_r, n_w, n_k, n_v, n_a, n_b = _load_token(r, w, k, v, a, b, (bos * H + i_h) * N, o_k, o_v)
        if ONE_TOKEN:
            b_s = _wkv7_token(b_s, n_r, n_w, n_k, n_v, n_a, n_b, y, (bos * H + i_h) * N, o_v)
        else:
            b_s = _wkv7_tokens(b_s, n_r, n_w, n_k, n_v, n_a, n_b, r, w, k, v, a, b, y, bos,
                               tl.load(cu_seqlens + i_n + 1).to(tl.int64), i_h, o_k, o_v, H, N)  # fmt: skip
        _store_state(p_s, b_s, i_slot, seed, i_h, o_v, BLOCK_V, N, STOCHASTIC)
        pdl_exit(PDL)

    @triton.jit
    def _wkv7_tokens(b_s, n_r, n_w, n_k, n_v, n_a, n_b, r, w, k, v, a, b, y, bos, eos, i_h, o_k, o_v,
                     H: tl.constexpr, N: tl.constexpr):  # fmt: skip
        """Tokens bos .. eos-1 (eos > bos: only live sequences are launched) of one head, token
        bos's inputs already loaded; returns the final state tile."""
        for t in range(bos, eos):
            # Issue token t+1's loads before token t's arithmetic: the chain through b_s is serial,
            # the inputs are not, so their latency hides behind it.
            # The last token reloads itself instead of masking (always in bounds, value unused).
            c_r, c_w, c_k, c_v, c_a, c_b = n_r, n_w, n_k, n_v, n_a, n_b
            o_next = (tl.minimum(t + 1, eos - 1) * H + i_h) * N
            n_r, n_w, n_k, n_v, n_a, n_b = _load_token(r, w, k, v, a, b, o_next, o_k, o_v)
            b_s = _wkv7_token(b_s, c_r, c_w, c_k, c_v, c_a, c_b, y, (t * H + i_h) * N, o_v)  # row t, head i_h
        return b_s

    @triton.jit
    def _store_state(p_s, b_s, i_slot, seed, i_h, o_v, BLOCK_V: tl.constexpr, N: tl.constexpr,
                     STOCHASTIC: tl.constexpr):  # fmt: skip
        """Stores a program's float32 state tile in the pool's dtype (nearest or stochastic)."""
        if STOCHASTIC:
            b_u = _uniform_tile(i_slot * 4294967296 + seed, i_h, o_v, BLOCK_V, N)
            tl.store(p_s, _stochastic_round(b_s, b_u, p_s.dtype.element_ty))
        else:
            tl.store(p_s, _round_nearest(b_s, p_s.dtype.element_ty))

    @triton.jit(do_not_specialize=["seed"])
    def _wkv7_prompt_kernel(
        state, live_slots, cu_seqlens, r, w, k, v, a, b, y, stride_slot, seed,
        H: tl.constexpr, N: tl.constexpr, BLOCK_V: tl.constexpr, STOCHASTIC: tl.constexpr, STAGES: tl.constexpr,
    ):  # fmt: skip
        """_wkv7_kernel for prompts (one warp): the token loop is software-pipelined, so every
        input row is copied to shared memory STAGES - 1 tokens ahead (cp.async) and read from there
        straight into the state tile's layout. v is loaded as the head's whole row (N values: at
        least 4 bytes per thread, as an asynchronous copy needs) and the program's BLOCK_V values
        are picked out of it."""
        i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        i_slot = tl.load(live_slots + i_n).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
        o_k = tl.arange(0, N)
        mine = (tl.arange(0, N // BLOCK_V) == i_v)[:, None]  # this program's row block of a head's v
        p_s = state + i_slot * stride_slot + i_h * N * N + o_v[:, None] * N + o_k[None, :]
        b_s = tl.load(p_s).to(tl.float32)  # [BLOCK_V, N], on chip until the last token
        for t in tl.range(bos, eos, num_stages=STAGES):
            o_t = (t * H + i_h) * N  # row t, head i_h of the [T, H, N] inputs
            b_r = tl.load(r + o_t + o_k).to(tl.float32)[None, :]
            b_w = tl.load(w + o_t + o_k).to(tl.float32)[None, :]
            b_k = tl.load(k + o_t + o_k).to(tl.float32)[None, :]
            b_a = tl.load(a + o_t + o_k).to(tl.float32)[None, :]
            b_b = tl.load(b + o_t + o_k).to(tl.float32)[None, :]
            b_vh = tl.reshape(tl.load(v + o_t + o_k).to(tl.float32), [N // BLOCK_V, BLOCK_V])
            b_v = tl.sum(tl.where(mine, b_vh, 0.0), axis=0)[:, None]  # [BLOCK_V, 1] = v[o_v]
            b_sa = tl.sum(b_s * b_a, axis=1, keep_dims=True)  # (S @ a)[o_v]
            b_s = b_s * b_w + b_sa * b_b + b_v * b_k
            tl.store(y + o_t + o_v, tl.sum(b_s * b_r, axis=1))
        _store_state(p_s, b_s, i_slot, seed, i_h, o_v, BLOCK_V, N, STOCHASTIC)


# ---- chunked-parallel form (long prompts) --------------------------------------------------------
# Per head, with M_t = diag(w_t) + a_t b_t^T the step is S_t = S_{t-1} M_t + v_t k_t^T. Inside a chunk
# of BT tokens starting from S_0, with G_t = sum_{s<=t} log w_s (inclusive, relative to the chunk
# start) and z_t = S_{t-1} a_t, everything is a product of [BT, .] tiles (ops/README.md derives it):
#   z_t = S_0 (a_t e^{G_{t-1}}) + sum_{s<t} [a_t . (b_s e^{G_{t-1}-G_s})] z_s + [a_t . (k_s e^{G_{t-1}-G_s})] v_s
#   y_t = S_0 (r_t e^{G_t})     + sum_{s<=t} [r_t . (b_s e^{G_t-G_s})] z_s + [r_t . (k_s e^{G_t-G_s})] v_s
#   S_BT = S_0 diag(e^{G_BT}) + sum_s z_s (b_s e^{G_BT-G_s})^T + v_s (k_s e^{G_BT-G_s})^T
# The z recurrence is a unit lower-triangular solve of BT rows. Every exponent above is <= 0 (a
# later cumulative log decay minus an earlier one), so nothing overflows however strong the decay
# (a factorisation e^{G_t} * e^{-G_s} would overflow float32 once a chunk decays past e^-88). The
# [BT, BT] matrices are therefore built elementwise over [BT, BT, BK] blocks of keys, not by tl.dot;
# the products with the state and with v, z are tl.dot in full float32 ("ieee").
# Grid and ownership as _wkv7_kernel: (live sequence, head, value-row block); value rows are
# independent, so each program solves the chunk for its BLOCK_V rows and recomputes the key-side
# matrices (they depend on r, w, k, a, b only).
if HAS_TRITON:

    @triton.jit
    def _chunk_rows(p, o_x, o_c, m_t, other: tl.constexpr):
        """[BT, len(o_c)] float32 tile of a [T, H, N] input: rows o_x (token, head offsets), columns
        o_c; rows past the sequence read `other` (the neutral value: w = 1, everything else 0)."""
        return tl.load(p + o_x[:, None] + o_c[None, :], mask=m_t[:, None], other=other).to(tl.float32)

    @triton.jit
    def _chunk_matrices(r, w, k, a, b, o_x, m_t, N: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):
        """The chunk's [BT, BT] key-side matrices, rows t and columns s:
        L_ab[t, s] = a_t . (b_s e^{G_{t-1}-G_s}), L_ak the same with k_s (both s < t);
        Q_b[t, s] = r_t . (b_s e^{G_t-G_s}), Q_k the same with k_s (both s <= t)."""
        o_t = tl.arange(0, BT)
        m_lower = (o_t[:, None] > o_t[None, :])[:, :, None]  # [BT, BT, 1]: s < t
        m_diag = (o_t[:, None] == o_t[None, :])[:, :, None]
        b_lab = tl.zeros([BT, BT], dtype=tl.float32)
        b_lak = tl.zeros([BT, BT], dtype=tl.float32)
        b_qb = tl.zeros([BT, BT], dtype=tl.float32)
        b_qk = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in tl.static_range(N // BK):
            o_c = i_k * BK + tl.arange(0, BK)
            b_w = _chunk_rows(w, o_x, o_c, m_t, 1.0)
            b_lw = tl.log(b_w)
            b_g = tl.cumsum(b_lw, axis=0)  # G_t, inclusive
            b_gx = b_g - b_lw  # G_{t-1}
            # [t, s, j] = e^{G_{t-1}[j] - G_s[j]} for s < t, 0 elsewhere (masked before the exp)
            b_e = tl.exp(tl.where(m_lower, b_gx[:, None, :] - b_g[None, :, :], float("-inf")))
            b_bs = _chunk_rows(b, o_x, o_c, m_t, 0.0)[None, :, :]
            b_ks = _chunk_rows(k, o_x, o_c, m_t, 0.0)[None, :, :]
            b_p = _chunk_rows(a, o_x, o_c, m_t, 0.0)[:, None, :] * b_e
            b_lab += tl.sum(b_p * b_bs, axis=2)
            b_lak += tl.sum(b_p * b_ks, axis=2)
            # e^{G_t - G_s} = w_t e^{G_{t-1} - G_s} for s < t, and 1 for s = t
            b_q = _chunk_rows(r, o_x, o_c, m_t, 0.0)[:, None, :] * tl.where(m_diag, 1.0, b_e * b_w[:, None, :])
            b_qb += tl.sum(b_q * b_bs, axis=2)
            b_qk += tl.sum(b_q * b_ks, axis=2)
        return b_lab, b_lak, b_qb, b_qk

    @triton.jit
    def _solve_lower(b_l, b_z, BT: tl.constexpr):
        """z = (I - L)^-1 z for strictly lower-triangular L [BT, BT], z [BT, BLOCK_V]: row by row,
        z_t += sum_{s<t} L[t, s] z_s (rows s < t are final when row t is reached)."""
        o_t = tl.arange(0, BT)
        for t in range(1, BT):
            b_row = tl.sum(tl.where(o_t[:, None] == t, b_l, 0.0), axis=0)  # L[t, :]
            b_add = tl.sum(b_row[:, None] * b_z, axis=0)  # [BLOCK_V]
            b_z = tl.where(o_t[:, None] == t, b_z + b_add[None, :], b_z)
        return b_z

    @triton.jit
    def _wkv7_chunk_step(b_s, r, w, k, v, a, b, y, o_x, m_t, o_v,
                         N: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr):  # fmt: skip
        """One chunk: stores its y rows (this program's value rows), returns the new state tile."""
        o_k = tl.arange(0, N)
        b_lab, b_lak, b_qb, b_qk = _chunk_matrices(r, w, k, a, b, o_x, m_t, N, BT, BK)
        b_lw = tl.log(_chunk_rows(w, o_x, o_k, m_t, 1.0))
        b_g = tl.cumsum(b_lw, axis=0)
        b_glast = tl.sum(b_lw, axis=0)  # G at the chunk's last token (rows past the end add log 1 = 0)
        b_v = tl.load(v + o_x[:, None] + o_v[None, :], mask=m_t[:, None], other=0).to(tl.float32)  # [BT, BLOCK_V]
        b_sT = tl.trans(b_s)  # [N, BLOCK_V]
        b_a = _chunk_rows(a, o_x, o_k, m_t, 0.0) * tl.exp(b_g - b_lw)
        b_z = tl.dot(b_a, b_sT, input_precision="ieee") + tl.dot(b_lak, b_v, input_precision="ieee")
        b_z = _solve_lower(b_lab, b_z, BT)  # [BT, BLOCK_V]: z_t = S_{t-1} a_t, this program's rows
        b_r = _chunk_rows(r, o_x, o_k, m_t, 0.0) * tl.exp(b_g)
        b_y = tl.dot(b_r, b_sT, input_precision="ieee") + tl.dot(b_qb, b_z, input_precision="ieee")
        b_y += tl.dot(b_qk, b_v, input_precision="ieee")
        tl.store(y + o_x[:, None] + o_v[None, :], b_y, mask=m_t[:, None])
        b_tail = tl.exp(b_glast[None, :] - b_g)  # [BT, N]: e^{G_BT - G_s}
        b_bt = _chunk_rows(b, o_x, o_k, m_t, 0.0) * b_tail
        b_kt = _chunk_rows(k, o_x, o_k, m_t, 0.0) * b_tail
        b_s = b_s * tl.exp(b_glast)[None, :] + tl.dot(tl.trans(b_z), b_bt, input_precision="ieee")
        return b_s + tl.dot(tl.trans(b_v), b_kt, input_precision="ieee")

    @triton.jit(do_not_specialize=["seed"])
    def _wkv7_chunk_kernel(
        state, live_slots, cu_seqlens, r, w, k, v, a, b, y, stride_slot, seed,
        H: tl.constexpr, N: tl.constexpr, BLOCK_V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
        STOCHASTIC: tl.constexpr,
    ):  # fmt: skip
        i_n, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        i_slot = tl.load(live_slots + i_n).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
        o_s = i_h * N * N + o_v[:, None] * N + tl.arange(0, N)[None, :]
        p_s = state + i_slot * stride_slot + o_s
        b_s = tl.load(p_s).to(tl.float32)  # [BLOCK_V, N], on chip across all chunks
        for t0 in range(bos, eos, BT):
            o_t = t0 + tl.arange(0, BT)
            o_x = (o_t * H + i_h) * N  # [BT] row offsets of the [T, H, N] inputs
            b_s = _wkv7_chunk_step(b_s, r, w, k, v, a, b, y, o_x, o_t < eos, o_v, N, BT, BK)
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


PROMPT_STAGES = 4  # tokens of inputs in flight per program (3 copies ahead of the one in use)


def _prompt_block_v(N: int, num_seqs: int, num_heads: int) -> int:
    """BLOCK_V of the prompt kernel: the largest of 32 .. 4 value rows (one warp: 1-8 rows per
    thread) that still gives 512 programs; measured on an H200 from one 4,096-token prompt to
    64 x 256 tokens at H = 32 and 64 (docs/benchmarks/wkv-prompt-h200.md)."""
    block_v = min(N, 32)
    while block_v > 4 and num_seqs * num_heads * (N // block_v) < 512:
        block_v //= 2
    return block_v


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


def _prepare(state, packed, inputs, rounding, out) -> tuple[torch.Tensor, bool]:
    """Checks a Triton call; returns (y, whether there is anything to compute)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    r = inputs[0]
    _check(state, r, inputs)
    y = torch.empty(r.shape, dtype=torch.float32, device=r.device) if out is None else out
    if y.shape != r.shape or y.dtype != torch.float32 or not y.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 {list(r.shape)} tensor")
    return y, r.shape[0] > 0 and packed.live_slots.numel() > 0


def _check_block_v(block_v: int, N: int) -> None:
    if N % block_v or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two dividing N = {N}, got {block_v}")


KERNELS = ("step", "prompt")


def wkv7_triton(
    state, packed, r, w, k, v, a, b, rounding="nearest", seed=0, *, out=None, block_v=None, num_warps=None,
    kernel=None, one_token=True,
) -> torch.Tensor:  # fmt: skip
    """One launch over all live sequences; reads and writes each live slot's state once, in
    place. rounding="stochastic" (fp16/bf16 storage) rounds the stored state with noise from
    (seed, slot, element): pass a new seed every call, or the same noise repeats step after step.
    out: an optional float32 [T, H, N] tensor for y. kernel: "step" (inputs loaded one token ahead;
    decode), "prompt" (one warp, inputs copied to shared memory several tokens ahead; faster
    for packed prompts, ops/README.md), None: "step" for decode batches, else "prompt". block_v /
    num_warps override the launch heuristics (tests and benchmarks; the prompt kernel runs one warp).
    one_token: the step kernel's form without a token loop for decode batches (False: the loop form,
    for tests and benchmarks)."""
    inputs = (r, w, k, v, a, b)
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} or None, got {kernel!r}")
    y, work = _prepare(state, packed, inputs, rounding, out)
    if not work:
        return y
    T, H, N = r.shape
    num_live = packed.live_slots.numel()
    kernel = kernel or ("step" if packed.is_decode else "prompt")
    stochastic = rounding == "stochastic" and state.dtype != torch.float32
    args = (state, packed.live_slots, packed.cu_seqlens, *(t.contiguous() for t in inputs), y,
            state.stride(0), seed & 0xFFFFFFFF)  # fmt: skip
    if kernel == "prompt":
        block_v = block_v or _prompt_block_v(N, num_live, H)
        _check_block_v(block_v, N)
        _wkv7_prompt_kernel[(num_live, H, N // block_v)](
            *args, H=H, N=N, BLOCK_V=block_v, STOCHASTIC=stochastic, STAGES=PROMPT_STAGES, num_warps=num_warps or 1,
        )  # fmt: skip
        return y
    bv, nw = _launch_config(N, num_live, H)
    block_v, num_warps = block_v or bv, num_warps or nw
    _check_block_v(block_v, N)
    _wkv7_kernel[(num_live, H, N // block_v)](
        *args, H=H, N=N, BLOCK_V=block_v, STOCHASTIC=stochastic, ONE_TOKEN=packed.is_decode and one_token,
        num_warps=num_warps, **pdl_args(state),
    )  # fmt: skip
    return y


CHUNK_SIZES = (16, 32)


def _chunk_config(N: int, num_seqs: int, num_heads: int) -> int:
    """BLOCK_V for the chunked kernel: whole heads (the key-side matrices are computed once per
    program) unless that leaves fewer than 256 programs, then down to 16 rows."""
    block_v = N
    while block_v > 16 and num_seqs * num_heads * (N // block_v) < 256:
        block_v //= 2
    return block_v


def wkv7_chunked(
    state, packed, r, w, k, v, a, b, rounding="nearest", seed=0, *, out=None, block_v=None, chunk=16, num_warps=4
) -> torch.Tensor:
    """The chunked-parallel form: same arguments, results (to float32 rounding) and in-place state
    update as wkv7_triton, one launch, but each program advances `chunk` tokens per step with
    matrix products instead of one token at a time. w must lie in (0, 1]. block_v overrides the
    value rows per program (a power of two, at least 16). Only an explicit choice: on an H200 it is
    about 3.3x slower than wkv7_triton for one 4,096-token prompt (ops/README.md)."""
    inputs = (r, w, k, v, a, b)
    y, work = _prepare(state, packed, inputs, rounding, out)
    if not work:
        return y
    T, H, N = r.shape
    if chunk not in CHUNK_SIZES:
        raise ValueError(f"chunk must be one of {CHUNK_SIZES}, got {chunk}")
    num_live = packed.live_slots.numel()
    block_v = block_v or _chunk_config(N, num_live, H)
    _check_block_v(block_v, N)
    if block_v < 16:
        raise ValueError(f"the chunked kernel needs block_v >= 16 (tl.dot tiles), got {block_v}")
    block_k = min(N, 4096 // (chunk * chunk))  # [chunk, chunk, block_k] blocks of 4096 elements
    stochastic = rounding == "stochastic" and state.dtype != torch.float32
    _wkv7_chunk_kernel[(num_live, H, N // block_v)](
        state, packed.live_slots, packed.cu_seqlens, *(t.contiguous() for t in inputs), y,
        state.stride(0), seed & 0xFFFFFFFF, H=H, N=N, BLOCK_V=block_v, BT=chunk, BK=block_k,
        STOCHASTIC=stochastic, num_warps=num_warps,
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


def _wkv7_triton_step(state, packed, r, w, k, v, a, b, rounding="nearest", seed=0) -> torch.Tensor:
    """The step kernel with its token loop for everything: prompts (the default before the prompt
    kernel) and decode batches (before the one-token form); for benchmarks."""
    return wkv7_triton(state, packed, r, w, k, v, a, b, rounding=rounding, seed=seed, kernel="step", one_token=False)


_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "torch": _wkv7_torch, "triton": wkv7_triton, "triton-step": _wkv7_triton_step, "triton-chunked": wkv7_chunked,
    "fla": wkv7_fla,
}  # fmt: skip


def wkv7(state, packed, r, w, k, v, a, b, backend=None, rounding="nearest", seed=0) -> torch.Tensor:
    """state [S, H, N, N] pool view, r, w, k, v, a, b [T, H, N] -> y [T, H, N] float32; updates
    the live slots' state. backend: None ("triton", the token-by-token kernels, for CUDA tensors
    when triton imports, whatever the sequence lengths; otherwise "torch"), "torch", "triton" (the
    step kernel for decode batches, the prompt kernel otherwise), "triton-step" (the step kernel with
    its token loop for everything), "triton-chunked" (the chunked-parallel kernel, only when asked for: it is slower,
    ops/README.md), "fla". rounding: "nearest" or "stochastic" (fp16/bf16 storage; seed picks the noise)."""
    fn = _BACKENDS[pick_backend(backend, r, tuple(_BACKENDS))]
    return fn(state, packed, r, w, k, v, a, b, rounding=rounding, seed=seed)
