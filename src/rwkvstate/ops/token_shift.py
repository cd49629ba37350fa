"""Token shift over a packed batch, reading and writing the pool's shift state in place.

For every row t of x [T, C] the previous row is x[t-1] within the same sequence;
the first token of a sequence reads the slot's stored shift vector instead. The
slot's shift vector is then replaced by the sequence's last row.
"""

from __future__ import annotations

import torch


def token_shift_reference(x: torch.Tensor, shift_state: torch.Tensor, packed) -> torch.Tensor:
    """x [T, C]; shift_state [S, C] (a view into the pool). Returns prev [T, C] in x's dtype."""
    prev = torch.empty_like(x)
    prev[1:] = x[:-1]
    prev[packed.first_rows] = shift_state.index_select(0, packed.live_slots).to(x.dtype)
    shift_state.index_copy_(0, packed.live_slots, x.index_select(0, packed.last_rows).to(shift_state.dtype))
    return prev


def token_shift(x: torch.Tensor, shift_state: torch.Tensor, packed) -> torch.Tensor:
    return token_shift_reference(x, shift_state, packed)
