"""Shared helpers for the Triton kernels in ops/. Triton is optional: without it every op runs
its torch reference, and asking for a Triton backend explicitly is an error that says why."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backends still work
    triton = tl = None

HAS_TRITON = triton is not None


def is_interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter. Triton reads it when a kernel
    is decorated, i.e. when its module is imported, so it must be set before importing rwkvstate."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def pick_backend(backend: str | None, tensor: torch.Tensor, allowed=("torch", "triton"), native=("torch",)) -> str:
    """None picks "triton" for CUDA tensors when triton imports, else "torch"; names are checked.
    `native`: the allowed names that are torch code (any device, no Triton); the others are kernels."""
    if backend is None:
        return "triton" if tensor.is_cuda and HAS_TRITON else "torch"
    if backend not in allowed:
        raise ValueError(f"unknown backend {backend!r}; expected None or one of {', '.join(map(repr, allowed))}")
    if backend not in native:
        if not HAS_TRITON:
            raise RuntimeError(f"backend {backend!r} needs the triton package, which is not installed")
        if not tensor.is_cuda and not is_interpreting():
            raise ValueError(f"backend {backend!r} runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1)")
    return backend
