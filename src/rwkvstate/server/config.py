"""ServerConfig: everything `rwkvstate serve` and `create_app` need besides the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..state.layout import parse_dtype


@dataclass
class ServerConfig:
    """Limits and resources of one server. The CLI builds this; tests and benchmarks too."""

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None  # the id clients pass as `model`; None: the model file's stem
    model_aliases: tuple[str, ...] = ()  # further ids accepted and listed by /v1/models
    slots: int = 8  # pool slots = the most requests generating at once
    state_dtype: torch.dtype = torch.float32
    prefix_cache_bytes: int = 64 << 20  # 0 turns the prefix cache off
    state_dir: Path | None = None  # persistent sessions, state files to load, snapshots
    api_key: str | None = None  # None: no authentication
    max_tokens_cap: int = 4096  # a request asking for more is refused (400)
    default_max_tokens: int = 256  # when a request does not say (capped by max_tokens_cap)
    max_request_bytes: int = 1 << 20  # larger bodies are refused (413)
    max_state_bytes: int = 64 << 20  # a request's `state` (decoded); the body may be this much larger
    max_queue: int = 256  # requests waiting for a slot beyond `slots` running; more get 429
    request_timeout_s: float | None = 300.0  # from arrival to the last token; None: no limit
    max_sessions: int | None = 1000  # persistent sessions; more are refused (429); None: no limit
    max_snapshots: int | None = 1000  # state files outside sessions/ the snapshot API may bring about
    max_state_dir_bytes: int | None = None  # bytes of the state directory past which new files are refused
    allow_other_weights: bool = False  # load state files saved from other weights of the same shape
    header_timeout_s: float = 10.0  # from connecting (or the last response) to the end of a request's headers
    keep_alive_s: float = 5.0  # an idle kept-alive connection is closed after this
    max_connections: int = 1000  # open connections; more are closed at once
    http: str = "h11"  # the HTTP/1.1 parser: "h11", "httptools", or "auto" (httptools if installed; server/http.py)
    docs: bool = False  # serve /docs, /redoc and /openapi.json (behind the API key when one is set)
    engine_options: dict = field(default_factory=dict)  # further Engine(...) keyword arguments
    api_processes: int = 1  # HTTP processes sharing the port, each connected to the one engine core
    core_address: str | None = None  # an engine core that is already running (ipc://... or tcp://...)
    session_store: Any = None  # a cluster.store.StoreConfig: sessions in Redis instead of the state directory
    store_metrics: bool = True  # /metrics shows the session store's counters (off in replicas: the ingress does)

    def __post_init__(self):
        self.state_dtype = parse_dtype(self.state_dtype)
        positive = ("slots", "max_tokens_cap", "default_max_tokens", "max_request_bytes", "max_connections",
                    "api_processes", "max_state_bytes")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"ServerConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_sessions", "max_snapshots", "max_state_dir_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"ServerConfig.{name} must be >= 1 or None (no limit), got {value}")
        for name in ("header_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("max_queue", "prefix_cache_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"ServerConfig.{name} must be >= 0, got {getattr(self, name)}")
        from .http import parser_name

        try:
            parser_name(self.http)
        except ValueError as e:
            raise ValueError(f"ServerConfig.{e}") from None
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"ServerConfig.request_timeout_s must be > 0 or None, got {self.request_timeout_s}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"ServerConfig.port must be in [0, 65535], got {self.port}")
        if self.state_dir is not None:
            self.state_dir = Path(self.state_dir)
        if self.api_key == "":
            self.api_key = None
        self.model_aliases = tuple(self.model_aliases)
        for name in (self.model_name, *self.model_aliases):
            if name is not None and (not isinstance(name, str) or not name.strip()):
                raise ValueError(f"ServerConfig: a served model name must be a non-empty string, got {name!r}")

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: max_request_bytes, plus a base64 state file of up to
        max_state_bytes that a generation request may carry (stateless mode)."""
        return self.max_request_bytes + base64_len(self.max_state_bytes)

    def served_names(self, model) -> tuple[str, ...]:
        """The model ids clients may use: the primary one (model_name, else the model file's
        stem) first, then the aliases, without repeats."""
        primary = self.model_name or (Path(str(model.path)).stem if getattr(model, "path", None) else "rwkv7")
        return tuple(dict.fromkeys((primary, *self.model_aliases)))


def base64_len(n: int) -> int:
    """Characters of n bytes in base64."""
    return 4 * ((n + 2) // 3)
