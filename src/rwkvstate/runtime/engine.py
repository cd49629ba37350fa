"""The Engine: hands out pool slots to sessions and batches generation.

Every generation stream alive at the same time advances in one packed forward per
step (`step()`), so sessions generating together share each pass over the weights.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..config import EngineConfig
from ..errors import RwkvStateError, SlotError
from .runner import ModelRunner
from .sampling import apply_penalties, sample
from .session import GenerationStream, Session, SessionSnapshot


class Engine:
    def __init__(self, model, slots: int = 8, state_dtype=torch.float32, layout: str = "contiguous", **options):
        self.config = EngineConfig(num_slots=slots, state_dtype=state_dtype, layout=layout, **options)
        self.model = model
        self.pool = model.new_pool(self.config.num_slots, self.config.state_dtype, self.config.layout)
        max_batch = min(self.config.max_decode_batch, self.config.num_slots)
        self.runner = ModelRunner(model, self.pool, max_batch=max_batch, enforce_eager=self.config.enforce_eager)
        V = model.config.vocab_size
        # next-token logits of every slot; rows are valid once the slot has been fed
        self._logits = torch.zeros(self.config.num_slots, V, dtype=torch.float32, device=model.device)
        self._has_logits = [False] * self.config.num_slots
        self._streams: list[GenerationStream] = []
        # a model whose vocabulary is larger than its tokenizer's must never sample
        # an id the tokenizer cannot decode
        self._sample_limit = min(V, model.tokenizer.vocab_size)
        self.steps = 0  # packed decode forwards run so far

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end a generation by default: the world vocab's end-of-text (0)."""
        return [0] if self.model.config.tokenizer == "world" else []

    # ---- sessions ------------------------------------------------------------------------
    def session(self) -> Session:
        if not self.pool.can_allocate():
            raise SlotError(
                f"all {self.pool.num_slots} slots are in use; close a session or create the Engine with more slots"
            )
        slot = self.pool.allocate()
        self.forget_logits(slot)
        return Session(self, slot)

    def release(self, session: Session) -> None:
        self.pool.free(session.slot)
        self.forget_logits(session.slot)

    def fork(self, session: Session) -> Session:
        child = self.session()
        self.pool.copy(session.slot, child.slot)
        self._logits[child.slot] = self._logits[session.slot]
        self._has_logits[child.slot] = self._has_logits[session.slot]
        child.tokens = list(session.tokens)
        return child

    def reset_slot(self, slot: int) -> None:
        self.pool.reset(slot)
        self.forget_logits(slot)

    def forget_logits(self, slot: int) -> None:
        self._has_logits[slot] = False

    def snapshot(self, session: Session) -> SessionSnapshot:
        logits = self._logits[session.slot].cpu().clone() if self._has_logits[session.slot] else None
        return SessionSnapshot(self.pool.export(session.slot), list(session.tokens), logits)

    def restore(self, session: Session, snap: SessionSnapshot) -> None:
        V = self.model.config.vocab_size
        if snap.logits is not None and tuple(snap.logits.shape) != (V,):
            raise RwkvStateError(f"snapshot logits have shape {list(snap.logits.shape)}, expected [{V}]")
        self.pool.load(session.slot, snap.state)  # validates before writing
        if snap.logits is not None:
            self._logits[session.slot] = snap.logits.to(self._logits.device)
        self._has_logits[session.slot] = snap.logits is not None
        session.tokens = list(snap.tokens)

    def slot_logits(self, slot: int) -> torch.Tensor:
        if not self._has_logits[slot]:
            raise RwkvStateError("no logits yet: feed at least one token first")
        return self._logits[slot]

    # ---- feeding -------------------------------------------------------------------------
    def feed(self, slot: int, ids: Sequence[int]) -> None:
        """Feeds a prompt into one slot, in chunks of at most max_prefill_chunk tokens."""
        chunk = self.config.max_prefill_chunk
        for start in range(0, len(ids), chunk):
            piece = ids[start : start + chunk]
            is_last = start + chunk >= len(ids)
            out = self.model.forward(self.pool, [slot], [piece], output="last" if is_last else "none")
            if is_last:
                self._logits[slot] = out[0]
                self._has_logits[slot] = True

    # ---- batched generation ------------------------------------------------------------
    def register(self, stream: GenerationStream) -> None:
        self._streams.append(stream)

    def unregister(self, stream: GenerationStream) -> None:
        if stream in self._streams:
            self._streams.remove(stream)

    @property
    def num_generating(self) -> int:
        return len(self._streams)

    def step(self) -> None:
        """Samples one token for every live stream and feeds them all in one packed forward."""
        streams = list(self._streams)
        if not streams:
            return
        slots = [s.session.slot for s in streams]
        rows = self._logits[slots, : self._sample_limit].clone()
        for row, stream in zip(rows, streams):
            apply_penalties(row, stream.params, stream.counts)
        uniforms = [torch.rand((), generator=s.generator).item() for s in streams]
        tokens = sample(rows, [s.params for s in streams], uniforms)
        fed = [(s, t) for s, t in zip(streams, tokens) if s.accept(t)]
        if not fed:
            return
        fed_slots = [s.session.slot for s, _ in fed]
        logits = self.runner.decode(fed_slots, [t for _, t in fed])
        self._logits[fed_slots] = logits
        for stream, token in fed:
            stream.session.tokens.append(token)
        self.steps += 1

    def run(self, streams: Sequence[GenerationStream]) -> list[str]:
        """Drives the given streams to the end; returns their texts.

        Draining them one after another still batches: the first stream's steps
        advance every live stream, whose pieces wait in their buffers.
        """
        return ["".join(stream) for stream in streams]
