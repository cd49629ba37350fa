"""Latency histograms the engine core keeps for /metrics (Prometheus histograms: a count per
upper bound, a sum), sent to the API processes with the core's stats.

    request_to_engine   from the API process's receipt of a generation request to the core's
                        (the API's parsing and validation, the socket, the core's loop reaching
                        its socket); only for API processes on the core's host (ipc:// sockets),
                        whose clocks are the core's
    engine_first_token  from the core's receipt of a request to its first token id leaving the
                        core (waiting for a slot, the prompt, the first draw)
    engine_token_gap    between a request's consecutive token-id messages (one per step it
                        produced tokens in)
    engine_gc_pause     each collection of Python's garbage collector in the core's process
                        (every stream waits while it runs)
    engine_core_step    each engine step of the core's loop: admissions, the forward (a decode
                        graph replay or a packed forward), sampling, the step's bookkeeping
    engine_core_between_steps  the rest of each loop iteration that stepped: receiving requests and
                        sending the step's token messages

Python's collector walks every tracked object of a generation; a full collection over the
objects of torch, Triton and a loaded model took about 80 ms on a 2-core machine, long enough to
stall every stream at once. So a serving process freezes what it has at the end of its start-up
(`startup_objects_frozen`): later collections walk only what was allocated since.
"""

from __future__ import annotations

import gc
import time
from bisect import bisect_left
from contextlib import contextmanager
from typing import Iterator

# upper bounds in seconds (the last bucket, +Inf, is implicit)
BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2,
           0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)  # fmt: skip
HISTOGRAMS = {  # name -> help text
    "request_to_engine": "seconds from an API process receiving a generation request to the engine core receiving it",
    "engine_first_token": "seconds from the engine core receiving a generation request to its first token leaving the core",
    "engine_token_gap": "seconds between consecutive token messages of one request, leaving the engine core",
    "engine_gc_pause": "seconds of each Python garbage collection in the engine core's process",
    "engine_core_step": "seconds of each engine step in the engine core (admissions, forward, sampling, bookkeeping)",
    "engine_core_between_steps": "seconds of each engine core loop iteration outside its engine step (requests in, tokens out)",
}


class Histogram:
    """Durations in seconds, counted per bucket of BUCKETS (plus one past the last)."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float, count: int = 1) -> None:
        """`count` durations of `seconds` each."""
        seconds = max(0.0, seconds)
        self.counts[bisect_left(BUCKETS, seconds)] += count
        self.sum += seconds * count

    def wire(self) -> dict:
        """The form carried in the core's stats: {"counts": per bucket (not cumulative), "sum"}."""
        return {"counts": list(self.counts), "sum": self.sum}


def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile (0..1) of a histogram's per-bucket counts, interpolated linearly inside its
    bucket (as Prometheus' histogram_quantile); the last finite bound for the +Inf bucket; None
    when empty."""
    total = sum(counts)
    if total == 0:
        return None
    rank, seen = q * total, 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(BUCKETS):
                return BUCKETS[-1]
            low = BUCKETS[i - 1] if i else 0.0
            return low + (BUCKETS[i] - low) * (rank - seen) / n
        seen += n
    return BUCKETS[-1]


@contextmanager
def startup_objects_frozen() -> Iterator[None]:
    """Collects what start-up left as garbage, then moves every surviving object to the
    collector's permanent generation (gc.freeze) until the block ends: collections inside it skip
    them. For a process at the end of its start-up (model loaded, kernels compiled, app built)
    around its serving; thawed at the end so the interpreter's exit finds the objects as usual."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class GcPauses:
    """Observes the duration of every garbage collection of this process into `histogram`
    (a gc callback) until `close()`."""

    def __init__(self, histogram: Histogram):
        self.histogram = histogram
        self._started: float | None = None
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.histogram.observe(time.perf_counter() - self._started)
            self._started = None

    def close(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
