"""Sampling: penalties, temperature, top-k, top-p, vectorised over a batch of rows.

Reproducibility: every generation owns a CPU torch.Generator seeded from its
SamplingParams.seed and draws exactly one uniform number per token. The token is
picked by inverse CDF over the filtered distribution, so a row's result depends
only on its own logits, parameters and generator, never on which other rows
share the batch.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class SamplingParams:
    """temperature 0 means greedy. top_k 0 and top_p 1 switch those filters off.

    Penalties apply to the tokens generated so far in the current generate() call:
    repetition_penalty (> 0; 1 = off) divides positive logits and multiplies
    negative ones of seen tokens; presence_penalty subtracts a constant from seen
    tokens, frequency_penalty subtracts per occurrence (OpenAI's definitions).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)  # stop strings, not included in the output
    stop_token_ids: Sequence[int] | None = None  # None: the tokenizer's end-of-text id

    def __post_init__(self):
        checks = (
            (self.temperature >= 0 and math.isfinite(self.temperature), "temperature must be finite and >= 0"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty), "repetition_penalty must be > 0"),
            (math.isfinite(self.presence_penalty), "presence_penalty must be finite"),
            (math.isfinite(self.frequency_penalty), "frequency_penalty must be finite"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {message}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("SamplingParams: stop strings must be non-empty strings")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def make_generator(self) -> random.Random:
        """The stream's own uniform source (one draw per sampled token): seeded, it makes the
        stream's tokens independent of whatever else is in the batch. A Python RNG: one draw is
        ~0.1 us, against several for a torch generator and .item()."""
        return random.Random(self.seed)  # None: seeded from the OS


def apply_penalties(logits: torch.Tensor, params: SamplingParams, counts: Counter) -> None:
    """In place on one row [V]: repetition, presence and frequency penalties."""
    if not counts or not params.has_penalties():
        return
    ids = torch.tensor(list(counts.keys()), device=logits.device)
    freq = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
    seen = logits[ids]
    if params.repetition_penalty != 1:
        seen = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
    seen = seen - params.presence_penalty - params.frequency_penalty * freq
    logits[ids] = seen


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], uniforms: Sequence[float]) -> list[int]:
    """logits [B, V] float32 (penalties already applied); one uniform in [0, 1) per row."""
    B, V = logits.shape
    device = logits.device
    # one host-to-device copy for the four per-row parameters (top_k is exact in float32: V < 2^24)
    rows = [[p.temperature for p in params], [p.top_k if 0 < p.top_k < V else V for p in params],
            [p.top_p for p in params], list(uniforms)]  # fmt: skip
    temperature, top_k, top_p, u = torch.tensor(rows, dtype=torch.float32).to(device, non_blocking=True)
    greedy = temperature == 0

    scaled = logits / torch.where(greedy, 1.0, temperature).unsqueeze(1)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly above each candidate
    probs = probs.masked_fill((before >= top_p.unsqueeze(1)) & (ranks > 0), 0.0)
    cdf = probs.cumsum(dim=-1)
    target = u * cdf[:, -1]
    pick = torch.searchsorted(cdf, target.unsqueeze(1), right=True).clamp_(max=V - 1)
    pick = torch.minimum(pick, (probs > 0).sum(-1, keepdim=True) - 1)  # rounding must not pick a masked tail
    sampled = order.gather(1, pick).squeeze(1)
    chosen = torch.where(greedy, logits.argmax(dim=-1), sampled)
    return chosen.tolist()
