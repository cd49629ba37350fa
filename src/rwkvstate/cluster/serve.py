"""`rwkvstate serve --replicas N`: engine replicas on Ray Serve behind the ingress.

    client --HTTP--> Ray Serve proxy --> Ingress (M replicas, default N; no model)
                                           | deployment handle, session-affinity router
                                           v
                          EngineReplica x N (one per GPU, or CPU): the single server's app
                                           |  and its engine core (on a thread of the replica)
                                           v
                                  Redis: every session's state file

Each EngineReplica runs the single server's whole FastAPI app (server/app.py: validation,
auth, limits, sessions API, SSE) and its engine core (runtime/core.py, on a thread: Ray
supervises the replica's process, see docs/cluster.md), with the core's sessions in the shared
store (runtime/shared.py, each blob written with the replica's id as its holder) instead of a
state directory; an ingress hands it raw HTTP requests
and streams its answers back, so every endpoint behaves as on one server. The ingress adds
what only a view over all replicas can give: routing by session (routing.py: the store names
each session's holder, so every ingress routes alike), /metrics summed over replicas plus the
store's counters (the ingresses' affinity counts among them), and the session list from the
store. Ingress replicas scale the per-request work in front of the engines (Ray's handle
calls cost milliseconds of CPU per request; docs/cluster.md has the measurements). A
replica that dies takes its in-flight requests with it (they end with an error); the next
request of each of its sessions goes to another replica, which loads it from the store.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig

from ..errors import first_line
from ..server.config import ServerConfig
from .affinity import AFFINITY
from .store import StoreConfig, StoreUnavailable, render_store_metrics

log = logging.getLogger("rwkvstate.cluster")

APP_NAME = "rwkvstate"
REPLICA_HEADER = "x-rwkvstate-replica"  # which replica answered (the ingress learns affinity from it)
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
ROUTER = "rwkvstate.cluster.routing.SessionAffinityRouter"  # by name: Ray imports it in the ingress
METRICS_TIMEOUT_S = 5.0  # per replica, for /metrics
QUICK_TIMEOUT_S = 1.0  # the ingress's store reads: a session's holder, /metrics' counters


@dataclass
class ClusterConfig:
    """What every replica needs to build its server; plain data, so Ray can ship it."""

    model: str
    store: StoreConfig
    device: str = "cpu"
    dtype: str = "fp32"
    tokenizer: str | None = None
    server: dict = field(default_factory=dict)  # ServerConfig(**server) keyword arguments
    replicas: int = 2
    torch_threads: int | None = None  # CPU replicas: threads each (None: torch's default)
    ingress_replicas: int | None = None  # None: one per engine replica


# ---- the engine replica --------------------------------------------------------------------------
class EngineReplica:
    """One model, one engine, one server app; requests arrive as dicts from the ingress."""

    async def __init__(self, config: ClusterConfig):  # type: ignore[misc]  # Ray runs async constructors
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.app = _build_server(replace(config, store=replace(config.store, holder=self.replica)))
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()

    async def handle(self, request: dict, session: str | None = None, replica: str | None = None,
                     holder: str | None = None) -> AsyncIterator:  # fmt: skip
        """The server app's answer to `request`: first {"status", "headers"}, then body chunks.
        `session`, `replica` and `holder` are for the router only."""
        async for part in _asgi_call(self.app, request, self.replica):
            yield part

    async def info(self, replica: str | None = None) -> dict:
        """Which replica, process and device this is (the device's UUID tells two GPUs apart)."""
        import torch

        device: dict[str, str | None] = {"device": "cpu"}
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            device = {"device": props.name, "device_uuid": str(props.uuid),
                      "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}  # fmt: skip
        return {"replica": self.replica, "pid": os.getpid(), **device}

    async def __del__(self):
        await self._lifespan.__aexit__(None, None, None)


def _build_server(config: ClusterConfig):
    """The single server's app for this replica: its engine core on a thread of the replica
    (docs/cluster.md says why), its sessions in the shared store. The store's counters are
    left to the ingress, which shows them once for all replicas."""
    import torch

    from ..model.rwkv7 import Model
    from ..server.app import create_app
    from ..server.config import ServerConfig
    from ..state.layout import parse_dtype

    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    model = Model.load(config.model, device=config.device, dtype=parse_dtype(config.dtype), tokenizer=config.tokenizer)
    return create_app(model, ServerConfig(**config.server, session_store=config.store, store_metrics=False))


async def _asgi_call(app, request: dict, replica: str) -> AsyncIterator:
    """Runs one HTTP request through an ASGI app in this process, yielding the response start
    ({"status", "headers"}) and then each body chunk. If the caller stops reading (the client
    went away), the app sees a disconnect."""
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request["body"], "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await out.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": request["method"], "scheme": "http", "path": request["path"], "raw_path": request["path"].encode(),
             "query_string": request["query"].encode(), "root_path": "", "headers": request["headers"],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}  # fmt: skip
    task = asyncio.ensure_future(app(scope, receive, send))
    try:
        while True:
            getter = asyncio.ensure_future(out.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                task.result()  # the app ended without a complete response: its error goes on
                return
            message = getter.result()
            if message["type"] == "http.response.start":
                headers = [(k.decode(), v.decode()) for k, v in message.get("headers", [])]
                yield {"status": message["status"], "headers": headers + [(REPLICA_HEADER, replica)]}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, 5)
            except (asyncio.TimeoutError, Exception):
                task.cancel()


# ---- the ingress -----------------------------------------------------------------------------------
def _ingress_app() -> FastAPI:
    app = FastAPI(title="rwkvstate cluster", docs_url=None, redoc_url=None, openapi_url=None)

    @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH"])
    async def proxy(request: Request, path: str):
        ingress: Any = serve.get_replica_context().servable_object  # the Ingress
        return await ingress.forward(request)

    return app


class Ingress:
    """An entry point (one of `ingress_replicas`): finds the session of each request and the
    replica the store says holds it, hands the request to the replica the router picks, streams
    the answer back."""

    def __init__(self, engine, config: ClusterConfig):
        from .store import RedisStore

        self.engine = engine.options(stream=True)
        self.config = config
        self.store = RedisStore(config.store)  # for counters only: sessions are the replicas' business
        # holder lookups and /metrics' reads: a short timeout, so a store that hangs costs a
        # session's request at most that, and requests without a session nothing
        self.quick = RedisStore(replace(config.store, timeout_s=min(config.store.timeout_s, QUICK_TIMEOUT_S)))
        self.name = serve.get_replica_context().replica_id.unique_id
        threading.Thread(target=self._publish_counts, name="affinity-counts", daemon=True).start()
        key = config.server.get("api_key")
        self.expected = None if not key else f"Bearer {key}".encode()
        self.max_body = ServerConfig(**config.server).max_body_bytes

    async def forward(self, request: Request) -> Response:
        path = request.url.path
        if path == "/metrics" and request.method == "GET":
            refused = self._refuse_key(request)
            return refused if refused is not None else PlainTextResponse(await self.metrics())
        body = await request.body()
        if len(body) > self.max_body:
            return _error(413, f"request body larger than this server's limit of {self.max_body} bytes",
                          "request_too_large")  # fmt: skip
        session = _session_of(request.method, path, body)
        raw = {"method": request.method, "path": path, "query": request.url.query, "body": body,
               "headers": [(k.encode(), v.encode()) for k, v in request.headers.items()]}  # fmt: skip
        stream = self.send(raw, session, await self._holder(session) if session else None)
        try:
            start = await stream.__anext__()
        except Exception as e:  # the replica died before answering
            log.warning("a replica failed before answering %s %s: %s", request.method, path, e)
            return _error(503, f"the replica serving this request failed ({type(e).__name__}); retry: "
                          "its sessions continue on another replica", "replica_failed")  # fmt: skip
        headers = dict(start["headers"])
        if headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(_relay(stream), status_code=start["status"], headers=_plain(headers))
        chunks = [chunk async for chunk in stream]
        content = b"".join(chunks)
        self._learn(request.method, path, start["status"], headers, content)
        return _raw_response(start["status"], headers, content)

    def send(self, raw: dict, session: str | None, holder: str | None = None):
        """Hands a request to a replica: the router reads `session` and `holder` to pick it."""
        return self.engine.handle.remote(raw, session=session, holder=holder)

    async def _holder(self, session: str) -> str | None:
        """The replica the store says wrote `session` last; None when the store does not know
        or does not answer in time (the router then uses its own map; the replica will report
        the store)."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.quick.holder, session), QUICK_TIMEOUT_S + 0.5)
        except (StoreUnavailable, asyncio.TimeoutError):
            return None

    def _refuse_key(self, request):
        if self.expected is None:
            return None
        given = request.headers.get("authorization", "").encode()
        if hmac.compare_digest(given, self.expected):
            return None
        return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                      "invalid_api_key")  # fmt: skip

    def _learn(self, method: str, path: str, status: int, headers: dict, content: bytes) -> None:
        """A session created or forked lives on the replica that answered: route it there."""
        creates = method == "POST" and (path == "/v1/sessions" or path.endswith("/fork"))
        if not creates or status != 200 or REPLICA_HEADER not in headers:
            return
        try:
            AFFINITY.remember(json.loads(content)["id"], headers[REPLICA_HEADER])
        except (ValueError, KeyError, TypeError):
            pass

    async def metrics(self) -> str:
        """Every replica's /metrics summed (each bounded), the ingresses' affinity counts, then
        the store's counters once. The replicas are asked one after another: two such calls at
        once through this router were seen to stall until their timeout."""
        texts = [t for t in [await self._replica_metrics(r) for r in list(AFFINITY.replicas)] if t is not None]
        text = sum_metrics(texts) + f"# TYPE rwkvstate_replicas gauge\nrwkvstate_replicas {len(texts)}\n"
        text += await asyncio.to_thread(self._affinity_metrics)
        return text + await asyncio.to_thread(render_store_metrics, self.quick)

    async def _replica_metrics(self, replica: str) -> str | None:
        raw = {"method": "GET", "path": "/metrics", "query": "", "body": b"", "headers": self._auth_headers()}
        call = self.engine.handle.remote(raw, replica=replica)
        try:  # bounded: a replica that is going away must not hold /metrics
            parts = await asyncio.wait_for(_collect(call), METRICS_TIMEOUT_S)
            return b"".join(p for p in parts[1:]).decode()
        except Exception as e:
            call.cancel()
            log.warning("metrics of replica %s: %s", replica, first_line(e, type(e).__name__))
            return None

    def _publish_counts(self, every_s: float = 1.0) -> None:
        """Writes this ingress's affinity hits and moves, as totals under its own name, beside the
        store's counters once a second: /metrics on any ingress sums every ingress's. Totals,
        not increments, so a write that failed halfway or is repeated counts nothing twice."""
        while True:
            time.sleep(every_s)
            try:
                self.store.set_counts(self.name, AFFINITY.totals())
            except StoreUnavailable:
                pass  # the next second writes the totals again

    def _affinity_metrics(self) -> str:
        """Hits and moves of every ingress (this one's from memory, the others' as last written)."""
        try:
            stored = self.quick.summed_counts(skip=self.name)
        except StoreUnavailable:  # rwkvstate_store_up 0 says why they are missing
            return ""
        counts = {k: stored.get(k, 0) + v for k, v in AFFINITY.totals().items()}
        return (f"# TYPE rwkvstate_affinity_hits_total counter\nrwkvstate_affinity_hits_total {counts['hits']}\n"
                f"# TYPE rwkvstate_affinity_moves_total counter\nrwkvstate_affinity_moves_total {counts['moves']}\n")

    def _auth_headers(self) -> list:
        return [] if self.expected is None else [(b"authorization", self.expected)]


async def _collect(stream) -> list:
    return [part async for part in stream]


def _session_of(method: str, path: str, body: bytes) -> str | None:
    """The session a request is for: the path's for /v1/sessions/<id>..., the body's
    `session` for generation requests."""
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[:2] == ["v1", "sessions"]:
        return parts[2]
    if method == "POST" and path in GENERATION_PATHS and b'"session"' in body:
        try:
            value = json.loads(body).get("session")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None
    return None


async def _relay(stream) -> AsyncIterator[bytes]:
    """SSE chunks as the replica sends them; if it dies mid-stream, an error event ends it."""
    try:
        async for chunk in stream:
            yield chunk
    except Exception as e:
        error = {"error": {"message": f"the replica serving this request failed ({type(e).__name__}); the session "
                                      "continues on another replica from its last stored state",
                           "type": "server_error", "param": None, "code": "replica_failed"}}  # fmt: skip
        yield b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n"


def _plain(headers: dict) -> dict:
    return {k: v for k, v in headers.items() if k not in ("content-length", "content-type", "transfer-encoding")}


def _raw_response(status: int, headers: dict, content: bytes) -> Response:
    return Response(content=content, status_code=status, headers=_plain(headers),
                    media_type=headers.get("content-type"))  # fmt: skip


def _error(status: int, message: str, code: str):
    return JSONResponse({"error": {"message": message, "type": "server_error" if status >= 500 else
                                   "invalid_request_error", "param": None, "code": code}}, status_code=status)  # fmt: skip


def sum_metrics(texts: list[str]) -> str:
    """Prometheus texts of several replicas as one: samples with the same name and labels
    added up (counters and the gauges here are all totals); HELP/TYPE lines kept once."""
    order: list[str] = []
    values: dict[str, float] = {}
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                if line not in values:
                    values[line] = 0.0
                    order.append(line)
                continue
            name, _, value = line.rpartition(" ")
            try:
                number = float(value)
            except ValueError:
                continue
            if name not in values:
                order.append(name)
                values[name] = 0.0
            values[name] += number
    return "".join(f"{k}\n" if k.startswith("#") else f"{k} {_number(values[k])}\n" for k in order)


def _number(x: float) -> str:
    return str(int(x)) if x == int(x) and abs(x) < 2**53 else repr(x)


# ---- building and running ----------------------------------------------------------------------------
def build_app(config: ClusterConfig, replica=EngineReplica, ingress=Ingress, router: str | None = ROUTER):
    """The Ray Serve application: N engine replicas behind the ingress replicas. `replica`,
    `ingress` and `router` (None: Ray Serve's default router) are for comparing other routing designs
    (benchmarks/bench_routing.py); `rwkvstate serve` uses the defaults."""
    gpu = config.device.startswith("cuda")
    server = config.server
    ongoing = int(server.get("slots", 8)) + int(server.get("max_queue", 256)) + 64  # the server's own 429 comes first
    # a str is accepted for the router class
    routing: dict[str, Any] = {}
    if router is not None:
        routing["request_router_config"] = RequestRouterConfig(request_router_class=router)  # type: ignore[arg-type]
    engine = serve.deployment(name="engine", num_replicas=config.replicas, max_ongoing_requests=ongoing,
                              health_check_period_s=2, health_check_timeout_s=30, **routing,
                              ray_actor_options={"num_gpus": 1 if gpu else 0, "num_cpus": 0})(replica)  # fmt: skip
    fronts = config.ingress_replicas or config.replicas
    front = serve.deployment(name="ingress", num_replicas=fronts, max_ongoing_requests=ongoing * config.replicas,
                             ray_actor_options={"num_cpus": 0})(serve.ingress(_ingress_app())(ingress))  # fmt: skip
    return front.bind(engine.bind(config), config)


def run(config: ClusterConfig, host: str, port: int, ray_address: str | None = None, blocking: bool = True,
        app=None):
    """Starts (or joins, with ray_address) a Ray cluster and runs the application (default:
    build_app(config)) on it."""
    import ray

    ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False,
             runtime_env={"env_vars": _forwarded_env()})  # fmt: skip
    serve.start(http_options={"host": host, "port": port})
    serve.run(app if app is not None else build_app(config), name=APP_NAME, route_prefix="/", blocking=blocking)


def _forwarded_env() -> dict[str, str]:
    """What replicas need from this process's environment: where rwkvstate's sources are."""
    keep = ("PYTHONPATH", "OMP_NUM_THREADS", "TRITON_INTERPRET", "RWKVSTATE_DEBUG")
    return {k: os.environ[k] for k in keep if k in os.environ}
