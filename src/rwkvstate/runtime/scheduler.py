"""The scheduler: which generation streams run, and what each step feeds.

    waiting     streams created while no slot could be had, first come first served
    prefilling  admitted streams still reading their prompts, oldest first
    decoding    the stepper's decode batch: one sampled token per stream per step

A stream is admitted when its session holds a slot or one can be had: a free slot, or the
slot of the least recently used idle session, which moves to the host tier. Every slot taken
by a generating session means waiting. Each step decodes every decoding stream first, then
feeds prompt chunks up to `max_prefill_tokens` tokens in all, oldest prompt first, so new
requests never stall the running ones for more than one budget's worth of tokens. A short
prompt admitted while streams decode skips the prefilling list: it joins the decode batch and
is read there one token per step (Stepper.takes_prompt), stalling nobody; so does a short
prompt still queued for a packed read, untouched, once streams decode (a burst into an idle
engine: the first step's budget is read packed, the rest in the decode batch).

While an operation of the engine's own waits for a slot (`hold()`), nothing is admitted: the
running streams finish and free their slots for it.
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from ..config import EngineConfig
from .residency import Residency
from .stepper import StepItem, Stepper
from .timeline import Timeline

if TYPE_CHECKING:
    from .session import GenerationStream

log = logging.getLogger("rwkvstate.engine")


class Scheduler:
    def __init__(self, residency: Residency, timeline: Timeline, stepper: Stepper, config: EngineConfig):
        self.residency = residency
        self.timeline = timeline
        self.stepper = stepper
        self.config = config
        self.waiting: deque[GenerationStream] = deque()
        self.prefilling: list[GenerationStream] = []
        self._fed: set[GenerationStream] = set()  # prefilling streams that got a chunk already
        self._holds = 0  # operations waiting for a slot: no admissions meanwhile

    @property
    def num_running(self) -> int:
        return len(self.prefilling) + len(self.stepper.batch)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or len(self.stepper.batch))

    # ---- streams coming and going ----------------------------------------------------------------
    def add(self, stream: GenerationStream) -> None:
        """A new stream: admitted at once when nobody waits before it and a slot can be had (its
        errors then reach the caller), else queued."""
        if not self.waiting and self._holds == 0 and self._can_admit(stream):
            self._admit(stream)
        else:
            self.waiting.append(stream)

    def remove(self, stream: GenerationStream) -> None:
        if stream in self.waiting:
            self.waiting.remove(stream)
        elif stream in self.prefilling:
            self.prefilling.remove(stream)
            self._fed.discard(stream)
        else:
            self.stepper.leave(stream)

    @contextmanager
    def hold(self) -> Iterator[None]:
        """No admissions while the block runs (an operation waits for running streams to end)."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1

    # ---- admission -----------------------------------------------------------------------------
    def admit(self) -> None:
        """Admits waiting streams in order while slots can be had; a stream whose session holds a
        slot already is admitted whatever waits before it (it costs no slot). A stream whose
        admission fails (e.g. its state cannot be brought back) ends with "error"; the others go on."""
        if self._holds:
            return
        slots_left = True
        for stream in list(self.waiting):
            if not stream.session.is_resident:
                slots_left = slots_left and self.residency.can_acquire()
                if not slots_left:
                    continue
            self.waiting.remove(stream)
            try:
                self._admit(stream)
            except Exception:
                log.exception("a waiting stream could not start")
                stream.finish("error")

    def _can_admit(self, stream: GenerationStream) -> bool:
        return stream.session.is_resident or self.residency.can_acquire()

    def _admit(self, stream: GenerationStream) -> None:
        """Starts the stream: its position is an undo point, its prompt starts from the longest
        cached prefix, and it joins the decode batch once the prompt is read."""
        session = stream.session
        with self.residency.pinned_slots(session) as (slot,):
            self.timeline.mark(session, slot)
            stream.pending = self.timeline.use_prefix_cache(session, slot, stream.pending)
        self.timeline.generation_started(session, stream)
        if stream.params.has_penalties():  # the slot's counts row may hold another stream's
            self.stepper.counts.rebuild(slot, stream.token_ids)
        if stream.pending and self.stepper.takes_prompt(stream):  # read inside the decode batch
            self.stepper.join(stream)
        elif stream.pending:
            self.prefilling.append(stream)
        else:
            self.timeline.reply_started(session, slot, stream)
            self.stepper.join(stream)

    # ---- planning a step -----------------------------------------------------------------------
    def prefill_chunks(self) -> list[StepItem]:
        """This step's prompt chunks, max_prefill_tokens in all; a stream whose prompt is read
        moves to the decode batch (the stepper moves it once the chunk is fed)."""
        self._join_decoding()
        budget, items = self.config.max_prefill_tokens, []
        for stream in list(self.prefilling):
            if budget <= 0:
                break
            position = len(stream.session.tokens)
            size = min(budget, self.timeline.chunk_size(position, len(stream.pending), True, stream.cut_at))
            items.append((stream, stream.pending[:size]))
            del stream.pending[:size]
            budget -= size
            self._fed.add(stream)
            if not stream.pending:
                self.prefilling.remove(stream)
                self._fed.discard(stream)
        return items

    def _join_decoding(self) -> None:
        """Short prompts queued for a packed read while nothing decoded (e.g. a burst of requests
        into an idle engine, more than one step's budget) join the decode batch as soon as other
        streams decode, to be read there one token per step: the streams that started decoding
        are then not held up by packed forwards of the rest. A prompt whose reading has begun
        stays packed."""
        for stream in list(self.prefilling):
            if stream not in self._fed and self.stepper.takes_prompt(stream):
                self.prefilling.remove(stream)
                self.stepper.join(stream)
