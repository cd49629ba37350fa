"""The engine core: the model, the engine, named sessions and the step loop, behind a socket.

One core serves one or more API server processes over a ZeroMQ ROUTER socket (msgpack
messages, runtime/messages.py). Its loop:

    receive (requests, cancellations, stops, session operations, pings; while streams generate,
             for at most RECEIVE_BUDGET_S, so a burst of requests is admitted over several steps)
    -> end requests that were cancelled or ran out of time
    -> engine.step() (the scheduler admits, decodes, feeds prompt chunks)
    -> one message per API process: every stream's new token ids and finish reasons

It busy-loops while the engine has work and blocks on the socket otherwise. It never
detokenises: the API processes turn ids into text and find stop strings (telling the core
with StopAt). A request that ends is answered only after its session is saved, so an API
process never acknowledges what is not stored.

The core runs in a process of its own (`CoreProcess`, restarted if it dies; saved sessions
load again) or, for tests, in a thread of the API process (`CoreThread`). Session operations
run between steps; one that needs a slot while every slot generates steps the running streams
until one ends (runtime/scheduler.py).

A request on a named session ends only after the session is saved: a failed save answers that
request with an error (503) and takes the session back to where the request found it, and so
does a stream that fails in the engine (500); other requests go on. With a shared store
(`CoreConfig.shared_store`, runtime/shared.py: Redis, for replicas) sessions are saved there,
and a session whose copy here is missing or stale is loaded from it before a request or
operation touches it. A stateless request brings its state file in `Generate.state` and, with
`return_state`, gets the new one back in its last `Update`.
"""

from __future__ import annotations

import heapq
import logging
import multiprocessing
import os
import queue
import secrets
import signal
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import zmq

from ..errors import RequestError, RwkvStateError, describe
from . import messages as m
from .registry import SessionRecord, SessionStore
from .chat import turn_break
from .latency import HISTOGRAMS, GcPauses, Histogram, startup_objects_frozen
from .sampling import SamplingParams

log = logging.getLogger("rwkvstate.core")

IDLE_POLL_MS = 50  # how long the loop blocks on the socket when the engine has nothing to do
# while streams generate, one iteration handles messages for at most this long and leaves the rest
# in the socket for the next: a burst of new requests is admitted over several steps instead of
# holding every running stream's next token for all of it
RECEIVE_BUDGET_S = 0.001
SLOW_STEP_S = 0.5  # an engine step longer than this is logged (every stream of the engine waited that long)
RATE_WINDOW_S = 10.0  # tokens/s is measured over this window


@dataclass
class CoreConfig:
    """What the core needs besides the model (the server's ServerConfig builds it)."""

    model_name: str = "rwkv7"
    slots: int = 8
    state_dtype: str = "fp32"
    prefix_cache_bytes: int = 64 << 20
    state_dir: str | None = None
    max_jobs: int = 264  # requests running or waiting, over all API processes; more are refused (429)
    engine_options: dict = field(default_factory=dict)
    max_sessions: int | None = 1000  # named sessions; more are refused (429)
    max_snapshots: int | None = 1000  # snapshot files in the state directory
    max_state_dir_bytes: int | None = None  # bytes of the state directory past which new files are refused
    allow_other_weights: bool = False  # load state files saved from other weights of the same shape
    # a store shared with other cores (runtime/shared.py), made in the core's process by calling
    # this (picklable) factory, e.g. cluster.store.RedisStore bound to its StoreConfig
    shared_store: Callable[[], Any] | None = None


@dataclass
class ModelSpec:
    """How a core process loads its model: a checkpoint path, or random weights of a shape."""

    path: str | None = None
    device: str = "cpu"
    dtype: str | None = None  # None: fp16 on a GPU, fp32 on the CPU
    tokenizer: str | None = None
    synthetic: dict | None = None  # {"config": ModelConfig fields, "seed": int}: random weights

    def load(self):
        from ..config import ModelConfig, parse_dtype
        from ..model.rwkv7 import Model

        device = torch.device(self.device)
        dtype = parse_dtype(self.dtype) if self.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
        if self.synthetic is not None:
            from ..model.synthetic import random_checkpoint

            cfg = ModelConfig(**self.synthetic["config"])
            tensors = random_checkpoint(cfg, seed=self.synthetic.get("seed", 0), dtype=dtype)
            return Model.from_tensors(tensors, cfg, device, dtype)
        return Model.load(self.path, device=device, dtype=dtype, tokenizer=self.tokenizer)


