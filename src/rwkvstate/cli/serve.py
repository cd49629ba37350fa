"""`rwkvstate serve`: its flags, its TOML config file, and RWKVSTATE_* environment variables.

Where a setting comes from, highest first: the command-line flag, the RWKVSTATE_* variable,
the `--config` file, the built-in default (docs/server.md). The model flags' variables
(RWKVSTATE_MODEL, _DEVICE, _DTYPE, _STATE_DTYPE) apply to every command that loads a model.
Values from a variable or the file are converted and checked as the flag's would be, and a
bad one is reported naming where it came from.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from pathlib import Path

from ..state.layout import parse_dtype
from ..errors import RwkvStateError

# dest -> variable. Model flags apply to every command; the rest to `serve` only.
ENV_VARS = {
    "model": "RWKVSTATE_MODEL", "device": "RWKVSTATE_DEVICE", "dtype": "RWKVSTATE_DTYPE",
    "state_dtype": "RWKVSTATE_STATE_DTYPE", "host": "RWKVSTATE_HOST", "port": "RWKVSTATE_PORT",
    "slots": "RWKVSTATE_SLOTS", "state_dir": "RWKVSTATE_STATE_DIR", "api_key": "RWKVSTATE_API_KEY",
    "served_model_name": "RWKVSTATE_SERVED_MODEL_NAME", "log_level": "RWKVSTATE_LOG_LEVEL",
}  # fmt: skip
_NOT_IN_FILE = {"help", "config", "command", "in_process_core"}


def add_parser(sub, add_model_args, positive_int) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and sessions")
    p.add_argument("--config", type=Path, default=None,
                   help="a TOML file of serve settings (keys are the flag names); "
                        "flags and RWKVSTATE_* variables override it")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (default: 8000)")
    p.add_argument("--slots", type=positive_int, default=8,
                   help="pool slots = requests generating at once (default: 8)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="directory for persistent sessions, state files to load, and snapshots")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $RWKVSTATE_API_KEY; none if unset)")
    p.add_argument("--served-model-name", "--model-name", dest="served_model_name", action="append", default=None,
                   metavar="NAME", help="a model id clients may use; repeat for aliases, the first is the main one "
                                        "(default: the model file's stem)")
    p.add_argument("--max-tokens-cap", type=positive_int, default=4096,
                   help="largest max_tokens a request may ask for (default: 4096)")
    p.add_argument("--max-request-bytes", type=positive_int, default=1 << 20,
                   help="largest request body (default: 1 MiB)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a slot; more are refused with 429 (default: 256)")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds from arrival to the last token, 0 = none (default: 300)")
    p.add_argument("--prefix-cache-mb", type=float, default=64.0,
                   help="prefix-cache budget in MiB, 0 = off (default: 64)")
    p.add_argument("--max-sessions", type=int, default=1000,
                   help="persistent sessions; more are refused with 429, 0 = no limit (default: 1000)")
    p.add_argument("--max-snapshots", type=int, default=1000,
                   help="state files outside sessions/ the snapshot API may bring about, 0 = no limit (default: 1000)")
    p.add_argument("--max-state-dir-mb", type=float, default=0,
                   help="MiB of the state directory past which new sessions and snapshots are refused, 0 = no limit")
    p.add_argument("--allow-other-weights", action="store_true",
                   help="load state files saved from other weights of the same shape")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's headers (default: 10)")
    p.add_argument("--keep-alive", type=float, default=5.0, help="seconds an idle connection stays open (default: 5)")
    p.add_argument("--max-connections", type=positive_int, default=1000,
                   help="open connections; more are closed at once (default: 1000)")
    p.add_argument("--http", choices=("h11", "httptools", "auto"), default="h11",
                   help="HTTP/1.1 parser: h11 (pure Python, default), httptools (uvicorn's C parser, if "
                        "installed), auto: httptools if installed")
    p.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (behind the API key if set)")
    p.add_argument("--api-processes", type=_api_processes_arg(positive_int), default="auto",
                   help="HTTP processes sharing the port, each connected to the engine core; auto (default): "
                        f"half the CPU cores, at most {MAX_AUTO_API_PROCESSES}, 1 with --in-process-core or --replicas")
    p.add_argument("--in-process-core", action="store_true",
                   help="run the engine core on a thread of the single API process instead of a process of its "
                        "own: one interpreter lock for HTTP and engine (small CPU runs)")
    p.add_argument("--max-state-bytes", type=positive_int, default=64 << 20,
                   help="largest state file a stateless request may carry (default: 64 MiB)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    c = p.add_argument_group("sessions in Redis and replicas on Ray Serve (docs/cluster.md; the cluster extra)")
    c.add_argument("--session-store", default=None, metavar="redis://HOST:PORT/DB",
                   help="keep sessions in this Redis instead of --state-dir; needed by --replicas")
    c.add_argument("--store-format", choices=("fp32", "fp16", "bf16", "int8"), default=None,
                   help="storage dtype of stored sessions (default: the pool's state dtype)")
    c.add_argument("--store-ttl", type=float, default=7 * 24 * 3600.0,
                   help="seconds an idle session stays in the store, 0 = forever (default: 7 days)")
    c.add_argument("--store-max-mb", type=float, default=0.0,
                   help="cap on the store's session bytes in MiB; the least recently used go first; 0 = none")
    c.add_argument("--replicas", type=positive_int, default=None,
                   help="run N engine replicas on Ray Serve behind the ingress (one per GPU with --device cuda)")
    c.add_argument("--ingress-replicas", type=positive_int, default=None,
                   help="ingress processes in front of the replicas (default: one per replica); each request "
                        "costs an ingress a few ms of CPU, so one ingress caps the requests per second")
    c.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. auto, or HOST:PORT) instead of starting a local one")
    return p  # fmt: skip


MAX_AUTO_API_PROCESSES = 8


def _api_processes_arg(positive_int):
    def parse(text: str) -> int | str:
        if text == "auto":
            return text
        try:
            return positive_int(text)
        except (argparse.ArgumentTypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text}") from None

    return parse


def resolve_api_processes(value: int | str, in_process_core: bool, replicas: int | None) -> int:
    """--api-processes: a number as given; auto: one where the engine core shares the API's process or the
    replicas serve (those take one), else half the CPU cores (each API process spends about 0.6-0.7 ms of
    CPU per request, docs/server.md), at most MAX_AUTO_API_PROCESSES."""
    if value != "auto":
        return int(value)
    if in_process_core or replicas is not None:
        return 1
    return max(1, min(MAX_AUTO_API_PROCESSES, (os.cpu_count() or 1) // 2))


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}")
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"a port must be in 0..65535, got {value}")
    return value


# ---- layered defaults: config file < environment < flags ---------------------------------------


def apply_layered_defaults(commands: dict, first) -> None:
    """Sets the command's parser defaults from the config file (serve only) and RWKVSTATE_*
    variables, so that a flag on the command line still wins when argv is parsed again."""
    parser = _leaf_parser(commands.get(first.command), first)
    if parser is None:
        return
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    values = {}
    if first.command == "serve" and first.config is not None:
        values.update(read_config(first.config, actions))
    for dest, var in ENV_VARS.items():
        if dest not in actions or os.environ.get(var, "") == "":
            continue
        if first.command == "serve" or dest in ("model", "device", "dtype", "state_dtype"):
            values[dest] = _convert(actions[dest], os.environ[var], f"environment variable {var}")
    # a repeatable flag appends to its default: when given, it must replace the layered value
    given = [d for d in values if isinstance(actions[d], argparse._AppendAction) and getattr(first, d) is not None]
    parser.set_defaults(**{d: v for d, v in values.items() if d not in given})


def _leaf_parser(parser, first):
    """The parser of a nested command (`state save`), or the command's own."""
    while parser is not None:
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not nested:
            return parser
        parser = nested[0].choices.get(getattr(first, nested[0].dest, None))
    return None


