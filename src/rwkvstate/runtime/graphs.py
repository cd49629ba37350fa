"""DecodeGraphs: decode steps through captured CUDA graphs (eager where graphs cannot run).

A decode step of B sequences is padded to the next captured batch size; padding rows
feed token 0 into the pool's scratch slot, so they can never touch a live session.
The slot indices and tokens live in static device tensors that every graph reads, so
a replay is: copy B slots and tokens in, replay, read B rows of logits out. Graphs
are captured largest first and share one memory pool; sampling stays outside.
The contiguous pool pays here: its addresses never change, so a graph captured
once serves every later step.
"""

from __future__ import annotations

import gc
import weakref
from typing import Sequence

import torch

from ..tokenizer import check_token_ids
from .transfer import to_device

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STREAM_DRAWS = 64  # torch's stream pool hands out 32 streams per device and priority, in turn


class GraphStreamError(RuntimeError):
    """Every stream of torch's pool is the capture stream of a live DecodeGraphs."""


# Every DecodeGraphs captures its graphs on a stream that no other live DecodeGraphs captured on.
# torch keeps one cuBLAS workspace per stream, and a graph that calls cuBLAS holds that
# workspace's address; torch versions that free a stream's workspace when any graph captured on
# it is destroyed (pytorch/pytorch#193402) would let one engine's dropped graphs free the
# workspace another engine's graphs still write, if both captured on one stream (torch's default
# capture stream, or a pool stream handed out again). Not seen with torch 2.11 on an H200
# (docs/benchmarks/decode.md), kept as a guard. All graphs of one DecodeGraphs share its stream
# and are destroyed together.
_live: weakref.WeakSet[DecodeGraphs] = weakref.WeakSet()


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """A stream of torch's pool that no live DecodeGraphs captures on, nor torch's default
    capture stream (used by torch.cuda.graph without a stream). DecodeGraphs that are unreachable
    but not yet collected still hold theirs: the pool is searched again after a collection."""
    for _ in range(2):
        taken = {g.stream.cuda_stream for g in list(_live) if g.stream is not None}
        default = getattr(torch.cuda.graph, "default_capture_stream", None)
        if default is not None:
            taken.add(default.cuda_stream)
        for _ in range(STREAM_DRAWS):
            stream = torch.cuda.Stream(device)
            if stream.cuda_stream not in taken:
                return stream
        gc.collect()
    raise GraphStreamError(f"every stream of torch's pool on {device} is the capture stream of a live DecodeGraphs "
                           f"({len(_live)} live); drop engines no longer used, or run with enforce_eager")  # fmt: skip


class DecodeGraphs:
    def __init__(self, model, pool, max_batch: int = 256, enforce_eager: bool = False, batch_sizes=None):
        self.model = model
        self.pool = pool
        self.device = model.device
        sizes = batch_sizes or DEFAULT_BATCH_SIZES
        # the largest batch gets a graph of its own size: with 6 slots (or 100) the steps of 5-6
        # (65-100) streams replay a graph too, instead of running eagerly
        self.batch_sizes = sorted({b for b in sizes if b < max_batch} | {max_batch})
        self.max_batch = self.batch_sizes[-1]
        self.use_graphs = not enforce_eager and self.device.type == "cuda"
        self._slots = torch.full((self.max_batch,), pool.scratch_slot, dtype=torch.int64, device=self.device)
        self._tokens = torch.zeros(self.max_batch, dtype=torch.int64, device=self.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.stream: torch.cuda.Stream | None = None  # the warm-up's and every capture's (capture_stream)
        self._captured = False
        self.replays = 0
        self.eager_steps = 0

    def capture(self) -> None:
        """Captures one graph per batch size, largest first, sharing one memory pool.

        The captured step runs once per size beforehand (kernel compilation and warm-up
        allocations stay out of the graph); it writes only the scratch slot."""
        if not self.use_graphs or self._captured:
            return
        self._slots.fill_(self.pool.scratch_slot)
        self._tokens.zero_()
        self.stream = stream = capture_stream(self.device)
        _live.add(self)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for size in self.batch_sizes:
                self.model.decode_step(self.pool, self._slots[:size], self._tokens[:size])
        torch.cuda.current_stream(self.device).wait_stream(stream)
        mempool = torch.cuda.graph_pool_handle()
        for size in reversed(self.batch_sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool, stream=stream):
                out = self.model.decode_step(self.pool, self._slots[:size], self._tokens[:size])
            self._graphs[size] = (graph, out)
        torch.cuda.synchronize(self.device)
        self._captured = True

    def can_replay(self, batch: int) -> bool:
        """Whether a decode step of this many rows replays a captured graph."""
        # stochastic rounding draws a new seed per call, which a replayed graph would freeze
        return self.use_graphs and batch <= self.max_batch and self.model.state_rounding == "nearest"

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """float32 logits [B, vocab] after feeding tokens[i] into slots[i].

        With graphs the result is a view of the graph's output, valid until the next call."""
        B = len(slots)
        self.pool.check_slots(slots)  # the eager path writes through Model.forward, the graph below
        check_token_ids(tokens, self.model.config.vocab_size)
        if not self.can_replay(B):
            self.eager_steps += 1
            return self.model.forward(self.pool, slots, [[t] for t in tokens], output="last")
        host = torch.tensor([list(slots), list(tokens)], dtype=torch.int64)
        device = to_device(host, self.device)
        return self.replay(device[0], device[1], slots)

    def replay(self, slots: torch.Tensor, tokens: torch.Tensor, written: Sequence[int]) -> torch.Tensor:
        """The graph step from device tensors slots [B] and tokens [B] (int64; rows may point at the
        scratch slot), with no host synchronisation: the decode batch feeds the sampled ids in
        without copying them to the host first. `written`: the live slots among them (checked
        by the caller), whose write generations move."""
        B = slots.numel()
        if not self.use_graphs:  # the same step, run eagerly (graphs turned off, or not a GPU)
            self.pool.begin_write(written, check=False)
            self.eager_steps += 1
            return self.model.decode_step(self.pool, slots, tokens)
        if not self._captured:
            self.capture()
        size = next(s for s in self.batch_sizes if s >= B)
        self._slots[:B].copy_(slots)
        self._tokens[:B].copy_(tokens)
        self._slots[B:size].fill_(self.pool.scratch_slot)
        graph, out = self._graphs[size]
        self.pool.begin_write(written, check=False)
        graph.replay()
        self.replays += 1
        return out[:B]
