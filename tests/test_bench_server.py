"""benchmarks/bench_server.py: a CPU smoke run with the bundled model, end to end (bare decode,
engine, the HTTP server with a load generator in its own process; JSON, markdown and chart)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("zmq")
pytest.importorskip("matplotlib")

from rwkvstate.cli import BUNDLED_MODEL  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_server.py"
API_BENCH = BENCH.parent / "bench_api.py"


def run_bench(script: Path, args: list[str], out: Path) -> dict:
    """Runs a benchmark script with --out OUT; its JSON result."""
    done = subprocess.run([sys.executable, str(script), *args, "--out", str(out)], capture_output=True, text=True,
                          timeout=170)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.with_suffix(".json").read_text())


@pytest.mark.skipif(not BUNDLED_MODEL.exists(), reason="the bundled model is not in this checkout")
@pytest.mark.timeout(180)
def test_bench_server_smoke_run(tmp_path):
    out = tmp_path / "serving"
    result = run_bench(BENCH, ["--device", "cpu", "--levels", "1,2", "--waves", "1", "--max-tokens", "4", "--steps", "3",
                               "--core", "thread", "--client-processes", "1", "--load-clients", "aiohttp,httpx"], out)  # fmt: skip
    assert [row["streams"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        for key in ("bare_tokens_per_s", "engine_decode_tokens_per_s", "engine_tokens_per_s", "server_tokens_per_s"):
            assert row[key] > 0, key
        assert row["server_requests"] == row["streams"] and row["ttft_p50_ms"] > 0 and row["itl_p99_ms"] >= 0
        # the engine at a full batch: the decode steps that carry every stream (at least one does)
        assert 0 < row["engine_full_batch_steps"] <= row["engine_decode_steps"] and row["engine_full_batch_tokens_per_s"] > 0
        assert row["server_wall_s"] > 0 and row["client_start_spread_ms"] >= 0
        # the core's histograms: every request reached the core and had a first token (same-host clocks)
        assert row["request_to_engine_p50_ms"] >= 0 and row["engine_first_token_p99_ms"] > 0
        assert 0 <= row["engine_gc_pause_over_5ms"] <= row["engine_gc_pause_count"]
        assert 0 <= row["slow_gaps_in_largest_bin"] <= row["slow_gaps"] and row["slow_gap_bins"] <= row["slow_gaps"]
        # CPU seconds per wall second: this process (the server on its threads) and one load generator
        assert len(row["server_cpu_per_wall"]) == 1 and len(row["client_cpu_per_wall"]) == 1
        assert all(0 < c < 64 for c in row["server_cpu_per_wall"] + row["client_cpu_per_wall"])
        # each level again with the other load client, its own figures beside the first's
        other = row["other_load_clients"]["httpx"]
        assert other["server_requests"] == row["streams"] and other["server_tokens_per_s"] > 0
    assert result["load_client"] == "aiohttp" and "with httpx load generators" in out.with_suffix(".md").read_text()
    assert "barrier" in result["server_method"]
    assert "The engine at a full batch" in out.with_suffix(".md").read_text()
    assert "| 2 |" in out.with_suffix(".md").read_text() and "API -> core" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 1000


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_server", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def request(start: float, first: float, gaps: list[float], tokens: int | None = None) -> dict:
    end = first + sum(gaps)
    return {"start": start, "end": end, "ttft_s": first - start, "gaps": gaps, "slow": [],
            "tokens": len(gaps) + 1 if tokens is None else tokens}  # fmt: skip


def test_steady_window_counts_tokens_while_every_stream_runs():
    """Two streams, two requests each: the window opens at the first wave's last first token
    (t = 2) and closes at the first end after the last start (t = 9); tokens are counted by their
    arrival times, a chunk standing for the request's tokens per chunk."""
    steady = _bench().steady
    rows = [request(0.0, 1.0, [1.0] * 5),  # stream a: tokens at 1..6, ends at 6
            request(0.0, 2.0, [1.0] * 4, tokens=10),  # stream b: chunks at 2..6 carrying 2 tokens each
            request(6.0, 7.0, [1.0] * 3),  # stream a again: 7..10
            request(6.5, 7.5, [0.5, 1.0])]  # stream b again, the last to start: 7.5, 8, 9; ends at 9
    got = steady(rows, level=2)
    # inside [2, 9]: a 2..6 (5 chunks), b 2..6 (5 chunks x 2 tokens), a 7, 8, 9 (3), b 7.5, 8, 9 (3)
    assert got["server_steady_window_s"] == 7.0
    assert got["server_steady_tokens_per_s"] == pytest.approx((5 + 10 + 3 + 3) / 7.0)
    # a run of one wave, or one whose window closes before it opens, has none
    assert steady(rows[:2], level=2)["server_steady_tokens_per_s"] is None
    assert steady([request(0.0, 5.0, [1.0]), request(0.0, 1.0, [1.0]), request(2.0, 3.0, [])], level=2)[
        "server_steady_tokens_per_s"] is None  # fmt: skip



@pytest.mark.timeout(180)
@pytest.mark.skipif(importlib.util.find_spec("httptools") is None, reason="httptools is not installed")
def test_bench_api_smoke_run(tmp_path):
    """The HTTP side against the simulated core, both parsers: every token arrives, at the core's pace."""
    out = tmp_path / "api"
    result = run_bench(API_BENCH, ["--levels", "3", "--step-ms", "5", "--waves", "1", "--max-tokens", "6", "--api-processes",
                                   "1", "--client-processes", "1", "--http", "h11,httptools", "--load-clients",
                                   "aiohttp,httpx"], out)  # fmt: skip
    assert [(row["http"], row["load_client"]) for row in result["rows"]] == [
        ("h11", "aiohttp"), ("h11", "httpx"), ("httptools", "aiohttp"), ("httptools", "httpx")]
    # the API processes' CPU time is read in clock ticks (10 ms): one row of this short run can
    # see none, so each row's is only checked to be counted and some row's to be non-zero
    assert max(row["api_cpu_us_per_token"] for row in result["rows"]) > 0
    for row in result["rows"]:
        assert row["server_requests"] == 3 and row["server_tokens_per_s"] > 0 and row["api_cpu_us_per_token"] >= 0
        assert row["client_cpu_us_per_token"] > 0
        assert row["itl_p50_ms"] >= 4  # tokens come one simulated step apart
        assert row["engine_first_token_p50_ms"] is not None and row["request_to_engine_p50_ms"] is not None
    assert "| httptools | httpx | 3 |" in out.with_suffix(".md").read_text()
