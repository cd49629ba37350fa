"""ServerContext: what the HTTP handlers of one API process share (config, core client, counters).

Lives on the event loop and runs no model code. The engine core runs elsewhere: in a process
of its own (a ModelSpec: the default for `rwkvstate serve`), on a thread of this process (a
loaded Model: tests and the CPU), or already running (`ServerConfig.core_address`: API worker
processes of `serve --api-processes N`). Generation requests go to the core; their token ids
come back one step at a time and are turned into text here (runtime/text.py), stop strings
included. Admission control is here too: at most `slots + max_queue` generation requests in
flight per API process, the rest answered 429 at once (the core enforces the same limit over
all API processes).
"""

from __future__ import annotations

import asyncio
import functools
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from ..runtime import messages as m
from ..runtime.core import CoreConfig, CoreProcess, CoreThread, ModelSpec
from ..runtime.sampling import SamplingParams
from ..runtime.text import StopText
from ..state.layout import dtype_name
from ..tokenizer import Tokenizer, get_tokenizer
from .client import CoreClient, from_wire
from .config import ServerConfig
from .events import Done, Failed, Text
from .metrics import Metrics
from .protocol import APIError
from .requestlog import RequestTimer, log_startup


@dataclass(eq=False)
class Job:
    """One generation request. The handler fills the request fields; ServerContext the rest."""

    prompt: str | list[int]
    max_tokens: int
    sampling: SamplingParams
    prefix: str = ""  # a system prompt, fed as its own prompt when the prefix cache can share it
    chat: bool = False  # a chat turn: starts after a blank line if earlier text did not end in one
    session: str | None = None  # a named session to continue
    state: bytes | None = None  # stateless mode: a one-off session starts from this state file
    return_state: bool = False  # Done carries the state file after the request
    arrived: float | None = None  # time.monotonic() when this process received the request (None: now)
    rid: int = 0
    stop_sent: bool = False
    ended: bool = False
    # set by ServerContext.submit
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # the core's updates for this request
    text: StopText = field(init=False)  # ids -> text, stop strings
    timer: RequestTimer = field(init=False)  # the request's log line


