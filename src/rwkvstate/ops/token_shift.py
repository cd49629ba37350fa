"""Token shift and mixing over a packed batch, reading and writing the pool's shift state in place.

For every row t of x [T, C] the previous row is x[t-1] within the same sequence;
the first token of a sequence reads the slot's stored shift vector instead. The
slot's shift vector is then replaced by the sequence's last row. The mixes are

    out[m, t] = x[t] + (prev[t] - x[t]) * mix[m]        m = 0 .. K-1

(K = 6 for the time mix: r, w, k, v, a, g; K = 1 for the channel mix).
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


def token_shift_mix_reference(x: torch.Tensor, shift_state: torch.Tensor, packed, mix: torch.Tensor) -> torch.Tensor:
    """x [T, C], mix [K, C]. Returns [K, T, C] in x's dtype and updates shift_state."""
    delta = token_shift_reference(x, shift_state, packed) - x
    return torch.addcmul(x.unsqueeze(0), delta.unsqueeze(0), mix.unsqueeze(1))


def token_shift_mix(x: torch.Tensor, shift_state: torch.Tensor, packed, mix: torch.Tensor) -> torch.Tensor:
    return token_shift_mix_reference(x, shift_state, packed, mix)
