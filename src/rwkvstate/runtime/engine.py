"""The Engine: sessions over a pool of state slots, and batched generation.

Sessions are not tied to slots. A session takes a slot when it is touched; when every
slot is taken, the least recently used idle session moves to the host tier and its
slot is reused, and it comes back, unchanged, the next time it is touched. On top of
the pool the engine keeps a ring-buffer history per slot (rollback, undo, regenerate
without re-reading the prompt) and an optional prefix cache (prompts that share a
prefix compute it once).

Every generation stream alive at the same time advances in one packed forward per
step (`step()`): decode tokens and prompt chunks of streams still reading their
prompts go through the same pass over the weights.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from ..config import EngineConfig
from ..errors import RwkvStateError, SlotError
from ..state.cache import PrefixCache
from ..state.convert import zero_state
from ..state.history import StateHistory
from ..state.layout import CANONICAL_KEYS
from ..state.host import HostTier, TierEntry, to_float32
from ..state.snapshot import Encoded, check_format
from .runner import ModelRunner
from .sampling import apply_penalties, sample
from .session import Base, GenerationStream, Session, SessionSnapshot

MAINTAIN_EVERY = 64  # steps between host-tier maintenance passes


class Engine:
    def __init__(self, model, slots: int = 8, state_dtype=torch.float32, layout: str = "contiguous",
                 clock=time.monotonic, **options):  # fmt: skip
        cfg = self.config = EngineConfig(num_slots=slots, state_dtype=state_dtype, layout=layout, **options)
        self.model = model
        self.pool = model.new_pool(cfg.num_slots, cfg.state_dtype, cfg.layout)
        max_batch = min(cfg.max_decode_batch, cfg.num_slots)
        self.runner = ModelRunner(model, self.pool, max_batch=max_batch, enforce_eager=cfg.enforce_eager)
        V = model.config.vocab_size
        # next-token logits of every slot; rows are valid once the slot has been fed
        self._logits = torch.zeros(cfg.num_slots, V, dtype=torch.float32, device=model.device)
        self._has_logits = [False] * cfg.num_slots
        self._owner: list[Session | None] = [None] * cfg.num_slots
        self._streams: list[GenerationStream] = []
        self._pinned: set[int] = set()  # ids of sessions an operation in progress needs resident
        # a model whose vocabulary is larger than its tokenizer's must never sample
        # an id the tokenizer cannot decode
        self._sample_limit = min(V, model.tokenizer.vocab_size)
        self.sessions: dict[int, Session] = {}
        self._next_id = 0
        self._tick = 0
        self.steps = 0  # packed forwards run by step()
        self.tokens_fed = 0
        self.tokens_generated = 0
        self.tier = HostTier(self.pool, cfg.host_format, cfg.cold_format, cfg.cold_after_s, clock)
        self.history = None
        if cfg.history_capacity:
            self.history = StateHistory(self.pool, cfg.history_every, cfg.history_capacity, cfg.history_format, V,
                                        marks=cfg.history_marks)  # fmt: skip
        self.prefix_cache = PrefixCache(cfg.prefix_cache_bytes) if cfg.prefix_cache_bytes else None

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end a generation by default: the world vocab's end-of-text (0)."""
        return [0] if self.model.config.tokenizer == "world" else []

    # ---- sessions and slots -----------------------------------------------------------------
    def session(self) -> Session:
        """A new, empty session. It takes a slot when first used."""
        session = Session(self, self._next_id)
        self.sessions[session.id] = session
        self._next_id += 1
        return session

    def resident(self, session: Session) -> int:
        """The session's slot, bringing the session back from the host tier (or giving it a
        fresh slot) if it has none."""
        if session._slot is None:
            slot = self._acquire_slot()
            if session.id in self.tier:
                try:
                    entry = self.tier.load(session.id, slot)  # the entry stays if the write fails
                except BaseException:
                    self.pool.free(slot)
                    raise
                self._set_logits(slot, entry.logits)
            session._slot = slot
            self._owner[slot] = session
        self._tick += 1
        session.last_used = self._tick
        return session._slot

    def _acquire_slot(self) -> int:
        if not self.pool.can_allocate():
            self._evict(self._victim())
        slot = self.pool.allocate()
        self._has_logits[slot] = False
        return slot

    def _victim(self) -> Session:
        idle = [s for s in self._owner if s is not None and not s.is_generating and s.id not in self._pinned]
        if not idle:
            raise SlotError(
                f"all {self.pool.num_slots} slots hold sessions that are generating; "
                "wait for a generation to finish or create the Engine with more slots"
            )
        return min(idle, key=lambda s: s.last_used)

    def _evict(self, session: Session) -> None:
        """Moves a resident session's state and logits to the host tier and frees its slot."""
        slot = session._slot
        logits = self._logits[slot] if self._has_logits[slot] else None
        self.tier.store(session.id, slot, logits)
        self._free_slot(slot)
        session._slot = None

    def _free_slot(self, slot: int) -> None:
        if self.history is not None:
            self.history.clear(slot)
        self.pool.free(slot)
        self._owner[slot] = None
        self._has_logits[slot] = False

    def release(self, session: Session) -> None:
        if session._slot is not None:
            self._free_slot(session._slot)
            session._slot = None
        self.tier.drop(session.id)
        self.sessions.pop(session.id, None)

    def _pin(self, *sessions: Session) -> list[int]:
        """Makes sessions resident together (none evicts another) and pins them until _unpin."""
        for s in sessions:
            self._pinned.add(s.id)
        return [self.resident(s) for s in sessions]

    def _unpin(self, *sessions: Session) -> None:
        for s in sessions:
            self._pinned.discard(s.id)

    # ---- logits ------------------------------------------------------------------------------
    def forget_logits(self, slot: int) -> None:
        self._has_logits[slot] = False

    def _set_logits(self, slot: int, logits: torch.Tensor | None) -> None:
        if logits is not None:
            self._logits[slot].copy_(logits)
        self._has_logits[slot] = logits is not None

    def slot_logits(self, slot: int) -> torch.Tensor:
        if not self._has_logits[slot]:
            raise RwkvStateError("no logits yet: feed at least one token first")
        return self._logits[slot]

    def _host_entry(self, session: Session) -> TierEntry | None:
        """The session's host-tier entry while it has no slot, else None."""
        return self.tier.entries.get(session.id) if session._slot is None else None

    def session_logits(self, session: Session) -> torch.Tensor:
        """The session's next-token logits, read from the host tier without bringing it back."""
        logits = self._logits_or_none(session)
        if logits is None:
            raise RwkvStateError("no logits yet: feed at least one token first")
        return logits

    def _logits_or_none(self, session: Session) -> torch.Tensor | None:
        if session.location == "none":  # never used: no logits, and no slot taken to say so
            return None
        entry = self._host_entry(session)
        if entry is not None:
            return entry.logits
        slot = self.resident(session)
        return self._logits[slot] if self._has_logits[slot] else None

    # ---- state operations --------------------------------------------------------------------
    def fork(self, session: Session) -> Session:
        """A new session with a copy of the state: slot to slot when a second slot can be had,
        else on the host (the parent moves to the host tier first, if it is idle)."""
        if session._slot is not None and not self._second_slot_available(session):
            if session.is_generating:
                raise SlotError(f"cannot fork: the other {self.pool.num_slots - 1} slots hold generating sessions")
            self._evict(session)
        child = self.session()
        if session._slot is None:
            if session.id in self.tier:  # else the session was never used, and the child starts empty too
                self._fork_on_host(session, child)
        else:
            try:
                src, dst = self._pin(session, child)
            except SlotError:
                self.release(child)
                raise
            finally:
                self._unpin(session, child)
            self.pool.copy(src, dst)
            self._logits[dst] = self._logits[src]
            self._has_logits[dst] = self._has_logits[src]
        child.tokens = list(session.tokens)
        child.from_zero, child._base = session.from_zero, session._base
        child._marks = list(session._marks)
        child._last_generation = session._last_generation
        return child

    def _second_slot_available(self, session: Session) -> bool:
        """Whether a slot other than session's can be had (free, or held by an idle session)."""
        if self.pool.can_allocate():
            return True
        return any(s is not None and s is not session and not s.is_generating and s.id not in self._pinned
                   for s in self._owner)  # fmt: skip

    def _fork_on_host(self, session: Session, child: Session) -> None:
        """No slot needed until the child is used: it gets its own copy of the host entry."""
        entry = self.tier.entries[session.id]
        state = entry.state if isinstance(entry.state, Encoded) else entry.state.clone()
        self.tier.put(child.id, TierEntry(state, entry.logits, entry.stored_at))

    def reset(self, session: Session) -> None:
        slot = self.resident(session)
        self.pool.reset(slot)
        self._forget_history(slot)
        self.forget_logits(slot)
        session.tokens, session._marks, session._last_generation = [], [], None
        session.from_zero, session._base = True, None

    def _forget_history(self, slot: int) -> None:
        if self.history is not None:
            self.history.clear(slot)

    def snapshot(self, session: Session, fmt: str | None = None, device=None) -> SessionSnapshot:
        """The session's state, token log and logits. fmt None: the canonical float32 dict on the
        host (from the lazy host copy); a format name: an encoded snapshot on `device` (default:
        the pool's device)."""
        if fmt is None:
            state = self._canonical(session)
            logits = self._logits_or_none(session)
            logits = None if logits is None else logits.cpu().clone()
        else:
            check_format(fmt)
            slot = self.resident(session)
            state = self.pool.encode_slot(slot, fmt)
            logits = self._logits[slot].clone() if self._has_logits[slot] else None
            if device is not None:
                state, logits = state.to(device), None if logits is None else logits.to(device)
        return SessionSnapshot(state, list(session.tokens), logits, from_zero=session.from_zero)

    def _canonical(self, session: Session) -> dict[str, torch.Tensor]:
        if session.location == "none":  # never used: the zero state, without taking a slot
            return zero_state(self.pool.layout.n_layer, self.pool.layout.n_embd, self.pool.layout.head_size)
        entry = self._host_entry(session)
        if entry is None:
            return self.pool.export(self.resident(session))
        lay = self.pool.layout
        parts = lay.split_layer(to_float32(entry.state).view(lay.n_layer, lay.layer_numel))
        return {name: part.clone(memory_format=torch.contiguous_format) for name, part in zip(CANONICAL_KEYS, parts)}

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
        self._write_state(slot, snap.state)  # a canonical dict is validated before it is written
        self._forget_history(slot)
        self._set_logits(slot, snap.logits)
        session.tokens = list(snap.tokens)
        session._marks, session._last_generation = [], None
        session.from_zero = snap.from_zero
        session._base = None if snap.from_zero else Base(len(snap.tokens), _own_copy(snap))

    def load_state(self, session: Session, state: dict[str, torch.Tensor]) -> None:
        snap = SessionSnapshot({k: v.detach().to("cpu", torch.float32, copy=True) for k, v in state.items()}, [], None)
        self.restore(session, snap)

    # ---- rollback ----------------------------------------------------------------------------
    def rollback(self, session: Session, n_tokens: int) -> None:
        """Takes back the session's last n_tokens tokens: restores the newest saved state at or
        before the target position (ring history, prefix cache or loaded base) and re-feeds the
        few tokens after it from the token log."""
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or not 0 <= n_tokens <= len(session.tokens):
            raise ValueError(f"can roll back 0 to {len(session.tokens)} tokens, got {n_tokens!r}")
        if n_tokens == 0:
            return
        target = len(session.tokens) - n_tokens
        if not session.from_zero and target < session._base.position:
            raise RwkvStateError(
                f"cannot roll back to position {target}: the session starts from a loaded state at "
                f"position {session._base.position}"
            )
        try:
            slot = self._pin(session)[0]
            self._rewind(session, slot, target)
        finally:
            self._unpin(session)
        session._marks = [m for m in session._marks if m < target]
        last = session._last_generation
        if last is not None and (last.start_position is None or last.start_position > target):
            session._last_generation = None

    def _rewind(self, session: Session, slot: int, target: int) -> None:
        tokens = session.tokens
        start, logits = self._restore_nearest(session, slot, target)
        if self.history is not None:
            self.history.truncate(slot, target)
        self._set_logits(slot, logits)  # copies: re-feeding may overwrite a ring entry
        session.tokens = tokens[:start]
        self._feed_ids(session, slot, tokens[start:target], cache=False)

    def _restore_nearest(self, session: Session, slot: int, target: int):
        """Restores the newest known state at or before target; returns (position, logits or None)."""
        hit = self.history.find(slot, target) if self.history is not None else None
        best = self.history.positions[slot][hit] if hit is not None else -1
        cached = None
        if self.prefix_cache is not None and session.from_zero:
            cached = self.prefix_cache.lookup(session.tokens[:target], min_length=best + 1)
        if cached is not None:
            self.pool.load_encoded(slot, cached.state)
            return cached.length, cached.logits
        if hit is not None:
            return self.history.restore(slot, hit)
        if session._base is not None:
            base = session._base.snapshot
            self._write_state(slot, base.state)
            return session._base.position, base.logits
        self.pool.reset(slot)
        return 0, None

    def _write_state(self, slot: int, state: dict[str, torch.Tensor] | Encoded) -> None:
        if isinstance(state, Encoded):
            self.pool.load_encoded(slot, state)
        else:
            self.pool.load(slot, state)

    def undo(self, session: Session, n: int = 1) -> int:
        """Takes back the last n feeds or generations; returns the number of tokens removed."""
        # an undo point at the end marks a feed or a reply that added nothing: nothing to take back
        session._marks = [m for m in session._marks if m < len(session.tokens)]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(session._marks):
            raise ValueError(f"can undo 1 to {len(session._marks)} steps, got {n!r}")
        removed = len(session.tokens) - session._marks[-n]
        self.rollback(session, removed)
        return removed

    # ---- feeding -----------------------------------------------------------------------------
    def feed(self, session: Session, ids: Sequence[int]) -> None:
        """Feeds a prompt into the session, in chunks of at most max_prefill_chunk tokens,
        starting from the longest cached prefix when the prefix cache is on."""
        try:
            slot = self._pin(session)[0]
            self._mark(session, slot)
            ids = self._use_prefix_cache(session, slot, list(ids))
            self._feed_ids(session, slot, ids, cache=True)
        finally:
            self._unpin(session)

    def _mark(self, session: Session, slot: int) -> None:
        """Remembers the session's position as an undo point (and may snapshot it)."""
        position = len(session.tokens)
        if not session._marks or session._marks[-1] != position:
            session._marks.append(position)
        self._record_mark(session, slot)

    def _record_mark(self, session: Session, slot: int) -> None:
        """Snapshots an undo point: into the ring's own entries for undo points when it has them;
        else only if the ring has nothing from the last `every` tokens (so a token-by-token feed
        cannot flood the periodic entries, yet undo never re-feeds more than that)."""
        history, position = self.history, len(session.tokens)
        if history is None or (position == 0 and session.from_zero):
            return
        logits = self._logits[slot] if self._has_logits[slot] else None
        if history.marks:
            history.record(slot, position, logits, mark=True)
        elif position - max(history.newest_position(slot), 0) >= history.every:
            history.record(slot, position, logits)

    def _use_prefix_cache(self, session: Session, slot: int, ids: list[int]) -> list[int]:
        """Restores the longest cached prefix that goes beyond the session's position; returns
        the ids still to feed."""
        if self.prefix_cache is None or not session.from_zero or not ids:
            return ids
        full = session.tokens + ids
        entry = self.prefix_cache.lookup(full, min_length=len(session.tokens) + 1)
        if entry is None:
            return ids
        self.pool.load_encoded(slot, entry.state)
        self._set_logits(slot, entry.logits)
        session.tokens = full[: entry.length]
        return full[entry.length :]

    def _feed_ids(self, session: Session, slot: int, ids: list[int], cache: bool) -> None:
        while ids:
            size = self._chunk_size(len(session.tokens), len(ids), cache)
            old = len(session.tokens)
            out = self.model.forward(self.pool, [slot], [ids[:size]], output="last")
            session.tokens.extend(ids[:size])
            ids = ids[size:]
            self._set_logits(slot, out[0])
            self.tokens_fed += size
            self._after_forward(session, slot, old, cache_end=cache and not ids)

    def _chunk_size(self, position: int, remaining: int, cache: bool, cut: int | None = None) -> int:
        """Tokens for the next prompt chunk; with the prefix cache on, chunks end at its
        multiples, and at `cut`, so the cache can store the shared parts of prompts."""
        size = min(remaining, self.config.max_prefill_chunk)
        if cache and self.prefix_cache is not None:
            every = self.config.prefix_cache_every
            size = min(size, every - position % every)
            if cut is not None and position < cut:
                size = min(size, cut - position)
        return size

    def _after_forward(self, session: Session, slot: int, old: int, cache_end: bool = False) -> None:
        """History and prefix-cache bookkeeping after the slot moved from position old."""
        new = len(session.tokens)
        if self.history is not None and self.history.due(old, new):
            self.history.record(slot, new, self._logits[slot])
        cache = self.prefix_cache
        at_cut = new % self.config.prefix_cache_every == 0 or cache_end
        if cache is not None and session.from_zero and at_cut and not cache.contains(session.tokens):
            state = self.pool.encode_slot(slot, self.config.prefix_cache_format)
            cache.insert(list(session.tokens), state, self._logits[slot].clone())

    # ---- batched generation ------------------------------------------------------------------
    def register(self, stream: GenerationStream) -> None:
        session = stream.session
        try:
            slot = self._pin(session)[0]
            self._mark(session, slot)
            stream.pending = self._use_prefix_cache(session, slot, stream.pending)
        finally:
            self._unpin(session)
        self._streams.append(stream)  # a registered stream keeps its session resident
        if not stream.pending:
            stream.start_position = len(session.tokens)
            self._record_mark(session, session._slot)

    def unregister(self, stream: GenerationStream) -> None:
        if stream in self._streams:
            self._streams.remove(stream)

    @property
    def num_generating(self) -> int:
        return len(self._streams)

    def step(self) -> None:
        """One packed forward for every live stream: one sampled token for each stream that is
        generating, and the next prompt chunk of each stream still reading its prompt."""
        streams = list(self._streams)
        if not streams:
            return
        items = self._sample_decode([s for s in streams if not s.pending])
        items += self._prompt_chunks([s for s in streams if s.pending])
        if items:
            try:
                self._run_items(items)
            except BaseException:
                self._recover_failed_step(items)
                raise
            self.steps += 1
        if self.steps % MAINTAIN_EVERY == 0:
            self.maintain()

    def _sample_decode(self, streams: list[GenerationStream]) -> list[tuple[GenerationStream, list[int]]]:
        if not streams:
            return []
        slots = [s.session._slot for s in streams]
        rows = self._logits[slots, : self._sample_limit].clone()
        for row, stream in zip(rows, streams):
            apply_penalties(row, stream.params, stream.counts)
        uniforms = [s.generator.random() for s in streams]
        tokens = sample(rows, [s.params for s in streams], uniforms)
        return [(s, [t]) for s, t in zip(streams, tokens) if s.accept(t)]

    def _prompt_chunks(self, streams: list[GenerationStream]) -> list[tuple[GenerationStream, list[int]]]:
        """Prompt chunks for this step, max_prefill_chunk tokens in all."""
        budget, items = self.config.max_prefill_chunk, []
        for stream in streams:
            if budget <= 0:
                break
            position = len(stream.session.tokens)
            size = min(budget, self._chunk_size(position, len(stream.pending), True, stream.cut_at))
            items.append((stream, stream.pending[:size]))
            del stream.pending[:size]
            budget -= size
        return items

    def _run_items(self, items) -> None:
        slots = [s.session._slot for s, _ in items]
        if all(len(ids) == 1 for _, ids in items) and all(s.start_position is not None for s, _ in items):
            logits = self.runner.decode(slots, [ids[0] for _, ids in items])
        else:
            logits = self.model.forward(self.pool, slots, [ids for _, ids in items], output="last")
        self._logits[slots] = logits
        for (stream, ids), slot in zip(items, slots):
            session = stream.session
            old = len(session.tokens)
            session.tokens.extend(ids)
            self._has_logits[slot] = True
            if stream.start_position is None:  # a prompt chunk
                self.tokens_fed += len(ids)
                self._after_forward(session, slot, old, cache_end=not stream.pending or len(session.tokens) == stream.cut_at)
                if not stream.pending:  # the reply starts here: what regenerate() returns to
                    stream.start_position = len(session.tokens)
                    self._record_mark(session, slot)
            else:
                self.tokens_generated += 1
                self._after_forward(session, slot, old)

    def _recover_failed_step(self, items) -> None:
        """A forward that raised may have written part of its slots. Its streams end ("error"),
        and each session's state is rebuilt from its token log, which holds only what was fed
        successfully; a session whose rebuild fails too is marked lost, so it is never used with
        a half-written state."""
        for stream, _ in items:
            if not stream.done:
                stream.finish("error")
            session = stream.session
            try:
                self._rewind(session, session._slot, len(session.tokens))
            except Exception:
                session._lost = True

    def run(self, streams: Sequence[GenerationStream]) -> list[str]:
        """Drives the given streams to the end; returns their texts.

        Draining them one after another still batches: the first stream's steps
        advance every live stream, whose pieces wait in their buffers.
        """
        return ["".join(stream) for stream in streams]

    # ---- housekeeping --------------------------------------------------------------------------
    def maintain(self) -> int:
        """Re-compresses host-tier entries that have been idle for cold_after_s; returns how many."""
        return self.tier.recompress_old()

    def stats(self) -> dict:
        """Counters for monitoring: slots, tiers, bytes, cache and history activity."""
        resident = sum(s is not None for s in self._owner)
        cache = self.prefix_cache
        out = {
            "sessions": len(self.sessions), "slots_total": self.pool.num_slots, "slots_in_use": resident,
            "sessions_on_host": len(self.tier), "generating": len(self._streams), "steps": self.steps,
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


def _own_copy(snap: SessionSnapshot) -> SessionSnapshot:
    """A snapshot sharing no tensor with the caller's (who may change theirs afterwards)."""
    state = snap.state.clone() if isinstance(snap.state, Encoded) else {k: v.clone() for k, v in snap.state.items()}
    logits = None if snap.logits is None else snap.logits.clone()
    return SessionSnapshot(state, list(snap.tokens), logits, from_zero=snap.from_zero)
