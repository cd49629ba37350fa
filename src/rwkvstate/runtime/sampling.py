"""Sampling parameters, per-slot token counts on the device, and the batched sampling call.

The math and the kernel live in ops/sampling.py (temperature, top-k, top-p, min-p, penalties and
logit bias without sorting the vocabulary). Here: the parameter ranges that keep every value
finite in float32, the counts the penalties read, and one call per step that copies the
parameters to the device once and the sampled ids back once.

Reproducibility: a stream's uniforms are Philox of (seed, position in the stream, round), so a
seeded stream's tokens depend only on its own logits and parameters, never on which other rows
share the batch. A stream without a seed gets a random 64-bit seed when it is created.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ..ops import sampling as ops
from .transfer import to_device

# Ranges chosen so no parameter can overflow float32 on its own: z = x / temperature grows at
# most 1000-fold, a repetition penalty at most 100-fold, and presence + frequency * count stays
# below 1e12 for any count below 2^32. Logits that still overflow (|x| > 3e35) fail their row only.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
MIN_REPETITION, MAX_REPETITION = 1e-2, 100.0
MAX_ADDITIVE_PENALTY = 100.0  # |presence_penalty| and |frequency_penalty|
MAX_LOGIT_BIAS = 100.0  # |bias| per token, as OpenAI's API
MAX_LOGIT_BIAS_ENTRIES = 1024
SEED_MASK = (1 << 64) - 1


@dataclass
class SamplingParams:
    """temperature 0 means greedy, else it lies in [1e-3, 100]. top_k 0, top_p 1 and min_p 0
    switch those filters off; top_k 1 is greedy too. The filters act jointly on the
    temperature-scaled distribution: a token is kept if fewer than top_k tokens are more likely,
    the tokens more likely than it hold less than top_p of the mass, and its probability is at
    least min_p times the largest (ties at a boundary are kept).

    Penalties apply to the tokens generated so far in the current generate() call:
    repetition_penalty (in [0.01, 100]; 1 = off) divides positive logits and multiplies
    negative ones of seen tokens; presence_penalty subtracts a constant from seen tokens,
    frequency_penalty subtracts per occurrence (OpenAI's definitions; each in [-100, 100]).
    logit_bias maps token ids to values in [-100, 100] added to their logits (before the
    penalties and the temperature). seed: any integer (taken modulo 2^64); None draws one.
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
    min_p: float = 0.0
    logit_bias: Mapping[int, float] | None = None

    def __post_init__(self):
        for ok, message in self._checks():
            if not ok:
                raise ValueError(f"SamplingParams: {message}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("SamplingParams: stop strings must be non-empty strings")
        self.logit_bias = self._checked_bias(self.logit_bias)

    def _checks(self):
        t, rep = self.temperature, self.repetition_penalty
        return (
            (_is_real(t) and (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE),
             f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {t!r}"),
            (_is_int(self.top_k) and 0 <= self.top_k < 2**31, f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}"),
            (_is_real(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}"),
            (_is_real(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}"),
            (_is_real(rep) and MIN_REPETITION <= rep <= MAX_REPETITION,
             f"repetition_penalty must be in [{MIN_REPETITION:g}, {MAX_REPETITION:g}] (1 = off), got {rep!r}"),
            (_is_real(self.presence_penalty) and abs(self.presence_penalty) <= MAX_ADDITIVE_PENALTY,
             f"presence_penalty must be in [-{MAX_ADDITIVE_PENALTY:g}, {MAX_ADDITIVE_PENALTY:g}], got {self.presence_penalty!r}"),
            (_is_real(self.frequency_penalty) and abs(self.frequency_penalty) <= MAX_ADDITIVE_PENALTY,
             f"frequency_penalty must be in [-{MAX_ADDITIVE_PENALTY:g}, {MAX_ADDITIVE_PENALTY:g}], got {self.frequency_penalty!r}"),
            (self.seed is None or _is_int(self.seed), f"seed must be an integer or None, got {self.seed!r}"),
        )  # fmt: skip

    @staticmethod
    def _checked_bias(bias) -> dict[int, float] | None:
        if not bias:
            return None
        if not isinstance(bias, Mapping) or len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ValueError(f"SamplingParams: logit_bias must map at most {MAX_LOGIT_BIAS_ENTRIES} token ids to values")
        for token, value in bias.items():
            if not _is_int(token) or token < 0:
                raise ValueError(f"SamplingParams: logit_bias keys must be token ids >= 0, got {token!r}")
            if not _is_real(value) or abs(value) > MAX_LOGIT_BIAS:
                raise ValueError(f"SamplingParams: logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, "
                                 f"{MAX_LOGIT_BIAS:g}], got {value!r} for token {token}")  # fmt: skip
        return {int(k): float(v) for k, v in bias.items()}

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def stream_seed(self) -> int:
        """The 64-bit seed of a new stream: the given one, or a fresh random one."""
        return secrets.randbits(64) if self.seed is None else self.seed & SEED_MASK

    def check_vocab(self, vocab_size: int) -> None:
        """Raises ValueError if logit_bias names a token id outside [0, vocab_size)."""
        bad = [t for t in self.logit_bias or () if t >= vocab_size]
        if bad:
            raise ValueError(f"SamplingParams: logit_bias token ids must lie in [0, {vocab_size}), got {bad[:5]}")


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class TokenCounts:
    """How often each token was sampled, one row per pool slot, on the device (int32 [slots, V]).

    The sampler adds each penalised row's token on the device, so no step copies counts either
    way. A stream with penalties rebuilds its slot's row from its token log when it starts
    (rebuild), which is what keeps the counts right whatever happened to the slot before (reset,
    fork, restore, another session); rows of streams without penalties are never read. The
    tensor is allocated on first use."""

    def __init__(self, num_rows: int, vocab_size: int, device):
        self.shape, self.device = (num_rows, vocab_size), device
        self.data: torch.Tensor | None = None

    def rebuild(self, row: int, token_ids: Sequence[int]) -> None:
        if self.data is None:
            self.data = torch.zeros(self.shape, dtype=torch.int32, device=self.device)
        ids = torch.tensor(list(token_ids), dtype=torch.int64)
        counts = torch.bincount(ids, minlength=self.shape[1])[: self.shape[1]].to(torch.int32)
        self.data[row].copy_(counts, non_blocking=True)

    def reset(self, row: int) -> None:
        self.rebuild(row, ())

    def copy(self, src: int, dst: int) -> None:
        if self.data is not None:
            self.data[dst].copy_(self.data[src])

    def row(self, row: int) -> torch.Tensor:
        """A CPU copy of one row (for tests and inspection)."""
        return torch.zeros(self.shape[1], dtype=torch.int32) if self.data is None else self.data[row].cpu()


def sampling_rows(params: Sequence[SamplingParams], seeds: Sequence[int], positions: Sequence[int],
                  count_rows: Sequence[int], device) -> ops.SamplingRows:  # fmt: skip
    """The per-row parameter tensors on `device`: one copy for the floats, one for the integers
    (and two for the logit bias when a row has one)."""
    floats = torch.tensor([_floats(p) for p in params], dtype=torch.float32).T
    ints = torch.tensor([[p.top_k, c, s - (1 << 64) if s >= 1 << 63 else s, n]
                         for p, c, s, n in zip(params, count_rows, seeds, positions)], dtype=torch.int64).T  # fmt: skip
    return ops.SamplingRows(to_device(floats, device), to_device(ints, device), logit_bias_rows(params, device))


def _floats(p: SamplingParams) -> list[float]:
    log_min_p = math.log(p.min_p) if p.min_p > 0 else -math.inf
    return [p.temperature, p.top_p, log_min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty]


def logit_bias_rows(params: Sequence[SamplingParams], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The logit bias of the rows that have one, on `device`, as (rows, ids, values) tensors:
    row rows[k] adds values[k] to token ids[k]. None when no row has a bias."""
    entries = [(i, t, v) for i, p in enumerate(params) for t, v in (p.logit_bias or {}).items()]
    if not entries:
        return None
    rows, ids, values = zip(*entries)
    return (to_device(torch.tensor(rows), device), to_device(torch.tensor(ids), device),
            to_device(torch.tensor(values, dtype=torch.float32), device))  # fmt: skip


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int], positions: Sequence[int],
           counts: TokenCounts | None = None, count_rows: Sequence[int] | None = None) -> list[int]:  # fmt: skip
    """One token per row of logits [B, V] float32 (a work buffer, changed in place), or -1 for a
    row that failed (non-finite values). count_rows[i]: the counts row of a penalised row (-1 or
    None: none). One device-to-host copy: the ids."""
    if count_rows is None:
        count_rows = [-1] * len(params)
    count_rows = [c if p.has_penalties() else -1 for p, c in zip(params, count_rows)]
    if any(c >= 0 for c in count_rows) and (counts is None or counts.data is None):
        raise ValueError("penalised rows need their counts rebuilt first (TokenCounts.rebuild)")
    rows = sampling_rows(params, seeds, positions, count_rows, logits.device)
    return ops.sample(logits, rows, None if counts is None else counts.data).tolist()
