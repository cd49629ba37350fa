"""The time mix's low-rank chains (decay w, in-context rate a, gate g, value residual v) in a few
launches:

    h_s   = act_s(x_s D_s^T)        x_s = token-shift mix m_s [T, C], D_s [R_s, C]
    out_s = h_s U_s^T               U_s [C, R_s]  ->  out [S, T, C]

with act tanh (w), none (a, v), sigmoid (g). As eight GEMMs and two activations, each is its own
launch: at batch 1 a kernel of 2-5 us for a few hundred kilobytes of weights, at batch 256 a GEMM
with so few output columns (R_s = 32..480) that it fills a fraction of the GPU. So the down
matrices are stacked into one [R, C] matrix at load time and the up matrices (transposed) into
another, and chains of similar rank form groups: within a group every chain is padded with zero
rows to the group's rank (a multiple of BLOCK_R), so the group's rows are a [n, R_g, C] batch.
- "triton", at most 16 rows: one GEMV-shaped kernel computes every h (the activation applied per
  row block, padding blocks skipped), one computes every out; lora_down_with_projection computes
  every h in the launch of another projection of the mixes (the time mix's r, k, v), and
  lora_up_triton the outs from it;
- "triton", more rows (batches, prompts): tiles of ROWS_BLOCK_T token rows. The down kernel's
  programs are (token tile, split of C, tile of a chain's rows); where C is split, each stores
  float32 partial sums and the one that completes a tile adds them in split order (as the GEMV
  kernel does, ops/gemv.py) and activates them. The up kernel's programs are (token tile, output
  channels of one chain). Two launches in place of the six GEMMs and two activations of "bmm";
  cuBLAS runs the downs (a few output columns over all of C) at a fraction of the GPU;
- "bmm" (any number of rows): per group one torch.bmm for the downs and one for the ups, the
  activations in place between them: with the usual ranks (v, w, a close, g larger) six launches
  instead of ten, each over several chains' columns.
The model keeps views into the stacks as its w1, w2, ... weights, so nothing is stored twice.
Rounding follows the torch chain step by step (GEMM output, activation, GEMM output, each rounded
to the compute dtype); padded rows are zero in both stacks and add exact zeros (an activation of a
padded column, e.g. sigmoid(0), meets a zero row of the up stack).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, is_interpreting, pdl_args, pick_backend, tl, triton
from .gemv import _num_sms, _split_counters, tiles

ACTIVATIONS = ("none", "tanh", "sigmoid")
BLOCK_R = 16  # rows of a stacked matrix per program step; every chain is padded to a multiple
MAX_ROWS = 16  # the Triton path pads the token rows to one 16-row tl.dot tile


GROUP_SLACK = 1.5  # a chain joins the previous one's group while the group's padded rows stay within this of the sum


@dataclass
class LoraPack:
    """Stacked low-rank chains of one layer. Segment s uses mix `mixes[s]`, activation
    `activations[s]` and rows starts[s] .. starts[s] + ranks[s] - 1 of both stacks; group g holds
    chains groups[g] = (first, count, padded rank), stored as rows starts[first] ..
    starts[first] + count * padded rank - 1."""

    down: torch.Tensor  # [R_pad, C]: D_s stacked, zero rows up to its group's padded rank each
    up_t: torch.Tensor  # [R_pad, C]: U_s^T stacked the same way
    block_codes: torch.Tensor  # [B, 2] int32 per row block holding weights: (row block index, mix * 4 + activation)
    bounds: torch.Tensor  # [S, 2] int32: first row of chain s, end of its last row block
    chain_codes: torch.Tensor  # [S] int32: mix * 4 + activation of chain s
    mixes: tuple[int, ...]
    activations: tuple[str, ...]
    starts: tuple[int, ...]
    ranks: tuple[int, ...]
    groups: tuple[tuple[int, int, int], ...]
    # per group: None when its chains read consecutive mixes (a view of them), else the mix
    # indices on the device (made at load, so that a CUDA graph can capture the gather)
    gathers: tuple[torch.Tensor | None, ...] = ()

    def down_weight(self, s: int) -> torch.Tensor:
        """D_s [R_s, C], a view: the F.linear weight of chain s's first GEMM."""
        return self.down[self.starts[s] : self.starts[s] + self.ranks[s]]

    def up_weight(self, s: int) -> torch.Tensor:
        """U_s [C, R_s], a transposed view: the F.linear weight of chain s's second GEMM."""
        return self.up_t[self.starts[s] : self.starts[s] + self.ranks[s]].t()

    def group_rows(self, stack: torch.Tensor, g: int) -> torch.Tensor:
        """Group g's rows of `stack` (down or up_t) as [count, padded rank, C], a view."""
        first, count, rank = self.groups[g]
        return stack[self.starts[first] : self.starts[first] + count * rank].view(count, rank, stack.shape[1])


