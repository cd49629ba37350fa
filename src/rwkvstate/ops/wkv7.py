"""The WKV-7 recurrence over a packed batch, on the pool's state in place.

Per token and head, with state S [N(value), N(key)] in float32:
    S = S * w[None, :] + (S @ a)[:, None] * b[None, :] + v[:, None] * k[None, :]
    y = S @ r
RWKV-7 calls it with a = -kk and b = kk * in_context_lr (see ops/README.md).
"""

from __future__ import annotations

import torch


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


def wkv7(state, packed, r, w, k, v, a, b):
    return wkv7_reference(state, packed, r, w, k, v, a, b)