def read_config(path: Path, actions: dict) -> dict:
    """The settings of a TOML file, by parser dest, converted like their flags."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        import tomli as tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise RwkvStateError(f"--config {path}: file not found")
    except tomllib.TOMLDecodeError as e:
        raise RwkvStateError(f"--config {path}: not valid TOML: {e}")
    out = {}
    for key, value in data.items():
        dest = key.replace("-", "_")
        if dest not in actions or dest in _NOT_IN_FILE:
            known = ", ".join(sorted(a.replace("_", "-") for a in actions if a not in _NOT_IN_FILE))
            raise RwkvStateError(f"--config {path}: unknown setting {key!r} (settings are the serve flags: {known})")
        out[dest] = _convert(actions[dest], value, f"{path}: {key}")
    return out


def _convert(action: argparse.Action, value, where: str):
    """A file or environment value checked and converted the way its flag would be."""
    if action.nargs == 0:  # a switch (--in-process-core): for the command line only
        raise RwkvStateError(f"{where}: {action.option_strings[0]} cannot be set here")
    if isinstance(action, argparse._AppendAction):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) and i.strip() for i in items):
            raise RwkvStateError(f"{where}: expected a list of names, got {value!r}")
        return [i.strip() for i in items]
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise RwkvStateError(f"{where}: expected a single value, got {value!r}")
    text = str(value)
    try:
        converted = action.type(text) if callable(action.type) else text
        if action.dest in ("dtype", "state_dtype"):
            parse_dtype(text)
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise RwkvStateError(f"{where}: {e}") from None
    if action.choices is not None and converted not in action.choices:
        raise RwkvStateError(f"{where}: {converted!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


# ---- running ------------------------------------------------------------------------------------


def bind_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """Binds the listening address before the (slow) model load, so a busy port or a bad host
    is a one-line error at once rather than uvicorn's traceback later. reuse_port: with
    SO_REUSEPORT (Linux), so that each API process can have a socket of its own on the address
    (server/workers.py)."""
    from ..server.workers import bind_reusable

    try:
        return bind_reusable(host, port, reuse_port)
    except socket.gaierror as e:
        raise RwkvStateError(f"--host {host!r} is not an address to listen on: {e.strerror}")
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise RwkvStateError(f"port {port} on {host} is already in use: stop what is listening there "
                                 f"or pick another --port")  # fmt: skip
        if e.errno == errno.EACCES:
            raise RwkvStateError(f"no permission to listen on port {port} (ports below 1024 need privileges): "
                                 f"pick another --port")  # fmt: skip
        raise RwkvStateError(f"cannot listen on {host}:{port} (--host/--port): {e.strerror}")


def cmd_serve(args, load_model, model_spec) -> int:
    try:
        from ..server import ServerConfig, serve
    except ImportError as e:
        raise RwkvStateError(
            f"rwkvstate serve needs the server extra ({e.name} is not installed): pip install 'rwkvstate[server]'"
        )
    names = args.served_model_name or _name_of(args.model)
    if args.in_process_core and args.api_processes not in ("auto", 1):
        raise RwkvStateError("--in-process-core runs one API process: leave out --api-processes")
    if args.replicas is not None and args.api_processes not in ("auto", 1):
        raise RwkvStateError("--replicas runs each replica's engine core in the replica: leave out --api-processes")
    args.api_processes = resolve_api_processes(args.api_processes, args.in_process_core, args.replicas)
    config = ServerConfig(
        host=args.host, port=args.port, model_name=names[0] if names else None, model_aliases=tuple(names[1:]),
        slots=args.slots, state_dtype=parse_dtype(args.state_dtype),
        prefix_cache_bytes=int(args.prefix_cache_mb * (1 << 20)), state_dir=args.state_dir, api_key=args.api_key,
        max_tokens_cap=args.max_tokens_cap, max_request_bytes=args.max_request_bytes, max_queue=args.max_queue,
        request_timeout_s=args.request_timeout or None, max_sessions=args.max_sessions or None,
        max_snapshots=args.max_snapshots or None, max_state_dir_bytes=int(args.max_state_dir_mb * (1 << 20)) or None,
        allow_other_weights=args.allow_other_weights, header_timeout_s=args.header_timeout,
        keep_alive_s=args.keep_alive, max_connections=args.max_connections, http=args.http, docs=args.docs,
        api_processes=args.api_processes, max_state_bytes=args.max_state_bytes,
        session_store=None if args.session_store is None else _store_config(args),
    )  # fmt: skip
    _log_to_stderr(args.log_level)
    if args.ingress_replicas is not None and args.replicas is None:
        raise RwkvStateError("--ingress-replicas sets the ingresses in front of --replicas; give --replicas too")
    if args.replicas is not None:
        return _serve_replicas(args, config, model_spec)
    sock = bind_socket(args.host, args.port, reuse_port=args.api_processes > 1)
    try:  # the engine core loads the model in a process of its own, unless --in-process-core
        model = load_model(args) if args.in_process_core else model_spec(args)
        serve(model, config, log_level=args.log_level, sockets=[sock])
    finally:
        sock.close()
    return 0


def _store_config(args):
    try:
        from ..cluster.store import StoreConfig
    except ImportError as e:
        raise RwkvStateError(f"--session-store needs the cluster extra ({e.name} is not installed): "
                             "pip install 'rwkvstate[cluster]'")  # fmt: skip
    try:
        import redis  # noqa: F401  # the store's client: fail here, not in the engine core
    except ImportError:
        raise RwkvStateError("--session-store needs the cluster extra (redis is not installed): "
                             "pip install 'rwkvstate[cluster]'") from None  # fmt: skip
    try:
        return StoreConfig(url=args.session_store, format=args.store_format, ttl_s=int(args.store_ttl) or None,
                           max_bytes=int(args.store_max_mb * (1 << 20)) or None)  # fmt: skip
    except ValueError as e:
        raise RwkvStateError(str(e)) from None


def _serve_replicas(args, config, model_spec) -> int:
    """`serve --replicas N`: the same server, N times on Ray Serve, sessions in the store."""
    import dataclasses

    if args.session_store is None:
        raise RwkvStateError("--replicas needs --session-store redis://HOST:PORT/DB: replicas share sessions there")
    if args.state_dir is not None:
        raise RwkvStateError("--replicas keeps sessions in --session-store; drop --state-dir")
    if args.in_process_core:
        raise RwkvStateError("--replicas runs each replica's engine core in the replica: leave out --in-process-core")
    try:
        from ..cluster.serve import ClusterConfig, run
    except ImportError as e:
        raise RwkvStateError(f"--replicas needs the cluster extra ({e.name} is not installed): "
                             "pip install 'rwkvstate[cluster]'")  # fmt: skip
    spec = model_spec(args)
    skip = ("host", "port", "state_dir", "session_store", "store_metrics", "api_processes", "core_address")
    server = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in skip}
    server["state_dtype"] = args.state_dtype
    cluster = ClusterConfig(model=spec.path, store=config.session_store, device=spec.device.split(":")[0],
                            dtype=spec.dtype, tokenizer=spec.tokenizer, server=server, replicas=args.replicas,
                            ingress_replicas=args.ingress_replicas)  # fmt: skip
    run(cluster, args.host, args.port, ray_address=args.ray_address, blocking=True)
    return 0


def _name_of(model: str | None) -> list[str]:
    """A model given by name is served under that name, not its file's stem."""
    from ..model import hub
    from .models import looks_like_path

    entry = hub.lookup(model) if model is not None and not looks_like_path(model) else None
    return [entry.name] if entry is not None else []


def _log_to_stderr(level: str) -> None:
    """rwkvstate's server log (start-up summary, one line per request) in uvicorn's style."""
    logger = logging.getLogger("rwkvstate")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
