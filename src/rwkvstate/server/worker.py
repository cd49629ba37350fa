"""The engine worker: one thread that owns the Engine and runs its loop.

The engine is single-threaded, so every Engine and Session call happens on this thread.
The event loop hands it jobs (generation requests), commands (session operations) and
cancellations through a thread-safe inbox; events go back through
loop.call_soon_threadsafe, in one batch per iteration. One iteration:

    receive -> cancel and expire -> run commands -> admit waiting jobs -> engine.step() -> deliver

Admission keeps at most `max_active` streams generating (one pool slot each); the others
wait, first come first served. A command that needs pool slots (fork, load, rollback) waits
until enough slots are not generating, and holds back admissions meanwhile, so a stream of
new requests cannot starve it.

A job on a persistent session ends only after its session is saved: a failed save answers
that job with an error (503) and takes the session back to where the job found it, and so
does a stream that fails in the engine (500); other jobs go on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..runtime.chat import turn_break
from ..runtime.sampling import SamplingParams
from .errors import api_error
from .protocol import APIError

if TYPE_CHECKING:
    from ..runtime.engine import Engine

log = logging.getLogger("rwkvstate.server")

RATE_WINDOW_S = 10.0  # tokens/s is measured over this window
PUBLISH_EVERY_S = 0.2  # how often the stats snapshot for /metrics is refreshed


# ---- events sent to the event loop ----------------------------------------------------------
@dataclass
class Text:
    text: str


@dataclass
class Done:
    finish_reason: str  # stop, length, timeout, cancelled, error
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    error: APIError


@dataclass(eq=False)
class Job:
    """One generation request. The handler fills the request fields; the worker the rest."""

    prompt: str | list[int]
    max_tokens: int
    sampling: SamplingParams
    prefix: str = ""  # a system prompt, fed as its own prompt when the prefix cache can share it
    chat: bool = False  # a chat turn: starts after a blank line if earlier text did not end in one
    record: Any = None  # the SessionRecord of a persistent session; None: a one-off session
    deadline: float | None = None  # time.monotonic() after which the request ends with "timeout"
    on_event: Callable[[object], None] = lambda event: None  # runs on the event loop
    cancel_reason: str | None = None  # set (from any thread) to stop the job
    events: Any = None  # the handler's asyncio.Queue of events (event loop side)
    ended: bool = False  # Done or Failed was delivered (event loop side)
    # worker side
    session: Any = None
    stream: Any = None
    prompt_tokens: int = 0  # the prompt's length in tokens
    start_tokens: int = 0  # the session's length when the job started

    @property
    def prompt_read(self) -> int:
        """Prompt tokens read into the state so far (a timeout may end a job mid-prompt)."""
        return self.prompt_tokens - (len(self.stream.pending) if self.stream is not None else self.prompt_tokens)


@dataclass(eq=False)
class Command:
    """A function run on the worker thread between steps, with the engine as its argument."""

    fn: Callable[[Any], Any]
    slots: int = 0  # pool slots it may need (it waits until that many are not generating)
    on_done: Callable[[Any, BaseException | None], None] = lambda result, error: None  # worker thread


GENERATION_FAILED = ("generation failed in the engine for this request (non-finite logits or a failed forward); "
                     "its session, if any, is as it was before the request")


@dataclass
class _Rate:
    """Tokens per second over the last RATE_WINDOW_S seconds."""

    samples: deque = field(default_factory=deque)

    def update(self, now: float, total: int) -> float:
        self.samples.append((now, total))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()
        t0, n0 = self.samples[0]
        return (total - n0) / (now - t0) if now > t0 else 0.0


class EngineWorker:
    def __init__(self, make_engine: Callable[[], Engine], max_active: int,
                 on_start: Callable[[Any], object] | None = None, on_stop: Callable[[Any], None] | None = None,
                 on_job_end: Callable[[Job], None] | None = None, on_job_undo: Callable[[Job], None] | None = None,
                 error_of: Callable[[BaseException], APIError] = api_error):  # fmt: skip
        self._make_engine, self.max_active = make_engine, max_active
        self._on_start, self._on_stop = on_start, on_stop
        # worker thread, before a job's last event: saving its session (raises if it cannot),
        # and taking a session back to the job's start (after a failed save or stream)
        self._on_job_end = on_job_end or (lambda job: None)
        self._on_job_undo = on_job_undo or (lambda job: None)
        self.error_of = error_of  # an exception as the HTTP error answered for it
        self.engine: Engine | None = None  # built on the worker thread
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[Job] = deque()
        self._commands: deque[Command] = deque()
        self._active: list[Job] = []
        self._outbox: list[tuple[Job, object]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stopping = False
        self._published = 0.0
        self._published_counts = (0, 0, 0)
        self._rate = _Rate()
        self.stats: dict = {}  # the latest engine.stats() plus worker counters, for /metrics

    @property
    def _engine(self) -> Engine:
        assert self.engine is not None, "the worker thread builds the engine before anything uses it"
        return self.engine

    # ---- any thread ------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop, timeout: float = 600.0) -> None:
        """Starts the thread (which builds the engine) and waits until it is ready."""
        self._loop = loop
        self._thread = threading.Thread(target=self._main, name="rwkvstate-engine", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the engine worker did not start in time")
        if self._startup_error is not None:
            raise self._startup_error

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    def run_command(self, command: Command) -> None:
        self._inbox.put(command)

    def cancel(self, job: Job, reason: str = "cancelled") -> None:
        if job.cancel_reason is None:
            job.cancel_reason = reason
        self._inbox.put(None)  # wakes the loop

    def stop(self, timeout: float = 60.0) -> None:
        """Ends every request (503), runs on_stop (e.g. saving sessions) and joins the thread."""
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- worker thread ---------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.engine = self._make_engine()
            if self._on_start is not None:
                self._on_start(self.engine)
        except BaseException as e:  # reported to start()
            self._startup_error = e
            self._ready.set()
            return
        self._publish(force=True)
        self._ready.set()
        try:
            while not self._stopping:
                self._iteration()
        except BaseException:
            log.exception("the engine worker crashed")
        finally:
            self._shutdown()

    def _iteration(self) -> None:
        self._receive(block=not (self._active or self._waiting or self._commands))
        if self._stopping:
            return
        self._cancel_and_expire()
        self._run_commands()
        self._admit()
        if self._active:
            self._step()
        self._flush()
        self._publish()

    def _receive(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.25) if block else self._inbox.get_nowait()
            while True:
                if isinstance(item, Job):
                    self._waiting.append(item)
                elif isinstance(item, Command):
                    self._commands.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _cancel_and_expire(self) -> None:
        now = time.monotonic()
        for job in list(self._waiting):
            reason = self._end_reason(job, now)
            if reason is not None:
                self._waiting.remove(job)
                self._emit(job, Done(reason, 0, 0))  # nothing was read
        for job in list(self._active):
            reason = self._end_reason(job, now)
            if reason is not None:
                job.stream.close()
                self._finish(job, reason)

    @staticmethod
    def _end_reason(job: Job, now: float) -> str | None:
        if job.cancel_reason is not None:
            return job.cancel_reason
        if job.deadline is not None and now >= job.deadline:
            return "timeout"
        return None

    def _run_commands(self) -> None:
        while self._commands:
            command = self._commands[0]
            if len(self._active) + command.slots > self.max_active:
                return  # wait for streams to finish
            self._commands.popleft()
            try:
                result, error = command.fn(self._engine), None
            except BaseException as e:
                result, error = None, e
            command.on_done(result, error)

    def _admit(self) -> None:
        while self._waiting and not self._commands and len(self._active) < self.max_active:
            self._start(self._waiting.popleft())

    def _start(self, job: Job) -> None:
        engine = self._engine
        job.session = job.record.session if job.record is not None else engine.session()
        job.start_tokens = len(job.session.tokens)
        try:
            ids, shared = self._prompt_ids(job)
            job.stream = job.session.generate(job.max_tokens, job.sampling, prompt=ids, cache_prefix=shared)
        except Exception as e:  # nothing was changed
            if job.record is None:
                job.session.close()
            self._emit(job, Failed(self.error_of(e)))
            return
        self._active.append(job)

    def _prompt_ids(self, job: Job) -> tuple[list[int], int]:
        """The prompt's token ids, and how many of them are a shared prefix. A chat turn after
        text that did not end its turn (a reply cut by max_tokens, say) starts after a blank
        line. A system prompt on an empty session is tokenized on its own and marked as a
        prefix, so the prefix cache keeps its state for other requests; like the rest of the
        prompt it is read inside the batched steps."""
        session, tokenizer = job.session, self._engine.tokenizer
        if isinstance(job.prompt, list):
            job.prompt_tokens += len(job.prompt)
            return list(job.prompt), 0
        text, prefix_ids = job.prompt, []
        if job.prefix and self._can_share(session):
            prefix_ids = tokenizer.encode(job.prefix)
        else:
            text = job.prefix + text
        before = session.tokens + prefix_ids
        if job.chat:
            text = turn_break(tokenizer.decode_bytes(before[-4:]) if before else None) + text
        ids = prefix_ids + tokenizer.encode(text)
        job.prompt_tokens += len(ids)
        return ids, len(prefix_ids)

    def _can_share(self, session) -> bool:
        return self._engine.prefix_cache is not None and session.from_zero and not session.tokens

    def _step(self) -> None:
        """One engine step. A stream that fails in it ends alone (its finish reason is 'error');
        only a step that raises without ending any stream fails every job of the step."""
        try:
            self._engine.step()
        except Exception as e:
            log.exception("an engine step failed")
            if not any(job.stream.done for job in self._active):
                error = self.error_of(e)
                for job in list(self._active):
                    job.stream.close()
                    self._active.remove(job)
                    self._undo(job)
                    self._end_session(job)
                    self._emit(job, Failed(error))
        for job in list(self._active):
            text = job.stream.read()
            if text:
                self._emit(job, Text(text))
            if job.stream.done:
                self._finish(job, job.stream.finish_reason)

    def _finish(self, job: Job, reason: str) -> None:
        """Ends an admitted job: its last text, then its session is closed or saved, then Done;
        Failed instead if the stream failed in the engine or the session could not be saved."""
        self._active.remove(job)
        text = job.stream.read()
        if text:
            self._emit(job, Text(text))
        if reason == "error":
            self._undo(job)
            self._end_session(job)
            self._emit(job, Failed(APIError(500, GENERATION_FAILED, code="generation_failed")))
            return
        error = self._end_session(job)
        if error is not None:
            self._emit(job, Failed(error))
            return
        self._emit(job, Done(reason, job.prompt_read, len(job.stream.token_ids)))

    def _end_session(self, job: Job) -> APIError | None:
        """Closes a one-off session or saves a persistent one; the error if the save failed (the
        session is then taken back to where the job found it, as its file still has it)."""
        if job.record is None:
            job.session.close()
            return None
        try:
            self._on_job_end(job)
        except Exception as e:
            log.error("saving session %s failed: %s", job.record.id, e)
            self._undo(job)
            return self.error_of(e)
        return None

    def _undo(self, job: Job) -> None:
        if job.record is not None:
            try:
                self._on_job_undo(job)
            except Exception:
                log.exception("taking session %s back to before the failed request failed", job.record.id)

    # ---- delivery ----------------------------------------------------------------------------
    def _emit(self, job: Job, event: object) -> None:
        self._outbox.append((job, event))

    def _flush(self) -> None:
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        assert self._loop is not None, "start() set the loop"
        try:
            self._loop.call_soon_threadsafe(_dispatch, batch)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _publish(self, force: bool = False) -> None:
        """Refreshes `stats`: every PUBLISH_EVERY_S, and at once when requests start or end."""
        now = time.monotonic()
        counts = (len(self._waiting), len(self._active), len(self._commands))
        if not force and counts == self._published_counts and now - self._published < PUBLISH_EVERY_S:
            return
        self._published, self._published_counts = now, counts
        stats = dict(self._engine.stats())
        stats["tokens_per_second"] = self._rate.update(now, stats["tokens_generated"])
        stats["queued"] = len(self._waiting)
        stats["running"] = len(self._active)
        stats["commands_waiting"] = len(self._commands)
        self.stats = stats

    def _shutdown(self) -> None:
        error = APIError(503, "the server is shutting down", code="shutting_down")
        self._receive(block=False)
        for job in list(self._active):
            job.stream.close()
            self._active.remove(job)
            self._end_session(job)
            self._emit(job, Failed(error))
        for job in self._waiting:
            self._emit(job, Failed(error))
        self._waiting.clear()
        for command in self._commands:
            command.on_done(None, error)
        self._commands.clear()
        self._flush()
        if self._on_stop is not None and self.engine is not None:
            try:
                self._on_stop(self.engine)
            except Exception:
                log.exception("shutdown hook failed")


def _dispatch(batch: list[tuple[Job, object]]) -> None:
    """On the event loop: hands each event to its job."""
    for job, event in batch:
        job.on_event(event)