def _padded(rank: int) -> int:
    return -(-rank // BLOCK_R) * BLOCK_R


def _group(ranks: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive chains whose padding to a common rank costs at most GROUP_SLACK of their rows."""
    groups: list[tuple[int, int, int]] = []
    for s, rank in enumerate(ranks):
        if groups:
            first, count, top = groups[-1]
            top2 = max(top, _padded(rank))
            if top2 * (count + 1) <= GROUP_SLACK * sum(_padded(r) for r in ranks[first : s + 1]):
                groups[-1] = (first, count + 1, top2)
                continue
        groups.append((s, 1, _padded(rank)))
    return groups


def pack_lora(chains) -> LoraPack:
    """chains: (mix index, activation, down [R, C], up [C, R]) per segment, all on one device and
    dtype. Returns the stacks (new tensors); the inputs can be dropped afterwards."""
    chains = list(chains)
    C = chains[0][2].shape[1]
    for _, act, down, up in chains:
        if act not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {act!r}")
        if down.dim() != 2 or down.shape[1] != C or up.shape != (C, down.shape[0]):
            raise ValueError(f"expected down [R, {C}] and up [{C}, R], got {list(down.shape)} and {list(up.shape)}")
    ranks = [c[2].shape[0] for c in chains]
    groups = _group(ranks)
    starts, blocks, bounds, rows = [], [], [], 0
    for first, count, rank in groups:
        for s in range(first, first + count):
            mix, act = chains[s][0], chains[s][1]
            starts.append(rows)
            used = _padded(ranks[s])
            blocks += [(rows // BLOCK_R + b, mix * 4 + ACTIVATIONS.index(act)) for b in range(used // BLOCK_R)]
            bounds.append((rows, rows + used))
            rows += rank
    ref = chains[0][2]
    down_all = torch.zeros(rows, C, dtype=ref.dtype, device=ref.device)
    up_all = torch.zeros(rows, C, dtype=ref.dtype, device=ref.device)
    for start, (_, _, down, up) in zip(starts, chains):
        down_all[start : start + down.shape[0]] = down
        up_all[start : start + down.shape[0]] = up.t()

    def ints(values):
        return torch.tensor(values, dtype=torch.int32, device=ref.device)

    mixes = tuple(c[0] for c in chains)
    gathers = []
    for first, count, _ in groups:
        own = mixes[first : first + count]
        gathers.append(None if own == tuple(range(own[0], own[0] + count)) else ints(list(own)))
    return LoraPack(
        down=down_all, up_t=up_all, block_codes=ints(blocks), bounds=ints(bounds),
        chain_codes=ints([c[0] * 4 + ACTIVATIONS.index(c[1]) for c in chains]),
        mixes=mixes, activations=tuple(c[1] for c in chains),
        starts=tuple(starts), ranks=tuple(ranks), groups=tuple(groups), gathers=tuple(gathers),
    )  # fmt: skip


_TORCH_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda x: x, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
}  # fmt: skip


def lora_reference(mixed: torch.Tensor, pack: LoraPack) -> list[torch.Tensor]:
    """mixed [K, T, C] (the token-shift mixes) -> S tensors [T, C] in mixed's dtype: the torch chains."""
    outs = []
    for s, (mix, act) in enumerate(zip(pack.mixes, pack.activations)):
        h = _TORCH_ACTIVATIONS[act](F.linear(mixed[mix], pack.down_weight(s)))
        outs.append(F.linear(h, pack.up_weight(s)))
    return outs


# ---- Triton ------------------------------------------------------------------------------------
# Both kernels pad the T <= 16 token rows to one 16-row tl.dot tile and accumulate in float32. At
# decode sizes they are latency-bound (a layer's LoRA weights are 1-4 MB, far below what the GPU
# reads in the time of one dependent load), so each program takes few, wide steps.
# _lora_down_kernel: grid (row blocks holding weights,); a program owns one row block of the down
#   stack (one chain: its code gives the mix to read and the activation; the zero blocks that pad a
#   chain to its group's rank get no program), steps over C by BLOCK_C, and writes
#   h[:, rows] = act(round(x_mix D_rows^T)), rounded. Reads each weight once.
# _lora_up_kernel: grid (C / BLOCK_C, S); a program owns channels o_c of chain s's output and sums
#   h[:, rows] U^T[rows, o_c] over the chain's rows, BLOCK_R at a time (rows past the chain's end,
#   another chain's, masked), writing out[s, :, o_c] rounded.
if HAS_TRITON:
    from ._triton import pdl_enter, pdl_exit  # first and last statements of the kernels launched with pdl_args
    from .gemv import _dot, _epilogue, _gemv_tile, _rows_times_weight_t  # float32 products (IEEE where needed)
    from .wkv7 import _round_nearest

    @triton.jit
    def _lora_down_kernel(
        x, down, codes, h, T, C, stride_xm, stride_xt, stride_h,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        pdl_enter(PDL)
        i_b = tl.program_id(0)
        i_r, code = tl.load(codes + 2 * i_b), tl.load(codes + 2 * i_b + 1)
        i_m, act = code // 4, code % 4
        o_t = tl.arange(0, BLOCK_T)
        o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
        m_t = o_t < T
        p_x = x + i_m.to(tl.int64) * stride_xm  # this block's mix
        b_acc = _rows_times_weight_t(p_x, stride_xt, o_t, m_t, down, C, o_r, o_r >= 0, C, BLOCK_T, BLOCK_R, BLOCK_C, IEEE)
        _activate_store(b_acc, act, h, o_t, m_t, o_r, stride_h)
        pdl_exit(PDL)

    @triton.jit
    def _activate(b_acc, act, dtype: tl.constexpr):
        """act(round(b_acc)), rounded to dtype: the torch chain's GEMM output and activation;
        act 0 none, 1 tanh, 2 sigmoid."""
        b_h = _round_nearest(b_acc, dtype).to(tl.float32)
        b_sig = tl.sigmoid(b_h)
        b_tanh = 2 * tl.sigmoid(2 * b_h) - 1  # tanh, from the sigmoid Triton has everywhere
        return _round_nearest(tl.where(act == 1, b_tanh, tl.where(act == 2, b_sig, b_h)), dtype)

    @triton.jit
    def _activate_store(b_acc, act, h, o_t, m_t, o_r, stride_h):
        """h[o_t, o_r] = act(round(b_acc)), rounded (_activate)."""
        tl.store(h + o_t[:, None] * stride_h + o_r[None, :], _activate(b_acc, act, h.dtype.element_ty), mask=m_t[:, None])

    @triton.jit
    def _chain_bounds(bounds, i_s, BLOCK_R: tl.constexpr):
        """Chain s's first row and the end of its last row block. Both are multiples of the pack's
        16-row blocks: saying so lets the compiler load and store a tile's rows in 16-byte
        vectors (and copy them asynchronously) instead of element by element."""
        r_start, r_end = tl.load(bounds + 2 * i_s), tl.load(bounds + 2 * i_s + 1)
        return tl.multiple_of(r_start, 16), tl.multiple_of(r_end, 16)

    @triton.jit
    def _lora_down_rows_kernel(
        x, down, bounds, chain_codes, part, h, counters, T, C, SPLIT_K, stride_xm, stride_xt, stride_ps, stride_h,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """Grid (token tiles x SPLIT splits of C, tiles of BLOCK_R rows of the longest chain,
        chains): h[o_t, o_r] = act(x[mix][o_t] D[o_r]^T) for rows o_r of chain s up to the end of
        its last row block (a tile past it has nothing to do; rows past it are another chain's or
        padding, and stay unwritten). With SPLIT > 1 each program stores its float32 sums over its
        split in part[split, o_t, o_r] (stride_h apart by row, as h) and the one that completes a
        tile adds them (ops/gemv.py _last_split_reduces: an atomic count per tile, split order),
        activates and stores them."""
        i_tk, i_j, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        i_t, i_k = i_tk // SPLIT, i_tk % SPLIT
        r_start, r_end = _chain_bounds(bounds, i_s, BLOCK_R)
        r0 = r_start + i_j * BLOCK_R
        if r0 < r_end:
            o_r = r0 + tl.arange(0, BLOCK_R)
            o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
            m = (o_t < T)[:, None] & (o_r < r_end)[None, :]
            code = tl.load(chain_codes + i_s)
            p_x = x + (code // 4).to(tl.int64) * stride_xm  # this chain's mix
            k0 = i_k * SPLIT_K
            b_acc = _gemv_tile(p_x, down, o_t, o_t < T, o_r, o_r < r_end, k0, tl.minimum(k0 + SPLIT_K, C), stride_xt,
                               C, 1, BLOCK_T, BLOCK_R, BLOCK_K, IEEE)  # fmt: skip
            o_tr = o_t[:, None].to(tl.int64) * stride_h + o_r[None, :]
            if SPLIT == 1:
                tl.store(h + o_tr, _activate(b_acc, code % 4, h.dtype.element_ty), mask=m)
            else:
                tl.store(part + i_k.to(tl.int64) * stride_ps + o_tr, b_acc, mask=m)
                tl.debug_barrier()  # every thread's partial sums stored before the count
                counter = counters + (i_t * tl.num_programs(1) + i_j) * tl.num_programs(2) + i_s
                if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
                    b_sum = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
                    for i in tl.static_range(SPLIT):
                        b_sum += tl.load(part + i * stride_ps + o_tr, mask=m, other=0, cache_modifier=".cg")
                    tl.store(h + o_tr, _activate(b_sum, code % 4, h.dtype.element_ty), mask=m)
                    tl.store(counter, 0)

    @triton.jit
    def _projection_lora_down_kernel(
        x, w, out, down, codes, h, T, N, C, NUM_DOWN, TILES_N,
        stride_xm, stride_xt, stride_wg, stride_wn, stride_wk, stride_og, stride_ot, stride_h,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        IEEE: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Programs 0 .. NUM_DOWN - 1: the down stack's row blocks (as _lora_down_kernel computes
        them); the rest: the grouped projection's output tiles, program NUM_DOWN + g * TILES_N + j
        computing out[g, :, j * BLOCK_N ..] = round(x[g] W_g^T). Both step over the whole of C
        with ops/gemv.py's [BLOCK_K, columns] weight tiles (BLOCK_K: PROJECTION_BLOCK_K, whose
        note gives the registers and the timings)."""
        pdl_enter(PDL)
        pid = tl.program_id(0)
        o_t = tl.arange(0, BLOCK_T)
        m_t = o_t < T
        if pid < NUM_DOWN:  # the smaller programs first
            i_r, code = tl.load(codes + 2 * pid), tl.load(codes + 2 * pid + 1)
            o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
            p_x = x + (code // 4).to(tl.int64) * stride_xm  # this block's mix
            b_down = _gemv_tile(p_x, down, o_t, m_t, o_r, o_r >= 0, 0, C, stride_xt, C, 1, BLOCK_T, BLOCK_R, BLOCK_K, IEEE)
            _activate_store(b_down, code % 4, h, o_t, m_t, o_r, stride_h)
        else:
            i_g, i_n = (pid - NUM_DOWN) // TILES_N, (pid - NUM_DOWN) % TILES_N
            o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
            m_n = o_n < N
            p_x, p_w = x + i_g.to(tl.int64) * stride_xm, w + i_g.to(tl.int64) * stride_wg
            b_acc = _gemv_tile(p_x, p_w, o_t, m_t, o_n, m_n, 0, C, stride_xt, stride_wn, stride_wk,
                               BLOCK_T, BLOCK_N, BLOCK_K, IEEE)  # fmt: skip
            p_o = out + i_g.to(tl.int64) * stride_og
            _epilogue(b_acc, p_o, p_o, o_t, o_n, m_t[:, None] & m_n[None, :], stride_ot, 0, 0, False)
        pdl_exit(PDL)

    @triton.jit
    def _lora_up_kernel(
        h, up_t, bounds, out, T, C, TILES_C, stride_h, stride_os, stride_ot,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        """Grid (token tiles x TILES_C channel tiles, chains)."""
        pdl_enter(PDL)
        i_tc, i_s = tl.program_id(0), tl.program_id(1)
        i_t, i_c = i_tc // TILES_C, i_tc % TILES_C
        r_start, r_end = _chain_bounds(bounds, i_s, BLOCK_R)
        o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
        o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m_t, m_c = o_t < T, o_c < C
        b_acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for r0 in range(r_start, r_end, BLOCK_R):
            o_r = r0 + tl.arange(0, BLOCK_R)
            m_r = o_r < r_end
            b_h = tl.load(h + o_t[:, None].to(tl.int64) * stride_h + o_r[None, :], mask=m_t[:, None] & m_r[None, :], other=0)
            b_u = tl.load(up_t + o_r[:, None].to(tl.int64) * C + o_c[None, :], mask=m_r[:, None] & m_c[None, :], other=0)
            b_acc += _dot(b_h, b_u, IEEE)
        p_o = out + i_s.to(tl.int64) * stride_os + o_t[:, None].to(tl.int64) * stride_ot + o_c[None, :]
        tl.store(p_o, _round_nearest(b_acc, out.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])
        pdl_exit(PDL)


# launch configuration: on an H200 (benchmarks/bench_lora.py) one layer's chains took 10.1 us at C =
# 2048 and 16.9 us at C = 4096 with these, 17.9 / 33.2 with steps of 128 channels and 16 rows
DOWN_BLOCK_C = 1024  # channels per step of a down program
UP_BLOCK_R = 64  # rows per step of an up program (a multiple of BLOCK_R)
UP_BLOCK_C = 64  # output channels per up program
# the step over C of lora_down_with_projection: compiled for sm_90 (Triton 3.6) the launch takes 254
# registers a thread with steps of 256 channels and 168 with 128, yet on an H200 256 was the faster
# (r/k/v with the four chains at 1.5B: 15.2 against 16.1 us at batch 1, 15.5 against 16.9 at 8; at
# 7.2B level; 64 channels or 8 warps slower; lora-projection-h200.md)
PROJECTION_BLOCK_K = 256


def lora_triton(mixed: torch.Tensor, pack: LoraPack, *, block_c=None, down_block_c=None,
                up_block_r=None) -> list[torch.Tensor]:  # fmt: skip
    """Two launches; same arguments and result as lora_reference (up to the order of float32
    sums), any number of rows: more than 16 take lora_rows_triton. block_c overrides the up
    kernel's channel block, down_block_c the down kernel's step over C and up_block_r the up
    kernel's step over a chain's rows (tests use them to cover several blocks;
    benchmarks/bench_lora.py compares them)."""
    K, T, C = _check_mixed(mixed, pack, rows=None)
    if T > MAX_ROWS:
        return lora_rows_triton(mixed, pack, up_block_c=block_c, block_k=down_block_c, up_block_r=up_block_r)
    h = torch.empty(T, pack.down.shape[0], dtype=mixed.dtype, device=mixed.device)
    if T:
        _lora_down_kernel[(pack.block_codes.shape[0],)](
            mixed, pack.down, pack.block_codes, h, T, C, mixed.stride(0), mixed.stride(1), h.stride(0),
            BLOCK_T=MAX_ROWS, BLOCK_R=BLOCK_R, BLOCK_C=_down_block_c(C, down_block_c), IEEE=_ieee(mixed.dtype),
            num_warps=4, **pdl_args(mixed),
        )  # fmt: skip
    return lora_up_triton(h, pack, block_c=block_c, up_block_r=up_block_r)


def lora_up_triton(h: torch.Tensor, pack: LoraPack, *, block_c=None, up_block_r=None) -> list[torch.Tensor]:
    """The second launch of lora_triton: out_s = h_s U_s^T for every chain s, from h [T, R] (the
    activated downs, R the rows of the down stack) -> S tensors [T, C] in h's dtype."""
    return _lora_up(h, pack, MAX_ROWS, block_c or UP_BLOCK_C, up_block_r or UP_BLOCK_R)


def _lora_up(h: torch.Tensor, pack: LoraPack, block_t: int, block_c: int, block_r: int,
             num_warps: int = 4) -> list[torch.Tensor]:  # fmt: skip
    """The up kernel over token tiles of block_t rows: h [T, R] the activated downs."""
    T, C, S = h.shape[0], pack.up_t.shape[1], len(pack.mixes)
    out = torch.empty(S, T, C, dtype=h.dtype, device=h.device)
    if T:
        block_c = min(block_c, triton.next_power_of_2(C))
        tiles_c = triton.cdiv(C, block_c)
        _lora_up_kernel[(triton.cdiv(T, block_t) * tiles_c, S)](
            h, pack.up_t, pack.bounds, out, T, C, tiles_c, h.stride(0), out.stride(0), out.stride(1),
            BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_C=block_c, IEEE=_ieee(h.dtype), num_warps=num_warps, **pdl_args(h),
        )  # fmt: skip
    return list(out.unbind(0))


# launch configuration of lora_rows_triton (more than 16 rows)
ROWS_BLOCK_T = 64  # token rows per program of both kernels
ROWS_BLOCK_R = 32  # rows of a chain per down program
ROWS_BLOCK_K = 128  # the down kernel's step over C
ROWS_SPLIT_K = 512  # channels per split of C in the down kernel, while the tiles alone leave SMs idle
ROWS_UP_BLOCK_C = 128  # output channels per up program
ROWS_UP_BLOCK_R = 32  # the up kernel's step over a chain's rows


def rows_splits(T: int, C: int, pack: LoraPack, device: torch.device, block_t: int, block_r: int,
                split_k: int) -> int:  # fmt: skip
    """How many splits of C the down kernel takes for T rows: enough for about two programs per
    SM, at most one per split_k channels."""
    programs = triton.cdiv(T, block_t) * sum(triton.cdiv(_padded(r), block_r) for r in pack.ranks)
    return max(1, min(triton.cdiv(C, split_k), triton.cdiv(2 * _num_sms(device), programs)))


def lora_rows_triton(mixed: torch.Tensor, pack: LoraPack, *, block_t=None, block_r=None, block_k=None,
                     splits=None, up_block_t=None, up_block_c=None, up_block_r=None,
                     num_warps=4) -> list[torch.Tensor]:  # fmt: skip
    """The chains of any number of rows in two launches of token tiles (module docstring); same
    arguments and result as lora_reference (up to the order of float32 sums). The keywords
    override the launch configuration (ROWS_*; splits: of C in the down kernel, None picks by
    rows_splits). A split C needs the zeroed counts of ops/gemv.py; while a CUDA graph is being
    captured and none are ready, C is not split."""
    K, T, C = _check_mixed(mixed, pack, rows=None)
    block_t, block_r = block_t or ROWS_BLOCK_T, block_r or ROWS_BLOCK_R
    block_k = min(block_k or ROWS_BLOCK_K, max(16, triton.next_power_of_2(C)))
    if splits is None:
        splits = rows_splits(T, C, pack, mixed.device, block_t, block_r, ROWS_SPLIT_K)
    split_k = triton.cdiv(triton.cdiv(C, splits), block_k) * block_k  # whole steps of block_k
    splits = triton.cdiv(C, split_k)
    R, S = pack.down.shape[0], len(pack.mixes)
    tiles_r = max(triton.cdiv(_padded(r), block_r) for r in pack.ranks)
    grid = (triton.cdiv(T, block_t) * splits, tiles_r, S)
    counters = _split_counters(mixed.device, grid[0] // splits * tiles_r * S) if splits > 1 and T else None
    if counters is None:  # unsplit (or no counts to be had during a capture)
        splits, split_k = 1, C
        grid = (triton.cdiv(T, block_t), tiles_r, S)
    h = torch.empty(T, R, dtype=mixed.dtype, device=mixed.device)
    part = torch.empty(splits, T, R, dtype=torch.float32, device=mixed.device) if splits > 1 else h
    if T:
        _lora_down_rows_kernel[grid](
            mixed, pack.down, pack.bounds, pack.chain_codes, part, h, counters if counters is not None else h, T, C,
            split_k, mixed.stride(0), mixed.stride(1), part.stride(0), h.stride(0),
            BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_K=block_k, SPLIT=splits, IEEE=_ieee(mixed.dtype), num_warps=num_warps,
        )  # fmt: skip
    return _lora_up(h, pack, up_block_t or block_t, up_block_c or ROWS_UP_BLOCK_C, up_block_r or ROWS_UP_BLOCK_R,
                    num_warps)


def lora_down_with_projection(mixed: torch.Tensor, weight: torch.Tensor, pack: LoraPack, *, block_n=None,
                              block_k=None, num_warps=4,
                              num_stages=3) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One launch for the LoRA downs and a grouped projection of the first G mixes: out[g] =
    mixed[g] weight[g]^T (weight [G, N, C] of F.linear weights, the time mix's r, k, v) and
    h = the activated downs of every chain of pack, [T, R] with R the rows of the down stack, as
    lora_triton's first launch writes them. Returns (out [G, T, N], h); at most 16 rows. The
    projection's tiles are gemv_triton's, K unsplit; the other arguments override the launch
    configuration (tests and benchmarks)."""
    K, T, C = _check_mixed(mixed, pack)
    if weight.dim() != 3 or weight.shape[0] > K or weight.shape[2] != C or weight.dtype != mixed.dtype:
        raise ValueError(f"weight must be [G <= {K}, N, {C}] in {mixed.dtype}, got {list(weight.shape)} in {weight.dtype}")
    if 1 not in weight.stride()[1:]:
        raise ValueError("weight needs unit stride along N or C")
    G, N = weight.shape[0], weight.shape[1]
    out = torch.empty(G, T, N, dtype=mixed.dtype, device=mixed.device)
    h = torch.empty(T, pack.down.shape[0], dtype=mixed.dtype, device=mixed.device)
    if T == 0:
        return out, h
    cfg = tiles(G, N, C, mixed.device, block_n, block_k or min(PROJECTION_BLOCK_K, triton.next_power_of_2(C)), 1)
    num_down, tiles_n = pack.block_codes.shape[0], triton.cdiv(N, cfg["block_n"])
    _projection_lora_down_kernel[(num_down + G * tiles_n,)](
        mixed, weight, out, pack.down, pack.block_codes, h, T, N, C, num_down, tiles_n,
        mixed.stride(0), mixed.stride(1), weight.stride(0), weight.stride(1), weight.stride(2),
        out.stride(0), out.stride(1), h.stride(0),
        BLOCK_T=MAX_ROWS, BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], BLOCK_R=BLOCK_R, IEEE=_ieee(mixed.dtype),
        num_warps=num_warps, num_stages=num_stages, **pdl_args(mixed),
    )  # fmt: skip
    return out, h


def _check_mixed(mixed: torch.Tensor, pack: LoraPack, rows: int | None = MAX_ROWS) -> tuple[int, int, int]:
    """The mixes [K, T, C] the Triton paths take: at most `rows` rows (None: any), every chain's mix present."""
    K, T, C = mixed.shape
    if rows is not None and T > rows:
        raise ValueError(f"the Triton LoRA kernels take at most {rows} rows here, got {T}")
    if pack.down.shape[1] != C or mixed.stride(2) != 1 or max(pack.mixes) >= K:
        raise ValueError(f"mixed must be [K > {max(pack.mixes)}, T, {pack.down.shape[1]}] with unit channel stride, "
                         f"got {list(mixed.shape)}")  # fmt: skip
    return K, T, C


def _down_block_c(C: int, wanted: int | None) -> int:
    return max(16, min(wanted or DOWN_BLOCK_C, triton.next_power_of_2(C)))


def _ieee(dtype: torch.dtype) -> bool:
    """Full float32 products in tl.dot (_dot): float32 inputs, and bf16 ones in the interpreter."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and is_interpreting())


def lora_bmm(mixed: torch.Tensor, pack: LoraPack) -> list[torch.Tensor]:
    """Same arguments and result as lora_reference, any number of rows: per group of chains one
    batched GEMM for the downs, the activations in place, one batched GEMM for the ups."""
    outs: list[torch.Tensor] = []
    for g, (first, count, _) in enumerate(pack.groups):
        gather = pack.gathers[g]
        if gather is None:  # consecutive mixes: a view, no gather
            x = mixed[pack.mixes[first] : pack.mixes[first] + count]
        else:
            x = mixed.index_select(0, gather)
        h = torch.bmm(x, pack.group_rows(pack.down, g).transpose(1, 2))  # [count, T, rank]
        for i in range(count):
            act = pack.activations[first + i]
            if act != "none":
                getattr(h[i], f"{act}_")()  # tanh_ / sigmoid_, in place
        outs += torch.bmm(h, pack.group_rows(pack.up_t, g)).unbind(0)
    return outs


_BACKENDS: dict[str, Callable[..., list[torch.Tensor]]] = {"torch": lora_reference, "triton": lora_triton,
                                                           "bmm": lora_bmm}  # fmt: skip


def lora(mixed: torch.Tensor, pack: LoraPack, backend=None) -> list[torch.Tensor]:
    """mixed [K, T, C] -> S tensors [T, C]: every chain of `pack`, in its order. backend: None
    picks, for CUDA tensors, "triton" for at most 16 rows (decode of 1-16 sequences) when triton
    imports and "bmm" for more, else "torch"; "torch", "triton" (any number of rows) and "bmm"
    force one."""
    if backend is None and mixed.is_cuda and (mixed.shape[1] > MAX_ROWS or not HAS_TRITON):
        backend = "bmm"
    return _BACKENDS[pick_backend(backend, mixed, tuple(_BACKENDS), native=("torch", "bmm"))](mixed, pack)