class ServerContext:
    def __init__(self, model, config: ServerConfig):
        self.config = config
        self.started = int(time.time())
        # engine figures and the server's own (sessions, storage) both come from the core's stats
        self.metrics = Metrics(lambda: self.stats)
        self.roots = () if config.state_dir is None else (config.state_dir,)  # never shown in errors
        self.inflight = 0  # generation requests accepted and not yet ended
        self.address = config.core_address or new_address()
        self.core: CoreThread | CoreProcess | None = None
        if config.core_address is None:
            settings = core_config(config, model)
            if isinstance(model, ModelSpec):
                self.core = CoreProcess(model, settings, self.address)
            else:
                self.core = CoreThread(model, settings, self.address)
        self._model = model if not isinstance(model, ModelSpec) else None
        self.client = CoreClient(self.address)
        # the ids clients may use, the first the one /health reports (API workers get them resolved)
        self.model_names = config.served_names(model)
        self.model_name = self.model_names[0]
        self.vocab_size = 0
        self.tokenizer: Tokenizer | None = None
        # the shared session store's counters for /metrics, read here (the core never waits on them)
        self.store_metrics: Callable[[], str] | None = None
        if config.session_store is not None and config.store_metrics:
            from ..cluster.store import RedisStore, render_store_metrics

            store = RedisStore(config.session_store)
            self.store_metrics = lambda: render_store_metrics(store)

    async def start(self) -> None:
        if self.core is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.core.start)
            log_startup(self.core.summary, self.config, self.model_names)
        await self.client.start()
        welcome = self.client.welcome
        assert welcome is not None  # start() returns once the core answered
        self.vocab_size = welcome.vocab_size
        self.tokenizer = self._model.tokenizer if self._model is not None else get_tokenizer(welcome.tokenizer)

    async def stop(self) -> None:
        await self.client.stop()
        if self.core is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.core.stop)

    @property
    def stats(self) -> dict:
        """The core's latest stats (refreshed by the heartbeat, every 0.1 s)."""
        return self.client.stats

    @property
    def alive(self) -> bool:
        return self.client.alive

    async def call(self, op: str, **args):
        """A session operation on the core; its errors come back as APIErrors."""
        return await self.client.call(op, **args)

    # ---- generation --------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Sends a job to the core (429 when this process has too many in flight)."""
        c = self.config
        limit = c.slots + c.max_queue
        if self.inflight >= limit:
            raise APIError(429, f"the server is at capacity ({self.inflight} requests running or waiting, "
                                f"limit {limit}); retry later", code="queue_full")  # fmt: skip
        arrived = time.monotonic() if job.arrived is None else job.arrived
        request = m.Generate(0, job.prompt, job.max_tokens, _sampling_fields(job.sampling), job.prefix, job.chat,
                             job.session, c.request_timeout_s, job.state, job.return_state, arrived)  # fmt: skip
        job.events = self.client.generate(request)
        job.rid = request.rid
        assert self.tokenizer is not None, "start() set the tokenizer"
        job.text = StopText(self.tokenizer, job.sampling.stop)
        job.timer = RequestTimer("chat" if job.chat else "completion", job.session, queued=arrived)
        self.inflight += 1
        return job

    async def events(self, job: Job, request=None) -> AsyncIterator[object]:
        """The job's Text events up to its Done or Failed. Leaving early (a disconnected client,
        a cancelled task) cancels the job; with `request`, a client that goes away while we
        wait cancels it too."""
        watcher = asyncio.ensure_future(self._watch(request, job)) if request is not None else None
        try:
            while True:
                for event in self._coalesce(job, await job.events.get()):
                    job.timer.on_event(event)
                    yield event
                if job.ended:
                    return
        finally:
            if watcher is not None:
                watcher.cancel()
            if not job.ended:
                self.cancel(job)
                self._ended(job)

    def _coalesce(self, job: Job, first: m.Update) -> list[object]:
        """The events of `first` and of every update already queued behind it, their text
        joined: a reader that fell behind by several steps writes them as one piece, so the
        work per wakeup (and per SSE write) does not grow with how far behind it is."""
        events, pieces = [], []
        update: m.Update | None = first
        while update is not None:
            for event in self._translate(job, update):
                if isinstance(event, Text):
                    pieces.append(event.text)
                else:
                    events.append(event)
            if job.ended:
                break
            update = job.events.get_nowait() if not job.events.empty() else None
        return ([Text("".join(pieces))] if pieces else []) + events

    def _translate(self, job: Job, update: m.Update) -> list[object]:
        """An update of the core as events: ids become text; a stop string found here is sent
        back to the core, which ends the stream there."""
        if update.error is not None:
            self._ended(job)
            return [Failed(from_wire(update.error))]
        text = job.text.push_many(update.ids) if update.ids else ""
        if job.text.stopped_at is not None and not job.stop_sent:
            job.stop_sent = True
            self.client.stop_at(job.rid, job.text.stopped_at)
        if update.finish is None:
            return [Text(text)] if text else []
        text += job.text.flush()
        self._ended(job)
        done = Done(update.finish, update.prompt_tokens, update.completion_tokens, update.state)
        return [Text(text), done] if text else [done]

    def _ended(self, job: Job) -> None:
        if not job.ended:
            job.ended = True
            self.inflight -= 1
            self.client.forget(job.rid)

    def cancel(self, job: Job) -> None:
        if not job.ended:
            self.client.cancel(job.rid)

    async def _watch(self, request, job: Job) -> None:
        """Cancels the job when the client disconnects (the body has been read already, so the
        next ASGI message is the disconnect)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.cancel(job)
                return

    def check_alive(self) -> None:
        self.client.check_alive()


def core_config(config: ServerConfig, model) -> CoreConfig:
    """The engine core's settings for this server config."""
    return CoreConfig(model_name=config.served_names(model)[0], slots=config.slots, state_dtype=dtype_name(config.state_dtype),
                      prefix_cache_bytes=config.prefix_cache_bytes,
                      state_dir=None if config.state_dir is None else str(config.state_dir),
                      max_jobs=config.slots + config.max_queue, engine_options=dict(config.engine_options),
                      max_sessions=config.max_sessions, max_snapshots=config.max_snapshots,
                      max_state_dir_bytes=config.max_state_dir_bytes,
                      allow_other_weights=config.allow_other_weights,
                      shared_store=shared_store(config.session_store))  # fmt: skip


def shared_store(store_config) -> Callable[[], Any] | None:
    """A factory the engine core calls (in its own process) to reach the shared session store."""
    if store_config is None:
        return None
    from ..cluster.store import RedisStore

    return functools.partial(RedisStore, store_config)


def _sampling_fields(p: SamplingParams) -> dict:
    return {"temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p, "min_p": p.min_p,
            "repetition_penalty": p.repetition_penalty, "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty, "seed": p.seed, "stop": list(p.stop),
            "stop_token_ids": None if p.stop_token_ids is None else list(p.stop_token_ids),
            "logit_bias": p.logit_bias}  # fmt: skip


def new_address() -> str:
    """A fresh socket path of this user's (ipc: a local socket, never on the network)."""
    directory = tempfile.mkdtemp(prefix="rwkvstate-")
    return f"ipc://{os.path.join(directory, 'core.sock')}"


__all__ = ["ServerContext", "Job", "Text", "Done", "Failed"]
