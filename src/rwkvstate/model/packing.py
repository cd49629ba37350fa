"""Packing many sequences of different lengths into one flattened token axis.

Each sequence i feeds tokens[i] into pool slot slots[i]. Tokens are laid out
sequence after sequence: rows starts[i] .. starts[i] + lengths[i] - 1 belong to
sequence i. Empty sequences take no rows and leave their slot untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import SlotError
from ..tokenizer import check_token_ids


@dataclass
class Packed:
    tokens: torch.Tensor  # [T] int64, all sequences back to back
    lengths: list[int]  # per sequence, may be 0
    live: list[int]  # indices (into the batch) of non-empty sequences
    live_slots: torch.Tensor  # [B'] int64 pool slots of the live sequences
    first_rows: torch.Tensor  # [B'] row of each live sequence's first token
    last_rows: torch.Tensor  # [B'] row of each live sequence's last token
    pad_rows: torch.Tensor  # [B', max_len] row of step t of each live sequence, T for padding
    cu_seqlens: torch.Tensor  # [B' + 1] int32: live sequence i owns rows cu_seqlens[i] .. cu_seqlens[i+1]-1
    token_seq: torch.Tensor  # [T] int32: index (into live) of each row's sequence
    is_decode: bool  # every live sequence feeds exactly one token

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()

    @property
    def max_len(self) -> int:
        return self.pad_rows.shape[1]


def _as_token_list(seq, index: int, vocab_size: int) -> list[int]:
    if torch.is_tensor(seq):
        if seq.dim() != 1 or seq.dtype.is_floating_point or seq.dtype == torch.bool:
            raise ValueError(f"tokens[{index}] must be a 1-D integer tensor, got {seq.dtype} {list(seq.shape)}")
        seq = seq.tolist()
    elif isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
        raise ValueError(f"tokens[{index}] must be a list of token ids, got {type(seq).__name__}")
    out = list(seq)
    for tok in out:
        if isinstance(tok, bool) or not isinstance(tok, int):
            raise ValueError(f"tokens[{index}] holds a non-integer token {tok!r}")
    try:
        return check_token_ids(out, vocab_size)
    except ValueError as e:
        raise ValueError(f"tokens[{index}]: {e}") from None


def pack(slots: Sequence[int], tokens: Sequence, vocab_size: int, device) -> Packed:
    """Validates and flattens a batch. Raises before anything is computed or written."""
    if len(slots) != len(tokens):
        raise SlotError(f"got {len(slots)} slots but {len(tokens)} token sequences")
    seqs = [_as_token_list(seq, i, vocab_size) for i, seq in enumerate(tokens)]
    lengths = [len(s) for s in seqs]
    live = [i for i, n in enumerate(lengths) if n > 0]
    flat = [tok for s in seqs for tok in s]
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    max_len = max(lengths, default=0)
    num_tokens = len(flat)
    pad = [[starts[i] + t if t < lengths[i] else num_tokens for t in range(max_len)] for i in live]

    def tensor(values, shape=None):
        t = torch.tensor(values, dtype=torch.int64)
        return (t.view(shape) if shape else t).to(device, non_blocking=True)

    live_lengths = [lengths[i] for i in live]
    cu = [0]
    for n in live_lengths:
        cu.append(cu[-1] + n)
    token_seq = [j for j, n in enumerate(live_lengths) for _ in range(n)]
    return Packed(
        tokens=tensor(flat),
        lengths=lengths,
        live=live,
        live_slots=tensor([slots[i] for i in live]),
        first_rows=tensor([starts[i] for i in live]),
        last_rows=tensor([starts[i] + lengths[i] - 1 for i in live]),
        pad_rows=tensor(pad, (len(live), max_len)),
        cu_seqlens=tensor(cu).int(),
        token_seq=tensor(token_seq).int(),
        is_decode=max_len == 1,
    )


def pack_decode(slots: torch.Tensor, tokens: torch.Tensor) -> Packed:
    """A decode batch (one token per sequence) from device tensors, with no host work:
    the form a CUDA graph can capture. slots [B] int64 may repeat only the scratch slot."""
    B = slots.numel()
    rows = torch.arange(B, device=slots.device)
    return Packed(
        tokens=tokens,
        lengths=[1] * B,
        live=list(range(B)),
        live_slots=slots,
        first_rows=rows,
        last_rows=rows,
        pad_rows=rows.unsqueeze(1),
        cu_seqlens=torch.arange(B + 1, device=slots.device, dtype=torch.int32),
        token_seq=rows.int(),
        is_decode=True,
    )
