"""The elementwise work of the time mix between its GEMMs, fused into two ops (ops/README.md).

Rows are the T packed tokens, columns the C = H * N channels; inputs come in the compute dtype
(fp32, fp16 or bf16), all math is float32, results are rounded once when stored.

    time_mix_prologue: the LoRA outputs and k, v -> the WKV-7 inputs
        a = sigmoid(a0 + a_lora)
        kk = normalize_per_head(k * k_k)                  L2 over each head's N channels
        k2 = k * (1 + (a - 1) * k_a)
        v2 = v + (v_first - v) * sigmoid(v0 + v_lora)    layers >= 1; layer 0: v2 = v
        decay = exp(-exp(-0.5) * sigmoid(w0 + w_lora))    float32
        -> decay, k2, v2, a_in = -kk, b_in = kk * a
    time_mix_epilogue: the WKV-7 output y (float32) -> the input of the output GEMM
        out = (GroupNorm(y, H groups, ln_w, ln_b, eps) + sum_head(r * k2 * r_k) * v2) * g

The torch references below are the model's only torch path (Model._time_mix_core calls these
ops with backend "torch" off CUDA): float32 math, one rounding per output, like the kernels, so
the two agree to float32 rounding in every compute dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, pdl_args, pick_backend, tl, triton
from .wkv7 import HEAD_SIZES, ROUNDINGS, wkv7

DECAY_SCALE = math.exp(-0.5)  # decay = exp(-exp(-0.5) * sigmoid(.)) lies in (0.545, 1)
GROUP_NORM_EPS = 64e-5
NORMALIZE_EPS = 1e-12  # as F.normalize: x / max(||x||, eps)


# ---- torch references (float32 math, one rounding per output) ---------------------------------
def time_mix_prologue_reference(k, v, w_lora, a_lora, v_lora, v_first, w0, a0, v0, k_k, k_a, H, N):
    """k, v, w_lora, a_lora, v_lora, v_first [T, C]; w0, a0, v0, k_k, k_a [C]; v_lora, v_first, v0
    are None in layer 0. Returns (decay float32, k2, v2, a_in, b_in), [T, C] each, the last four in
    k's dtype (v2 is v itself in layer 0)."""
    T, C = k.shape
    dtype = k.dtype
    kf = k.float()
    a = torch.sigmoid(a0.float() + a_lora.float())
    kk = F.normalize((kf * k_k.float()).view(T, H, N), dim=-1, p=2.0, eps=NORMALIZE_EPS).view(T, C)
    k2 = kf * (1 + (a - 1) * k_a.float())
    if v_lora is None:
        v2 = v
    else:
        vf = v.float()
        v2 = (vf + (v_first.float() - vf) * torch.sigmoid(v0.float() + v_lora.float())).to(dtype)
    decay = torch.exp(-DECAY_SCALE * torch.sigmoid(w0.float() + w_lora.float()))
    return decay, k2.to(dtype), v2, (-kk).to(dtype), (kk * a).to(dtype)


def time_mix_epilogue_reference(y, r, k2, v2, g, r_k, ln_w, ln_b, H, N, eps=GROUP_NORM_EPS):
    """y [T, C] float32 (the WKV output); r, k2, v2, g [T, C]; r_k [H, N]; ln_w, ln_b [C].
    Returns (GroupNorm(y) + sum_head(r * k2 * r_k) * v2) * g, [T, C] in r's dtype."""
    T, C = y.shape
    yn = F.group_norm(y.float(), H, ln_w.float(), ln_b.float(), eps=eps)
    rk = (r.float() * k2.float() * r_k.float().reshape(C)).view(T, H, N).sum(-1, keepdim=True)
    bonus = (rk * v2.float().view(T, H, N)).view(T, C)
    return ((yn + bonus) * g.float()).to(r.dtype)


