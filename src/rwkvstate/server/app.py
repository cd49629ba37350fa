"""The FastAPI application: OpenAI-compatible endpoints, sessions, health and metrics.

An API process is transport: handlers validate, authenticate, send generation requests and
session operations to the engine core (ServerContext), turn the token ids that come back into
text and write it out (JSON or server-sent events). docs/server.md describes the API.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime.chat import ASSISTANT_STOP, ReplyText, render_messages
from ..runtime.latency import startup_objects_frozen
from ..runtime.sampling import SamplingParams
from ..tokenizer import check_token_ids
from ..version import __version__
from .config import ServerConfig, base64_len
from .errors import add_error_handlers, error_response
from .metrics import CONTENT_TYPE, REFUSED
from .protocol import (
    MAX_STOP_STRINGS,
    APIError,
    ChatRequest,
    CompletionRequest,
    CreateSessionRequest,
    GenerationRequest,
    RollbackRequest,
    SnapshotRequest,
)
from .context import Done, Failed, Job, ServerContext, Text
from .web import add_web_routes

DONE_EVENT = b"data: [DONE]\n\n"
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
STATE_PATHS = ("/v1/completions", "/v1/chat/completions")  # requests that may carry a state file
ARRIVED = "rwkvstate_arrived"  # the request scope's state key: time.monotonic() when Guard saw it


def create_app(model=None, config: ServerConfig | None = None) -> FastAPI:
    """The server for a model: a loaded Model (its engine core runs on a thread of this
    process), a ModelSpec (the core runs in a process of its own, restarted if it dies) or None
    with `config.core_address` (a core that is already running). The core is started, and
    persisted sessions are loaded, when the app starts (ASGI lifespan); they are saved when a
    core this app started stops."""
    ctx = ServerContext(model, config or ServerConfig())

    @asynccontextmanager
    async def lifespan(app):
        await ctx.start()
        try:
            with startup_objects_frozen():  # collections while serving skip the start-up's objects
                yield
        finally:
            await ctx.stop()

    docs = ctx.config.docs  # off: no docs routes at all
    app = FastAPI(title="rwkvstate", version=__version__, lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)  # fmt: skip
    app.state.context = ctx
    add_error_handlers(app, ctx.roots)
    _add_info_routes(app, ctx)
    _add_generation_routes(app, ctx)
    _add_session_routes(app, ctx)
    add_web_routes(app)
    ctx.metrics.routes = frozenset(str(route.path) for route in app.routes if hasattr(route, "path"))
    app.add_middleware(Guard, ctx=ctx)
    return app


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` when a body without Content-Length grows past the limit; FastAPI
    re-raises HTTPExceptions from body reading, so the 413 handler answers it."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


class Guard:
    """ASGI middleware: bearer-token check, request body cap, request counts for /metrics (by
    the route template the router matched, once the response has started)."""

    def __init__(self, app, ctx: ServerContext):
        self.app, self.ctx = app, ctx
        self.limit = ctx.config.max_request_bytes
        # a generation request may carry a base64 state file (stateless mode) besides itself;
        # the handler holds the rest of the body to the plain limit
        self.state_limit = ctx.config.max_body_bytes
        key = ctx.config.api_key
        self.expected = None if key is None else f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]
        scope.setdefault("state", {})[ARRIVED] = time.monotonic()  # the request's clock starts here

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        error = self._refuse(scope)
        if error is not None:
            self.ctx.metrics.count(REFUSED, error.status)
            return await error_response(error)(scope, receive, send)
        try:
            await self.app(scope, self._capped(receive, self._limit(scope["path"])), send_counted)
        finally:
            route = scope.get("route")  # set by the router on a match
            self.ctx.metrics.count(getattr(route, "path", None), status[0])

    def _refuse(self, scope) -> APIError | None:
        headers = dict(scope["headers"])
        path = scope["path"]
        if self.expected is not None and _needs_key(path):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                code="invalid_api_key")  # fmt: skip
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self._limit(path)):
            return APIError(413, f"request body larger than this server's limit of {self.limit} bytes",
                            code="request_too_large")  # fmt: skip
        return None

    def _limit(self, path: str) -> int:
        return self.state_limit if path in STATE_PATHS else self.limit

    def _capped(self, receive, limit: int):
        seen = [0]

        async def wrapped():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise BodyTooLarge(self.limit)
            return message

        return wrapped


def _needs_key(path: str) -> bool:
    """Everything but /health (for probes) needs the API key when one is set."""
    return path.startswith("/v1/") or path == "/metrics" or path in DOCS_PATHS


# ---- health, models, metrics ---------------------------------------------------------------------
def _add_info_routes(app: FastAPI, ctx: ServerContext) -> None:
    @app.get("/health")
    async def health():
        """ok (200); degraded (503) after a write to the state directory failed, until one
        succeeds; stopped (503) when the engine is not running."""
        stats = ctx.stats
        storage = stats.get("storage", {"status": "none"})
        status = "stopped" if not ctx.alive else "degraded" if storage["status"] == "degraded" else "ok"
        body = {"status": status, "model": ctx.model_name, "running": stats.get("running", 0),
                "queued": stats.get("queued", 0), "storage": storage}  # fmt: skip
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def prometheus():
        body = ctx.metrics.render()
        if ctx.store_metrics is not None:
            body += (await anyio.to_thread.run_sync(ctx.store_metrics)).encode()
        return Response(body, media_type=CONTENT_TYPE)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": ctx.started, "owned_by": "rwkvstate"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(name) for name in ctx.model_names]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        _check_model(ctx, model_id)
        return model_card(model_id)


def _check_model(ctx: ServerContext, name: str) -> None:
    if name not in ctx.model_names:
        served = ", ".join(repr(n) for n in ctx.model_names)
        raise APIError(404, f"model {name!r} is not served here; this server serves {served}",
                       param="model", code="model_not_found")  # fmt: skip


# ---- completions --------------------------------------------------------------------------------
def _add_generation_routes(app: FastAPI, ctx: ServerContext) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.single_prompt()
        _check_prompt(ctx, prompt, body.session, body.state)
        job = Job(prompt=prompt, max_tokens=_max_tokens(ctx.config, body.max_tokens), sampling=_sampling(body),
                  session=body.session)  # fmt: skip
        _stateless(ctx.config, body, job, len(await request.body()))
        return await _respond(ctx, body, job, Reply(False, ctx.model_name, body.session), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        prefix, prompt = render_messages([(m.role, m.text()) for m in body.messages])
        max_tokens = _max_tokens(ctx.config, body.max_completion_tokens or body.max_tokens)
        sampling = _sampling(body, extra_stop=(ASSISTANT_STOP,))
        job = Job(prompt=prompt, prefix=prefix, max_tokens=max_tokens, sampling=sampling, chat=True,
                  session=body.session)  # fmt: skip
        _stateless(ctx.config, body, job, len(await request.body()))
        return await _respond(ctx, body, job, Reply(True, ctx.model_name, body.session), request)


def _stateless(config: ServerConfig, body: GenerationRequest, job: Job, body_bytes: int) -> None:
    """Stateless mode: the request brings its state (a base64 state file) and/or asks for the
    state after it; it runs in a one-off session, so any server of the model can serve it."""
    if body_bytes - len(body.state or "") > config.max_request_bytes:
        raise APIError(413, f"request body larger than this server's limit of {config.max_request_bytes} bytes "
                            "(besides a state)", code="request_too_large")  # fmt: skip
    if body.state is None and not body.return_state:
        return
    if body.session is not None:
        raise APIError(400, "state and return_state are for requests without a session; a session keeps its own "
                            "state", param="state")  # fmt: skip
    job.return_state = body.return_state
    if body.state is None:
        return
    if len(body.state) > base64_len(config.max_state_bytes):
        raise APIError(413, f"state is larger than this server's limit of {config.max_state_bytes} bytes",
                       param="state", code="state_too_large")  # fmt: skip
    try:
        job.state = base64.b64decode(body.state, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "state must be a state file in base64", param="state") from None


def _check_prompt(ctx: ServerContext, prompt, session: str | None, body_state: str | None = None) -> None:
    if not prompt and session is None and body_state is None:
        raise APIError(400, "prompt is empty (a request without a session or state needs at least one token)",
                       param="prompt")  # fmt: skip
    if isinstance(prompt, list):
        try:
            check_token_ids(prompt, ctx.vocab_size)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from None


def _max_tokens(config: ServerConfig, requested: int | None) -> int:
    cap = config.max_tokens_cap
    if requested is None:
        return min(config.default_max_tokens, cap)
    if requested > cap:
        raise APIError(400, f"max_tokens is {requested}, more than this server's limit of {cap}",
                       param="max_tokens", code="max_tokens_too_large")  # fmt: skip
    return requested


def _sampling(body: GenerationRequest, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
    stops = body.stop_list()
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, min_p=body.min_p or 0.0,
            logit_bias=body.logit_bias,
            repetition_penalty=body.repetition_penalty or 1.0,
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            seed=body.seed, stop=tuple(extra_stop) + tuple(stops), stop_token_ids=body.stop_token_ids,
        )  # fmt: skip
    except ValueError as e:
        raise APIError(400, str(e)) from None


async def _respond(ctx: ServerContext, body: GenerationRequest, job: Job, reply: "Reply", request: Request):
    _check_model(ctx, body.model)
    reply.model = body.model  # answer with the name (or alias) the client used
    unsupported = body.unsupported()
    if unsupported is not None:
        param, message = unsupported
        raise APIError(400, message, param=param, code="unsupported_parameter")
    ctx.check_alive()
    job.arrived = request.scope.get("state", {}).get(ARRIVED)
    ctx.submit(job)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStreamResponse(_sse(ctx, job, reply, usage), headers={"cache-control": "no-cache"})
    return await _collect(ctx, job, reply, request)


class Reply:
    """Builds the OpenAI objects (chunks, final response, usage) of one request."""

    def __init__(self, chat: bool, model: str, session: str | None):
        self.chat, self.model, self.session = chat, model, session
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self._reply = ReplyText() if chat else None  # a chat reply starts after "Assistant:"
        self._template: tuple[bytes, bytes] | None = None  # a text chunk's SSE bytes around its text

    def text_event(self, text: str) -> bytes:
        """The SSE event of a chunk carrying `text`: the chunk's JSON is rendered once per
        reply around a marker, so each piece costs one string encoding, not a dict and a dump."""
        if self._template is None:
            marker = f"@{uuid.uuid4().hex}@"
            before, after = _sse_data(self.chunk(text=marker)).split(json.dumps(marker).encode())
            self._template = (before, after)
        before, after = self._template
        return before + json.dumps(text, ensure_ascii=False).encode() + after

    def text(self, piece: str) -> str:
        return piece if self._reply is None else self._reply.push(piece)

    def _object(self, kind: str, choices: list) -> dict:
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if self.session is not None:
            out["session"] = self.session
        return out

    def chunk(self, text: str | None = None, finish: str | None = None, role: bool = False) -> dict:
        if not self.chat:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return self._object("text_completion", [choice])
        delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
        return self._object("chat.completion.chunk", [{"index": 0, "delta": delta, "logprobs": None,
                                                        "finish_reason": finish}])  # fmt: skip

    @staticmethod
    def add_state(out: dict, done: Done) -> dict:
        if done.state is not None:
            out["state"] = base64.b64encode(done.state).decode("ascii")
        return out

    def usage_chunk(self, done: Done) -> dict:
        out = self._object("chat.completion.chunk" if self.chat else "text_completion", [])
        out["usage"] = usage(done)
        return out

    def full(self, text: str, done: Done) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": done.finish_reason}  # fmt: skip
            out = self._object("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
            out = self._object("text_completion", [choice])
        out["usage"] = usage(done)
        return self.add_state(out, done)


def usage(done: Done) -> dict:
    total = done.prompt_tokens + done.completion_tokens
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens, "total_tokens": total}


async def _collect(ctx: ServerContext, job: Job, reply: Reply, request: Request) -> JSONResponse:
    pieces, done = [], None
    async for event in ctx.events(job, request):
        if isinstance(event, Text):
            pieces.append(reply.text(event.text))
        elif isinstance(event, Done):
            done = event
        elif isinstance(event, Failed):
            raise event.error
    assert done is not None  # the events end with Done, or Failed raised above
    return JSONResponse(reply.full("".join(pieces), done))


def _sse_data(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def _sse(ctx: ServerContext, job: Job, reply: Reply, include_usage: bool):
    """Server-sent events: `data: {chunk}` per piece of text, a last chunk with the finish
    reason, an optional usage chunk, then `data: [DONE]`. An error after the stream began is
    sent as `data: {"error": ...}` before [DONE]."""
    try:
        finished = False
        if reply.chat:
            yield _sse_data(reply.chunk(role=True))
        async for event in ctx.events(job):
            if isinstance(event, Text):
                text = reply.text(event.text)
                if text:
                    yield reply.text_event(text)
            elif isinstance(event, Done):  # the last events in one write: the finish, usage and [DONE]
                tail = _sse_data(reply.add_state(reply.chunk(finish=event.finish_reason), event))
                if include_usage:
                    tail += _sse_data(reply.usage_chunk(event))
                yield tail + DONE_EVENT
                finished = True
            elif isinstance(event, Failed):
                yield _sse_data(event.error.body())
        if not finished:
            yield DONE_EVENT
    finally:
        if not job.ended:
            ctx.cancel(job)


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response that always watches for the client going away (whatever
    ASGI spec version the server speaks) and always closes its iterator, so a disconnect
    cancels the request's stream and frees its slot at once."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tasks:

                async def stream():
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client went away mid-write
                        pass
                    tasks.cancel_scope.cancel()

                tasks.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tasks.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


# ---- sessions -------------------------------------------------------------------------------------
def _add_session_routes(app: FastAPI, ctx: ServerContext) -> None:
    """Session operations run on the engine core, between steps; the core holds the sessions,
    their busy flags (409), their files and the limits on them."""

    @app.post("/v1/sessions")
    async def create_session(body: CreateSessionRequest | None = None):
        return await ctx.call("create", state_file=body.state_file if body is not None else None)

    @app.get("/v1/sessions")
    async def list_sessions():
        return {"object": "list", "data": await ctx.call("list")}

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str):
        return await ctx.call("get", session=session_id)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str):
        return await ctx.call("delete", session=session_id)

    @app.post("/v1/sessions/{session_id}/fork")
    async def fork_session(session_id: str):
        return await ctx.call("fork", session=session_id)

    @app.post("/v1/sessions/{session_id}/rollback")
    async def rollback_session(session_id: str, body: RollbackRequest):
        if (body.tokens is None) == (body.turns is None):
            raise APIError(400, 'give exactly one of "tokens" and "turns"', param="tokens", code="invalid_rollback")
        return await ctx.call("rollback", session=session_id, tokens=body.tokens, turns=body.turns)

    @app.post("/v1/sessions/{session_id}/snapshot")
    async def snapshot_session(session_id: str, body: SnapshotRequest | None = None):
        return await ctx.call("snapshot", session=session_id, name=body.name if body is not None else None)
