"""/metrics in the Prometheus text exposition format (version 0.0.4).

Engine figures come from the worker's latest stats snapshot (refreshed every 0.2 s), so a
scrape never waits for the engine. Request counts are kept on the event loop.
"""

from __future__ import annotations

import re
from collections import Counter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "rwkvstate_"

# (stats key, metric name, type, help)
ENGINE_METRICS = (
    ("tokens_per_second", "generation_tokens_per_second", "gauge", "tokens generated per second over the last 10 s"),
    ("tokens_generated", "generated_tokens_total", "counter", "tokens generated"),
    ("tokens_fed", "prompt_tokens_total", "counter", "prompt tokens read (prefix-cache hits excluded)"),
    ("steps", "engine_steps_total", "counter", "packed forwards run by the engine loop"),
    ("queued", "queue_depth", "gauge", "requests waiting for a slot"),
    ("running", "requests_running", "gauge", "requests generating"),
    ("slots_total", "slots", "gauge", "pool slots"),
    ("slots_in_use", "slots_in_use", "gauge", "pool slots holding a session"),
    ("sessions", "sessions", "gauge", "engine sessions (persistent and per-request)"),
    ("sessions_on_host", "sessions_on_host", "gauge", "idle sessions moved to host memory"),
    ("evictions", "evictions_total", "counter", "sessions moved from the pool to host memory"),
    ("host_restores", "host_restores_total", "counter", "sessions brought back from host memory"),
    ("bytes_to_host", "bytes_to_host_total", "counter", "state bytes copied device -> host"),
    ("bytes_to_device", "bytes_to_device_total", "counter", "state bytes copied host -> device"),
    ("prefix_cache_hit_rate", "prefix_cache_hit_rate", "gauge", "prefix-cache lookups that found a prefix"),
    ("prefix_cache_lookups", "prefix_cache_lookups_total", "counter", "prefix-cache lookups"),
    ("prefix_cache_hits", "prefix_cache_hits_total", "counter", "prefix-cache hits"),
    ("prefix_cache_hit_tokens", "prefix_cache_hit_tokens_total", "counter", "prompt tokens skipped by the cache"),
)
STATE_TIERS = (("pool", "bytes_pool"), ("host", "bytes_host_tier"), ("history", "bytes_history"),
               ("prefix_cache", "bytes_prefix_cache"))  # fmt: skip

_SESSION_PATH = re.compile(r"^/v1/sessions/[^/]+")


def endpoint_label(path: str) -> str:
    """A bounded label for a request path: session ids collapsed, unknown paths 'other'."""
    path = _SESSION_PATH.sub("/v1/sessions/{id}", path)
    known = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/v1/sessions")
    return path if path.startswith(known) else "other"


class RequestCounter:
    def __init__(self):
        self.counts: Counter = Counter()

    def add(self, endpoint: str, status: int) -> None:
        self.counts[endpoint, status] += 1


def render(stats: dict, requests: RequestCounter, persistent_sessions: int) -> str:
    lines = []

    def metric(name, kind, help_text, samples):
        lines.append(f"# HELP {PREFIX}{name} {help_text}")
        lines.append(f"# TYPE {PREFIX}{name} {kind}")
        for labels, value in samples:
            lines.append(f"{PREFIX}{name}{labels} {_number(value)}")

    for key, name, kind, help_text in ENGINE_METRICS:
        if key in stats:
            metric(name, kind, help_text, [("", stats[key])])
    tiers = [(f'{{tier="{tier}"}}', stats.get(key, 0)) for tier, key in STATE_TIERS]
    metric("state_bytes", "gauge", "bytes of recurrent state held, by tier", tiers)
    metric("persistent_sessions", "gauge", "sessions created through /v1/sessions", [("", persistent_sessions)])
    counts = sorted(requests.counts.items())
    samples = [(f'{{endpoint="{ep}",status="{status}"}}', n) for (ep, status), n in counts]
    metric("requests_total", "counter", "HTTP requests by endpoint and status code", samples)
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))