# ---- Triton ------------------------------------------------------------------------------------
# Both kernels: grid (row blocks, heads). A program owns rows o_t = i_t*BLOCK_T .. +BLOCK_T-1 and
# the N channels o_n of head i_h, a [BLOCK_T, N] tile per tensor: the per-head reductions (the L2
# norm of kk, the group-norm moments, sum_head(r * k2 * r_k)) stay inside the program. Every
# input element is read once and every output element written once; no two programs share one.
if HAS_TRITON:
    from ._triton import pdl_enter, pdl_exit  # first and last statements of the kernels launched with pdl_args
    from .wkv7 import _round_nearest  # float32 -> fp16/bf16 to nearest, also in the interpreter
    from .wkv7 import _store_state  # the state tile stored in the pool's dtype (nearest or stochastic)

    @triton.jit
    def _tile(p, o_x, m_x):
        return tl.load(p + o_x, mask=m_x, other=0).to(tl.float32)

    @triton.jit
    def _vec(p, o_c):
        return tl.load(p + o_c).to(tl.float32)[None, :]

    @triton.jit
    def _prologue_math(b_k, b_a_lora, b_w_lora, b_a0, b_w0, b_k_k, b_k_a):
        """[R, N] float32 tiles of one head (the vectors [1, N]) -> (decay, k2, a_in, b_in) in
        float32, before any rounding."""
        b_a = tl.sigmoid(b_a0 + b_a_lora)
        b_kk = b_k * b_k_k
        b_kk = b_kk / tl.maximum(tl.sqrt(tl.sum(b_kk * b_kk, axis=1)), 1e-12)[:, None]
        b_k2 = b_k * (1 + (b_a - 1) * b_k_a)
        b_decay = tl.exp(-0.6065306597126334 * tl.sigmoid(b_w0 + b_w_lora))  # exp(-exp(-0.5) * w)
        return b_decay, b_k2, -b_kk, b_kk * b_a

    @triton.jit
    def _value_mix(b_v, b_v_first, b_v0, b_v_lora):
        """v2 = v + (v_first - v) * sigmoid(v0 + v_lora), float32 (layers >= 1)."""
        return b_v + (b_v_first - b_v) * tl.sigmoid(b_v0 + b_v_lora)

    @triton.jit
    def _epilogue_math(b_y, b_rkk, b_v2, b_g, b_ln_w, b_ln_b, eps, N: tl.constexpr):
        """[R, N] float32 tiles of one head: (GroupNorm(y) + sum(r * k2 * r_k) * v2) * g, before
        rounding; b_rkk is r * k2 * r_k."""
        b_mean = tl.sum(b_y, axis=1) / N
        b_d = b_y - b_mean[:, None]
        b_rstd = 1 / tl.sqrt(tl.sum(b_d * b_d, axis=1) / N + eps)
        b_o = b_d * b_rstd[:, None] * b_ln_w + b_ln_b
        b_o += tl.sum(b_rkk, axis=1)[:, None] * b_v2
        return b_o * b_g

    @triton.jit
    def _time_mix_prologue_kernel(
        k, v, w_lora, a_lora, v_lora, v_first, w0, a0, v0, k_k, k_a,
        decay, k2, v2, a_in, b_in, T,
        H: tl.constexpr, N: tl.constexpr, BLOCK_T: tl.constexpr, HAS_V: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        pdl_enter(PDL)
        i_t, i_h = tl.program_id(0), tl.program_id(1)
        o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
        o_c = i_h * N + tl.arange(0, N)
        m_x = (o_t < T)[:, None]
        o_x = o_t.to(tl.int64)[:, None] * (H * N) + o_c[None, :]
        b_decay, b_k2, b_ain, b_bin = _prologue_math(
            _tile(k, o_x, m_x), _tile(a_lora, o_x, m_x), _tile(w_lora, o_x, m_x), _vec(a0, o_c), _vec(w0, o_c),
            _vec(k_k, o_c), _vec(k_a, o_c),
        )  # fmt: skip
        if HAS_V:  # loaded before the first store: a load after a store waits for a trip of its own
            b_v2 = _value_mix(_tile(v, o_x, m_x), _tile(v_first, o_x, m_x), _vec(v0, o_c), _tile(v_lora, o_x, m_x))
        tl.store(decay + o_x, b_decay, mask=m_x)
        tl.store(k2 + o_x, _round_nearest(b_k2, k2.dtype.element_ty), mask=m_x)
        tl.store(a_in + o_x, _round_nearest(b_ain, a_in.dtype.element_ty), mask=m_x)
        tl.store(b_in + o_x, _round_nearest(b_bin, b_in.dtype.element_ty), mask=m_x)
        if HAS_V:
            tl.store(v2 + o_x, _round_nearest(b_v2, v2.dtype.element_ty), mask=m_x)
        pdl_exit(PDL)

    @triton.jit
    def _time_mix_epilogue_kernel(
        y, r, k2, v2, g, r_k, ln_w, ln_b, out, T, eps,
        H: tl.constexpr, N: tl.constexpr, BLOCK_T: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        pdl_enter(PDL)
        i_t, i_h = tl.program_id(0), tl.program_id(1)
        o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
        o_c = i_h * N + tl.arange(0, N)
        m_x = (o_t < T)[:, None]
        o_x = o_t.to(tl.int64)[:, None] * (H * N) + o_c[None, :]
        b_rkk = _tile(r, o_x, m_x) * _tile(k2, o_x, m_x) * _vec(r_k, o_c)
        b_o = _epilogue_math(_tile(y, o_x, m_x), b_rkk, _tile(v2, o_x, m_x), _tile(g, o_x, m_x), _vec(ln_w, o_c),
                             _vec(ln_b, o_c), eps, N)  # fmt: skip
        tl.store(out + o_x, _round_nearest(b_o, out.dtype.element_ty), mask=m_x)
        pdl_exit(PDL)

    @triton.jit(do_not_specialize=["seed"])
    def _time_mix_decode_kernel(
        state, live_slots, cu_seqlens, r, w_lora, k, v, a_lora, g, v_lora, v_first,
        w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, out, stride_slot, seed, eps,
        H: tl.constexpr, N: tl.constexpr, HAS_V: tl.constexpr, STOCHASTIC: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """One decode token of one sequence and one head: the prologue, WKV-7 and the epilogue
        (the two kernels' math, _prologue_math and _epilogue_math, on [1, N] tiles) with the state
        on chip, every intermediate rounded where the three kernels round it. v2 is also needed
        along the state's rows ([N, 1]) for the update."""
        pdl_enter(PDL)
        i_n, i_h = tl.program_id(0), tl.program_id(1)
        i_slot = tl.load(live_slots + i_n).to(tl.int64)
        row = tl.load(cu_seqlens + i_n).to(tl.int64)  # the sequence's one token
        o_c = i_h * N + tl.arange(0, N)
        o_x = row * (H * N) + o_c[None, :]  # [1, N]
        m_x = o_x >= 0  # all true: _tile's mask
        dt = out.dtype.element_ty
        # loads first: a load placed after a store waits for a trip of its own
        b_r = _tile(r, o_x, m_x)
        b_decay, b_k2, b_ain, b_bin = _prologue_math(
            _tile(k, o_x, m_x), _tile(a_lora, o_x, m_x), _tile(w_lora, o_x, m_x), _vec(a0, o_c), _vec(w0, o_c),
            _vec(k_k, o_c), _vec(k_a, o_c),
        )  # fmt: skip
        b_v2 = _tile(v, o_x, m_x)
        if HAS_V:
            b_v2 = _value_mix(b_v2, _tile(v_first, o_x, m_x), _vec(v0, o_c), _tile(v_lora, o_x, m_x))
        b_v2 = _round_nearest(b_v2, dt).to(tl.float32)  # layer 0: v itself, unchanged by the rounding
        b_g, b_rk, b_lw, b_lb = _tile(g, o_x, m_x), _vec(r_k, o_c), _vec(ln_w, o_c), _vec(ln_b, o_c)
        o_s = i_h * N * N + tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :]
        p_s = state + i_slot * stride_slot + o_s
        b_s = tl.load(p_s).to(tl.float32)  # [N (v), N (k)]
        b_k2 = _round_nearest(b_k2, dt).to(tl.float32)
        b_ain = _round_nearest(b_ain, dt).to(tl.float32)
        b_bin = _round_nearest(b_bin, dt).to(tl.float32)
        # WKV-7, one token (as _wkv7_kernel): [1, N] vectors run along the state's columns
        b_sa = tl.sum(b_s * b_ain, axis=1)
        b_s = b_s * b_decay + b_sa[:, None] * b_bin + tl.reshape(b_v2, [N, 1]) * b_k2
        b_y = tl.sum(b_s * b_r, axis=1)[None, :]  # [1, N (v)], float32
        b_o = _epilogue_math(b_y, b_r * b_k2 * b_rk, b_v2, b_g, b_lw, b_lb, eps, N)
        tl.store(out + o_x, _round_nearest(b_o, dt))
        _store_state(p_s, b_s, i_slot, seed, i_h, tl.arange(0, N), N, N, STOCHASTIC)
        pdl_exit(PDL)

def _launch_config(T: int, N: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps): tiles of up to 1024 elements (8 per thread at 4 warps per tensor;
    the prologue holds about eight such tiles), one warp for a decode row of one head."""
    block_t = min(max(1024 // N, 1), triton.next_power_of_2(max(T, 1)))
    return block_t, max(1, min(4, block_t * N // 256))


def _check(H: int, N: int, tensors: dict) -> torch.Tensor:
    """Every named [T, C] tensor (None skipped) has the same shape as the first one, C = H * N."""
    (name0, first), *_ = tensors.items()
    if N < 1 or N & (N - 1):
        raise ValueError(f"the Triton time-mix kernels need a power-of-two head size, got N = {N}")
    if first.dim() != 2 or first.shape[1] != H * N:
        raise ValueError(f"{name0} must be [T, {H * N}] (H = {H}, N = {N}), got {list(first.shape)}")
    for name, t in tensors.items():
        if t is not None and (t.shape != first.shape or t.device != first.device):
            raise ValueError(f"{name} is {list(t.shape)} on {t.device}, expected {list(first.shape)} on {first.device}")
    return first


def _flat(*vectors):
    """Per-channel parameters as contiguous [C] tensors (r_k is [H, N]); None stays None."""
    return [None if t is None else t.reshape(-1).contiguous() for t in vectors]


def time_mix_prologue_triton(k, v, w_lora, a_lora, v_lora, v_first, w0, a0, v0, k_k, k_a, H, N):
    """One launch; same arguments and results as time_mix_prologue_reference."""
    has_v = v_lora is not None
    if has_v != (v_first is not None) or has_v != (v0 is not None):
        raise ValueError("v_lora, v_first and v0 are all given (layers >= 1) or all None (layer 0)")
    _check(H, N, {"k": k, "v": v, "w_lora": w_lora, "a_lora": a_lora, "v_lora": v_lora, "v_first": v_first})
    T, C = k.shape
    ins = [t.contiguous() for t in (k, v, w_lora, a_lora)]
    ins += [t.contiguous() for t in (v_lora, v_first)] if has_v else [ins[0], ins[0]]  # unread if not has_v
    vecs = _flat(w0, a0, v0 if has_v else w0, k_k, k_a)
    decay = torch.empty(T, C, dtype=torch.float32, device=k.device)
    out = torch.empty(4 if has_v else 3, T, C, dtype=k.dtype, device=k.device)
    k2, a_in, b_in = out[0], out[1], out[2]
    v2 = out[3] if has_v else v
    if T:
        block_t, num_warps = _launch_config(T, N)
        _time_mix_prologue_kernel[(triton.cdiv(T, block_t), H)](
            *ins, *vecs, decay, k2, v2, a_in, b_in, T,
            H=H, N=N, BLOCK_T=block_t, HAS_V=has_v, num_warps=num_warps, **pdl_args(k),
        )  # fmt: skip
    return decay, k2, v2, a_in, b_in


def time_mix_epilogue_triton(y, r, k2, v2, g, r_k, ln_w, ln_b, H, N, eps=GROUP_NORM_EPS):
    """One launch; same arguments and result as time_mix_epilogue_reference."""
    _check(H, N, {"y": y, "r": r, "k2": k2, "v2": v2, "g": g})
    T, C = y.shape
    out = torch.empty(T, C, dtype=r.dtype, device=r.device)
    if T:
        block_t, num_warps = _launch_config(T, N)
        _time_mix_epilogue_kernel[(triton.cdiv(T, block_t), H)](
            *(t.contiguous() for t in (y, r, k2, v2, g)), *_flat(r_k, ln_w, ln_b), out, T, float(eps),
            H=H, N=N, BLOCK_T=block_t, num_warps=num_warps, **pdl_args(r),
        )  # fmt: skip
    return out


def time_mix_decode_reference(state, packed, r, w_lora, k, v, a_lora, g, v_lora, v_first, w0, a0, v0, k_k, k_a,
                              r_k, ln_w, ln_b, H, N, eps=GROUP_NORM_EPS, rounding="nearest", seed=0):  # fmt: skip
    """The three steps in torch: prologue, WKV-7 (updating state), epilogue -> [T, C] in r's dtype."""
    decay, k2, v2, a_in, b_in = time_mix_prologue_reference(k, v, w_lora, a_lora, v_lora, v_first, w0, a0, v0, k_k,
                                                            k_a, H, N)  # fmt: skip
    T = r.shape[0]
    heads = [t.reshape(T, H, N) for t in (r, decay, k2, v2, a_in, b_in)]
    y = wkv7(state, packed, *heads, backend="torch", rounding=rounding, seed=seed).reshape(T, H * N)
    return time_mix_epilogue_reference(y, r, k2, v2, g, r_k, ln_w, ln_b, H, N, eps=eps)


def decode_warps(N: int) -> int:
    """Warps of the one-launch decode kernel. At N = 64 two: 128 registers per thread on sm_90
    (Triton 3.6), where four warps take 255 and leave room for two programs per SM. On an H200 two
    warps were the fastest at batches 1-256 but one (8 x 64 heads, level with two), and four cost
    a batch of 256 up to 63% (time-mix-decode-h200.md)."""
    return 2 if N == 64 else 4 if N < 64 else 8


def time_mix_decode_triton(state, packed, r, w_lora, k, v, a_lora, g, v_lora, v_first, w0, a0, v0, k_k, k_a,
                           r_k, ln_w, ln_b, H, N, eps=GROUP_NORM_EPS, rounding="nearest", seed=0, *,
                           num_warps=None):  # fmt: skip
    """One launch for a decode batch (one token per live sequence): the prologue, WKV-7 and the
    epilogue of time_mix_decode_reference, with the same roundings as the three Triton kernels.
    Grid (live sequences, heads): a program holds one head's [N, N] state. num_warps overrides
    decode_warps (benchmarks)."""
    pick_backend("triton", r)  # a clear error without Triton, or for CPU tensors outside the interpreter
    if not packed.is_decode:
        raise ValueError("the fused decode time mix takes decode batches (one token per sequence)")
    has_v = v_lora is not None
    if has_v != (v_first is not None) or has_v != (v0 is not None):
        raise ValueError("v_lora, v_first and v0 are all given (layers >= 1) or all None (layer 0)")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if N not in HEAD_SIZES:
        raise ValueError(f"the fused decode time mix supports head sizes {HEAD_SIZES}, got N = {N}")
    _check(H, N, {"r": r, "w_lora": w_lora, "k": k, "v": v, "a_lora": a_lora, "g": g, "v_lora": v_lora,
                  "v_first": v_first})  # fmt: skip
    if state.dim() != 4 or state.shape[1:] != (H, N, N) or state.stride()[1:] != (N * N, N, 1):
        raise ValueError(f"state must be a [S, {H}, {N}, {N}] pool view with contiguous heads, got {list(state.shape)}")
    T, C = r.shape
    out = torch.empty(T, C, dtype=r.dtype, device=r.device)
    num_live = packed.live_slots.numel()
    if T == 0 or num_live == 0:
        return out
    ins = [t.contiguous() for t in (r, w_lora, k, v, a_lora, g)]
    ins += [t.contiguous() for t in (v_lora, v_first)] if has_v else [ins[0], ins[0]]  # unread if not has_v
    vecs = _flat(w0, a0, v0 if has_v else w0, k_k, k_a, r_k, ln_w, ln_b)
    stochastic = rounding == "stochastic" and state.dtype != torch.float32
    _time_mix_decode_kernel[(num_live, H)](
        state, packed.live_slots, packed.cu_seqlens, *ins, *vecs, out, state.stride(0), seed & 0xFFFFFFFF, float(eps),
        H=H, N=N, HAS_V=has_v, STOCHASTIC=stochastic, num_warps=num_warps or decode_warps(N), **pdl_args(r),
    )  # fmt: skip
    return out


_PROLOGUES = {"torch": time_mix_prologue_reference, "triton": time_mix_prologue_triton}
_EPILOGUES = {"torch": time_mix_epilogue_reference, "triton": time_mix_epilogue_triton}


def time_mix_prologue(k, v, w_lora, a_lora, v_lora, v_first, w0, a0, v0, k_k, k_a, H, N, backend=None):
    """-> (decay [T, C] float32, k2, v2, a_in, b_in) in k's dtype: the WKV-7 inputs (k2, v2 also
    feed the epilogue). v_lora, v_first, v0 are None in layer 0 (then v2 is v). backend: None
    ("triton" for CUDA tensors when triton imports, else "torch"), "torch", "triton"."""
    fn = _PROLOGUES[pick_backend(backend, k, tuple(_PROLOGUES))]
    return fn(k, v, w_lora, a_lora, v_lora, v_first, w0, a0, v0, k_k, k_a, H, N)


def time_mix_epilogue(y, r, k2, v2, g, r_k, ln_w, ln_b, H, N, eps=GROUP_NORM_EPS, backend=None):
    """y [T, C] float32 WKV output -> (GroupNorm(y) + sum_head(r * k2 * r_k) * v2) * g in r's
    dtype, the input of the output projection. backend as for time_mix_prologue."""
    fn = _EPILOGUES[pick_backend(backend, y, tuple(_EPILOGUES))]
    return fn(y, r, k2, v2, g, r_k, ln_w, ln_b, H, N, eps=eps)
