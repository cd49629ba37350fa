"""Running the app: `serve` (blocking, for the CLI) and BackgroundServer (a thread, for tests
and benchmarks).

`serve` with one API process: uvicorn serves one app, whose lifespan starts the engine core
(a process of its own for a ModelSpec, a thread for a loaded Model) and watches it. With N API
processes: this process starts and watches the core process and runs N API processes
(server/workers.py: on Linux each on a listening socket of its own, bound with SO_REUSEPORT),
each building its app from the environment (`worker_app`) and connecting to the core.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import threading
import time

from dataclasses import asdict, replace

import uvicorn

from ..state.layout import dtype_name
from .app import create_app
from .config import ServerConfig
from .http import LIMITS_ENV, WorkerHttpProtocol, limited_protocol
from .context import core_config, new_address
from .requestlog import log_startup
from .workers import ApiWorkers, bind_reusable, listening_sockets

log = logging.getLogger("rwkvstate.server")
GRACEFUL_SHUTDOWN_S = 10
CONFIG_ENV = "RWKVSTATE_SERVER_CONFIG"  # the ServerConfig of API worker processes, as JSON

SPARE_FDS = 64  # file descriptors kept for state files, the model and logs


def uvicorn_options(config: ServerConfig, http: type | None = None) -> dict:
    """uvicorn settings from the config: the HTTP parser, header and keep-alive timeouts, the
    connection limit. http: the protocol class when it is built elsewhere (the API worker processes')."""
    if http is None:
        http = limited_protocol(config.http, config.header_timeout_s, connection_limit(config))
    return {"http": http, "timeout_keep_alive": config.keep_alive_s}


def connection_limit(config: ServerConfig) -> int:
    """max_connections, lowered to fit the process's file-descriptor limit."""
    limit = config.max_connections
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and soft - SPARE_FDS < limit:
            limit = max(1, soft - SPARE_FDS)
            log.warning("max_connections lowered from %d to %d to fit the open-file limit (ulimit -n %d)",
                        config.max_connections, limit, soft)  # fmt: skip
    except (ImportError, OSError, ValueError):
        pass
    return limit


def serve(model, config: ServerConfig, log_level: str = "info", sockets=None) -> None:
    """Serves until interrupted (Ctrl-C / SIGTERM); sessions are saved on the way out.

    model: a ModelSpec (the engine core runs in a process of its own: the CLI's default), a
    loaded Model (the core runs on a thread of the one API process), or None with
    `config.core_address` (API processes for a core that is already running, which this call
    neither starts nor stops). sockets: already bound
    listening sockets (the CLI binds before anything loads, so a busy port fails fast); None
    binds config.host:config.port here."""
    from ..runtime.core import CoreProcess, ModelSpec

    if config.api_key is None and not _is_loopback(config.host):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", config.host)
    if config.state_dir is not None:
        config.state_dir.mkdir(parents=True, exist_ok=True)  # fail here, with a plain OSError, if it cannot be
    if config.api_processes == 1:  # the app's lifespan starts the engine core
        uvicorn.Server(uvicorn.Config(create_app(model, config), host=config.host, port=config.port,
                                      log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                                      **uvicorn_options(config))).run(sockets=sockets)  # fmt: skip
        return
    names = config.served_names(model)
    config = replace(config, model_name=names[0], model_aliases=names[1:])
    core = None
    if model is None and config.core_address is not None:  # a core that is already running
        address = config.core_address
    elif not isinstance(model, ModelSpec):
        raise ValueError("several API processes need the engine core in a process of its own (a ModelSpec)")
    else:
        address = new_address()
        core = CoreProcess(model, core_config(config, model), address)
        core.start()
        log_startup(core.summary, config, names)
    try:
        os.environ[CONFIG_ENV] = _config_json(config, address)
        # the workers build their HTTP protocol (parser and limits) from the environment (see http.py)
        os.environ[LIMITS_ENV] = json.dumps([config.http, config.header_timeout_s, connection_limit(config)])
        workers = uvicorn.Config("rwkvstate.server.background:worker_app", factory=True, host=config.host,
                                 port=config.port, workers=config.api_processes, log_level=log_level,
                                 timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                                 **uvicorn_options(config, http=WorkerHttpProtocol))  # fmt: skip
        own = [] if sockets else [bind_reusable(config.host, config.port)]
        try:
            given = sockets or own
            if len(given) == 1:  # more sockets on its address, one per API process, where that balances
                given = listening_sockets(given[0], config.api_processes)
                own += given[1:]
            ApiWorkers(workers, given).run()
        finally:
            for sock in own:
                sock.close()
    finally:
        if core is not None:
            core.stop()


def worker_app():
    """The app of one API worker process (uvicorn's factory): the config comes from the
    environment, the engine core is already running."""
    fields = json.loads(os.environ[CONFIG_ENV])
    if fields.get("session_store") is not None:
        from ..cluster.store import StoreConfig

        fields["session_store"] = StoreConfig(**fields["session_store"])
    return create_app(None, ServerConfig(**fields))


def _config_json(config: ServerConfig, address: str) -> str:
    fields = dict(vars(config), state_dtype=dtype_name(config.state_dtype), core_address=address, api_processes=1)
    fields["state_dir"] = None if config.state_dir is None else str(config.state_dir)
    fields["model_aliases"] = list(config.model_aliases)
    if config.session_store is not None:
        fields["session_store"] = asdict(config.session_store)
    return json.dumps(fields)


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
        options = uvicorn_options(app.state.context.config)
        self._config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2, lifespan="on", **options)
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
