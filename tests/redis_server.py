"""A real redis-server for the tests: started on a free port in a temporary directory.

The cluster tests need the real server (Lua scripts, TTLs, a connection that drops when it
stops); `redis-server` comes from Debian's package of that name (.ci/run installs it).
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

# .ci/run sets this: there the cluster tests must run, and a missing package or redis-server
# fails them; elsewhere (a GPU machine without ray or redis-server, say) they are skipped.
REQUIRED = os.environ.get("RWKVSTATE_REQUIRE_CLUSTER") == "1"


def require(module: str):
    """The module, or (where the cluster tests are optional) a skip of the test file."""
    return importlib.import_module(module) if REQUIRED else pytest.importorskip(module)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """start() / stop() a redis-server (keeping nothing on disk unless `durable`); `url` stays the
    same across restarts, so a test can take the store away and bring it back."""

    def __init__(self, directory: Path, port: int | None = None, durable: bool = False):
        self.durable = durable  # an append-only file, so a restart keeps what was written
        self.binary = shutil.which("redis-server")
        self.directory, self.port = Path(directory), port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        if self.binary is None:
            if REQUIRED:
                raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
            pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.directory),
                "--appendonly", "yes" if self.durable else "no", "--appendfsync", "always", "--daemonize", "no",
                "--loglevel", "warning"]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None
