"""N API processes on one port, each accepting connections from a listening socket of its own.

With one listening socket shared by every process, which process accepts a new connection is a
race that the busiest tends to win: at 256 streams over 4 processes on an H200 the busiest API
process ran at 0.86 CPU seconds per second and the idlest at 0.23, and the streams of the busiest
got their tokens late. On Linux every process here gets a socket of its own, bound to the same
address with SO_REUSEPORT, and the kernel spreads new connections evenly over them (by a hash of
the connection's addresses). Elsewhere (no SO_REUSEPORT, or one that does not balance) the
processes share one socket as before.

`ApiWorkers` runs the processes as uvicorn's supervisor does, with uvicorn's worker process
(spawned: each imports the app afresh; it answers health checks), but gives each its own socket,
which uvicorn's supervisor cannot. It replaces one that dies or stops answering (its socket stays
open here, so connections that arrive in the meantime wait in its backlog instead of being
refused), and on SIGINT or SIGTERM stops them all (uvicorn's graceful shutdown in each) and
returns. A process that fails before it serves (a broken app or config) stops the whole server
instead of restarting forever.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading

import uvicorn
from uvicorn.server import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Process

log = logging.getLogger("rwkvstate.server")
STOP_WAIT_S = 30  # how long stopping waits for a process's graceful shutdown before killing it


def balances_connections() -> bool:
    """Whether sockets bound with SO_REUSEPORT share connections out evenly (Linux)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def has_reuse_port(sock: socket.socket) -> bool:
    """Whether sock was bound with SO_REUSEPORT (so that more sockets can join its address)."""
    return balances_connections() and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))


def _bound(family: int, kind: int, proto: int, address, reuse_port: bool) -> socket.socket:
    """A new socket with SO_REUSEADDR (and SO_REUSEPORT when asked) bound to address."""
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def bind_address(family: int, kind: int, proto: int, address, reuse_port: bool) -> socket.socket:
    """A socket bound to address. reuse_port: with SO_REUSEPORT where that balances connections
    (so that listening_sockets can add more on the address), after a plain bind of a probe that
    must succeed first: an address where another server listens, with SO_REUSEPORT too, is then
    refused (EADDRINUSE) instead of joined."""
    reuse_port = reuse_port and balances_connections()
    if reuse_port:
        _bound(family, kind, proto, address, reuse_port=False).close()  # the probe
    return _bound(family, kind, proto, address, reuse_port)


def bind_reusable(host: str, port: int, reuse_port: bool = True) -> socket.socket:
    """bind_address for host:port (its first address to listen on), with SO_REUSEPORT where
    that balances connections unless reuse_port is False."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    return bind_address(family, kind, proto, address, reuse_port)


def listening_sockets(first: socket.socket, count: int) -> list[socket.socket]:
    """`count` sockets bound to first's address: first and count - 1 more, when first was bound
    with SO_REUSEPORT; else [first] alone (the processes then share it)."""
    if count <= 1 or not has_reuse_port(first):
        return [first]
    socks = [first]
    try:
        for _ in range(count - 1):
            socks.append(_bound(first.family, first.type, first.proto, first.getsockname(), reuse_port=True))
    except OSError:
        for sock in socks[1:]:
            sock.close()
        raise
    return socks


class ApiWorkers:
    """`config.workers` API processes, spread over `sockets` (one each, or all on one)."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]):
        if len(sockets) not in (1, config.workers):
            raise ValueError(f"{config.workers} API processes need 1 or {config.workers} sockets, got {len(sockets)}")
        self.config = config
        self.sockets = sockets
        self.processes: list = [None] * config.workers
        self.stopping = threading.Event()

    def socket_of(self, i: int) -> socket.socket:
        return self.sockets[i % len(self.sockets)]

    def _start(self, i: int) -> None:
        process = Process(self.config, [self.socket_of(i)])  # uvicorn's: spawned, answers health checks
        process.start()
        self.processes[i] = process

    def run(self) -> None:
        """Serves until SIGINT or SIGTERM (on the main thread) or stop(), then stops every process."""
        previous = {}
        if threading.current_thread() is threading.main_thread():  # else the caller stops it with stop()
            previous = {sig: signal.signal(sig, lambda *_: self.stopping.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for i in range(len(self.processes)):
                self._start(i)
            log.info("%d API processes, %s", len(self.processes),
                     "each on its own socket (SO_REUSEPORT)" if len(self.sockets) > 1 else "sharing one socket")
            while not self.stopping.wait(0.5):
                self._restart_dead()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        self.stopping.set()

    def _restart_dead(self) -> None:
        for i, process in enumerate(self.processes):
            if process.is_alive(self.config.timeout_worker_healthcheck):  # running and answering
                continue
            process.kill()  # ended, or hung
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                log.error("API process %d failed to start (exit code %d); stopping the server", i, process.exitcode)
                self.stopping.set()
                return
            log.warning("API process %d (pid %s) ended or stopped answering (exit code %s); starting a new one", i,
                        process.pid, process.exitcode)  # fmt: skip
            self._start(i)

    def _stop_all(self) -> None:
        live = [p for p in self.processes if p is not None and p.process.is_alive()]
        for process in live:
            process.terminate()  # SIGTERM: uvicorn's graceful shutdown
        for process in live:
            process.process.join(STOP_WAIT_S)
            if process.process.is_alive():
                log.warning("API process (pid %s) did not stop within %d s; killing it", process.pid, STOP_WAIT_S)
                process.kill()
                process.process.join()
