"""benchmarks/bench_server.py: a CPU smoke run with the bundled model, end to end (bare decode,
engine, the HTTP server with a load generator in its own process; JSON, markdown and chart)."""

from __future__ import annotations

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


@pytest.mark.skipif(not BUNDLED_MODEL.exists(), reason="the bundled model is not in this checkout")
@pytest.mark.timeout(180)
def test_bench_server_smoke_run(tmp_path):
    out = tmp_path / "serving"
    cmd = [sys.executable, str(BENCH), "--device", "cpu", "--levels", "1,2", "--waves", "1", "--max-tokens", "4",
           "--steps", "3", "--core", "thread", "--client-processes", "1", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert [row["streams"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        for key in ("bare_tokens_per_s", "engine_decode_tokens_per_s", "engine_tokens_per_s", "server_tokens_per_s"):
            assert row[key] > 0, key
        assert row["server_requests"] == row["streams"] and row["ttft_p50_ms"] > 0 and row["itl_p99_ms"] >= 0
        assert row["server_wall_s"] > 0 and row["client_start_spread_ms"] >= 0
        assert 0 <= row["slow_gaps_in_largest_bin"] <= row["slow_gaps"] and row["slow_gap_bins"] <= row["slow_gaps"]
        # CPU seconds per wall second: this process (the server on its threads) and one load generator
        assert len(row["server_cpu_per_wall"]) == 1 and len(row["client_cpu_per_wall"]) == 1
        assert all(0 < c < 64 for c in row["server_cpu_per_wall"] + row["client_cpu_per_wall"])
    assert "barrier" in result["server_method"]
    assert "| 2 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 1000
