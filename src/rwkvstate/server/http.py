"""Connection limits for uvicorn: a header timeout and a cap on open connections.

uvicorn closes idle kept-alive connections (`timeout_keep_alive`) but never times out a
client that connects and sends its request headers slowly, or not at all, and it accepts
connections without limit (`limit_concurrency` answers 503 but keeps the connection): a
few thousand slow clients exhaust the file descriptors. The h11 protocol here closes a
connection whose request headers are not complete `header_timeout_s` after it opened (or
after the previous response on it), and closes new connections at once while
`max_connections` are open. The request body and the response are not timed here: the body
is capped in size (the app), generation by the request timeout.
"""

from __future__ import annotations

import json
import logging
import os

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("rwkvstate.server")


def limited_h11(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """An H11Protocol class (uvicorn's `http=` option) enforcing these limits."""

    class LimitedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("refusing a connection: %d are open, the limit is %d", len(self.connections) - 1,
                            max_connections)  # fmt: skip
                self.transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the first bytes of a next request on a kept-alive connection
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # the headers are in: a request is being served

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:
                pass
            self.transport.close()

    return LimitedH11Protocol


# The API worker processes of `serve --api-processes N` get their uvicorn config from the parent,
# pickled, so their protocol class must be importable by name: its limits come from the
# environment the parent set (LIMITS_ENV: [header_timeout_s, max_connections]).
LIMITS_ENV = "RWKVSTATE_HTTP_LIMITS"
WorkerH11Protocol = limited_h11(*json.loads(os.environ.get(LIMITS_ENV, "[10.0, 1000]")))
WorkerH11Protocol.__qualname__ = WorkerH11Protocol.__name__ = "WorkerH11Protocol"
