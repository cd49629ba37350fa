"""Batched token sampling without sorting the vocabulary.

Per row b of logits [B, V] (float32): x = logits + logit bias; penalties on the tokens the row's
count row has seen (c = counts[count_row, i] > 0):
    x_i = (x_i / rep if x_i > 0 else x_i * rep) - presence - frequency * c
then z = x / temperature, p_i = exp(z_i - max z) / S with S = sum_i exp(z_i - max z). The kept set
is the intersection of three thresholds on that one distribution (ties at a boundary are kept):
    top-k:  #{l : z_l > z_i} < top_k                      (top_k 0: off)
    top-p:  sum_{l : z_l > z_i} p_l < top_p                (top_p 1: off)
    min-p:  z_i - max z >= log(min_p)                      (min_p 0: off)
The most likely token always passes all three. Temperature 0 or top_k 1 is greedy: the first
index of the maximum of x.

Sampling is rejection with a rising pivot: round r draws one uniform u_r and picks token j by
inverse CDF (in index order) over the candidates {i : z_i > pivot}; if j passes the three tests
it is the answer, else pivot = z_j and the next round draws again. Every rejection removes j and
every token at or below it, none of which can pass (the tests are monotone in z), so conditioned
on acceptance j is distributed exactly as p restricted to the kept set. A round reads the row
about 1.5 times (a scan that stops at j, then one pass counting the tokens above j, which also
gives the next round's candidate mass); most rounds accept. After MAX_ROUNDS rejections (a
distribution with a vanishing kept mass) the row takes its most likely token.

Randomness: u_r is Philox-4x32-10 of the counter (position low, position high, r, 0) under the
key (seed low, seed high), top 24 bits of the first word over 2^24. It depends only on the row's
seed, its position and the round, so a stream's tokens never depend on its batch neighbours;
the torch implementation below computes the same bits. Kernel and reference differ only in the
rounding of exp and of the running sums, i.e. only when u lands within rounding of a boundary.

Failure: a row whose x or z holds a NaN or an infinity (including overflow from a tiny
temperature) gets -1 and changes nothing; other rows are not affected. Every other row gets an
index in [0, V). Rows with a count row (>= 0) add 1 at the sampled id: counts stay on the device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._triton import HAS_TRITON, pick_backend, tl, triton

MAX_ROUNDS = 64
F_TEMPERATURE, F_TOP_P, F_LOG_MIN_P, F_REPETITION, F_PRESENCE, F_FREQUENCY = range(6)
I_TOP_K, I_COUNT_ROW, I_SEED, I_POSITION = range(4)
NUM_FLOATS, NUM_INTS = 6, 4
FAILED = -1

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key increments (Weyl sequence)


class SamplingRows(NamedTuple):
    """Per-row parameters as two device tensors (one copy each), plus an optional sparse bias.

    floats [6, B] float32: temperature (0 greedy), top_p, log(min_p) (-inf off), repetition,
    presence, frequency. ints [4, B] int64: top_k (0 off), count_row (-1: penalties off, counts
    never read), seed (64 bits, two's complement), position. bias: (rows, ids, values) or None.
    """

    floats: torch.Tensor
    ints: torch.Tensor
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def philox_uniform(seed: torch.Tensor, position: torch.Tensor, rnd: int) -> torch.Tensor:
    """One float32 uniform in [0, 1) per element (int64 seed, int64 position, round); the bits
    the kernel draws. A few CPU rows take Python integers (a tensor op per step of Philox costs
    more than the whole draw there); the results are identical."""
    if seed.device.type == "cpu" and seed.numel() <= 64:
        words = [_philox_int(s, q, rnd) for s, q in zip(seed.tolist(), position.tolist())]
        return torch.tensor(words, dtype=torch.int64).reshape(seed.shape).to(torch.float32) * (1.0 / (1 << 24))
    words = philox4x32((position & _MASK32, (position >> 32) & _MASK32, torch.zeros_like(position) + rnd,
                        torch.zeros_like(position)), (seed & _MASK32, (seed >> 32) & _MASK32))  # fmt: skip
    return (words[0] >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _philox_int(seed: int, position: int, rnd: int) -> int:
    """The top 24 bits of Philox-4x32-10's first word, in Python integers."""
    c0, c1, c2, c3 = position & _MASK32, (position >> 32) & _MASK32, rnd, 0
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        p0, p1 = c0 * _PHILOX_M0, c2 * _PHILOX_M1
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & _MASK32
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
    return c0 >> 8


def philox4x32(counter, key, rounds: int = 10):
    """Philox-4x32 (Salmon et al., SC'11) on int64 tensors holding uint32 values: four counter
    words and two key words in, four words out. Products are split in 16-bit halves so no
    intermediate reaches 2^63."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W0) & _MASK32, (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * m for a in [0, 2^32) and a constant m < 2^32."""
    a_lo, a_hi, m_lo, m_hi = a & 0xFFFF, a >> 16, m & 0xFFFF, m >> 16
    ll, lh, hl, hh = a_lo * m_lo, a_lo * m_hi, a_hi * m_lo, a_hi * m_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    return hh + (lh >> 16) + (hl >> 16) + (mid >> 16), ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)


