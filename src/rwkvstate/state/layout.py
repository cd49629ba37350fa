"""The state's vocabulary, in one place: shapes and offsets of one sequence's RWKV-7 state,
the canonical keys, and the names of storage dtypes and snapshot formats.

Within one layer the state is laid out as

    [ att_shift (C) | wkv (H * N * N = N * C) | ffn_shift (C) ]   ->   (N + 2) * C elements

and wkv is row-major [H, N(value i), N(key j)], the canonical orientation.
Both pool layouts use this per-layer block; they differ in where the blocks live.
The canonical state (export/import, files) is `{key: float32 tensor of state_shapes(...)[key]}`.

Everything above `state/` (config, model, runtime, the CLI) takes these names from here; this
module imports nothing of rwkvstate but the errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import StateError

CANONICAL_KEYS = ("att_shift", "wkv", "ffn_shift")

# storage dtypes of a state (pool, snapshots, files) by their short names
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
# snapshot formats (state/snapshot.py): the storage dtypes as casts, plus two quantised ones
SNAPSHOT_FORMATS = ("fp32", "fp16", "bf16", "int8", "fp8")
# The largest magnitude a state element may have wherever a state comes in from outside (files,
# state-tuning files, load_state): finite values beyond it are refused as damaged. Real states
# stay far below it (the bundled model's largest element over 4,096-token documents is under
# 400, docs/state-precision.md); at or under it, the squares and sums of squares the forward
# forms over a head (group norm over N values of S @ r) stay finite in float32, while a
# wkv of 1e30 turns every later token's logits into NaN.
MAX_STATE_ABS = float(2**20)
# safetensors' dtype names, used where a name must not depend on torch's repr (file checksums)
SAFETENSORS_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
                           torch.int8: "I8"}  # fmt: skip


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """A storage dtype from a torch dtype or a name (fp32, fp16, bf16, float32, float16, bfloat16)."""
    if isinstance(value, torch.dtype):
        if value not in STORAGE_DTYPES.values():
            raise ValueError(f"unsupported dtype {value}; use float32, float16 or bfloat16")
        return value
    key = str(value).lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in STORAGE_DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of fp32, fp16, bf16")
    return STORAGE_DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name (fp32, fp16, bf16) of a storage dtype."""
    for name, candidate in STORAGE_DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")


def check_format(name: str) -> str:
    """name, if it is a snapshot format; else a StateError listing them."""
    if name not in SNAPSHOT_FORMATS:
        raise StateError(f"unknown snapshot format {name!r}; expected one of {', '.join(SNAPSHOT_FORMATS)}")
    return name


def state_dims(n_layer: int, n_embd: int, head_size: int) -> tuple[int, int, int, int]:
    """(L, H, N, C) of a state, rejecting sizes no RWKV-7 model can have."""
    if n_layer < 1 or n_embd < 1 or head_size < 1:
        raise StateError(f"sizes must be positive: n_layer={n_layer}, n_embd={n_embd}, head_size={head_size}")
    if n_embd % head_size:
        raise StateError(f"n_embd={n_embd} is not a multiple of head_size={head_size}")
    return n_layer, n_embd // head_size, head_size, n_embd


def state_shapes(n_layer: int, n_embd: int, head_size: int) -> dict[str, tuple[int, ...]]:
    """The canonical state's tensor shapes: att_shift [L, C], wkv [L, H, N, N], ffn_shift [L, C]."""
    L, H, N, C = state_dims(n_layer, n_embd, head_size)
    return {"att_shift": (L, C), "wkv": (L, H, N, N), "ffn_shift": (L, C)}


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
