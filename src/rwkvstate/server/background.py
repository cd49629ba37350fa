"""Running the app: `serve` (blocking, for the CLI) and BackgroundServer (a thread, for tests
and benchmarks)."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time

import uvicorn

from .app import create_app
from .config import ServerConfig
from .requestlog import log_startup

log = logging.getLogger("rwkvstate.server")
GRACEFUL_SHUTDOWN_S = 10


def serve(model, config: ServerConfig, log_level: str = "info", sockets=None) -> None:
    """Serves until interrupted (Ctrl-C / SIGTERM); sessions are saved on the way out.

    sockets: already bound listening sockets (the CLI binds before loading the model, so a
    busy port fails fast); None binds config.host:config.port here."""
    if config.api_key is None and not _is_loopback(config.host):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", config.host)
    if config.state_dir is not None:
        config.state_dir.mkdir(parents=True, exist_ok=True)  # fail here, with a plain OSError, if it cannot be
    app = create_app(model, config)
    log_startup(model, config, config.served_names(model))
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))  # fmt: skip
    server.run(sockets=sockets)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class BackgroundServer:
    """The app served by uvicorn on a thread of this process, on a free port by default.

    with BackgroundServer(create_app(model, config)) as server:
        openai.OpenAI(base_url=server.url + "/v1", api_key=...)
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app, self.host, self.port = app, host, port
        self._config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2, lifespan="on")
        self.server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 120.0) -> "BackgroundServer":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="rwkvstate-http")  # fmt: skip
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
