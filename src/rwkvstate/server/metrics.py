"""/metrics, rendered by prometheus-client in the Prometheus text format.

Every label value comes from a fixed set, so no request can add a line or grow the output:
requests are counted by route template (the path pattern the router matched, e.g.
`/v1/sessions/{session_id}`; `unmatched` for no route, `refused` for requests turned away
before routing: wrong API key, body too large) and status class (`2xx` ... `5xx`). Engine
figures come from the engine core's latest stats (its heartbeat refreshes them every 0.1 s),
read when scraped, so a scrape never waits for the engine.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..runtime.latency import BUCKETS, HISTOGRAMS

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "rwkvstate_"
UNMATCHED, REFUSED = "unmatched", "refused"
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")

# (stats key, metric name, type, help)
ENGINE_METRICS = (
    ("tokens_per_second", "generation_tokens_per_second", "gauge", "tokens generated per second over the last 10 s"),
    ("tokens_generated", "generated_tokens", "counter", "tokens generated"),
    ("tokens_fed", "prompt_tokens", "counter", "prompt tokens read (prefix-cache hits excluded)"),
    ("steps", "engine_steps", "counter", "packed forwards run by the engine loop"),
    ("graph_steps", "decode_graph_steps", "counter", "engine steps that replayed a captured decode graph"),
    ("queued", "queue_depth", "gauge", "requests waiting for a slot"),
    ("running", "requests_running", "gauge", "requests generating"),
    ("slots_total", "slots", "gauge", "pool slots"),
    ("slots_in_use", "slots_in_use", "gauge", "pool slots holding a session"),
    ("sessions", "sessions", "gauge", "engine sessions (persistent and per-request)"),
    ("sessions_on_host", "sessions_on_host", "gauge", "idle sessions moved to host memory"),
    ("evictions", "evictions", "counter", "sessions moved from the pool to host memory"),
    ("host_restores", "host_restores", "counter", "sessions brought back from host memory"),
    ("bytes_to_host", "bytes_to_host", "counter", "state bytes copied device -> host"),
    ("bytes_to_device", "bytes_to_device", "counter", "state bytes copied host -> device"),
    ("prefix_cache_hit_rate", "prefix_cache_hit_rate", "gauge", "prefix-cache lookups that found a prefix"),
    ("prefix_cache_lookups", "prefix_cache_lookups", "counter", "prefix-cache lookups"),
    ("prefix_cache_hits", "prefix_cache_hits", "counter", "prefix-cache hits"),
    ("prefix_cache_hit_tokens", "prefix_cache_hit_tokens", "counter", "prompt tokens skipped by the cache"),
)
STATE_TIERS = (("pool", "bytes_pool"), ("host", "bytes_host_tier"), ("history", "bytes_history"),
               ("prefix_cache", "bytes_prefix_cache"))  # fmt: skip
# (figures key, metric name, type, help): the server's own figures (in the core's stats too)
SERVER_METRICS = (
    ("persistent_sessions", "persistent_sessions", "gauge", "sessions created through /v1/sessions"),
    ("storage_ok", "storage_ok", "gauge", "1 while the state directory takes writes, 0 after a failed one"),
    ("save_failures", "state_save_failures", "counter", "session or snapshot writes that failed"),
    ("skipped_files", "session_files_skipped", "counter", "saved session files skipped at startup as bad"),
    ("state_dir_bytes", "state_dir_bytes", "gauge", "bytes of files in the state directory"),
)


def status_class(status: int) -> str:
    return STATUS_CLASSES[status // 100 - 1] if 100 <= status < 600 else "5xx"


class Metrics:
    """One registry per app (tests run several apps in one process)."""

    def __init__(self, stats: Callable[[], dict]):
        """stats: the engine core's latest stats, engine and server figures alike."""
        self.routes: frozenset[str] = frozenset()  # the app's route templates, set once its routes exist
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(f"{PREFIX}requests", "HTTP requests by route template and status class",
                                ("route", "status"), registry=self.registry)  # fmt: skip
        self.registry.register(_Snapshot(stats))

    def count(self, route: str | None, status: int) -> None:
        """Counts a finished request; `route` is the template the router matched, or None."""
        label = route if route in self.routes or route == REFUSED else UNMATCHED
        self.requests.labels(label, status_class(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Snapshot:
    """A collector reading the latest figures at scrape time."""

    def __init__(self, stats: Callable[[], dict]):
        self.stats = stats

    def describe(self):
        return []  # the families depend on what the engine reports (no prefix cache: no cache figures)

    def collect(self):
        stats = self.stats()
        for key, name, kind, help_text in ENGINE_METRICS + SERVER_METRICS:
            if key in stats:
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(PREFIX + name, help_text, value=float(stats[key]))
        tiers = GaugeMetricFamily(f"{PREFIX}state_bytes", "bytes of recurrent state held, by tier", labels=["tier"])
        for tier, key in STATE_TIERS:
            tiers.add_metric([tier], float(stats.get(key, 0)))
        yield tiers
        for name, histogram in stats.get("latency", {}).items():
            if name in HISTOGRAMS:
                yield _histogram(PREFIX + name + "_seconds", HISTOGRAMS[name], histogram)


def _histogram(name: str, help_text: str, wire: dict) -> HistogramMetricFamily:
    """A Prometheus histogram from the engine core's per-bucket counts (runtime/latency.py)."""
    total, buckets = 0, []
    for bound, count in zip((*BUCKETS, float("inf")), wire["counts"]):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
    return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=float(wire["sum"]))