def apply_logit_bias(logits: torch.Tensor, bias) -> None:
    """Adds the sparse bias (rows, ids, values) into logits [B, V] in place."""
    if bias is not None and bias[0].numel():
        logits.index_put_((bias[0], bias[1]), bias[2].to(logits.dtype), accumulate=True)


# ---- torch reference ---------------------------------------------------------------------------
def sample_reference(logits: torch.Tensor, rows: SamplingRows, counts: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] float32 (a work buffer: the bias is added in place). Returns int64 [B]:
    a token id, or FAILED. Updates counts for rows with a count row."""
    apply_logit_bias(logits, rows.bias)
    t, top_p, log_min_p = rows.floats[F_TEMPERATURE], rows.floats[F_TOP_P], rows.floats[F_LOG_MIN_P]
    top_k, count_row = rows.ints[I_TOP_K], rows.ints[I_COUNT_ROW]
    x = _penalised(logits, rows, counts)
    greedy = (t == 0) | (top_k == 1)
    z = x / torch.where(greedy, 1.0, t).unsqueeze(1)
    failed = ~torch.isfinite(z).all(-1)
    z = z.masked_fill(failed.unsqueeze(1), 0.0)
    top, best = z.max(-1).values, z.argmax(-1)  # argmax: the first index of the maximum
    e = torch.exp(z - top.unsqueeze(1))
    total = e.sum(-1)
    out = best.clone()
    pending = ~greedy & ~failed
    pivot, mass = torch.full_like(top, -math.inf), total.clone()
    V = z.shape[1]
    has_filter = ((top_k > 0) & (top_k < V)) | (top_p < 1) | (log_min_p > -math.inf)
    for rnd in range(MAX_ROUNDS):
        if not pending.any():
            break
        u = philox_uniform(rows.ints[I_SEED], rows.ints[I_POSITION], rnd)
        p = torch.where(z > pivot.unsqueeze(1), e, 0.0)
        j = _inverse_cdf(p, u * mass)
        zj = z.gather(1, j.unsqueeze(1))
        above = z > zj
        count_gt, mass_gt = above.sum(-1), torch.where(above, e, 0.0).sum(-1)
        zj = zj.squeeze(1)
        ok = ~has_filter | (
            (zj - top >= log_min_p) & ((top_k <= 0) | (count_gt < top_k)) & ((top_p >= 1) | (mass_gt < top_p * total))
        )
        out = torch.where(pending & ok, j, out)
        rejected = pending & ~ok
        pivot, mass = torch.where(rejected, zj, pivot), torch.where(rejected, mass_gt, mass)
        pending = rejected
    out = out.masked_fill(failed, FAILED)
    if counts is not None:
        live = (count_row >= 0) & ~failed
        counts.index_put_((count_row[live], out[live]), torch.ones_like(out[live], dtype=counts.dtype), accumulate=True)
    return out


def _penalised(logits: torch.Tensor, rows: SamplingRows, counts: torch.Tensor | None) -> torch.Tensor:
    """x with the penalties applied to the rows that have a count row; only those rows' counts are read."""
    count_row = rows.ints[I_COUNT_ROW]
    on = (count_row >= 0).nonzero().squeeze(1)
    if counts is None or on.numel() == 0:
        return logits
    x, f = logits.clone(), rows.floats[:, on].unsqueeze(2)
    seen = x[on]
    c = counts[count_row[on]].to(torch.float32)
    rep = f[F_REPETITION]
    pen = torch.where(seen > 0, seen / rep, seen * rep) - f[F_PRESENCE] - f[F_FREQUENCY] * c
    x[on] = torch.where(c > 0, pen, seen)
    return x


