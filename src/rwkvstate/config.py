"""Configuration dataclasses: one per concern, validated on construction.

Names of dtypes and snapshot formats come from state/layout.py, below this module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from .state.layout import check_format, dtype_name, parse_dtype

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
    state_dtype: torch.dtype | str = torch.float32  # a name (fp16, ...) becomes the torch dtype
    layout: str = "contiguous"
    max_prefill_chunk: int = 1024  # tokens fed per forward; longer prompts are chunked
    max_prefill_tokens: int = 0  # prompt tokens per generation step, all streams together; 0: max_prefill_chunk
    # a prompt of at most this many tokens that arrives while other streams decode is read one
    # token per step inside the decode graph, so it never stalls them with an eager packed forward
    decode_prompt_tokens: int = 64
    enforce_eager: bool = False  # True: no CUDA graphs for decode
    max_decode_batch: int = 256  # largest captured decode batch; larger steps run eagerly
    # sessions beyond the pool's slots live on the host; None keeps them in the storage dtype (lossless)
    host_format: str | None = None
    cold_format: str | None = None  # host entries idle for cold_after_s are re-encoded into this format
    cold_after_s: float = 300.0
    # ring-buffer history for rollback/undo: a snapshot every history_every tokens, history_capacity per slot
    history_every: int = 64
    history_capacity: int | None = None  # None: 4 with the contiguous layout, 0 (off) with the fragmented one
    history_format: str | None = None  # None: the storage dtype
    history_marks: int = 2  # more ring entries per slot for the latest undo points (feed and reply starts)
    prefix_cache_bytes: int = 0  # byte budget of the prefix cache; 0 turns it off
    prefix_cache_every: int = 256  # prompts are cached at multiples of this many tokens and at their end
    prefix_cache_format: str | None = None  # None: the storage dtype

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
        if self.max_prefill_tokens == 0:
            self.max_prefill_tokens = self.max_prefill_chunk
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1 (0: max_prefill_chunk), got {self.max_prefill_tokens}")
        if self.decode_prompt_tokens < 0:
            raise ValueError(f"decode_prompt_tokens must be >= 0 (0: off), got {self.decode_prompt_tokens}")
        if self.history_capacity is None:
            self.history_capacity = 4 if self.layout == "contiguous" else 0
        self._check_lifecycle()

    # Typed views of fields the constructor resolved: a dtype name becomes a torch dtype, a
    # snapshot format left None becomes the storage dtype's name.
    @property
    def storage_dtype(self) -> torch.dtype:
        return cast(torch.dtype, self.state_dtype)

    @property
    def history_fmt(self) -> str:
        return cast(str, self.history_format)

    @property
    def prefix_cache_fmt(self) -> str:
        return cast(str, self.prefix_cache_format)

    def _check_lifecycle(self) -> None:
        for name in ("host_format", "cold_format", "history_format", "prefix_cache_format"):
            if getattr(self, name) is not None:
                check_format(getattr(self, name))
        self.history_format = self.history_format or dtype_name(self.storage_dtype)
        self.prefix_cache_format = self.prefix_cache_format or dtype_name(self.storage_dtype)
        for name in ("history_every", "prefix_cache_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("history_capacity", "history_marks", "prefix_cache_bytes", "cold_after_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        needs_contiguous = self.history_capacity or self.prefix_cache_bytes or self.host_format or self.cold_format
        if self.layout == "fragmented" and needs_contiguous:
            raise ValueError(
                "the fragmented layout is the seed design's baseline and runs without history, the prefix "
                "cache and encoded host formats; use the contiguous layout for them"
            )
