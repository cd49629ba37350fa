"""Warming the GPU's L2 cache with weights that a later kernel of the same step will read.

At decode batch 1 a layer alternates between projections that stream their weights from memory
(bandwidth-bound) and small kernels that move a few kilobytes (latency-bound: norms, the time
mix's prologue, WKV and epilogue). While the small kernels run, memory bandwidth is idle. A
prefetch launched on a second stream during that time reads the first bytes of the weights that
the next projections need, so those projections find them in L2 (ops/README.md).

    l2_prefetch(tensors, max_bytes, sink)

reads the first max_bytes of the tensors, in order, with an evict-last hint, and writes one
int32 per program into `sink` (the largest 32-bit word it read: something the compiler cannot
drop, and a checksum the tests compare). A prefetch changes no result; it only moves when bytes
come from memory. It applies to tensors whose storage is one dense block (contiguous, or the
transposed view of a contiguous matrix, as the feed-forward's value weights are).
"""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON, pick_backend, tl, triton

MAX_TENSORS = 3  # tensors per launch
BLOCK = 4096  # 32-bit words per load of one program (16 KB: 32 per thread at 4 warps)
PROGRAMS_PER_SM = 2  # enough 16 KB loads in flight to keep the memory busy, few warps per SM


if HAS_TRITON:

    @triton.jit
    def _read_words(p, n, i_p, P, BLOCK: tl.constexpr):
        """The largest word of program i_p's share of n words at p (shares are whole BLOCKs)."""
        per = tl.cdiv(tl.cdiv(n, BLOCK), P) * BLOCK
        start = i_p * per
        b_max = tl.full([BLOCK], -2147483648, tl.int32)
        for off in range(start, tl.minimum(start + per, n), BLOCK):
            o = off + tl.arange(0, BLOCK)
            b_w = tl.load(p + o, mask=o < n, other=-2147483648, eviction_policy="evict_last")
            b_max = tl.maximum(b_max, b_w)
        return tl.max(b_max, axis=0)

    @triton.jit
    def _prefetch_kernel(p0, n0, p1, n1, p2, n2, sink, BLOCK: tl.constexpr):
        """Grid (P, tensors): program (i_p, i) reads the i_p-th of P shares of tensor i's words."""
        i_p, i_t, P = tl.program_id(0), tl.program_id(1), tl.num_programs(0)
        if i_t == 0:
            m = _read_words(p0, n0, i_p, P, BLOCK)
        elif i_t == 1:
            m = _read_words(p1, n1, i_p, P, BLOCK)
        else:
            m = _read_words(p2, n2, i_p, P, BLOCK)
        tl.store(sink + i_t * P + i_p, m)


def dense_words(t: torch.Tensor) -> torch.Tensor:
    """The int32 words of a tensor whose storage is one dense block (contiguous, or a transposed
    matrix of a contiguous one), in storage order."""
    if not t.is_contiguous():
        if t.dim() == 2 and t.t().is_contiguous():
            t = t.t()
        else:
            raise ValueError(f"l2_prefetch needs a dense tensor (or a transposed dense matrix), got strides {t.stride()}")
    flat = t.reshape(-1).view(torch.uint8)
    if flat.numel() % 4 or flat.data_ptr() % 16:
        raise ValueError("l2_prefetch needs tensors of whole, 16-byte aligned 32-bit words")
    return flat.view(torch.int32)


def prefetch_plan(tensors, max_bytes: int) -> list[torch.Tensor]:
    """The word prefixes that l2_prefetch reads: the tensors in order until max_bytes are covered."""
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"l2_prefetch takes at most {MAX_TENSORS} tensors, got {len(tensors)}")
    words, left = [], max(0, int(max_bytes)) // 4
    for t in tensors:
        w = dense_words(t)
        take = min(left, w.numel())
        if take:
            words.append(w[:take])
        left -= take
    return words


def sink_size(device: torch.device | str) -> int:
    """int32 entries the sink of l2_prefetch needs on this device (one per program)."""
    return MAX_TENSORS * _programs(torch.device(device))


def _programs(device: torch.device) -> int:
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return PROGRAMS_PER_SM * sms


def l2_prefetch(tensors, max_bytes: int, sink: torch.Tensor) -> None:
    """Reads the first max_bytes of `tensors` (up to three, in order) into L2 in one launch; sink: an
    int32 tensor of at least sink_size() entries on their device, overwritten (per program, the
    largest word it read). Nothing to read: nothing is launched."""
    words = prefetch_plan(tensors, max_bytes)
    if not words:
        return
    pick_backend("triton", words[0])  # a clear error without Triton, or for CPU tensors outside the interpreter
    P = _programs(words[0].device)
    if sink.dtype != torch.int32 or sink.numel() < MAX_TENSORS * P or sink.device != words[0].device:
        raise ValueError(f"sink must be an int32 tensor of at least {MAX_TENSORS * P} entries on {words[0].device}")
    args = []
    for i in range(MAX_TENSORS):
        w = words[i] if i < len(words) else words[0][:0]
        args += [w, w.numel()]
    _prefetch_kernel[(P, len(words))](*args, sink, BLOCK=BLOCK, num_warps=4)
