"""Shared helpers for the Triton kernels in ops/. Triton is optional: without it every op runs
its torch reference, and asking for a Triton backend explicitly is an error that says why."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backends still work
    triton = tl = None

HAS_TRITON = triton is not None
_DEPENDENT_LAUNCHES: contextvars.ContextVar[str | None] = contextvars.ContextVar("rwkvstate_dependent_launches", default=None)


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


@contextlib.contextmanager
def dependent_launches(trigger: str | None = "end"):
    """Within it, the decode kernels that take `PDL` are launched as programmatic dependent
    launches (Hopper and later): the next kernel may be launched before the current one has
    finished, and waits in its first statement (griddepcontrol.wait) until the current one has
    finished and its writes are visible, so the launch latency between the two overlaps the first
    one's work. CUDA graphs capture the dependency. Each such kernel waits before touching memory,
    so the order of every read and write is the same as without it.
    trigger: when a kernel lets the next one launch: "start" (right after its wait: the next
    kernel's programs then wait on the SMs while this one runs), "end" (after its last store:
    only the tail overlaps), or None (plain launches)."""
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
    token = _DEPENDENT_LAUNCHES.set(trigger)
    try:
        yield
    finally:
        _DEPENDENT_LAUNCHES.reset(token)


TRIGGERS = (None, "start", "end")


@functools.lru_cache(maxsize=None)
def _supports_dependent_launch(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_args(tensor: torch.Tensor) -> dict:
    """Launch arguments of a kernel with a `PDL` constexpr (0: plain, 1: trigger at the start, 2: at
    the end): a dependent launch inside dependent_launches() for CUDA tensors on a GPU that has it,
    else a plain launch."""
    trigger = _DEPENDENT_LAUNCHES.get()
    if trigger is not None and HAS_GDC and tensor.is_cuda and not is_interpreting():
        if _supports_dependent_launch(tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()):
            return {"PDL": TRIGGERS.index(trigger), "launch_pdl": True}
    return {"PDL": 0}


try:  # Triton 3.3 and later
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # older Triton: plain launches only (pdl_args never asks for more)
    HAS_GDC = False

if HAS_TRITON and not HAS_GDC:

    @triton.jit
    def pdl_enter(PDL: tl.constexpr):
        """Without grid dependency control in this Triton: nothing (PDL is always 0)."""
        pass

    @triton.jit
    def pdl_exit(PDL: tl.constexpr):
        pass

elif HAS_TRITON:

    @triton.jit
    def pdl_enter(PDL: tl.constexpr):
        """First statement of a kernel launched with pdl_args: wait for the previous kernel (and
        its writes); with the trigger at the start, then let the next one launch."""
        if PDL > 0:
            gdc_wait()
        if PDL == 1:
            gdc_launch_dependents()

    @triton.jit
    def pdl_exit(PDL: tl.constexpr):
        """Last statement of such a kernel: with the trigger at the end, let the next one launch."""
        if PDL == 2:
            gdc_launch_dependents()
