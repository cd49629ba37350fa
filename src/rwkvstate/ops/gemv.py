"""Projections of a few rows (decode of 1-16 sequences), several independent ones in one launch:

    out[g] = epilogue(x[g] W_g^T)      x [G, T, K], W [G, N, K] -> out [G, T, N]

("grouped"; G = 1 with x [T, K] and W [N, K] is a single projection). At batch 1 a projection is a
matrix-vector product: every weight element is read once and used for T multiply-adds, so the
time is the weight bytes over the bandwidth the kernel reaches. Design (the math and the reasons
are in ops/README.md):
- grid (cdiv(N, BLOCK_N), G, num_splits): a program owns BLOCK_N output columns of one group and
  one contiguous range of K; many programs, so that every SM has weight loads in flight;
- the T rows are padded to one 16-row tl.dot tile (tensor cores do the reduction; only live rows
  are loaded); more than 16 rows are tiles of ROWS_BLOCK_T rows, a tile's token tiles neighbouring
  programs (measured slower than cuBLAS at those sizes; for measurement), the weight streams in [BLOCK_K, BLOCK_N] tiles whose unit-stride axis gives 16-byte
  vector loads (W may be row-major [N, K] or the transposed view of a contiguous [K, N] tensor);
- one split: the program rounds and stores its outputs (one launch). Several splits: each stores
  its float32 partial sums, and either the split that completes a tile last (an atomic count per
  tile) adds them, or a second launch does (SPLIT_REDUCE); both add in a fixed order: deterministic;
- the epilogue follows the torch reference's roundings: the product rounded to x's dtype, then
  optionally relu and square (rounded), then optionally a residual add (rounded).
The torch reference is F.linear per group; "bmm" puts the groups in one batched GEMM (the model's
choice on CUDA beyond GEMV_ROWS rows).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, is_interpreting, pdl_args, pick_backend, tl, triton

MAX_ROWS = 16  # rows are padded to one 16-row tl.dot tile
ACTIVATIONS = ("none", "relu2")  # relu2: relu, then square (the channel mix's key projection)


def gemv_reference(x, weight, residual=None, activation="none"):
    """x [T, K] with weight [N, K], or x [G, T, K] with weight [G, N, K] -> [T, N] or [G, T, N]:
    F.linear per group, then relu and square (activation "relu2"), then + residual."""
    if x.dim() == 2:
        out = F.linear(x, weight)
    else:  # each group's product written in place (F.linear's GEMM, no copy kernel to stack them)
        out = x.new_empty(x.shape[0], x.shape[1], weight.shape[1])
        for g in range(x.shape[0]):
            torch.mm(x[g], weight[g].t(), out=out[g])
    return _activate_and_add(out, residual, activation)


def _activate_and_add(out, residual, activation: str):
    """The torch paths' epilogue: relu then square ("relu2"), then + residual."""
    if activation == "relu2":
        out = torch.relu(out).square()
    return out if residual is None else residual + out


