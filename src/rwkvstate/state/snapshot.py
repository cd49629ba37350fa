"""Snapshot formats of one slot's state: a flat tensor of `layout.slot_numel` elements in the
pool's storage dtype (a contiguous pool slot [L, (N + 2) * C], flattened).

    fp32, fp16, bf16   a cast (one `copy_`, a single kernel on the GPU)
    int8, fp8          per-group symmetric quantisation (ops/quantize.py): 1 byte per element
                       plus one float16 scale per group of `group` contiguous elements

The default group is one head's row of N = head_size elements (a WKV row: one value index
across all keys; in the shift vectors one head's slice), which always tiles a layer block
[att_shift C | wkv H*N*N | ffn_shift C]. Measured against other groupings in
docs/benchmarks/snapshot-error.md.

An `Encoded` holds the buffers. `empty_encoded(..., count=n)` preallocates n entries in one
buffer (a ring); `enc[i]` is a view of entry i, and `encode(src, fmt, group, out=enc[i])`
writes straight into it without allocating (on the GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import StateError
from ..ops.quantize import dequantize_groups, fp8_supported, quantize_groups
from .layout import STORAGE_DTYPES, check_format

QUANTIZED_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_DTYPES = {**STORAGE_DTYPES, **QUANTIZED_DTYPES}


def is_quantized(fmt: str) -> bool:
    return check_format(fmt) in QUANTIZED_DTYPES


def default_group(layout) -> int:
    """One head's row: N = head_size elements (see the module docstring and the benchmark)."""
    return layout.head_size


def _check_group(fmt: str, numel: int, group: int) -> None:
    if not is_quantized(fmt):
        return
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or numel % group:
        raise StateError(f"{fmt} snapshots need a positive group size dividing {numel} elements, got {group!r}")


def encoded_nbytes(fmt: str, numel: int, group: int) -> int:
    """Bytes of one snapshot: data plus (quantised formats) one float16 scale per group."""
    _check_group(fmt, numel, group)
    size = numel * torch.empty((), dtype=_DTYPES[fmt]).element_size()
    return size + (numel // group * 2 if is_quantized(fmt) else 0)


@dataclass
class Encoded:
    """One snapshot (data 1-D [numel]) or a batch of them (data [count, numel]).
    scales: float16 [numel // group] (batched: [count, numel // group]) for int8/fp8, else None.
    group is the quantisation group size (carried but unused by the cast formats)."""

    fmt: str
    data: torch.Tensor
    scales: torch.Tensor | None
    group: int

    @property
    def numel(self) -> int:
        """Elements of one snapshot."""
        return self.data.shape[-1]

    @property
    def count(self) -> int | None:
        """Entries of a batch, None for a single snapshot."""
        return self.data.shape[0] if self.data.dim() == 2 else None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        size = self.data.numel() * self.data.element_size()
        return size + (0 if self.scales is None else self.scales.numel() * self.scales.element_size())

    def __getitem__(self, i: int) -> "Encoded":
        """Entry i of a batch: a view sharing the batch's memory."""
        if self.count is None:
            raise StateError("indexing needs a batched Encoded (empty_encoded(..., count=n))")
        scales = None if self.scales is None else self.scales[i]
        return Encoded(self.fmt, self.data[i], scales, self.group)

    def to(self, device, non_blocking: bool = False) -> "Encoded":
        """A copy on device; shares the tensors when they are there already (as Tensor.to)."""
        scales = None if self.scales is None else self.scales.to(device, non_blocking=non_blocking)
        return Encoded(self.fmt, self.data.to(device, non_blocking=non_blocking), scales, self.group)

    def clone(self) -> "Encoded":
        """A copy in new buffers on the same device."""
        scales = None if self.scales is None else self.scales.clone()
        return Encoded(self.fmt, self.data.clone(), scales, self.group)

    def copy_(self, other: "Encoded", non_blocking: bool = False) -> "Encoded":
        """Copies other into this snapshot's buffers (same format, group and shape; any device)."""
        same_group = self.scales is None or self.group == other.group
        if other.fmt != self.fmt or other.data.shape != self.data.shape or not same_group:
            raise StateError(f"cannot copy a {other.fmt} snapshot {list(other.data.shape)} (group {other.group}) "
                             f"into a {self.fmt} one {list(self.data.shape)} (group {self.group})")  # fmt: skip
        self.data.copy_(other.data, non_blocking=non_blocking)
        if self.scales is not None and other.scales is not None:  # both or neither: same format
            self.scales.copy_(other.scales, non_blocking=non_blocking)
        return self


def empty_encoded(fmt: str, numel: int, group: int, device, count: int | None = None) -> Encoded:
    """Uninitialised buffers for one snapshot, or with count=n for n of them in one allocation."""
    _check_group(fmt, numel, group)
    lead = () if count is None else (count,)
    data = torch.empty(*lead, numel, dtype=_DTYPES[fmt], device=device)
    scales = None
    if is_quantized(fmt):
        scales = torch.empty(*lead, numel // group, dtype=torch.float16, device=device)
    return Encoded(fmt, data, scales, group)


def _flat(t: torch.Tensor, name: str) -> torch.Tensor:
    if not t.is_contiguous() or t.dtype not in STORAGE_DTYPES.values():
        raise StateError(f"{name} must be a contiguous float32, float16 or bfloat16 tensor, "
                         f"got {t.dtype} {list(t.shape)} (contiguous: {t.is_contiguous()})")  # fmt: skip
    return t.view(-1)


def _check_fp8(fmt: str, device: torch.device) -> None:
    if fmt == "fp8" and not fp8_supported(device):
        raise StateError(f"fp8 snapshots are not supported on {device} "
                         "(CUDA needs compute capability 8.9 or newer and triton)")  # fmt: skip


def _check_target(enc: Encoded, fmt: str, numel: int, group: int, device: torch.device) -> None:
    if enc.count is not None:
        raise StateError("encode/decode take one snapshot; index a batch first (enc[i])")
    if enc.fmt != fmt or enc.numel != numel or enc.device != device or (is_quantized(fmt) and enc.group != group):
        raise StateError(f"snapshot buffer is {enc.fmt} x {enc.numel} (group {enc.group}) on {enc.device}, "
                         f"needed {fmt} x {numel} (group {group}) on {device}")  # fmt: skip


def encode(src: torch.Tensor, fmt: str, group: int, out: Encoded | None = None, backend=None) -> Encoded:
    """Snapshot of src (a contiguous slot view in the storage dtype, flattened) in format fmt,
    written into out when given (e.g. an entry of a preallocated batch)."""
    check_format(fmt)
    flat = _flat(src, "the state to encode")
    _check_group(fmt, flat.numel(), group)
    _check_fp8(fmt, flat.device)
    if out is None:
        out = empty_encoded(fmt, flat.numel(), group, flat.device)
    _check_target(out, fmt, flat.numel(), group, flat.device)
    if is_quantized(fmt):
        quantize_groups(flat, group, fmt, out_q=out.data, out_scales=out.scales, backend=backend)
    else:
        out.data.copy_(flat)
    return out


def decode(enc: Encoded, out: torch.Tensor, backend=None) -> torch.Tensor:
    """Writes the snapshot into out (the destination slot view in the storage dtype) in place."""
    flat = _flat(out, "the decode destination")
    _check_target(enc, check_format(enc.fmt), flat.numel(), enc.group, flat.device)
    _check_fp8(enc.fmt, flat.device)
    if is_quantized(enc.fmt):
        dequantize_groups(enc.data, enc.scales, enc.group, flat, backend=backend)
    else:
        flat.copy_(enc.data)
    return out