def model_summary(model) -> dict:
    """What a core serves, for the start-up log of the process that started it."""
    from ..state.layout import dtype_name

    c = model.config
    return {"path": str(model.path), "n_layer": c.n_layer, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
            "tokenizer": c.tokenizer, "device": str(model.device), "dtype": dtype_name(model.dtype)}  # fmt: skip


@dataclass(eq=False)
class Job:
    """A generation request inside the core."""

    client: bytes
    rid: int
    record: SessionRecord | None = None  # a named session; None: a session of its own
    session: Any = None
    stream: Any = None
    prompt_tokens: int = 0  # the prompt's length in tokens
    start_tokens: int = 0  # the session's length when the request started
    sent: int = 0  # token ids sent so far
    deadline: float | None = None
    return_state: bool = False  # the last update carries the state file after the request
    received: float = 0.0  # time.monotonic() when the core received it
    last_sent: float | None = None  # when its latest token ids left the core

    @property
    def prompt_read(self) -> int:
        """Prompt tokens read into the state so far (a timeout may end a request mid-prompt)."""
        return self.prompt_tokens - (len(self.stream.pending) if self.stream is not None else self.prompt_tokens)


GENERATION_FAILED = ("generation failed in the engine for this request (non-finite logits or a failed forward); "
                     "its session, if any, is as it was before the request")


