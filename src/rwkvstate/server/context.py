"""ServerContext: what the HTTP handlers share (config, engine worker, sessions, counters).

Lives on the event loop. Generation requests become Jobs for the worker; their events come
back into a per-request asyncio.Queue. Admission control is here: at most
`slots + max_queue` generation requests in flight, the rest answered 429 at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from .config import ServerConfig
from .metrics import RequestCounter
from .protocol import APIError
from .requestlog import RequestTimer
from .sessions import SessionRecord, SessionStore
from .worker import Command, Done, EngineWorker, Failed, Job, api_error


class ServerContext:
    def __init__(self, model, config: ServerConfig):
        self.model, self.config = model, config
        self.model_names = config.served_names(model)  # the first is the one /health reports
        self.model_name = self.model_names[0]
        self.started = int(time.time())
        self.store = SessionStore(config.state_dir)
        self.requests = RequestCounter()
        self.inflight = 0  # generation requests accepted and not yet ended
        self.worker = EngineWorker(self._make_engine, config.slots, on_start=self.store.load_all,
                                   on_stop=lambda engine: self.store.save_all(),
                                   on_job_end=lambda job: self.store.persist(job.record))  # fmt: skip

    def _make_engine(self):
        from ..runtime.engine import Engine

        c = self.config
        return Engine(self.model, slots=c.slots, state_dtype=c.state_dtype, prefix_cache_bytes=c.prefix_cache_bytes,
                      **c.engine_options)  # fmt: skip

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.worker.start, loop)

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)

    # ---- commands ----------------------------------------------------------------------------
    async def call(self, fn, slots: int = 0):
        """Runs fn(engine) on the worker thread; returns its result or raises its error."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def done(result, error):  # worker thread: engine errors become HTTP errors here
            loop.call_soon_threadsafe(_settle, future, result, None if error is None else api_error(error))

        self.worker.run_command(Command(fn, min(slots, self.config.slots), done))
        return await future

    async def with_session(self, session_id: str, fn, slots: int = 0):
        """Runs fn(engine, record) on the worker while holding the session (409 if busy)."""
        record = self.store.acquire(session_id)
        try:
            return await self.call(lambda engine: fn(engine, record), slots)
        finally:
            self.store.release(record)

    # ---- generation --------------------------------------------------------------------------
    def submit(self, job: Job, session_id: str | None) -> Job:
        """Queues a job (429 when the queue is full), holding its session if it names one."""
        self._check_alive()
        c = self.config
        limit = c.slots + c.max_queue
        if self.inflight >= limit:
            raise APIError(429, f"the server is at capacity ({self.inflight} requests running or waiting, "
                                f"limit {limit}); retry later", code="queue_full")  # fmt: skip
        if session_id is not None:
            job.record = self.store.acquire(session_id, param="session")
        job.events = asyncio.Queue()
        timer = RequestTimer("chat" if job.chat else "completion", session_id)

        def on_event(event) -> None:
            timer.on_event(event)
            self._on_event(job, event)

        job.on_event = on_event
        if c.request_timeout_s is not None:
            job.deadline = time.monotonic() + c.request_timeout_s
        self.inflight += 1
        self.worker.submit(job)
        return job

    def _on_event(self, job: Job, event) -> None:
        if isinstance(event, (Done, Failed)):
            self.inflight -= 1
            job.ended = True
            if job.record is not None:
                self.store.release(job.record)
        job.events.put_nowait(event)

    async def events(self, job: Job, request=None) -> AsyncIterator[object]:
        """The job's events up to Done or Failed. Leaving early (a disconnected client, a
        cancelled task) cancels the job; with `request`, a client that goes away while we
        wait cancels it too."""
        watcher = asyncio.ensure_future(self._watch(request, job)) if request is not None else None
        try:
            while True:
                event = await job.events.get()
                yield event
                if isinstance(event, (Done, Failed)):
                    return
        finally:
            if watcher is not None:
                watcher.cancel()
            if not job.ended:
                self.worker.cancel(job)

    async def _watch(self, request, job: Job) -> None:
        """Cancels the job when the client disconnects (the body has been read already, so the
        next ASGI message is the disconnect)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.worker.cancel(job)
                return

    def _check_alive(self) -> None:
        if not self.worker.alive:
            raise APIError(503, "the engine is not running", code="engine_stopped")


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


__all__ = ["ServerContext", "SessionRecord"]
