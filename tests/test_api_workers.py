"""API processes with a listening socket each (server/workers.py): sockets bound with SO_REUSEPORT
share connections out over every process; an address another server listens on is refused, not
joined; a process that dies or hangs is replaced on its socket; stop() ends them all."""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from rwkvstate.server.workers import ApiWorkers, balances_connections, bind_address, bind_reusable, listening_sockets  # noqa: E402

pytestmark = pytest.mark.skipif(not balances_connections(), reason="SO_REUSEPORT balancing is Linux's")


def test_connections_are_spread_over_every_socket():
    first = bind_reusable("127.0.0.1", 0)
    socks = listening_sockets(first, 4)
    try:
        assert len(socks) == 4 and {s.getsockname() for s in socks} == {first.getsockname()}
        for s in socks:
            s.listen(128)
            s.setblocking(False)
        clients = [socket.create_connection(first.getsockname()) for _ in range(64)]
        time.sleep(0.2)
        accepted = []
        for s in socks:
            n = 0
            while True:
                try:
                    s.accept()[0].close()
                    n += 1
                except BlockingIOError:
                    break
            accepted.append(n)
        assert sum(accepted) == 64 and min(accepted) > 0  # all four take some (P(a zero) is about 4e-8)
        for c in clients:
            c.close()
    finally:
        for s in socks:
            s.close()


def test_an_address_in_use_is_refused_not_joined():
    first = bind_reusable("127.0.0.1", 0)
    first.listen(8)
    try:
        with pytest.raises(OSError) as e:
            bind_address(first.family, first.type, first.proto, first.getsockname(), reuse_port=True)
        assert e.value.errno == errno.EADDRINUSE
    finally:
        first.close()


def pid_of(url: str) -> int:
    with httpx.Client(timeout=30) as client:  # a new connection each time
        return int(client.get(url, headers={"connection": "close"}).text)


def test_each_process_serves_and_a_dead_or_hung_one_is_replaced(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    first = bind_reusable("127.0.0.1", 0)
    socks = listening_sockets(first, 2)
    url = "http://127.0.0.1:%d/" % first.getsockname()[1]
    config = uvicorn.Config("pid_app:app", workers=2, log_level="warning", timeout_worker_healthcheck=1)
    workers = ApiWorkers(config, socks)
    thread = threading.Thread(target=workers.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        pids: set[int] = set()
        while len(pids) < 2:
            assert time.monotonic() < deadline, f"only {pids} answered"
            try:
                pids.add(pid_of(url))
            except httpx.HTTPError:
                time.sleep(0.2)
        assert pids == {p.pid for p in workers.processes}
        victim = workers.processes[0].pid
        os.kill(victim, signal.SIGKILL)
        while workers.processes[0].pid == victim:
            assert time.monotonic() < deadline, "the dead process was not replaced"
            time.sleep(0.1)
        seen: set[int] = set()
        while len(seen) < 2:  # the replacement serves the dead one's socket
            assert time.monotonic() < deadline, f"only {seen} answered after the restart"
            seen.add(pid_of(url))
        assert victim not in seen and seen == {p.pid for p in workers.processes}
        hung = workers.processes[1].pid
        os.kill(hung, signal.SIGSTOP)  # alive but answering nothing: replaced after a failed health check
        while workers.processes[1].pid == hung:
            assert time.monotonic() < deadline, "the hung process was not replaced"
            time.sleep(0.1)
        while pid_of(url) == workers.processes[0].pid:  # the replacement serves the hung one's socket
            assert time.monotonic() < deadline, "the replacement of the hung process does not answer"
    finally:
        workers.stop()
        thread.join(60)
        for s in socks:
            s.close()
    assert not thread.is_alive() and not any(p.is_alive() for p in workers.processes)