def _inverse_cdf(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The first index whose running sum of p exceeds target; the last positive p if rounding
    leaves none."""
    cdf = p.cumsum(-1)
    j = torch.searchsorted(cdf, target.unsqueeze(1).contiguous(), right=True).squeeze(1)
    o = torch.arange(p.shape[1], device=p.device)
    last = torch.where(p > 0, o, -1).max(-1).values
    return torch.minimum(j, last)


# ---- Triton ------------------------------------------------------------------------------------
# One program per row loops over the vocabulary in blocks of BLOCK: pass 1 (max, first argmax,
# S, finiteness), then per round a scan that stops at the picked block and, when a filter is on,
# one counting pass. Rows without penalties never load counts (a runtime branch per block).
if HAS_TRITON:

    @triton.jit
    def _philox_uniform(seed, position, rnd):
        """The uniform of philox_uniform for scalar int64 seed and position and round rnd."""
        M: tl.constexpr = 0xFFFFFFFF
        s = seed.to(tl.uint64, bitcast=True)
        q = position.to(tl.uint64, bitcast=True)
        c0, c1 = q & M, (q >> 32) & M
        c2 = rnd.to(tl.uint64)
        c3 = c2 * 0
        k0, k1 = s & M, (s >> 32) & M
        for _ in tl.static_range(10):
            p0 = c0 * 0xD2511F53  # < 2^64: exact in uint64
            p1 = c2 * 0xCD9E8D57
            c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M, (p0 >> 32) ^ c3 ^ k1, p0 & M
            k0, k1 = (k0 + 0x9E3779B9) & M, (k1 + 0xBB67AE85) & M
        return (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0)

    @triton.jit
    def _load_z(p_x, p_c, o, m, is_pen, rep, pres, freq, t):
        """z for the lanes o of one row: penalties (if is_pen), then / t; masked lanes -inf."""
        x = tl.load(p_x + o, mask=m, other=float("-inf"))
        if is_pen:
            c = tl.load(p_c + o, mask=m, other=0).to(tl.float32)
            pen = tl.where(x > 0, tl.math.div_rn(x, rep), x * rep) - pres - freq * c
            x = tl.where(c > 0, pen, x)
        return tl.math.div_rn(x, t)

    @triton.jit
    def _sample_kernel(
        logits, floats, ints, counts, out, B, V, stride_l, stride_c,
        BLOCK: tl.constexpr, MAX_ROUNDS: tl.constexpr,
    ):  # fmt: skip
        i_b = tl.program_id(0)
        t = tl.load(floats + 0 * B + i_b)
        top_p = tl.load(floats + 1 * B + i_b)
        log_min_p = tl.load(floats + 2 * B + i_b)
        rep = tl.load(floats + 3 * B + i_b)
        pres = tl.load(floats + 4 * B + i_b)
        freq = tl.load(floats + 5 * B + i_b)
        top_k = tl.load(ints + 0 * B + i_b)
        c_row = tl.load(ints + 1 * B + i_b)
        seed = tl.load(ints + 2 * B + i_b)
        position = tl.load(ints + 3 * B + i_b)
        is_greedy = (t == 0) | (top_k == 1)
        t = tl.where(is_greedy, 1.0, t)
        is_pen = c_row >= 0
        p_x = logits + i_b.to(tl.int64) * stride_l
        p_c = counts + tl.maximum(c_row, 0) * stride_c
        o_v = tl.arange(0, BLOCK)

        # pass 1: max (first index), S = sum exp(z - max) online, any non-finite z
        top = float("-inf")
        best = 0
        total = 0.0
        bad = 0
        for start in range(0, V, BLOCK):
            o = start + o_v
            m = o < V
            z = _load_z(p_x, p_c, o, m, is_pen, rep, pres, freq, t)
            bad = tl.maximum(bad, tl.max(tl.where(m & ((z != z) | (tl.abs(z) == float("inf"))), 1, 0), 0))
            b_top = tl.max(z, 0)
            best = tl.where(b_top > top, start + tl.argmax(z, 0, tie_break_left=True), best)
            new_top = tl.maximum(top, b_top)
            total = total * tl.exp(top - new_top) + tl.sum(tl.exp(z - new_top), 0)
            top = new_top

        has_filter = ((top_k > 0) & (top_k < V)) | (top_p < 1) | (log_min_p > float("-inf"))
        tok = best
        pending = ((bad == 0) & (is_greedy == 0)).to(tl.int32)
        pivot = float("-inf")
        mass = total
        rnd = 0
        while (pending != 0) & (rnd < MAX_ROUNDS):
            target = _philox_uniform(seed, position, rnd) * mass
            # scan: the first candidate whose running mass exceeds target
            running = 0.0
            j = -1
            zj = 0.0
            last = -1
            z_last = 0.0
            start = 0
            while (start < V) & (j < 0):
                o = start + o_v
                m = o < V
                z = _load_z(p_x, p_c, o, m, is_pen, rep, pres, freq, t)
                p = tl.where(m & (z > pivot), tl.exp(z - top), 0.0)
                hit = (p > 0) & (running + tl.cumsum(p, 0) > target)
                first = tl.min(tl.where(hit, o, V), 0)
                j = tl.where(first < V, first, j)
                zj = tl.where(first < V, tl.sum(tl.where(o == first, z, 0.0), 0), zj)
                b_last = tl.max(tl.where(p > 0, o, -1), 0)
                z_last = tl.where(b_last >= 0, tl.sum(tl.where(o == b_last, z, 0.0), 0), z_last)
                last = tl.maximum(last, b_last)
                running += tl.sum(p, 0)
                start += BLOCK
            zj = tl.where(j < 0, z_last, zj)  # rounding left the target above the running sum
            j = tl.where(j < 0, last, j)
            count_gt = 0
            mass_gt = 0.0
            for start2 in range(0, tl.where(has_filter, V, 0), BLOCK):  # no pass without a filter
                o = start2 + o_v
                m = o < V
                z = _load_z(p_x, p_c, o, m, is_pen, rep, pres, freq, t)
                above = m & (z > zj)
                count_gt += tl.sum(above.to(tl.int32), 0)
                mass_gt += tl.sum(tl.where(above, tl.exp(z - top), 0.0), 0)
            ok = (zj - top >= log_min_p) & ((top_k <= 0) | (count_gt < top_k))
            ok = (has_filter == 0) | (ok & ((top_p >= 1) | (mass_gt < top_p * total)))
            tok = tl.where(ok, j, tok)
            pending = tl.where(ok, 0, pending)
            pivot = tl.where(ok, pivot, zj)
            mass = tl.where(ok, mass, mass_gt)
            rnd += 1

        if is_pen & (bad == 0):
            p_n = p_c + tok
            tl.store(p_n, tl.load(p_n) + 1)
        tl.store(out + i_b, tl.where(bad != 0, -1, tok).to(tl.int64))


def sample_triton(logits: torch.Tensor, rows: SamplingRows, counts: torch.Tensor | None = None,
                  block: int | None = None) -> torch.Tensor:  # fmt: skip
    """The kernel's launcher; same contract as sample_reference."""
    B, V = logits.shape
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    apply_logit_bias(logits, rows.bias)
    if counts is None:  # never read (sample() checks that no row has a count row)
        counts = torch.zeros(1, 1, dtype=torch.int32, device=logits.device)
    block = block or min(4096, triton.next_power_of_2(V))
    _sample_kernel[(B,)](
        logits, rows.floats.contiguous(), rows.ints.contiguous(), counts, out, B, V, logits.stride(0),
        counts.stride(0), BLOCK=block, MAX_ROUNDS=MAX_ROUNDS, num_warps=8 if block >= 2048 else 4,
    )  # fmt: skip
    return out


def sample(logits: torch.Tensor, rows: SamplingRows, counts: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:  # fmt: skip
    """Samples one token per row of logits [B, V] float32 (a work buffer: modified in place).
    Returns int64 [B] on logits' device: token ids, or FAILED (-1) for a row with non-finite
    values. Rows with a count row add their token to counts [R, V] int32. backend: None (Triton on
    CUDA, torch elsewhere), "torch" or "triton"."""
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be a [B, V] float32 tensor with unit stride in V, got {tuple(logits.shape)} "
                         f"{logits.dtype}")  # fmt: skip
    if counts is None and bool((rows.ints[I_COUNT_ROW] >= 0).any()):
        raise ValueError("rows with a count row (penalties) need the counts tensor")
    if pick_backend(backend, logits) == "triton":
        return sample_triton(logits, rows, counts)
    return sample_reference(logits, rows, counts)
