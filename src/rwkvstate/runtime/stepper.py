"""Stepping: every forward the engine runs, and the live generation streams.

A prompt fed outside generation goes through `feed_ids` in chunks. Every generation stream
alive at the same time advances in one packed forward per `step()`: one sampled token for
each stream that is generating, and the next prompt chunk of each stream still reading its
prompt, through the same pass over the weights (decode-only steps replay a captured graph).

`plan_step` decides what runs in a step: all live streams, prompt chunks within a budget of
`max_prefill_chunk` tokens. A scheduler (a waiting queue, admission by free slots) goes in
front of `streams`: it holds a stream back until it may join, and `plan_step` is where a
per-step token budget is applied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..config import EngineConfig
from ..state.pool import StatePool
from .residency import Residency
from .graphs import DecodeGraphs
from .sampling import TokenCounts, sample
from .timeline import Timeline

if TYPE_CHECKING:
    from ..model.rwkv7 import Model
    from .session import GenerationStream, Session

StepItem = tuple["GenerationStream", list[int]]  # a stream and the tokens it feeds this step


class Stepper:
    def __init__(self, model: Model, pool: StatePool, residency: Residency, timeline: Timeline,
                 config: EngineConfig):  # fmt: skip
        self.model = model
        self.pool = pool
        self.residency = residency
        self.timeline = timeline
        self.config = config
        max_batch = min(config.max_decode_batch, config.num_slots)
        self.graphs = DecodeGraphs(model, pool, max_batch=max_batch, enforce_eager=config.enforce_eager)
        self.streams: list[GenerationStream] = []  # a live stream keeps its session resident
        # a model whose vocabulary is larger than its tokenizer's must never sample
        # an id the tokenizer cannot decode
        self.sample_limit = min(model.config.vocab_size, model.tokenizer.vocab_size)
        self.counts = TokenCounts(config.num_slots, self.sample_limit, model.device)  # for penalties
        self.steps = 0  # packed forwards run by step()
        self.tokens_fed = 0
        self.tokens_generated = 0

    # ---- prompts outside generation -----------------------------------------------------------
    def feed_ids(self, session: Session, slot: int, ids: list[int], cache: bool) -> None:
        """Feeds ids into the session's slot in chunks; cache: chunks end where the prefix cache
        keeps states (a prompt), else as large as allowed (a re-feed after a rollback)."""
        while ids:
            size = self.timeline.chunk_size(len(session.tokens), len(ids), cache)
            old = len(session.tokens)
            out = self.model.forward(self.pool, [slot], [ids[:size]], output="last")
            session.tokens.extend(ids[:size])
            ids = ids[size:]
            self.residency.set_logits(slot, out[0])
            self.tokens_fed += size
            self.timeline.after_forward(session, slot, old, cache_end=cache and not ids)

    def rewind(self, session: Session, slot: int, target: int) -> None:
        """Puts the session at position target (at most its length): restores the newest saved
        state at or before it and re-feeds the tokens after that from the token log."""
        tokens = session.tokens
        start, logits = self.timeline.restore_nearest(session, slot, target)
        self.residency.set_logits(slot, logits)  # copies: re-feeding may overwrite a ring entry
        session.tokens = tokens[:start]
        self.feed_ids(session, slot, tokens[start:target], cache=False)

    # ---- generation ---------------------------------------------------------------------------
    def add(self, stream: GenerationStream, slot: int) -> None:
        if stream.params.has_penalties():  # the slot's counts row may hold another stream's
            self.counts.rebuild(slot, stream.token_ids)
        self.streams.append(stream)

    def remove(self, stream: GenerationStream) -> None:
        if stream in self.streams:
            self.streams.remove(stream)

    def step(self) -> bool:
        """One packed forward for every live stream; returns whether a forward ran."""
        if not self.streams:
            return False
        items = self.plan_step(list(self.streams))
        if not items:
            return False
        try:
            self._run(items)
        except BaseException:
            self._recover(items)
            raise
        self.steps += 1
        return True

    def plan_step(self, streams: list[GenerationStream]) -> list[StepItem]:
        """What this step feeds: a sampled token for each generating stream, then prompt chunks,
        max_prefill_chunk tokens in all."""
        items = self._sample([s for s in streams if not s.pending])
        budget = self.config.max_prefill_chunk
        for stream in (s for s in streams if s.pending):
            if budget <= 0:
                break
            position = len(stream.session.tokens)
            size = min(budget, self.timeline.chunk_size(position, len(stream.pending), True, stream.cut_at))
            items.append((stream, stream.pending[:size]))
            del stream.pending[:size]
            budget -= size
        return items

    def _sample(self, streams: list[GenerationStream]) -> list[StepItem]:
        """A token for each stream; those it does not end are fed this step."""
        if not streams:
            return []
        slots = [self._slot(s) for s in streams]
        rows = self.residency.logits[slots, : self.sample_limit]  # a gathered copy: the sampler's work buffer
        positions = [len(s.token_ids) for s in streams]
        tokens = sample(rows, [s.params for s in streams], [s.seed for s in streams], positions, self.counts, slots)
        items = []
        for stream, token in zip(streams, tokens):
            if token < 0:  # non-finite logits: this stream ends, the others go on
                stream.finish("error")
            elif stream.accept(token):
                items.append((stream, [token]))
        return items

    def _run(self, items: list[StepItem]) -> None:
        slots = [self._slot(s) for s, _ in items]
        if all(len(ids) == 1 for _, ids in items) and all(s.start_position is not None for s, _ in items):
            logits = self.graphs.decode(slots, [ids[0] for _, ids in items])
        else:
            logits = self.model.forward(self.pool, slots, [ids for _, ids in items], output="last")
        self.residency.logits[slots] = logits
        for (stream, ids), slot in zip(items, slots):
            session = stream.session
            old = len(session.tokens)
            session.tokens.extend(ids)
            self.residency.has_logits[slot] = True
            if stream.start_position is None:  # a prompt chunk
                self.tokens_fed += len(ids)
                at_cut = not stream.pending or len(session.tokens) == stream.cut_at
                self.timeline.after_forward(session, slot, old, cache_end=at_cut)
                if not stream.pending:  # the reply starts here: what regenerate() returns to
                    self.timeline.reply_started(session, slot, stream)
            else:
                self.tokens_generated += 1
                self.timeline.after_forward(session, slot, old)

    def _recover(self, items: list[StepItem]) -> None:
        """A forward that raised may have written part of its slots. Its streams end ("error"),
        and each session's state is rebuilt from its token log, which holds only what was fed
        successfully; a session whose rebuild fails too is marked lost, so it is never used with
        a half-written state."""
        for stream, _ in items:
            if not stream.done:
                stream.finish("error")
            session = stream.session
            try:
                self.rewind(session, self._slot(stream), len(session.tokens))
            except Exception:
                session._lost = True

    @staticmethod
    def _slot(stream: GenerationStream) -> int:
        slot = stream.session._slot
        assert slot is not None, "a live stream keeps its session resident"
        return slot
