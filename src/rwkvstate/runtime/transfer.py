"""Host-to-device copies of the small per-step tensors (slot indices, tokens, sampling rows).

On a GPU the tensor is staged in pinned memory so the copy is asynchronous: the host goes on
building the step while the copy runs, and the stream orders it before the kernels that read
it. Elsewhere it is a plain copy (a no-op when the device is the CPU)."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A contiguous copy of host tensor t on `device`."""
    t = t.contiguous()
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
