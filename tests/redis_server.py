"""A real redis-server for the tests: started on a free port in a temporary directory.

The cluster tests need the real server (Lua scripts, TTLs, a connection that drops when it
stops); `redis-server` comes from Debian's package of that name (.ci/run installs it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


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
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
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
