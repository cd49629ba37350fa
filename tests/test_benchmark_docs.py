"""Every table under docs/benchmarks/ is a rendering of a committed JSON file: each markdown
file is rendered again from its JSON with the writer that produced it and must come out the
same, and docs/impact.md likewise from docs/benchmarks/impact.json."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from rwkvstate.evaluation import precision_markdown

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"
sys.path.insert(0, str(ROOT / "benchmarks"))


def bench(name: str):
    return importlib.import_module(name)


def tool(name: str):
    """A writer under tools/ (which imports from benchmarks/, already on sys.path)."""
    if str(ROOT / "tools") not in sys.path:
        sys.path.insert(0, str(ROOT / "tools"))
    return importlib.import_module(name)


def tokenizer_markdown(data: dict, tmp_path: Path) -> str:
    path = tmp_path / "tokenizer.md"
    bench("bench_tokenizer").write_markdown(data, path)
    return path.read_text()


# stem of the markdown file -> writer(json dict, tmp_path) -> markdown text
WRITERS = {
    "decode-small-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-7b-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-fused-small-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-fused-7b-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-final-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-recheck-h200": lambda d, _: bench("bench_decode").markdown(d),
    "prefill-two-launch-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-official-small-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-official-final-h200": lambda d, _: bench("bench_decode").markdown(d),
    "prefill-wkv": lambda d, _: bench("bench_prefill").markdown(d),
    "ffn-sparsity": lambda d, _: bench("bench_ffn_sparsity").markdown(d),
    "ffn-first-h200": lambda d, _: bench("bench_ffn").markdown(d),
    "ffn-sweep-first-h200": lambda d, _: bench("bench_ffn").markdown(d),
    "ffn-h200": lambda d, _: bench("bench_ffn").markdown(d),
    "ffn-sweep-h200": lambda d, _: bench("bench_ffn").markdown(d),
    "decode-ffn-first-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-ffn-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-options-first-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-options-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-candidates-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-defaults-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-wkv-h200": lambda d, _: bench("bench_decode").markdown(d),
    "wkv-decode-h200": lambda d, _: bench("bench_wkv_decode").markdown(d),
    "time-mix-decode-h200": lambda d, _: bench("bench_wkv_decode").markdown(d),
    "decode-time-mix-h200": lambda d, _: bench("bench_decode").markdown(d),
    "profile-before-h200": lambda d, _: tool("profile_step").markdown(d),
    "profile-after-h200": lambda d, _: tool("profile_step").markdown(d),
    "profile-prompt-h200": lambda d, _: tool("profile_step").markdown(d),
    "profile-defaults-h200": lambda d, _: tool("profile_step").markdown(d),
    "profile-fused-lora-h200": lambda d, _: tool("profile_step").markdown(d),
    "lora-projection-h200": lambda d, _: bench("bench_lora").markdown(d),
    "decode-priority-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-tiles-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-lora-fused-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-split-reduce-first-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-split-reduce-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-default-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-lora-split-h200": lambda d, _: bench("bench_decode").markdown(d),
    "state-h200": lambda d, _: bench("bench_state").markdown(d),
    "server-h200": lambda d, _: bench("bench_server").markdown(d),
    "server-h200-rerun": lambda d, _: bench("bench_server").markdown(d),
    "serving-h200": lambda d, _: bench("bench_server").markdown(d),
    "serving-barrier-h200": lambda d, _: bench("bench_server").markdown(d),
    "serving-prompts-h200": lambda d, _: bench("bench_server").markdown(d),
    "serving-8api-h200": lambda d, _: bench("bench_server").markdown(d),
    "serving-4api-h200": lambda d, _: bench("bench_server").markdown(d),
    "serving-batched-h200": lambda d, _: bench("bench_server").markdown(d),
    "api-parsers-cpu": lambda d, _: bench("bench_api").markdown(d),
    "api-clients-cpu": lambda d, _: bench("bench_api").markdown(d),
    "api-requests-cpu": lambda d, _: bench("bench_api").markdown(d),
    "serving-stages-h200": lambda d, _: bench("bench_server").markdown(d),
    "serving-8lg-h200": lambda d, _: bench("bench_server").markdown(d),
    "serving-warmup-h200": lambda d, _: bench("bench_server").markdown(d),
    "serving-clients-h200": lambda d, _: bench("bench_server").markdown(d),
    "serving-gcfreeze-h200": lambda d, _: bench("bench_server").markdown(d),
    "serving-8api-aiohttp-h200": lambda d, _: bench("bench_server").markdown(d),
    "serving-scheduler-h200": lambda d, _: bench("bench_server").markdown(d),
    "serving-8api-loop-h200": lambda d, _: bench("bench_server").markdown(d),
    "serving-deferred-history-h200": lambda d, _: bench("bench_server").markdown(d),
    "serving-records-h200": lambda d, _: bench("bench_server").markdown(d),
    "serving-records-4api-h200": lambda d, _: bench("bench_server").markdown(d),
    "serving-records-rerun-h200": lambda d, _: bench("bench_server").markdown(d),
    "decode-lora-128-16-128-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-lora-512-16-128-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-lora-512-64-64-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-lora-1024-64-64-h200": lambda d, _: bench("bench_decode").markdown(d),
    "lora-rows-h200": lambda d, _: bench("bench_lora").markdown(d),
    "decode-lora-rows-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-rows-default-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-session-base-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-session-h200": lambda d, _: bench("bench_decode").markdown(d),
    "peers-ours-h200": lambda d, _: bench("bench_decode").markdown(d),
    "serving-reuseport-h200": lambda d, _: bench("bench_server").markdown(d),
    "serving-reuseport-4api-h200": lambda d, _: bench("bench_server").markdown(d),
    "serving-workers-h200": lambda d, _: bench("bench_server").markdown(d),
    "wkv-prompt-h200": lambda d, _: bench("bench_wkv_prompt").markdown(d),
    "prefill-prompt-h200": lambda d, _: bench("bench_decode").markdown(d),
    "peers-prompt-h200": lambda d, _: bench("bench_decode").markdown(d),
    "peers-7b-h200": lambda d, _: bench("bench_decode").markdown(d),
    "peers-1.5b-h200": lambda d, _: bench("bench_decode").markdown(d),
    "peers-default-1.5b-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-batched-h200": lambda d, _: bench("bench_decode").markdown(d),
    "decode-gemv-h200": lambda d, _: bench("bench_decode").markdown(d),
    "gemv-h200": lambda d, _: bench("bench_gemv").markdown(d),
    "gemv-sweep-h200": lambda d, _: bench("bench_gemv").markdown(d),
    "cluster-h200x2": lambda d, _: bench("bench_cluster").markdown(d),
    "cluster-balance-h200x2": lambda d, _: bench("bench_cluster").markdown(d),
    "cluster-omp1-h200x2": lambda d, _: bench("bench_cluster").markdown(d),
    "cluster-cpu-h200x2": lambda d, _: bench("bench_cluster").markdown(d),
    "cluster-direct-h200x2": lambda d, _: bench("bench_cluster").markdown(d),
    "cluster-gpus-h200x2": lambda d, _: bench("bench_cluster").markdown(d),
    "cluster-loop-h200x2": lambda d, _: bench("bench_cluster").markdown(d),
    "cluster-loop-1ingress-h200x2": lambda d, _: bench("bench_cluster").markdown(d),
    "routing-cpu": lambda d, _: bench("bench_routing").markdown(d),
    "snapshot-error": lambda d, _: bench("bench_snapshot_error").markdown(d),
    "state-precision": lambda d, _: precision_markdown(d),
    "state-precision-snapshots-h200": lambda d, _: precision_markdown(d),
    "tokenizer": tokenizer_markdown,
}
# markdown under docs/benchmarks/ that no JSON backs (summaries, the test logs' notes) must hold no table
PROSE_ONLY = {"decode", "tests-cuda-h200"}


def test_every_markdown_file_is_accounted_for():
    stems = {p.stem for p in DOCS.glob("*.md")}
    assert stems == set(WRITERS) | PROSE_ONLY, stems ^ (set(WRITERS) | PROSE_ONLY)
    for stem in WRITERS:
        assert (DOCS / f"{stem}.json").exists(), stem


@pytest.mark.parametrize("stem", sorted(WRITERS))
def test_markdown_matches_its_json(stem, tmp_path):
    data = json.loads((DOCS / f"{stem}.json").read_text())
    assert WRITERS[stem](data, tmp_path) == (DOCS / f"{stem}.md").read_text()


@pytest.mark.parametrize("stem", sorted(PROSE_ONLY))
def test_summaries_hold_no_table(stem):
    text = (DOCS / f"{stem}.md").read_text()
    assert not [line for line in text.splitlines() if line.startswith("|")], f"{stem}.md has a table with no JSON"


def test_impact_doc_matches_its_json():
    report = bench("impact_report")
    data = json.loads((DOCS / "impact.json").read_text())
    doc = ROOT / "docs" / "impact.md"
    charts = {"speed-up by batch size": DOCS / "impact-speedup.png",
              "bytes per cached session by format": DOCS / "impact-bytes.png",
              "rollback against re-feeding": DOCS / "impact-rollback.png"}  # fmt: skip
    assert all(path.exists() for path in charts.values())
    assert report.render(data, doc, charts) == doc.read_text()
