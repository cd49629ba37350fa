"""`rwkvstate bench impact --tiny`: the CPU smoke run of the measured impact table, end to end
(every row measured, the JSON complete, the markdown and charts rendered from it)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import re
import sys
from pathlib import Path

import pytest

from rwkvstate.cli import build_parser, main

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_impact.py"
SEED_ROWS = ["Contiguous State", "F16 State", "Lazy Materialization", "State Compression",
             "Batched Updates (fused token shift)", "Ring Buffer"]  # fmt: skip


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_impact", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny CPU run through the CLI (the slow part, ~10 s), shared by the tests below."""
    root = tmp_path_factory.mktemp("impact")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["bench", "impact", "--tiny", "--out", str(root / "impact"), 
                   "--doc", str(root / "doc" / "impact.md")])
    assert rc == 0
    assert "NOTE: CPU figures from tiny smoke shapes: they are not GPU figures." in out.getvalue()
    return root, json.loads((root / "impact.json").read_text())


def test_json_has_every_row(tiny_run):
    _, result = tiny_run
    meta = result["meta"]
    assert meta["cpu"] and "not a GPU figure" in meta["card"]
    batches = meta["batches"]
    variants = {name for pair in meta["pairs"] for name in pair[2:]}
    cells = {(r["batch"], r["workload"], r["variant"]) for r in result["speed"]}
    assert cells == {(b, w, v) for b in batches for w in ("decode", "prefill") for v in variants}
    for r in result["speed"]:
        assert len(r["repeats_s"]) == meta["repeats"] and r["min_s"] <= r["median_s"] <= r["max_s"]
    assert {(r["batch"], r["policy"]) for r in result["lazy"]} == {(b, p) for b in batches for p in ("eager", "lazy")}
    eager = {r["batch"]: r["bytes_to_host_per_turn"] for r in result["lazy"] if r["policy"] == "eager"}
    lazy = {r["batch"]: r["bytes_to_host_per_turn"] for r in result["lazy"] if r["policy"] == "lazy"}
    assert lazy[max(batches)] < eager[max(batches)]  # idle sessions are not copied again
    formats = {r["format"]: r for r in result["compression"]}
    assert set(formats) == {"fp32", "fp16", "bf16", "int8", "fp8"}
    assert all("encode_decode" in r for r in formats.values())
    assert formats["fp16"]["state_bytes"] * 2 == formats["fp32"]["state_bytes"]
    cases = {(r["case"], r["method"]) for r in result["rollback"]}
    assert ("undo", "ring rollback") in cases and ("speculative", "copy the slot before the draft") in cases
    assert {r["format"] for r in result["ring_memory"]} == {"fp16", "int8"}
    assert result["quality"]["storage"] and result["quality"]["snapshots"]  # read from docs/benchmarks


def test_markdown_renders_every_row(tiny_run):
    root, _ = tiny_run
    assert not (root / "impact.md").exists()  # with --doc the markdown goes there only
    text = (root / "doc" / "impact.md").read_text()
    assert "they are not GPU figures" in text
    for n, name in enumerate(SEED_ROWS, 1):
        assert f"| {n} | {name} |" in text
        assert re.search(rf"^{n}\. \*\*{re.escape(name)}\.\*\* These are CPU figures", text, re.M)
    assert not re.search(r"\bnan\b|\bNone\b|\{|\}", text)
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert len(links) == 3 and all((root / "doc" / link).resolve().exists() for link in links)


def test_gpu_wording_and_merge(tiny_run, monkeypatch):
    """The GPU sentences render from the same numbers; merging a run with itself changes nothing.
    Stability is not what this checks: on a loaded CPU every tiny cell can be unstable, which
    would turn each sentence into "Not measured", so the render here treats every cell as stable."""
    _, result = tiny_run
    report = load_bench().render
    monkeypatch.setattr(sys.modules["impact_report"], "pair_flag", lambda *args, **kwargs: None)
    gpu = json.loads(json.dumps(result))
    gpu["meta"]["cpu"] = False
    text = report(gpu)
    assert "These are CPU figures" not in text and "Not measured" not in text
    assert "did not complete" not in text
    gpu["meta"]["incomplete_runs"] = [{"date": "2026-01-02", "card": "card", "shapes": ["tiny"], "reason": "timed out"}]
    assert "A later run (2026-01-02, card, tiny) did not complete: timed out." in report(gpu)
    merged = load_bench().merge([result, result])
    assert merged["meta"]["shapes"] == ["tiny"] and len(merged["speed"]) == len(result["speed"])


def test_cli_options_match_the_benchmark():
    cli = build_parser()._subparsers._group_actions[0].choices["bench"]
    impact = cli._subparsers._group_actions[0].choices["impact"]
    ours = argparse.ArgumentParser()
    load_bench().add_arguments(ours)
    names = lambda p: {a.dest for a in p._actions if a.dest != "help"}  # noqa: E731
    assert names(impact) == names(ours)
