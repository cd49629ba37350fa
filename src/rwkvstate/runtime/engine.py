"""The Engine: sessions over a pool of state slots, and batched generation.

The engine is an orchestrator; each job is done by one part:

    Residency (residency.py)  which session is in which slot, the host tier, the logits table
    Timeline (timeline.py)    undo points, the ring history, the prefix cache, rollback targets
    Scheduler (scheduler.py)  waiting streams, admission, each step's prompt chunks
    Stepper (stepper.py)      every forward: prompt feeds, the packed step of all live streams

Sessions are not tied to slots: a session takes a slot when touched, and the least recently
used idle session moves to the host tier when none is free. Every generation stream alive at
the same time advances in one packed forward per step (`step()`). A stream that finds every
slot held by a generating session waits in the scheduler's queue; an operation that needs a
slot then (feed, fork, ...) steps the running streams until one ends.

The engine emits token ids and finish reasons; text and stop strings are the reader's
(runtime/text.py), who tells the engine where a stop string ended a stream (`stop_at`).

Every public method that changes a session is reached through the Session (which checks that
it is open, usable and not generating) and leaves the session unchanged when it raises.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..config import EngineConfig
from ..errors import RwkvStateError, SlotError
from ..state.history import StateHistory
from ..state.cache import PrefixCache
from ..state.host import HostTier
from ..state.pool import StatePool
from ..state.snapshot import Encoded, check_format
from .residency import Residency
from .graphs import DecodeGraphs
from .scheduler import Scheduler
from .session import GenerationStream, Session, SessionSnapshot
from .stepper import Stepper
from .timeline import Timeline

if TYPE_CHECKING:
    from ..model.rwkv7 import Model
    from ..tokenizer import Tokenizer

log = logging.getLogger("rwkvstate.engine")
MAINTAIN_EVERY = 64  # steps between host-tier maintenance passes


class Engine:
    def __init__(self, model: Model, slots: int = 8, state_dtype: torch.dtype | str = torch.float32,
                 layout: str = "contiguous", clock: Callable[[], float] = time.monotonic, **options: Any):  # fmt: skip
        cfg = self.config = EngineConfig(num_slots=slots, state_dtype=state_dtype, layout=layout, **options)
        self.model = model
        self.pool: StatePool = model.new_pool(cfg.num_slots, cfg.storage_dtype, cfg.layout)
        vocab = model.config.vocab_size
        self.tier = HostTier(self.pool, cfg.host_format, cfg.cold_format, cfg.cold_after_s, clock)
        self.residency = Residency(self.pool, self.tier, vocab, model.device, on_free=self._forget_history,
                                   wait=self._wait_for_slot)  # fmt: skip
        self.timeline = Timeline(self.pool, self.residency, cfg, vocab)
        self.stepper = Stepper(model, self.pool, self.residency, self.timeline, cfg)
        self.scheduler = Scheduler(self.residency, self.timeline, self.stepper, cfg)
        self.sessions: dict[int, Session] = {}
        self._next_id = 0
        self._in_step = False
        self._take_back: list[tuple[Session, int]] = []  # tokens after a stop string, taken back after the step

    # ---- parts, as attributes of the engine ------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        return self.model.tokenizer

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end a generation by default: the world vocab's end-of-text (0)."""
        return [0] if self.model.config.tokenizer == "world" else []

    @property
    def graphs(self) -> DecodeGraphs:
        return self.stepper.graphs

    @property
    def history(self) -> StateHistory | None:
        return self.timeline.history

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self.timeline.prefix_cache

    @property
    def steps(self) -> int:
        return self.stepper.steps

    @property
    def tokens_fed(self) -> int:
        return self.stepper.tokens_fed

    @property
    def tokens_generated(self) -> int:
        return self.stepper.tokens_generated

    @property
    def num_generating(self) -> int:
        """Streams admitted and running (reading their prompts or decoding)."""
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        """Streams waiting for a slot."""
        return len(self.scheduler.waiting)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- sessions and slots -----------------------------------------------------------------
    def session(self) -> Session:
        """A new, empty session. It takes a slot when first used."""
        session = Session(self, self._next_id)
        self.sessions[session.id] = session
        self._next_id += 1
        return session

    def resident(self, session: Session) -> int:
        """The session's slot, bringing it back from the host tier (or taking a fresh slot)."""
        return self.residency.resident(session)

    def release(self, session: Session) -> None:
        """Gives the session's slot or host memory back and forgets the session."""
        self.residency.release(session)
        self.sessions.pop(session.id, None)

    def forget_logits(self, slot: int) -> None:
        self.residency.forget_logits(slot)

    def slot_logits(self, slot: int) -> torch.Tensor:
        """The slot's next-token logits (a view of the logits table)."""
        return self.residency.slot_logits(slot)

    def session_logits(self, session: Session) -> torch.Tensor:
        """The session's next-token logits, read from the host tier without bringing it back."""
        logits = self.residency.session_logits(session)
        if logits is None:
            raise RwkvStateError("no logits yet: feed at least one token first")
        return logits

    def _forget_history(self, slot: int) -> None:
        self.timeline.forget(slot)

    # ---- state operations --------------------------------------------------------------------
    def fork(self, session: Session) -> Session:
        """A new session with a copy of the state, logits, token log and undo points: slot to
        slot when a second slot can be had, else on the host (the parent moves to the host tier
        first, if it is idle)."""
        residency = self.residency
        if session.is_resident and not residency.second_slot_available(session):
            if session.is_generating:
                raise SlotError(f"cannot fork: the other {self.pool.num_slots - 1} slots hold generating sessions")
            residency.evict(session)
        child = self.session()
        if not session.is_resident:
            if session.location == "host":  # else the session was never used, and the child starts empty too
                residency.copy_host_entry(session, child)
        else:
            try:
                with residency.pinned_slots(session, child) as (src, dst):
                    pass
            except SlotError:
                self.release(child)
                raise
            self.pool.copy(src, dst)
            residency.set_logits(dst, residency.logits_of(src))
        child.tokens = list(session.tokens)
        self.timeline.copy(session, child)
        return child

    def reset(self, session: Session) -> None:
        """Back to the zero state with an empty token log."""
        slot = self.resident(session)
        self.pool.reset(slot)
        self.timeline.forget(slot)
        self.residency.forget_logits(slot)
        session.tokens = []
        self.timeline.start_over(session)

    def snapshot(self, session: Session, fmt: str | None = None, device: torch.device | str | None = None) -> SessionSnapshot:
        """The session's state, token log and logits. fmt None: the canonical float32 dict on the
        host (from the lazy host copy); a format name: an encoded snapshot on `device` (default:
        the pool's device)."""
        if fmt is None:
            state: dict[str, torch.Tensor] | Encoded = self.residency.export(session)
            logits = self.residency.session_logits(session)
            logits = None if logits is None else logits.cpu().clone()
        else:
            check_format(fmt)
            slot = self.resident(session)
            state = self.pool.encode_slot(slot, fmt)
            logits = self.residency.logits_of(slot)
            logits = None if logits is None else logits.clone()
            if device is not None:
                state, logits = state.to(device), None if logits is None else logits.to(device)
        return SessionSnapshot(state, list(session.tokens), logits, from_zero=session.from_zero)

    def restore(self, session: Session, snap: SessionSnapshot) -> None:
        """Puts a snapshot back into the session. Checks everything before writing anything."""
        V = self.model.config.vocab_size
        if snap.logits is not None and tuple(snap.logits.shape) != (V,):
            raise RwkvStateError(f"snapshot logits have shape {list(snap.logits.shape)}, expected [{V}]")
        if isinstance(snap.state, Encoded) and snap.state.numel != self.pool.layout.slot_numel:
            raise RwkvStateError(
                f"snapshot holds {snap.state.numel} state elements, this pool's slots {self.pool.layout.slot_numel}"
            )
        slot = self.resident(session)
        self.timeline.write_state(slot, snap.state)  # a canonical dict is validated before it is written
        self.timeline.forget(slot)
        self.residency.set_logits(slot, snap.logits)
        session.tokens = list(snap.tokens)
        self.timeline.start_over(session, snap)

    def load_state(self, session: Session, state: dict[str, torch.Tensor]) -> None:
        snap = SessionSnapshot({k: v.detach().to("cpu", torch.float32, copy=True) for k, v in state.items()}, [], None)
        self.restore(session, snap)

    # ---- rollback ----------------------------------------------------------------------------
    def rollback(self, session: Session, n_tokens: int) -> None:
        """Takes back the session's last n_tokens tokens: restores the newest saved state at or
        before the target position (prefix cache, ring history or loaded origin) and re-feeds the
        few tokens after it from the token log."""
        target = self.timeline.check_rollback(session, n_tokens)
        if target == len(session.tokens):
            return
        with self.residency.pinned_slots(session) as (slot,):
            self.stepper.rewind(session, slot, target)
        self.timeline.rolled_back(session, target)

    def undo(self, session: Session, n: int = 1) -> int:
        """Takes back the last n feeds or generations; returns the number of tokens removed."""
        removed = self.timeline.undo_length(session, n)
        self.rollback(session, removed)
        return removed

    # ---- feeding -----------------------------------------------------------------------------
    def feed(self, session: Session, ids: Sequence[int]) -> None:
        """Feeds a prompt into the session, in chunks of at most max_prefill_chunk tokens,
        starting from the longest cached prefix when the prefix cache is on."""
        with self.residency.pinned_slots(session) as (slot,):
            self.timeline.mark(session, slot)
            rest = self.timeline.use_prefix_cache(session, slot, list(ids))
            self.stepper.feed_ids(session, slot, rest, cache=True)

    # ---- batched generation ------------------------------------------------------------------
    def register(self, stream: GenerationStream) -> None:
        """Adds a new stream (called by the stream itself): it starts at once if a slot can be had,
        else it waits for one."""
        stream.params.check_vocab(self.stepper.sample_limit)
        self.scheduler.add(stream)

    def unregister(self, stream: GenerationStream) -> None:
        self.scheduler.remove(stream)

    def step(self) -> bool:
        """One packed forward for the running streams: one sampled token for each stream that is
        generating, and prompt chunks of streams still reading their prompts, after admitting
        waiting streams that can start. Returns whether a forward ran."""
        if self._in_step:
            return False
        self._in_step = True
        try:
            self.scheduler.admit()
            ran = self.stepper.step(self.scheduler.prefill_chunks())
        finally:
            self._in_step = False
            self._take_back_after_stops()
        if ran and self.steps % MAINTAIN_EVERY == 0:
            self.maintain()
        return ran

    def stop_at(self, stream: GenerationStream, n_tokens: int) -> None:
        """A reader found a stop string completed by the stream's n_tokens-th token: the stream
        ends there ("stop"), and the tokens generated after it are taken back from the session."""
        if not 0 <= n_tokens <= len(stream.token_ids):
            raise ValueError(f"stop_at: the stream has {len(stream.token_ids)} tokens, got {n_tokens!r}")
        extra = len(stream.token_ids) - n_tokens
        if not stream.done:
            self.unregister(stream)
        stream.finish_reason = "stop"
        if extra:
            del stream.token_ids[n_tokens:]
            self._take_back.append((stream.session, extra))
            if not self._in_step:
                self._take_back_after_stops()

    def _take_back_after_stops(self) -> None:
        while self._take_back:
            session, extra = self._take_back.pop(0)
            try:
                self.rollback(session, extra)
            except Exception:  # the session keeps the extra tokens rather than a broken state
                log.exception("taking back %d tokens after a stop string failed", extra)

    def _wait_for_slot(self) -> bool:
        """Steps the running streams, admitting none, so one can end and free a slot; False when
        none runs (or a step is in progress), so waiting cannot help."""
        if self._in_step or not (self.scheduler.prefilling or len(self.stepper.batch)):
            return False
        with self.scheduler.hold():
            self.step()
        return True

    def run(self, streams: Sequence[GenerationStream]) -> list[str]:
        """Drives the given streams to the end; returns their texts.

        Draining them one after another still batches: the first stream's steps
        advance every live stream, whose pieces wait in their buffers.
        """
        return ["".join(stream) for stream in streams]

    def warm_up(self) -> float:
        """Compiles, before any request needs them, the kernels that serving meets: the decode
        graphs are captured, and packed forwards run on free slots (reset and freed afterwards) for
        1, 2, 4, ... sequences of 1, 2, 3, 16 and 17 tokens. Triton compiles a kernel once per
        block size and per specialisation of its integer arguments (== 1, divisible by 16), a
        second or more each the first time, so without this the first burst of prompts can stall
        every stream of the engine that long. Returns the seconds it took; on the CPU it does
        nothing (and returns 0)."""
        return self.stepper.warm_up()

    # ---- housekeeping --------------------------------------------------------------------------
    def maintain(self) -> int:
        """Re-compresses host-tier entries that have been idle for cold_after_s; returns how many."""
        return self.tier.recompress_old()

    def stats(self) -> dict:
        """Counters for monitoring: slots, tiers, bytes, cache and history activity."""
        resident = self.residency.slots_in_use
        cache = self.prefix_cache
        out: dict[str, int | float] = {
            "sessions": len(self.sessions), "slots_total": self.pool.num_slots, "slots_in_use": resident,
            "sessions_on_host": len(self.tier), "generating": self.num_generating, "waiting": self.num_waiting,
            "steps": self.steps, "graph_steps": self.graphs.replays,
            "tokens_fed": self.tokens_fed, "tokens_generated": self.tokens_generated,
            "bytes_pool": self.pool.nbytes, "bytes_host_tier": self.tier.nbytes,
            "bytes_history": 0 if self.history is None else self.history.nbytes,
            "bytes_prefix_cache": 0 if cache is None else cache.nbytes,
            "bytes_to_host": self.pool.bytes_to_host, "bytes_to_device": self.pool.bytes_to_device,
            "evictions": self.tier.evictions, "host_restores": self.tier.restores,
        }  # fmt: skip
        if cache is not None:
            s = cache.stats
            out.update(prefix_cache_lookups=s.lookups, prefix_cache_hits=s.hits, prefix_cache_hit_tokens=s.hit_tokens,
                       prefix_cache_hit_rate=s.hit_rate, prefix_cache_entries=cache.num_entries)  # fmt: skip
        return out
