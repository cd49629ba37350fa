"""Stepping: every forward the engine runs.

A prompt fed outside generation goes through `feed_ids` in chunks. A generation step
(`step(chunks)`) samples one token for every stream of the decode batch and feeds it, together
with the prompt chunks the scheduler chose, in one packed forward.

The decode-only step is the hot loop, and its Python work per stream is a few list operations:

    sample on the device (per-row tensors of the decode batch; only the ids come back)
    -> mask rows whose sample failed or hit a stop id (on the device) -> replay the decode graph
       with the sampled ids as its input, no host round trip in between
    -> while the GPU decodes: the ids reach the host; each stream appends its token, and ends on
       a stop id, a failed row or max_tokens.

A short prompt that arrives while other streams decode (at most `decode_prompt_tokens`) joins
the decode batch at once and is read one token per step inside the decode graph: an eager
packed forward costs every decoding stream a step many times longer than a graph replay, so
such prompts never go through one. Longer prompts, and prompts while nothing decodes, are fed in
packed chunks (the scheduler's prefill budget).

History and prefix-cache bookkeeping run only at their cut points: each stream's next cut is
scheduled at the step (tick) it will reach it, so a step without cuts costs nothing there.
Detokenisation and stop strings are not done here at all (runtime/text.py).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, ContextManager

import torch

from ..config import EngineConfig
from ..ops import sampling as ops
from ..state.pool import StatePool
from .batch import DecodeBatch, resident_slot
from .graphs import DecodeGraphs
from .residency import Residency
from .sampling import TokenCounts
from .timeline import Timeline

if TYPE_CHECKING:
    from ..model.rwkv7 import Model
    from .session import GenerationStream, Session

StepItem = tuple["GenerationStream", list[int]]  # a stream and the tokens it feeds this step
WARM_UP_LENGTHS = (1, 2, 3, 16, 17)  # tokens per sequence in warm_up's packed forwards
log = logging.getLogger("rwkvstate.engine")


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
        # a model whose vocabulary is larger than its tokenizer's must never sample
        # an id the tokenizer cannot decode
        self.sample_limit = min(model.config.vocab_size, model.tokenizer.vocab_size)
        self.counts = TokenCounts(config.num_slots, self.sample_limit, model.device)  # for penalties
        self.batch = DecodeBatch(config.num_slots, self.sample_limit, model.device, self.counts,
                                 prompt_width=config.decode_prompt_tokens)  # fmt: skip
        self.steps = 0  # packed forwards run by step()
        self.tokens_fed = 0
        self.tokens_generated = 0
        self.tick = 0  # decode steps so far: the clock cut points are scheduled on
        self._cuts: dict[int, list[tuple[GenerationStream, int]]] = {}  # tick -> (stream, position)
        self._host_ids: torch.Tensor | None = None  # pinned buffer the sampled ids come back through

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

    def warm_up(self) -> float:
        """Engine.warm_up: the decode graphs, then packed forwards of 1, 2, 4, ... sequences (as
        many as there are free slots) of each of WARM_UP_LENGTHS tokens, on free slots that are
        reset and freed again."""
        if self.model.device.type != "cuda":
            return 0.0
        start = time.perf_counter()
        self.graphs.capture()
        taken: list[int] = []
        try:
            while self.pool.can_allocate():
                taken.append(self.pool.allocate())
            count = 1
            while count <= len(taken):
                for length in WARM_UP_LENGTHS:
                    self.model.forward(self.pool, taken[:count], [[0] * length] * count, output="last")
                count *= 2
        finally:
            for slot in taken:
                self.pool.reset(slot)
                self.pool.free(slot)
        torch.cuda.synchronize(self.model.device)
        return time.perf_counter() - start

    # ---- the decode batch ---------------------------------------------------------------------
    def takes_prompt(self, stream: GenerationStream) -> bool:
        """Whether the stream should read its pending prompt inside the decode batch: a short
        prompt, while other streams decode, and the step with it still replays a graph."""
        size, batch = len(stream.pending), len(self.batch)
        return 0 < size <= self.config.decode_prompt_tokens and batch > 0 and self.graphs.can_replay(batch + 1)

    def join(self, stream: GenerationStream) -> None:
        """From the next step on the stream samples a token every step, or, with a prompt still
        pending (takes_prompt), first feeds that prompt one token per step."""
        self.batch.join(stream)
        self._schedule_cut(stream)

    def leave(self, stream: GenerationStream) -> None:
        self.batch.leave(stream)

    def _schedule_cut(self, stream: GenerationStream) -> None:
        """Files the stream under the tick at which it reaches its next history or prefix-cache
        position (every stream in the batch moves one position per tick)."""
        position = len(stream.session.tokens)
        cut = self.timeline.next_cut(stream.session, position)
        if cut is not None:
            self._cuts.setdefault(self.tick + cut - position, []).append((stream, cut))

    def _run_cuts(self) -> None:
        for stream, cut in self._cuts.pop(self.tick, ()):
            session = stream.session
            if len(session.tokens) != cut or session._slot is None or stream.session._stream is not stream:
                continue  # the stream ended before it got there
            self.timeline.after_forward(session, session._slot, cut - 1)
            if not stream.done:
                self._schedule_cut(stream)

    # ---- a generation step ----------------------------------------------------------------------
    def step(self, chunks: list[StepItem]) -> bool:
        """One packed forward: a sampled token for every stream of the decode batch, and the given
        prompt chunks. Returns whether a forward ran."""
        batch = self.batch
        if not len(batch) and not chunks:
            return False
        if len(batch) and not chunks and self.graphs.can_replay(len(batch)):
            self._decode_on_device()
        else:
            self._packed_step(chunks)
        self.steps += 1
        return True

    def _sample(self) -> torch.Tensor:
        """One id per stream of the decode batch (int64 on the device; -1: the row failed). If the
        batched draw raises, each row draws alone, and a row that still raises gets -1: one
        stream's failure never ends another's."""
        batch = self.batch
        batch.prepare()
        logits = self.residency.logits[batch.slots, : self.sample_limit]  # a gathered copy: the work buffer
        try:
            ids = ops.sample(logits, batch.rows, batch.count_tensor())
        except Exception:  # the work buffer may be half-changed: gather the rows again
            logits = self.residency.logits[batch.slots, : self.sample_limit]
            ids = torch.stack([self._sample_alone(logits[i : i + 1], i) for i in range(len(batch))])
        batch.advance()
        return ids

    def _sample_alone(self, logits: torch.Tensor, row: int) -> torch.Tensor:
        try:
            return ops.sample(logits, self.batch.row(row), self.batch.count_tensor())[0]
        except Exception:
            log.exception("sampling failed for one stream; it ends with 'error', the others go on")
            return torch.tensor(ops.FAILED, dtype=torch.int64, device=logits.device)

    def _decode_on_device(self) -> None:
        """The hot loop: the sampled ids go into the decode graph on the device, and to the host
        while the graph runs."""
        batch = self.batch
        streams, slots = list(batch.streams), batch.slot_list
        ids, prompting = batch.force_prompts(self._sample())
        host = self._to_host(ids)  # enqueued before the decode, so it does not wait for it
        copied = None
        if self.model.device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(self.model.device))
        feed = batch.feed_mask(ids, prompting)
        tokens = ids.clamp(0, self.sample_limit - 1)  # a failed row (-1) feeds the scratch slot
        if prompting is not None:  # a prompt token may lie beyond the sampled range
            tokens = torch.where(prompting, ids, tokens)
        try:
            logits = self.graphs.replay(feed, tokens, slots)
            self.residency.logits.index_copy_(0, feed, logits)
        except Exception:  # states rebuilt, then each stream runs again alone, through the host
            fed, ended, prompts = self._take(streams, ids.tolist())
            items = fed + self._prompt_items(prompts)
            self._recover(items, finish=False)
            self._run_alone(items)
            self._end_decode(ended)
            return
        except BaseException:  # an interrupt: every stream of the step ends
            self._recover([(s, []) for s in streams])
            raise
        if copied is not None:
            copied.synchronize()
        _, ended, prompts = self._take(streams, host[: len(streams)].tolist())
        with self._records_batched():
            for stream in prompts:  # the graph fed each one's next prompt token
                self._prompt_chunk_done(stream, resident_slot(stream), [stream.pending.pop(0)], cuts_only=True)
            self._end_decode(ended)

    def _records_batched(self) -> ContextManager[None]:
        """History records of a step's bookkeeping (after its forward, before the next one),
        written together when the block ends (StateHistory.deferred). Nothing inside writes a
        slot's state: a stop string's take-back (a rollback) waits until the step has ended
        (Engine.stop_at)."""
        history = self.timeline.history
        return nullcontext() if history is None else history.deferred()

    def _prompt_items(self, streams: list[GenerationStream]) -> list[StepItem]:
        """Prompting streams of the decode batch whose next token a step feeds on the host: each
        one's next prompt token, as a one-token prompt chunk."""
        if streams:
            self.batch.resync()
        return [(s, [s.pending.pop(0)]) for s in streams]

    def _to_host(self, ids: torch.Tensor) -> torch.Tensor:
        if self._host_ids is None:
            pinned = self.model.device.type == "cuda"
            self._host_ids = torch.empty(self.pool.num_slots, dtype=torch.int64, pin_memory=pinned)
        host = self._host_ids[: ids.numel()]
        host.copy_(ids, non_blocking=True)
        return host

    def _packed_step(self, chunks: list[StepItem]) -> None:
        """A step with prompt chunks (or without graphs): the ids come to the host first, and the
        kept ones are fed with the chunks through Model.forward."""
        streams = list(self.batch.streams)
        fed, ended, prompts = self._take(streams, self._sample().tolist()) if streams else ([], [], [])
        items = fed + self._prompt_items(prompts) + chunks
        try:
            if items:
                self._forward(items)
        except Exception:  # states rebuilt, then each item runs alone: only a failing one ends
            self._recover(items, finish=False)
            self._run_alone(items)
        except BaseException:  # an interrupt: every stream of the step ends
            self._recover(items)
            self._end_decode(ended)
            raise
        if streams:
            with self._records_batched():
                self._end_decode(ended)

    def _run_alone(self, items: list[StepItem]) -> None:
        """After a packed forward raised (and its states were rebuilt): each item runs alone, so
        only the stream that makes the forward fail ends ("error"); the others advance as they
        would have in the packed pass."""
        for stream, ids in items:
            session = stream.session
            if session._lost:  # its state could not be rebuilt
                if not stream.done:
                    stream.finish("error")
                continue
            if stream.start_position is not None:  # the decode token goes back into the log
                session.tokens.extend(ids)
            try:
                self._forward([(stream, ids)])
            except Exception:
                log.exception("a forward failed for one stream; it ends with 'error', the others go on")
                self._recover([(stream, ids)])

    def _take(self, streams: list[GenerationStream], ids: list[int]) -> tuple[list[StepItem], list, list]:
        """Each stream's sampled id, on the host: appended to the stream and its session's token
        log (the decode fed it, or is about to), or the stream is to end (a failed row, a stop id:
        not fed; max_tokens: fed). Returns the fed (stream, [id]) items, the (stream, reason)
        pairs to end once the step's forward has run, and the prompting streams (their draws
        are thrown away: they feed a prompt token instead)."""
        fed, ended, prompts = [], [], []
        limit, prompting = self.sample_limit, self.batch.prompting
        for stream, token in zip(streams, ids):
            if prompting and stream in prompting:
                prompts.append(stream)
                continue
            if not 0 <= token < limit or token in stream.stop_ids:  # -1: the row failed
                ended.append((stream, "stop" if 0 <= token < limit else "error"))
                continue
            stream.token_ids.append(token)
            stream.session.tokens.append(token)
            fed.append((stream, [token]))
            if len(stream.token_ids) >= stream.max_tokens:
                ended.append((stream, "length"))
        self.tokens_generated += len(fed)
        return fed, ended, prompts

    def _end_decode(self, ended: list) -> None:
        """After the decode forward: the clock moves on, due cut points run, streams end."""
        self.tick += 1
        self._run_cuts()
        for stream, reason in ended:
            if not stream.done:
                stream.finish(reason)

    def _forward(self, items: list[StepItem]) -> None:
        """Feeds decode tokens (already in the token logs) and prompt chunks in one forward."""
        slots = [resident_slot(s) for s, _ in items]
        decode = all(len(ids) == 1 for _, ids in items) and all(s.start_position is not None for s, _ in items)
        if decode:
            logits = self.graphs.decode(slots, [ids[0] for _, ids in items])
        else:
            logits = self.model.forward(self.pool, slots, [ids for _, ids in items], output="last")
        self.residency.logits[slots] = logits
        with self._records_batched():
            for (stream, ids), slot in zip(items, slots):
                if stream.start_position is None:  # a prompt chunk
                    self._prompt_chunk_done(stream, slot, ids)

    def _prompt_chunk_done(self, stream: GenerationStream, slot: int, ids: list[int], cuts_only: bool = False) -> None:
        session = stream.session
        old = len(session.tokens)
        session.tokens.extend(ids)
        self.tokens_fed += len(ids)
        self._prompt_fed(stream, slot, old, cuts_only)

    def _prompt_fed(self, stream: GenerationStream, slot: int, old: int, cuts_only: bool = False) -> None:
        """History and prefix-cache bookkeeping after prompt tokens were fed (cuts_only: only at the
        prompt's cut and end, a prompting row's periodic cuts being scheduled like any decode
        row's), and the start of the reply once the prompt is read."""
        session = stream.session
        self.residency.has_logits[slot] = True
        at_cut = not stream.pending or len(session.tokens) == stream.cut_at
        if at_cut or not cuts_only:
            self.timeline.after_forward(session, slot, old, cache_end=at_cut)
        if not stream.pending and not stream.done:  # the reply starts here: what regenerate() returns to
            self.timeline.reply_started(session, slot, stream)
            if stream in self.batch.prompting:
                self.batch.prompt_done(stream)
            else:
                self.join(stream)

    def _recover(self, items: list[StepItem], finish: bool = True) -> None:
        """A forward that raised may have written part of its slots. Each session's state is
        rebuilt from its token log, which holds only what was fed successfully (a decode token
        put there for this forward comes out again); a session whose rebuild fails too is marked
        lost, so it is never used with a half-written state. finish: the streams end ("error")."""
        for stream, ids in items:
            session = stream.session
            if stream.start_position is not None and ids:  # not fed: the forward failed
                del session.tokens[-1]
            if finish and not stream.done:
                stream.finish("error")
            try:
                self.rewind(session, resident_slot(stream), len(session.tokens))
            except Exception:
                session._lost = True

