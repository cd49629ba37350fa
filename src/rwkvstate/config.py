"""Configuration dataclasses: one per concern, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """Accepts a torch dtype or one of the names in DTYPES."""
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise ValueError(f"unsupported dtype {value}; use float32, float16 or bfloat16")
        return value
    key = str(value).lower()
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of fp32, fp16, bf16")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of an RWKV-7 model, all inferred from the checkpoint's tensors.

    Released models do not follow one formula for the LoRA ranks, so every rank
    is read from a tensor shape rather than computed from n_embd.
    """

    n_layer: int
    n_embd: int
    head_size: int
    vocab_size: int
    ffn_dim: int
    decay_rank: int  # att.w1: [C, decay_rank]
    aaa_rank: int  # att.a1: in-context learning rate
    mv_rank: int  # att.v1 (layers >= 1): value residual mix
    gate_rank: int  # att.g1
    tokenizer: str = "world"

    def __post_init__(self):
        for name in ("n_layer", "n_embd", "head_size", "vocab_size", "ffn_dim", "decay_rank", "aaa_rank", "gate_rank"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.head_size:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of head_size {self.head_size}")
        if self.tokenizer not in ("world", "bytes"):
            raise ValueError(f"unknown tokenizer kind {self.tokenizer!r}; use 'world' or 'bytes'")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


@dataclass
class EngineConfig:
    """How an Engine runs a model: pool size, state storage, batching limits."""

    num_slots: int = 8
    state_dtype: torch.dtype = torch.float32
    layout: str = "contiguous"
    max_prefill_chunk: int = 1024  # tokens fed per forward; longer prompts are chunked
    enforce_eager: bool = False  # True: no CUDA graphs for decode
    max_decode_batch: int = 256  # largest captured decode batch; larger steps run eagerly

    def __post_init__(self):
        if self.num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {self.num_slots}")
        self.state_dtype = parse_dtype(self.state_dtype)
        if self.layout not in ("contiguous", "fragmented"):
            raise ValueError(f"layout must be 'contiguous' or 'fragmented', got {self.layout!r}")
        if self.layout == "fragmented" and self.state_dtype != torch.float32:
            raise ValueError("the fragmented layout stores float32 only")
        if self.max_prefill_chunk < 1:
            raise ValueError(f"max_prefill_chunk must be >= 1, got {self.max_prefill_chunk}")
