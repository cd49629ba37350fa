"""The API process's side of the engine core: one ZeroMQ DEALER socket on the event loop.

Requests go out as messages; the core's step messages come back and each update is handed to
its request's queue, without any model code in this process. A heartbeat (Ping, every
PING_S) keeps the engine stats for /metrics and /health fresh. When the connection drops
(the core process died) every request in flight ends with a 503 at once; when a core answers
again with a new incarnation (it restarted and reloaded its saved sessions), new requests go
to it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from ..runtime import messages as m
from .protocol import APIError

log = logging.getLogger("rwkvstate.server")

PING_S = 0.1
RESTARTED = m.Error(503, "the engine process stopped while this request ran; retry it", code="engine_restarted")


class CoreClient:
    def __init__(self, address: str):
        self.address = address
        # a core on this host (a local socket) reads this process's time.monotonic() as its own
        self.same_host = address.startswith(("ipc://", "inproc://"))
        self.context = zmq.asyncio.Context()
        self._socket: zmq.asyncio.Socket | None = None  # made in start(), on the event loop
        self._monitor: zmq.asyncio.Socket | None = None
        self.welcome: m.Welcome | None = None  # the latest answer of a core: model info and incarnation
        self.stats: dict = {}
        self.connected = False
        self._answered = False  # a Welcome came since the latest connection: requests go to a known core
        self._requests: dict[int, asyncio.Queue] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task] = []
        self._welcomed = asyncio.Event()

    @property
    def alive(self) -> bool:
        """Connected, and the core at the other end has said who it is. A request sent after a
        reconnection but before the new core's Welcome would be failed by that Welcome (a new
        incarnation ends everything in flight), so until then the engine counts as not running."""
        return self.connected and self._answered and self.welcome is not None

    async def start(self, timeout: float = 600.0) -> None:
        self._socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RECONNECT_IVL, 100)
        self._monitor = monitor = self.socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.socket.connect(self.address)
        self._tasks = [asyncio.ensure_future(self._read()), asyncio.ensure_future(self._watch(monitor)),
                       asyncio.ensure_future(self._ping())]  # fmt: skip
        await asyncio.wait_for(self._welcomed.wait(), timeout)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_all(m.Error(503, "the server is shutting down", code="shutting_down"))
        self.context.destroy(0)  # closes the socket and its monitor

    @property
    def socket(self) -> zmq.asyncio.Socket:
        assert self._socket is not None, "start() makes the socket"
        return self._socket

    # ---- requests -------------------------------------------------------------------------------
    def generate(self, request: m.Generate) -> asyncio.Queue:
        """Sends a generation request; its updates arrive on the returned queue."""
        self.check_alive()
        request.rid = next(self._ids)
        if not self.same_host:
            request.arrived = None  # another host's clock
        events: asyncio.Queue = asyncio.Queue()
        self._requests[request.rid] = events
        self._send(request)
        return events

    def forget(self, rid: int) -> None:
        self._requests.pop(rid, None)

    def cancel(self, rid: int, reason: str = "cancelled") -> None:
        if rid in self._requests:
            self._send(m.Cancel(rid, reason))

    def stop_at(self, rid: int, tokens: int) -> None:
        if rid in self._requests:
            self._send(m.StopAt(rid, tokens))

    async def call(self, op: str, **args) -> Any:
        """Runs a session operation on the core; its error becomes an APIError."""
        self.check_alive()
        cid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[cid] = future
        self._send(m.Call(cid, op, {k: v for k, v in args.items() if v is not None}))
        try:
            result: m.Result = await future
        finally:
            self._calls.pop(cid, None)
        if result.error is not None:
            raise from_wire(result.error)
        return result.value

    def check_alive(self) -> None:
        if not self.alive:
            raise APIError(503, "the engine is not running", code="engine_stopped")

    def _send(self, msg) -> None:
        try:
            data = m.encode(msg)
        except (OverflowError, UnicodeEncodeError, TypeError, ValueError) as e:  # e.g. an int past 64 bits
            raise APIError(400, f"the request holds a value out of range: {type(e).__name__}",
                           code="invalid_value") from None  # fmt: skip
        try:
            self.socket.send(data, zmq.NOBLOCK)
        except zmq.ZMQError as e:
            raise APIError(503, f"the engine cannot be reached: {e}", code="engine_stopped") from None

    # ---- background tasks ------------------------------------------------------------------------
    async def _read(self) -> None:
        while True:
            msg = m.decode_from_core(await self.socket.recv())
            if isinstance(msg, m.Steps):
                if msg.stats is not None:
                    self.stats = msg.stats
                for update in msg.updates:
                    events = self._requests.get(update.rid)
                    if events is not None:
                        events.put_nowait(update)
            elif isinstance(msg, m.Pong):
                self._on_incarnation(msg.incarnation)
                self.stats = msg.stats
            elif isinstance(msg, m.Result):
                if msg.stats is not None:
                    self.stats = msg.stats
                future = self._calls.get(msg.cid)
                if future is not None and not future.done():
                    future.set_result(msg)
            elif isinstance(msg, m.Welcome):
                self._on_incarnation(msg.incarnation)
                self.welcome, self.stats = msg, msg.stats
                self._answered = True
                self._welcomed.set()

    def _on_incarnation(self, incarnation: str) -> None:
        if self.welcome is not None and incarnation != self.welcome.incarnation:
            self._fail_all(RESTARTED)  # a core that restarted knows nothing of them
            self.welcome.incarnation = incarnation

    async def _watch(self, monitor) -> None:
        while True:
            event = await recv_monitor_message(monitor)
            if event["event"] == zmq.EVENT_CONNECTED:
                self.connected, self._answered = True, False
                self._send(m.Hello())
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.connected = False
                log.error("lost the engine core; requests in flight end with 503")
                self._fail_all(RESTARTED)

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(PING_S)
            if self.connected:
                try:
                    self._send(m.Ping())
                except APIError:
                    pass

    def _fail_all(self, error: m.Error) -> None:
        for rid, events in list(self._requests.items()):
            events.put_nowait(m.Update(rid, [], error=error))
        self._requests.clear()
        for future in self._calls.values():
            if not future.done():
                future.set_result(m.Result(0, error=error))


def from_wire(error: m.Error) -> APIError:
    return APIError(error.status, error.message, param=error.param, code=error.code)