class EngineCore:
    def __init__(self, model, config: CoreConfig, address: str, parent_pid: int | None = None):
        from .engine import Engine

        self.config = config
        self.engine = Engine(model, slots=config.slots, state_dtype=config.state_dtype,
                             prefix_cache_bytes=config.prefix_cache_bytes, **config.engine_options)  # fmt: skip
        if model.device.type == "cuda":  # kernels compiled now, not in the first requests' steps
            log.info("kernels compiled and decode graphs captured in %.1f s", self.engine.warm_up())
        file_bytes = model.state_layout.slot_nbytes(self.engine.pool.dtype) + 4 * model.config.vocab_size
        shared = None
        if config.shared_store is not None:
            from .shared import SharedSessions

            shared = SharedSessions(config.shared_store())
        self.store = SessionStore(None if config.state_dir is None else Path(config.state_dir), config.max_sessions,
                                  config.max_state_dir_bytes, config.max_snapshots, config.allow_other_weights,
                                  file_bytes, shared)  # fmt: skip
        self.store.load_all(self.engine)
        self.incarnation = secrets.token_hex(8)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting API process keeps its identity
        self.socket.bind(address)
        self.jobs: dict[tuple[bytes, int], Job] = {}
        self.local: queue.SimpleQueue = queue.SimpleQueue()  # callables from this process (CoreThread)
        self._deadlines: list[tuple[float, int, tuple[bytes, int]]] = []  # heap of (deadline, n, job key)
        self._outbox: dict[bytes, list[m.Update]] = defaultdict(list)
        self._rate: deque = deque()
        self.latency = {name: Histogram() for name in HISTOGRAMS}  # runtime/latency.py
        self._stopping = False
        self._n = 0
        self.parent_pid = parent_pid  # a core process stops when its parent is gone (never orphaned)

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        pauses = GcPauses(self.latency["engine_gc_pause"])
        try:
            with startup_objects_frozen():  # the model, kernels and sessions: collections skip them
                while not self._stopping:
                    self._iteration()
        finally:
            pauses.close()
            self._shutdown()

    def stop(self) -> None:
        """Ends the loop after the current iteration (from any thread or a signal handler)."""
        self._stopping = True

    def _iteration(self) -> None:
        idle = not self.engine.has_work
        start = time.perf_counter()
        self._receive(block=idle)
        if idle:  # the wait for a first request is not time between steps
            start = time.perf_counter()
        self._run_local()
        self._expire()
        stepped = self.engine.has_work
        took = self._step() if stepped else 0.0
        self._collect()
        self._flush()
        if stepped:
            self.latency["engine_core_step"].observe(took)
            self.latency["engine_core_between_steps"].observe(time.perf_counter() - start - took)

    def _receive(self, block: bool) -> None:
        """Handles the messages waiting (after waiting for one when block); with work running,
        at least one and then more for at most RECEIVE_BUDGET_S."""
        if not self.socket.poll(IDLE_POLL_MS if block else 0):
            if block and self.parent_pid is not None and os.getppid() != self.parent_pid:
                log.error("the process that started this engine core is gone; stopping")
                self.stop()
            return
        until = time.perf_counter() + RECEIVE_BUDGET_S
        while True:
            try:
                client, payload = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._handle(client, m.decode_to_core(payload))
            except Exception:
                log.exception("a message from an API process could not be handled")
            if self.engine.has_work and time.perf_counter() >= until:
                return

    def _handle(self, client: bytes, msg) -> None:
        if isinstance(msg, m.Generate):
            self._generate(client, msg)
        elif isinstance(msg, m.Cancel):
            self._end(self.jobs.get((client, msg.rid)), msg.reason)
        elif isinstance(msg, m.StopAt):
            self._stop_at(self.jobs.get((client, msg.rid)), msg.tokens)
        elif isinstance(msg, m.Call):
            result = self._call(msg)
            result.stats = self.stats()  # so /health and /metrics see what the operation did at once
            self._send(client, result)
        elif isinstance(msg, m.Ping):
            self._send(client, m.Pong(self.incarnation, self.stats()))
        elif isinstance(msg, m.Hello):
            self._send(client, self._welcome())

    def _welcome(self) -> m.Welcome:
        model = self.engine.model
        return m.Welcome(self.incarnation, self.config.model_name, model.config.vocab_size, model.config.tokenizer,
                         self.stats())  # fmt: skip

    def _run_local(self) -> None:
        while True:
            try:
                fn = self.local.get_nowait()
            except queue.Empty:
                return
            try:
                fn(self)
            except Exception:
                log.exception("a local call in the engine core failed")

    def _step(self) -> float:
        """One engine step; returns the seconds it took. A stream that fails in it ends alone
        ("error"); a step that raises anyway without ending a stream ends every running one."""
        start = time.perf_counter()
        try:
            self.engine.step()
            took = time.perf_counter() - start
            if took > SLOW_STEP_S:
                log.warning("an engine step took %.2f s (%d streams generating, %d waiting)", took,
                            self.engine.num_generating, self.engine.num_waiting)  # fmt: skip
            return took
        except Exception:
            log.exception("an engine step failed")
            if not any(job.stream.done for job in self.jobs.values()):
                for job in self.jobs.values():
                    job.stream.finish("error")
        return time.perf_counter() - start

    # ---- generation requests -------------------------------------------------------------------
    def _generate(self, client: bytes, msg: m.Generate) -> None:
        job = Job(client, msg.rid, received=time.monotonic())
        if msg.arrived is not None:
            self.latency["request_to_engine"].observe(job.received - msg.arrived)
        try:
            if len(self.jobs) >= self.config.max_jobs:
                raise RequestError(429, f"the server is at capacity ({len(self.jobs)} requests running or waiting); "
                                        "retry later", code="queue_full")  # fmt: skip
            if msg.session is not None:
                self.store.sync(self.engine, msg.session)
                job.record = self.store.acquire(msg.session, param="session")
            job.session = job.record.session if job.record is not None else self.engine.session()
            if msg.state is not None:
                from .persist import load_session_bytes

                load_session_bytes(job.session, msg.state, "state")
            job.return_state = msg.return_state
            job.start_tokens = len(job.session.tokens)
            ids, shared = self._prompt_ids(job, msg)
            sampling = SamplingParams(**msg.sampling)
            job.stream = job.session.generate(msg.max_tokens, sampling, prompt=ids, cache_prefix=shared)
        except Exception as e:  # nothing was changed
            if job.record is not None:
                self.store.release(job.record)
            elif job.session is not None:
                job.session.close()
            self._outbox[client].append(m.Update(msg.rid, [], error=self.error_of(e)))
            return
        self.jobs[client, msg.rid] = job
        if msg.timeout_s is not None:
            job.deadline = time.monotonic() + msg.timeout_s
            self._n += 1
            heapq.heappush(self._deadlines, (job.deadline, self._n, (client, msg.rid)))

    def _prompt_ids(self, job: Job, msg: m.Generate) -> tuple[list[int], int]:
        """The prompt's token ids, and how many of them are a shared prefix. A chat turn after
        text that did not end its turn (a reply cut by max_tokens, say) starts after a blank
        line. A system prompt on an empty session is tokenized on its own and marked as a
        prefix, so the prefix cache keeps its state for other requests; like the rest of the
        prompt it is read inside the batched steps."""
        session, tokenizer = job.session, self.engine.tokenizer
        if isinstance(msg.prompt, list):
            job.prompt_tokens = len(msg.prompt)
            return list(msg.prompt), 0
        text, prefix_ids = msg.prompt, []
        if msg.prefix and self.engine.prefix_cache is not None and session.from_zero and not session.tokens:
            prefix_ids = tokenizer.encode(msg.prefix)
        else:
            text = msg.prefix + text
        before = prefix_ids or session.tokens  # prefix_ids only when the session is empty
        if msg.chat:
            text = turn_break(tokenizer.decode_bytes(before[-4:]) if before else None) + text
        ids = prefix_ids + tokenizer.encode(text)
        job.prompt_tokens = len(ids)
        return ids, len(prefix_ids)

    def _end(self, job: Job | None, reason: str) -> None:
        """Ends a request early (cancelled by its client, or out of time)."""
        if job is not None and not job.stream.done:
            job.stream.finish(reason)

    def _stop_at(self, job: Job | None, tokens: int) -> None:
        if job is not None and not job.stream.done and 0 <= tokens <= len(job.stream.token_ids):
            self.engine.stop_at(job.stream, tokens)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, key = heapq.heappop(self._deadlines)
            self._end(self.jobs.get(key), "timeout")

    def _collect(self) -> None:
        """Every stream's new token ids; a stream that ended has its session saved (or closed)
        first, then its finish reason and usage go out."""
        now, first = time.monotonic(), self.latency["engine_first_token"]
        # the gaps, by when each request's previous message left: most left together one step ago,
        # so a step observes a few distinct gaps instead of one per request
        previous: Counter[float] = Counter()
        for key, job in list(self.jobs.items()):
            stream, updates = job.stream, self._outbox[job.client]
            ids = stream.token_ids
            new = ids[job.sent :] if len(ids) > job.sent else []
            job.sent = max(job.sent, len(ids))
            if new:
                if job.last_sent is None:
                    first.observe(now - job.received)
                else:
                    previous[job.last_sent] += 1
                job.last_sent = now
            if not stream.done:
                if new:
                    updates.append(m.Update(job.rid, new))
                continue
            del self.jobs[key]
            updates.append(self._finish(job, new))
        gap = self.latency["engine_token_gap"]
        for sent, count in previous.items():
            gap.observe(now - sent, count)

    def _finish(self, job: Job, new: list[int]) -> m.Update:
        """The last update of a request whose stream ended: its session is saved (or closed) first;
        a stream that failed in the engine, or a save that failed, answers an error instead and
        takes the session back to where the request found it."""
        if job.stream.finish_reason == "error":
            self._undo(job)
            self._end_session(job)
            return m.Update(job.rid, [], error=m.Error(500, GENERATION_FAILED, code="generation_failed"))
        state = self._returned_state(job)
        error = self._end_session(job)
        if error is None and isinstance(state, BaseException):
            error = self.error_of(state)
        if error is not None or isinstance(state, BaseException):  # not stored (or no state): not acknowledged
            return m.Update(job.rid, [], error=error)
        return m.Update(job.rid, new, job.stream.finish_reason, job.prompt_read, len(job.stream.token_ids),
                        state=state)  # fmt: skip

    @staticmethod
    def _returned_state(job: Job) -> bytes | BaseException | None:
        """The state file of a request that asked for it (return_state), or the error."""
        if not job.return_state:
            return None
        from .persist import session_bytes

        try:
            return session_bytes(job.session)
        except Exception as e:
            return e

    def _end_session(self, job: Job) -> m.Error | None:
        """Closes a one-off session or saves a named one (and lets it go); the error if the save
        failed (the session is then taken back to where the request found it, as its file has it)."""
        if job.record is None:
            if job.session is not None:
                job.session.close()
            return None
        try:
            self.store.persist(job.record)
        except Exception as e:
            log.error("saving session %s failed: %s", job.record.id, e)
            self._undo(job)
            return self.error_of(e)
        finally:
            self.store.release(job.record)
        return None

    def _undo(self, job: Job) -> None:
        if job.record is not None:
            try:
                self.store.revert(job.record, job.start_tokens)
            except Exception:
                log.exception("taking session %s back to before the failed request failed", job.record.id)

    def _flush(self) -> None:
        for client, updates in self._outbox.items():
            if updates:
                ended = any(u.finish is not None or u.error is not None for u in updates)
                self._send(client, m.Steps(updates, self.stats() if ended else None))
        self._outbox.clear()

    def _send(self, client: bytes, msg) -> None:
        try:
            self.socket.send_multipart([client, m.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:  # the API process is gone (or its queue is full): nothing to do
            pass

    # ---- session operations ---------------------------------------------------------------------
    def _call(self, msg: m.Call) -> m.Result:
        op = getattr(self, f"op_{msg.op}", None)
        if op is None:
            return m.Result(msg.cid, error=m.Error(404, f"unknown operation {msg.op!r}"))
        try:
            return m.Result(msg.cid, op(**msg.args))
        except Exception as e:
            return m.Result(msg.cid, error=self.error_of(e))

    def error_of(self, e: BaseException) -> m.Error:
        """The wire form of an exception raised while serving a request, without host paths."""
        status, message, code, param = describe(e, self.store.roots)
        return m.Error(status, message, param, code)

    def _info(self, record: SessionRecord) -> dict:
        return dict(self.store.info(self.engine, record), busy=record.busy, persistent=self.store.durable)

    def op_create(self, state_file: str | None = None) -> dict:
        path = None if state_file is None else self.store.resolve(state_file, "state_file")
        self.store.check_room(with_state=path is not None)
        record = self.store.create(self.engine, path, state_file)
        self.store.records[record.id] = record
        return self._info(record)

    def op_list(self) -> list[dict]:
        if self.store.shared is not None:  # every core's sessions, as the store has them
            return self.store.shared.listing()
        return [self._info(r) for r in self.store.records.values()]

    def op_get(self, session: str) -> dict:
        self.store.sync(self.engine, session)
        return self._info(self.store.get(session))

    def op_delete(self, session: str) -> dict:
        self.store.sync(self.engine, session)
        with self.store.held(session) as record:
            self.store.delete(record)
        self.store.records.pop(session, None)
        return {"id": session, "object": "session.deleted", "deleted": True}

    def op_fork(self, session: str) -> dict:
        self.store.sync(self.engine, session)
        self.store.get(session)  # 404 before 429
        self.store.check_room(with_state=True)
        with self.store.held(session) as record:
            child = self.store.fork(self.engine, record)
        self.store.records[child.id] = child
        return self._info(child)

    def op_rollback(self, session: str, tokens: int | None = None, turns: int | None = None) -> dict:
        self.store.sync(self.engine, session)
        with self.store.held(session) as record, self.store.saved_or_undone(record):
            s = record.session
            before = len(s.tokens)
            try:
                if tokens is not None:
                    s.rollback(tokens)
                else:
                    s.undo(1 if turns is None else turns)
            except (RwkvStateError, ValueError) as e:
                param = "tokens" if tokens is not None else "turns"
                raise RequestError(400, str(e), param=param, code="rollback_not_possible") from None
        return dict(self._info(record), removed=before - len(s.tokens))

    def op_snapshot(self, session: str, name: str | None = None) -> dict:
        self.store.sync(self.engine, session)
        with self.store.held(session) as record:
            return dict(self.store.snapshot(record, name), object="session.snapshot", session=session)

    def op_check_name(self, name: str) -> None:
        self.store.resolve(name, "name", must_exist=False)

    # ---- stats and shutdown ----------------------------------------------------------------------
    def stats(self) -> dict:
        stats = self.engine.stats()
        now = time.monotonic()
        self._rate.append((now, stats["tokens_generated"]))
        while len(self._rate) > 2 and now - self._rate[1][0] >= RATE_WINDOW_S:
            self._rate.popleft()
        t0, n0 = self._rate[0]
        stats["tokens_per_second"] = (stats["tokens_generated"] - n0) / (now - t0) if now > t0 else 0.0
        stats["queued"] = stats["waiting"]
        stats["running"] = stats["generating"]
        stats["requests"] = len(self.jobs)
        stats["pid"] = os.getpid()
        stats["latency"] = {name: h.wire() for name, h in self.latency.items()}
        stats.update(self._figures())
        return stats

    def _figures(self) -> dict:
        """The named sessions and the state directory, for /health and /metrics."""
        storage = self.store.storage
        out: dict = {"persistent_sessions": len(self.store.records), "storage": storage.health()}
        if self.store.persistent:
            out.update(storage_ok=int(storage.ok), save_failures=storage.failures,
                       skipped_files=storage.skipped_files, state_dir_bytes=storage.bytes_used)  # fmt: skip
        return out

    def _shutdown(self) -> None:
        """Ends every request (503) and saves every named session."""
        error = m.Error(503, "the server is shutting down", code="shutting_down")
        for job in list(self.jobs.values()):
            job.stream.close()
            self._end_session(job)
            self._outbox[job.client].append(m.Update(job.rid, [], error=error))
        self.jobs.clear()
        self._flush()
        self.store.save_all()
        self.socket.close(0)
        self.context.destroy(0)


# ---- running a core -----------------------------------------------------------------------------
class CoreThread:
    """A core on a thread of this process, for a model already loaded here (tests, CPU use):
    one interpreter lock for HTTP and engine, but no second copy of the model."""

    def __init__(self, model, config: CoreConfig, address: str):
        self.model, self.config, self.address = model, config, address
        self.summary = model_summary(model)
        self.core: EngineCore | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 600.0) -> None:
        self._thread = threading.Thread(target=self._main, name="rwkvstate-core", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the engine core did not start in time")
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            self.core = EngineCore(self.model, self.config, self.address)
        except BaseException as e:  # reported to start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.core.run()

    def call_soon(self, fn: Callable[[EngineCore], Any]) -> None:
        """Runs fn(core) on the core's thread between steps."""
        assert self.core is not None, "start() made the core"
        self.core.local.put(fn)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 60.0) -> None:
        if self.core is not None:
            self.core.stop()
        if self._thread is not None:
            self._thread.join(timeout)


def _core_main(spec: ModelSpec, config: CoreConfig, address: str, ready) -> None:
    """The entry point of a core process; `ready` gets the model summary once it serves."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     core: %(message)s")
    model = spec.load()
    core = EngineCore(model, config, address, parent_pid=os.getppid())
    signal.signal(signal.SIGTERM, lambda *_: core.stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us in order
    ready.send(model_summary(model))
    ready.close()
    core.run()


class CoreProcess:
    """A core in a process of its own, restarted when it dies (saved sessions load again).

    The API processes notice the restart (their connection drops, then a new incarnation
    answers): requests in flight end with an error, nothing acknowledged is lost."""

    def __init__(self, spec: ModelSpec, config: CoreConfig, address: str, restart: bool = True):
        self.spec, self.config, self.address, self.restart = spec, config, address, restart
        self._ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self.process: Any = None  # the multiprocessing Process
        self.summary: dict = {}
        self.restarts = 0
        self._stopping = False
        self._watcher: threading.Thread | None = None

    def start(self, timeout: float = 600.0) -> None:
        self._launch(timeout)
        self._watcher = threading.Thread(target=self._watch, name="rwkvstate-core-watch", daemon=True)
        self._watcher.start()

    def _launch(self, timeout: float) -> None:
        receive, send = self._ctx.Pipe(duplex=False)
        self.process = self._ctx.Process(target=_core_main, args=(self.spec, self.config, self.address, send),
                                         name="rwkvstate-core", daemon=True)  # fmt: skip
        self.process.start()
        send.close()
        deadline = time.monotonic() + timeout
        while not receive.poll(0.1):
            if not self.process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the engine core process did not start (exit code {self.process.exitcode})")
        self.summary = receive.recv()
        receive.close()

    def _watch(self) -> None:
        while not self._stopping:
            self.process.join(0.2)
            if self.process.is_alive() or self._stopping:
                continue
            if not self.restart:
                return
            log.error("the engine core process died (exit code %s); restarting it", self.process.exitcode)
            self.restarts += 1
            try:
                self._launch(600.0)
            except Exception:
                log.exception("the engine core could not be restarted")
                time.sleep(1.0)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM: the core ends its requests, saves its sessions and exits."""
        self._stopping = True
        if self.process is not None and self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        if self._watcher is not None:
            self._watcher.join(5)
