"""Shapes and offsets of one sequence's RWKV-7 state.

Within one layer the state is laid out as

    [ att_shift (C) | wkv (H * N * N = N * C) | ffn_shift (C) ]   ->   (N + 2) * C elements

and wkv is row-major [H, N(value i), N(key j)], the canonical orientation.
Both pool layouts use this per-layer block; they differ in where the blocks live.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StateLayout:
    n_layer: int
    n_embd: int
    head_size: int

    def __post_init__(self):
        if min(self.n_layer, self.n_embd, self.head_size) <= 0:
            raise ValueError(f"StateLayout sizes must be positive: {self}")
        if self.n_embd % self.head_size:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of head_size {self.head_size}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @property
    def layer_numel(self) -> int:
        return (self.head_size + 2) * self.n_embd

    @property
    def slot_numel(self) -> int:
        return self.n_layer * self.layer_numel

    # offsets inside one layer block
    @property
    def wkv_offset(self) -> int:
        return self.n_embd

    @property
    def ffn_offset(self) -> int:
        return (self.head_size + 1) * self.n_embd

    def slot_nbytes(self, dtype: torch.dtype) -> int:
        return self.slot_numel * torch.empty((), dtype=dtype).element_size()

    def split_layer(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views (att_shift [.., C], wkv [.., H, N, N], ffn_shift [.., C]) of layer blocks [.., (N+2)*C]."""
        C, H, N = self.n_embd, self.n_head, self.head_size
        lead = block.shape[:-1]
        att = block[..., :C]
        wkv = block[..., C : (N + 1) * C].unflatten(-1, (H, N, N))
        ffn = block[..., (N + 1) * C :]
        assert wkv.shape == (*lead, H, N, N)
        return att, wkv, ffn
