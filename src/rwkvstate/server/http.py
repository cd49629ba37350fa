"""Connection limits for uvicorn: a header timeout and a cap on open connections, on either of
uvicorn's HTTP/1.1 parsers.

uvicorn closes idle kept-alive connections (`timeout_keep_alive`) but never times out a
client that connects and sends its request headers slowly, or not at all, and it accepts
connections without limit (`limit_concurrency` answers 503 but keeps the connection): a
few thousand slow clients exhaust the file descriptors. The protocols here close a
connection whose request headers are not complete `header_timeout_s` after it opened (or
after the previous response on it), and close new connections at once while
`max_connections` are open. The request body and the response are not timed here: the body
is capped in size (the app), generation by the request timeout.

The parser (`ServerConfig.http`): "h11" (pure Python, the default), "httptools" (uvicorn's C
parser, when installed), or "auto": httptools when it is installed. Every server-sent event of a
streamed reply goes through the protocol's send; under a profiler httptools' send took about half
of h11's, but end to end (benchmarks/bench_api.py, docs/benchmarks/api-parsers-cpu.md, a 2-core
machine) the API processes' CPU per token did not differ beyond run-to-run spread.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("rwkvstate.server")
PARSERS = ("auto", "h11", "httptools")


def parser_name(http: str) -> str:
    """The parser `http` names here ("auto": httptools if it can be imported, else h11); a
    ValueError for an unknown name, or httptools when it is not installed."""
    if http not in PARSERS:
        raise ValueError(f"http must be one of {PARSERS}, got {http!r}")
    installed = importlib.util.find_spec("httptools") is not None
    if http == "auto":
        return "httptools" if installed else "h11"
    if http == "httptools" and not installed:
        raise ValueError("the httptools parser is not installed: pip install httptools (or use h11)")
    return http


class _Limits:
    """The limits, mixed into one of uvicorn's protocol classes (it provides connections, cycle,
    transport and loop)."""

    header_timeout_s = 10.0
    max_connections = 1000
    _header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        if len(self.connections) > self.max_connections:  # type: ignore[attr-defined]
            log.warning("refusing a connection: %d are open, the limit is %d", len(self.connections) - 1,  # type: ignore[attr-defined]
                        self.max_connections)  # fmt: skip
            self.transport.close()  # type: ignore[attr-defined]
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle  # type: ignore[attr-defined]
        if self._header_timer is None and (cycle is None or cycle.response_complete):
            self._arm()  # the first bytes of a next request on a kept-alive connection
        super().data_received(data)  # type: ignore[misc]
        cycle = self.cycle  # type: ignore[attr-defined]
        if cycle is not None and not cycle.response_complete:
            self._disarm()  # the headers are in: a request is being served

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)  # type: ignore[attr-defined]

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        cycle = self.cycle  # type: ignore[attr-defined]
        if self.transport.is_closing() or (cycle is not None and not cycle.response_complete):  # type: ignore[attr-defined]
            return
        self._close_idle()
        self.transport.close()  # type: ignore[attr-defined]

    def _close_idle(self) -> None:
        """The parser's own bookkeeping before the connection is closed (h11: its state machine)."""


def limited_protocol(http: str, header_timeout_s: float, max_connections: int) -> type:
    """A uvicorn protocol class (uvicorn's `http=` option) of the parser `http` ("auto", "h11",
    "httptools") enforcing these limits."""
    if parser_name(http) == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base: type = HttpToolsProtocol
    else:
        base = _H11Closing
    return type(f"Limited{base.__name__}", (_Limits, base), {"header_timeout_s": header_timeout_s,
                                                            "max_connections": max_connections})  # fmt: skip


class _H11Closing(H11Protocol):
    def _close_idle(self) -> None:
        import h11

        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass


# The API worker processes of `serve --api-processes N` get their uvicorn config from the parent,
# pickled, so their protocol class must be importable by name: its parser and limits come from the
# environment the parent set (LIMITS_ENV: [parser, header_timeout_s, max_connections]).
LIMITS_ENV = "RWKVSTATE_HTTP_LIMITS"
WorkerHttpProtocol = limited_protocol(*json.loads(os.environ.get(LIMITS_ENV, '["h11", 10.0, 1000]')))
WorkerHttpProtocol.__qualname__ = WorkerHttpProtocol.__name__ = "WorkerHttpProtocol"
