"""What every benchmark script shares: one timer, one stability rule, writing OUT.json and OUT.md.

The timer: wall-clock seconds of each call with the device synchronised before and after it
(host work included, as a user sees it), after untimed warm-up calls. A measurement is
`repeats` medians of `calls` such calls; its spread is (max - min) / median of those medians.
A measurement whose spread exceeds MAX_SPREAD is re-run, at most MAX_RERUNS times, and if it is
still unstable it carries `unstable: True`: reports mark it and never present it as a finding.
Every peer and baseline in a comparison goes through this same timer.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

MAX_SPREAD = 0.25  # (max - min) / median of the repeats' medians above this: unstable
MAX_RERUNS = 2  # re-runs of an unstable measurement before it is published as unstable


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def call_seconds(fn, device, calls: int, warmup: int = 2, setup=None) -> list[float]:
    """Wall-clock seconds of each of `calls` calls of fn, device synchronised around each; an
    untimed setup() before every call (warm-up calls included) when given."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(calls):
        if setup:
            setup()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def spread_of(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def summary(values: list[float], attempts: int = 1, max_spread: float = MAX_SPREAD) -> dict:
    """Per-repeat values with their median, min-max, spread and the stability verdict."""
    return {"repeats_s": list(values), "median_s": statistics.median(values), "min_s": min(values),
            "max_s": max(values), "spread": spread_of(values), "attempts": attempts,
            "unstable": len(values) > 1 and spread_of(values) > max_spread}  # fmt: skip


def measure(fn, device, repeats: int, calls: int, warmup: int = 2, setup=None, max_spread: float = MAX_SPREAD,
            reruns: int = MAX_RERUNS) -> dict:  # fmt: skip
    """`repeats` medians of `calls` timed calls, re-run while unstable (bounded)."""
    for attempt in range(1, reruns + 2):
        medians = [statistics.median(call_seconds(fn, device, calls, warmup if r == 0 else 1, setup))
                   for r in range(repeats)]  # fmt: skip
        result = summary(medians, attempt, max_spread)
        if not result["unstable"]:
            break
    return result


def write_results(out: Path | None, result: dict, text: str) -> None:
    """Prints the markdown; with out, writes OUT.json (every raw number) and OUT.md."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)


class CpuTimes:
    """CPU seconds (user + system) each process of this machine spent inside the block, the
    busiest first (`top`): a process near one CPU second per second of wall time is saturated (an
    interpreter lock, an event loop). Labels are command lines; Ray names its processes
    (ray::ServeReplica:..., ray::ProxyActor). Needs psutil (the bench extra)."""

    def __enter__(self):
        self.before, self.t0 = self._snapshot(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        after = self._snapshot()
        spent = [(label, cpu - self.before.get(pid, ("", 0.0))[1]) for pid, (label, cpu) in after.items()]
        spent.sort(key=lambda x: -x[1])
        self.top = [{"process": label, "cpu_s": cpu, "per_wall_s": cpu / wall} for label, cpu in spent[:8]]

    @staticmethod
    def _snapshot() -> dict[int, tuple[str, float]]:
        import psutil

        return process_cpu([p.pid for p in psutil.process_iter()])


def process_cpu(pids: list[int]) -> dict[int, tuple[str, float]]:
    """Each live process among pids: (its command line, shortened; its CPU seconds, user + system)."""
    import psutil

    out = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            times, cmd = proc.cpu_times(), proc.cmdline() or [proc.name()]
        except psutil.Error:  # gone, or not ours to read
            continue
        out[pid] = (" ".join(cmd).strip()[:70], times.user + times.system)
    return out