# ---- Triton ------------------------------------------------------------------------------------
if HAS_TRITON:
    from ._triton import pdl_enter, pdl_exit  # first and last statements of the kernels launched with pdl_args
    from .wkv7 import _round_nearest

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
    def _epilogue(b_acc, out, residual, o_t, o_n, m, stride_ot, stride_rt, ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        """Rounds the float32 sums [BLOCK_T, BLOCK_N] as the reference does and stores them."""
        b_y = _round_nearest(b_acc, out.dtype.element_ty)
        if ACT == 1:  # relu2
            b_h = tl.maximum(b_y.to(tl.float32), 0)
            b_y = _round_nearest(b_h * b_h, out.dtype.element_ty)
        if HAS_RESIDUAL:
            b_r = tl.load(residual + o_t[:, None] * stride_rt + o_n[None, :], mask=m, other=0).to(tl.float32)
            b_y = _round_nearest(b_r + b_y.to(tl.float32), out.dtype.element_ty)
        tl.store(out + o_t[:, None] * stride_ot + o_n[None, :], b_y, mask=m)

    @triton.jit
    def _gemv_tile(p_x, p_w, o_t, m_t, o_n, m_n, k_start, k_end, stride_xt, stride_wn, stride_wk,
                   BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
        """float32 [BLOCK_T, BLOCK_N] = x[o_t, k_start:k_end] @ W^T[k_start:k_end, o_n]: the weight
        streams in [BLOCK_K, BLOCK_N] tiles of W^T, the rows padded to one tl.dot tile."""
        b_acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < k_end
            b_x = tl.load(p_x + o_t[:, None] * stride_xt + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0)
            p_wt = p_w + o_k[:, None] * stride_wk + o_n[None, :] * stride_wn  # [BLOCK_K, BLOCK_N] of W^T
            b_w = tl.load(p_wt, mask=m_k[:, None] & m_n[None, :], other=0)
            b_acc += _dot(b_x, b_w, IEEE)
        return b_acc

    @triton.jit
    def _gemv_kernel(
        x, w, out, partial, residual, counters, T, N, K, K_SPLIT, G, TILES_T,
        stride_xg, stride_xt, stride_wg, stride_wn, stride_wk, stride_og, stride_ot, stride_rg, stride_rt,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
        IN_KERNEL: tl.constexpr, ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Grid (output tiles x TILES_T token tiles, groups, splits of K); the token tiles of one
        output tile are neighbours, so that they read its weights about together (once from
        memory, again from L2)."""
        pdl_enter(PDL)
        i_nt, i_g, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        i_n, i_t = i_nt // TILES_T, i_nt % TILES_T
        o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_t, m_n = o_t < T, o_n < N
        p_x = x + i_g.to(tl.int64) * stride_xg
        p_w = w + i_g.to(tl.int64) * stride_wg
        k_start = i_s * K_SPLIT
        k_end = tl.minimum(k_start + K_SPLIT, K)
        b_acc = _gemv_tile(p_x, p_w, o_t, m_t, o_n, m_n, k_start, k_end, stride_xt, stride_wn, stride_wk,
                           BLOCK_T, BLOCK_N, BLOCK_K, IEEE)  # fmt: skip
        m = m_t[:, None] & m_n[None, :]
        if SPLIT == 1:
            p_o, p_r = out + i_g.to(tl.int64) * stride_og, residual + i_g.to(tl.int64) * stride_rg
            _epilogue(b_acc, p_o, p_r, o_t, o_n, m, stride_ot, stride_rt, ACT, HAS_RESIDUAL)
        else:  # partial[i_s, i_g, :T, :N], float32
            p_p = partial + ((i_s * G + i_g).to(tl.int64) * T + o_t[:, None]) * N + o_n[None, :]
            tl.store(p_p, b_acc, mask=m)
            if IN_KERNEL:
                g = i_g.to(tl.int64)
                _last_split_reduces(partial + g * T * N, out + g * stride_og, residual + g * stride_rg,
                                    counters + i_g * tl.num_programs(0) + i_nt, o_t, o_n, m, N, G * T * N, stride_ot,
                                    stride_rt, BLOCK_T, BLOCK_N, SPLIT, ACT, HAS_RESIDUAL)  # fmt: skip
        pdl_exit(PDL)

    @triton.jit
    def _last_split_reduces(p_part, p_o, p_r, counter, o_t, o_n, m, N, split_stride, stride_ot, stride_rt,
                            BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, ACT: tl.constexpr,
                            HAS_RESIDUAL: tl.constexpr):  # fmt: skip
        """Called by every split of an output tile once it has stored its partial sums part[s, o_t,
        o_n] (part[s] at p_part + s * split_stride, [T, N] each): the split that arrives last (an
        atomic count per tile, `counter`) adds all of them, in split order, applies the epilogue,
        and sets the count back to zero for the next launch. The barrier before the count orders
        every thread's stores before it; the count's acquire-release makes the other splits'
        stores visible to the last one, whose loads skip L1 (.cg). The loop over the splits is
        unrolled (SPLIT is a constant) and its loads do not depend on one another, so they are in
        flight together: the tail is about one trip to L2, whatever the number of rows."""
        tl.debug_barrier()
        count = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if count == SPLIT - 1:
            b_acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
            p_p = p_part + o_t[:, None] * N + o_n[None, :]
            for s in tl.static_range(SPLIT):
                b_acc += tl.load(p_p + s * split_stride, mask=m, other=0, cache_modifier=".cg")
            _epilogue(b_acc, p_o, p_r, o_t, o_n, m, stride_ot, stride_rt, ACT, HAS_RESIDUAL)
            tl.store(counter, 0)

    @triton.jit
    def _gemv_reduce_kernel(
        partial, out, residual, T, N, G, SPLIT, stride_og, stride_ot, stride_rg, stride_rt,
        SPLIT_P2: tl.constexpr, BLOCK_N: tl.constexpr, ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        """Grid (N blocks, G, T): one output row's BLOCK_N columns; every split's partial sums are
        loaded at once (one [SPLIT_P2, BLOCK_N] tile: no chain of dependent loads however many
        splits) and added by tl.sum, whose order is fixed at compile time: deterministic."""
        pdl_enter(PDL)
        i_n, i_g, i_t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        o_s = tl.arange(0, SPLIT_P2)
        o_t = i_t + tl.arange(0, 1)
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        p_p = partial + ((o_s[:, None] * G + i_g).to(tl.int64) * T + i_t) * N + o_n[None, :]
        b_acc = tl.sum(tl.load(p_p, mask=(o_s < SPLIT)[:, None] & m_n[None, :], other=0), axis=0)[None, :]
        p_o, p_r = out + i_g.to(tl.int64) * stride_og, residual + i_g.to(tl.int64) * stride_rg
        _epilogue(b_acc, p_o, p_r, o_t, o_n, m_n[None, :], stride_ot, stride_rt, ACT, HAS_RESIDUAL)
        pdl_exit(PDL)

    @triton.jit
    def _gemv_rows_kernel(
        x, wt, out, partial, residual, counters, T, N, K, K_SPLIT, stride_xt, stride_wk, stride_ot, stride_rt,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
        IN_KERNEL: tl.constexpr, HAS_RESIDUAL: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """x [T, K] @ wt [K, N] (rows of wt contiguous), reading only the rows k of wt where some
        x[:, k] != 0 (a masked-off row is never fetched). BLOCK_T == 1: one input row, products
        summed elementwise in a [BLOCK_K, BLOCK_N] float32 tile and reduced over K once at the end;
        otherwise the rows are padded to a 16-row tl.dot tile."""
        pdl_enter(PDL)
        i_n, i_s = tl.program_id(0), tl.program_id(1)
        o_t = tl.arange(0, BLOCK_T)
        o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_t, m_n = o_t < T, o_n < N
        k_start = i_s * K_SPLIT
        k_end = tl.minimum(k_start + K_SPLIT, K)
        if BLOCK_T == 1:
            b_acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        else:
            b_acc2 = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < k_end
            p_w = wt + o_k[:, None].to(tl.int64) * stride_wk + o_n[None, :]
            if BLOCK_T == 1:
                b_x = tl.load(x + o_k, mask=m_k, other=0)
                b_w = tl.load(p_w, mask=(b_x != 0)[:, None] & m_n[None, :], other=0)
                b_acc2 += b_x.to(tl.float32)[:, None] * b_w.to(tl.float32)
            else:
                b_x = tl.load(x + o_t[:, None] * stride_xt + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0)
                b_need = tl.max((b_x != 0).to(tl.int32), axis=0) > 0  # [BLOCK_K]: some row needs wt[k]
                b_w = tl.load(p_w, mask=b_need[:, None] & m_n[None, :], other=0)
                b_acc2 += _dot(b_x, b_w, IEEE)
        if BLOCK_T == 1:
            b_acc = tl.sum(b_acc2, axis=0)[None, :]
        else:
            b_acc = b_acc2
        m = m_t[:, None] & m_n[None, :]
        if SPLIT == 1:
            _epilogue(b_acc, out, residual, o_t, o_n, m, stride_ot, stride_rt, 0, HAS_RESIDUAL)
        else:  # partial[i_s, :T, :N], float32, as the reduce kernel reads it (one group)
            tl.store(partial + (i_s.to(tl.int64) * T + o_t[:, None]) * N + o_n[None, :], b_acc, mask=m)
            if IN_KERNEL:
                _last_split_reduces(partial, out, residual, counters + i_n, o_t, o_n, m, N, T * N, stride_ot, stride_rt,
                                    BLOCK_T, BLOCK_N, SPLIT, 0, HAS_RESIDUAL)  # fmt: skip
        pdl_exit(PDL)


PROGRAMS_PER_SM = 2  # programs wanted per SM once K is split (an estimate, not yet measured)
# K is not split when the output tiles alone give every SM a program: on an H200 the 1.5B r/k/v
# projection (3 x 64 tiles of 32 columns on 132 SMs) took 10.12 / 10.47 us unsplit at batch 1 / 8
# against 10.19 / 11.48 us in two splits with their reduce (gemv-sweep-h200.md), and in a decode
# graph the reduce is one launch more per layer
UNSPLIT_PROGRAMS_PER_SM = 1
REDUCE_TILE = 4096  # partial sums per program of the reduce launch: splits (padded) x columns
# How a split K's partial sums are added: "kernel": the split that completes an output tile last
# (an atomic count per tile) adds them in split order and applies the epilogue (deterministic; the
# float32 sum can differ in its last bit from the reduce launch's, which adds in a tree);
# "launch": a second launch adds them. The count lives in a zeroed int32 buffer per device and
# stream (_split_counters) that every launch leaves zeroed again. SPLIT_REDUCE None: "kernel" up
# to IN_KERNEL_MAX_N outputs, where it measured faster in decode on an H200 (1.5B: batch 1-8 1.5-3%,
# 0.1B level), "launch" beyond (7.2B: batch 1 1% faster, 2-8 1.2-1.5% slower; decode-split-reduce-h200)
SPLIT_REDUCES = ("kernel", "launch")
SPLIT_REDUCE: str | None = None
IN_KERNEL_MAX_N = 2048
MIN_COUNTERS = 4096  # counts per buffer (one per output tile of a launch)
_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # smaller buffers replaced by larger ones: a captured graph may still use them


def _split_counters(device: torch.device, tiles: int) -> torch.Tensor | None:
    """A zeroed int32 buffer of at least `tiles` counts for the current stream of `device`, made on
    first use; None while a CUDA graph is being captured and none is ready (allocating one then
    would leave it unset until the graph first runs): the caller then takes the reduce launch.
    DecodeGraphs runs every step once on its capture stream before capturing, which makes it.
    One buffer per stream: launches on one stream run one after another, so they can share it."""
    if device.type == "cuda" and device.index is None:  # one key per device: tensors' devices carry the index
        device = torch.device("cuda", torch.cuda.current_device())
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    buf = _COUNTERS.get((device, stream))
    if buf is None or buf.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if buf is not None:
            _RETIRED.append(buf)
        buf = _COUNTERS[(device, stream)] = torch.zeros(max(tiles, MIN_COUNTERS), dtype=torch.int32, device=device)
    return buf


def reserve_counters(device: torch.device, stream: torch.cuda.Stream | None = None,
                     tiles: int = MIN_COUNTERS) -> None:  # fmt: skip
    """Makes the zeroed counts of `stream` (default: the current stream of `device`) now, so that
    launches captured into a CUDA graph on that stream reduce their splits in-kernel: a stream that
    only ever runs inside captures (the model's LoRA side stream) has no eager launch to make them."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    with torch.cuda.stream(stream or torch.cuda.current_stream(device)):
        _split_counters(device, tiles)


def _reduce_plan(splits: int, tiles: int, N: int, device: torch.device, split_reduce: str | None) -> torch.Tensor | None:
    """The counts of an in-kernel split reduction, or None for one split or the reduce launch."""
    wanted = split_reduce or SPLIT_REDUCE or ("kernel" if N <= IN_KERNEL_MAX_N else "launch")
    if wanted not in SPLIT_REDUCES:
        raise ValueError(f"split_reduce must be one of {SPLIT_REDUCES}, got {wanted!r}")
    if splits == 1 or wanted == "launch":
        return None
    return _split_counters(device, tiles)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """SMs of a CUDA device; 4 for the interpreter (so that default tiles split K in tests too)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def tiles(G: int, N: int, K: int, device, block_n=None, block_k=None, num_splits=None,
          programs_per_sm: int = PROGRAMS_PER_SM, tiles_t: int = 1) -> dict:
    """The launch configuration: BLOCK_N output columns (16 or 32) by BLOCK_K (up to 256) weight
    tiles, and K split into num_splits ranges (whole BLOCK_K steps) when the G * cdiv(N, BLOCK_N)
    (x tiles_t token tiles) tiles give fewer than UNSPLIT_PROGRAMS_PER_SM programs per SM: then
    into as many as give programs_per_sm per SM. Arguments override the choice."""
    block_n = block_n or max(16, min(32, triton.next_power_of_2(N)))
    block_k = block_k or max(16, min(256, triton.next_power_of_2(K)))
    steps = triton.cdiv(K, block_k)
    if num_splits is None:
        sms, programs = _num_sms(torch.device(device)), G * triton.cdiv(N, block_n) * tiles_t
        if programs >= UNSPLIT_PROGRAMS_PER_SM * sms:
            num_splits = 1
        else:
            num_splits = min(steps, triton.cdiv(programs_per_sm * sms, programs))
    k_split = triton.cdiv(steps, max(1, min(num_splits, steps))) * block_k
    return {"block_n": block_n, "block_k": block_k, "k_split": k_split, "num_splits": triton.cdiv(K, k_split)}


def _as_groups(x, weight, residual, max_rows: int | None = MAX_ROWS):
    """Views of a single projection as one group; checks shapes and strides (and at most
    max_rows rows, None: any)."""
    single = x.dim() == 2
    if single:
        x, weight = x.unsqueeze(0), weight.unsqueeze(0)
        residual = None if residual is None else residual.unsqueeze(0)
    if x.dim() != 3 or weight.dim() != 3 or weight.shape[0] != x.shape[0] or weight.shape[2] != x.shape[2]:
        raise ValueError(f"expected x [T, K] and weight [N, K], or x [G, T, K] and weight [G, N, K]; got "
                         f"x {list(x.shape)} and weight {list(weight.shape[int(single):])}")  # fmt: skip
    G, T, K = x.shape
    if max_rows is not None and T > max_rows:
        raise ValueError(f"the Triton GEMV takes at most {max_rows} rows here, got {T}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x and weight must share a dtype, got {x.dtype} and {weight.dtype}")
    if x.stride(2) != 1 or 1 not in (weight.stride(1), weight.stride(2)):
        raise ValueError("x needs unit stride along K, and weight unit stride along N or K")
    if residual is not None and residual.shape != (G, T, weight.shape[1]):
        raise ValueError(f"residual must be {[G, T, weight.shape[1]][int(single):]}, got {list(residual.shape[int(single):])}")
    if residual is not None and residual.stride(2) != 1:  # the epilogues read it along N with unit stride
        residual = residual.contiguous()
    return single, x, weight, residual


# more than 16 rows (batches, prompts): token tiles of ROWS_BLOCK_T rows by ROWS_BLOCK_N columns,
# steps of ROWS_BLOCK_K, K split as tiles() says, a split K added in the kernel
ROWS_BLOCK_T = 64
ROWS_BLOCK_N = 128
ROWS_BLOCK_K = 64


def gemv_triton(x, weight, residual=None, activation="none", *, block_n=None, block_k=None, num_splits=None,
                num_warps=None, num_stages=3, split_reduce=None, block_t=None):  # fmt: skip
    """One launch (two when K is split and split_reduce is "launch"); same arguments and result as
    gemv_reference (up to the order of float32 sums where K is split). At most 16 rows are one
    16-row tile; more are tiles of block_t rows (ROWS_BLOCK_T; their defaults ROWS_*, 8 warps,
    a split K added in the kernel). block_n, block_k, num_splits, num_warps and num_stages
    override the launch configuration (tests and benchmarks use them); split_reduce (None:
    SPLIT_REDUCE, or by N) how a split K is added."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    single, x, weight, residual = _as_groups(x, weight, residual, max_rows=None)
    G, T, K = x.shape
    N = weight.shape[1]
    out = torch.empty(G, T, N, dtype=x.dtype, device=x.device)
    if T > MAX_ROWS:
        block_t = block_t or ROWS_BLOCK_T
        block_n, block_k = block_n or ROWS_BLOCK_N, block_k or ROWS_BLOCK_K
        num_warps, split_reduce = num_warps or 8, split_reduce or SPLIT_REDUCE or "kernel"
    else:
        block_t, num_warps = MAX_ROWS, num_warps or 4
    if T > 0:
        cfg = tiles(G, N, K, x.device, block_n, block_k, num_splits, tiles_t=triton.cdiv(T, block_t))
        _launch(x, weight, residual, out, cfg, block_t, ACTIVATIONS.index(activation), num_warps, num_stages,
                split_reduce)  # fmt: skip
    return out[0] if single else out


def _launch(x, weight, residual, out, cfg: dict, block_t: int, act: int, num_warps: int, num_stages: int,
            split_reduce: str | None) -> None:  # fmt: skip
    G, T, K = x.shape
    N = weight.shape[1]
    splits, tiles_n, tiles_t = cfg["num_splits"], triton.cdiv(N, cfg["block_n"]), triton.cdiv(T, block_t)
    partial = torch.empty(splits, G, T, N, dtype=torch.float32, device=x.device) if splits > 1 else out  # unused if 1
    res = residual if residual is not None else out  # unread without a residual
    counters = _reduce_plan(splits, G * tiles_n * tiles_t, N, x.device, split_reduce)
    ieee = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and is_interpreting())
    flags = dict(ACT=act, HAS_RESIDUAL=residual is not None)
    _gemv_kernel[(tiles_n * tiles_t, G, splits)](
        x, weight, out, partial, res, counters if counters is not None else partial, T, N, K, cfg["k_split"], G,
        tiles_t, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
        out.stride(0), out.stride(1), res.stride(0), res.stride(1),
        BLOCK_T=block_t, BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], SPLIT=splits,
        IN_KERNEL=counters is not None, IEEE=ieee,
        num_warps=num_warps, num_stages=num_stages, **flags, **pdl_args(x),
    )  # fmt: skip
    if splits > 1 and counters is None:
        _reduce(partial, out, res, G, T, N, splits, **flags)


def rows_config(N: int) -> dict:
    """The sparse-input GEMV's launch: output columns per program, rows of W^T per step, warps and
    programs per SM before K is split. Chosen on an H200 (bench_ffn.py --sweep, batch 1, densities
    1 and 0.5, docs/benchmarks/ffn-sweep-h200.md): 64 x 128 tiles with 4 programs per SM were the
    fastest at N = 768 and 2048 (10.8 us at 1.5B, density 0.5), 256 x 64 with 2 at N = 4096
    (31.3 us against 34.4 with the smaller tile)."""
    if N <= 2048:
        return {"block_n": 64, "block_k": 128, "num_warps": 4, "programs_per_sm": 4}
    return {"block_n": 256, "block_k": 64, "num_warps": 4, "programs_per_sm": 2}


def gemv_sparse_input(x, weight, residual=None, *, block_n=None, block_k=None, num_splits=None,
                      programs_per_sm=None, num_warps=None, num_stages=3, split_reduce=None):  # fmt: skip
    """x [T, K] @ weight [N, K]^T (+ residual), T <= 16, for an x with many exact zeros (the
    feed-forward's squared-ReLU activations): weight must be the [N, K] view of a contiguous
    [K, N] tensor, and row k of that tensor is read only if some x[:, k] != 0. The result equals
    gemv_reference's up to the order of the float32 sums (terms of zero activations are exact
    zeros, so skipping them changes nothing, except that a NaN or Inf in a skipped row cannot show).
    One launch, two when K is split and split_reduce is "launch"; the other arguments override
    the launch configuration, as for gemv_triton."""
    single, x, weight, residual = _as_groups(x, weight, residual)
    if x.shape[0] != 1:
        raise ValueError(f"gemv_sparse_input takes one projection, got {x.shape[0]} groups")
    wt = weight[0].t()  # [K, N]
    if wt.stride(1) != 1:
        raise ValueError("gemv_sparse_input needs weight as the [N, K] view of a contiguous [K, N] tensor")
    x, res = x[0], None if residual is None else residual[0]
    T, K = x.shape
    N = wt.shape[1]
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    if T == 0:
        return out if single else out.unsqueeze(0)
    default = rows_config(N)
    block_n = block_n or min(default["block_n"], max(16, triton.next_power_of_2(N)))
    block_t = 1 if T == 1 else MAX_ROWS
    block_k = block_k or default["block_k"]
    num_warps = num_warps or default["num_warps"]
    cfg = tiles(1, N, K, x.device, block_n, block_k, num_splits, programs_per_sm or default["programs_per_sm"])
    splits, tiles_n = cfg["num_splits"], triton.cdiv(N, block_n)
    partial = torch.empty(splits, T, N, dtype=torch.float32, device=x.device) if splits > 1 else out
    res_arg = res if res is not None else out  # unread without a residual
    counters = _reduce_plan(splits, tiles_n, N, x.device, split_reduce)
    ieee = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and is_interpreting())
    _gemv_rows_kernel[(tiles_n, splits)](
        x, wt, out, partial, res_arg, counters if counters is not None else partial, T, N, K, cfg["k_split"],
        x.stride(0), wt.stride(0), out.stride(0), res_arg.stride(0), BLOCK_T=block_t, BLOCK_K=block_k,
        BLOCK_N=block_n, SPLIT=splits, IN_KERNEL=counters is not None,
        HAS_RESIDUAL=res is not None, IEEE=ieee, num_warps=num_warps, num_stages=num_stages, **pdl_args(x),
    )  # fmt: skip
    if splits > 1 and counters is None:
        _reduce(partial, out.unsqueeze(0), res_arg.unsqueeze(0), 1, T, N, splits, ACT=0, HAS_RESIDUAL=res is not None)
    return out if single else out.unsqueeze(0)


def _reduce(partial, out, res, G: int, T: int, N: int, splits: int, **flags) -> None:
    """The second launch of a split K: out[g, t] = epilogue(sum over splits of partial[:, g, t])."""
    split_p2 = triton.next_power_of_2(splits)
    block = max(16, min(256, REDUCE_TILE // split_p2, triton.next_power_of_2(N)))
    _gemv_reduce_kernel[(triton.cdiv(N, block), G, T)](
        partial, out, res, T, N, G, splits, out.stride(0), out.stride(1), res.stride(0), res.stride(1),
        SPLIT_P2=split_p2, BLOCK_N=block, num_warps=4, **flags, **pdl_args(partial),
    )  # fmt: skip


def gemv_bmm(x, weight, residual=None, activation="none"):
    """As gemv_reference, with the groups in one batched GEMM (torch.bmm) instead of F.linear each:
    one launch whose tiles cover every group, for any number of rows."""
    if x.dim() == 2:
        return gemv_reference(x, weight, residual, activation)
    return _activate_and_add(torch.bmm(x, weight.transpose(1, 2)), residual, activation)


_BACKENDS = {"torch": gemv_reference, "triton": gemv_triton, "bmm": gemv_bmm}


def gemv(x, weight, residual=None, activation="none", backend=None):
    """x [T, K] @ weight [N, K]^T, or per group x [G, T, K] @ weight [G, N, K]^T, in x's dtype, then
    activation ("none" or "relu2") and + residual. backend: None and "torch" use F.linear per group
    (the model chooses the kernel itself where it measured faster); "bmm" one batched GEMM for the
    groups; "triton" the kernel (any number of rows; gemv_triton)."""
    backend = backend or "torch"
    return _BACKENDS[pick_backend(backend, x, tuple(_BACKENDS), native=("torch", "bmm"))](x, weight, residual, activation)
