"""Batched sampling on CUDA: the sorting-free sampler against a full-sort baseline.

For 1, 64 and 256 rows of a 65,536-word vocabulary and several parameter sets it times
- `kernel`: rwkvstate.ops.sampling.sample on device tensors (ids stay on the device),
- `call`: rwkvstate.runtime.sampling.sample, what the engine calls once per step (parameter
  tensors built and copied, the ids copied back),
- `sort`: the sort-based sampler the engine used before (kept here only as the baseline).
The floor is the logits' bytes read once at the measured device copy bandwidth. It also counts
rows where the kernel and the torch reference pick different tokens (rounding at a CDF
boundary; expected 0 or a handful).

    python benchmarks/bench_sampling.py --out $OUT/sampling
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import measure as common_measure, write_results  # noqa: E402  (benchmarks/ is the script's directory)
from rwkvstate.ops import sampling as ops
from rwkvstate.runtime.sampling import SamplingParams, TokenCounts, sample, sampling_rows

CASES = {
    "greedy": SamplingParams(temperature=0),
    "temperature 1": SamplingParams(temperature=1.0),
    "top_p 0.9": SamplingParams(temperature=1.0, top_p=0.9),
    "top_k 50, top_p 0.9": SamplingParams(temperature=0.8, top_k=50, top_p=0.9),
    "min_p 0.05": SamplingParams(temperature=1.0, min_p=0.05),
    "penalties, top_p 0.9": SamplingParams(top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1),
}


def sort_sample(logits: torch.Tensor, params, uniforms: torch.Tensor) -> torch.Tensor:
    """The baseline: a full sort per row, then top-k, top-p and inverse CDF over the sorted row."""
    B, V = logits.shape
    temperature = torch.tensor([p.temperature for p in params], device=logits.device)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in params], device=logits.device)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, 1.0, temperature).unsqueeze(1)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=logits.device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill((before >= top_p.unsqueeze(1)) & (ranks > 0), 0.0)
    cdf = probs.cumsum(dim=-1)
    pick = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(1), right=True).clamp_(max=V - 1)
    sampled = order.gather(1, pick).squeeze(1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)


def device_seconds(fn, repeats: int) -> float:
    """Median seconds of fn through the benchmarks' common timer on CUDA (device synchronised
    around each call, repeats checked for spread); wall time on CPU (a smoke run only)."""
    if torch.cuda.is_available():
        return common_measure(fn, "cuda", repeats=3, calls=repeats)["median_s"]
    return wall_seconds(fn, repeats)


def wall_seconds(fn, repeats: int, warmup: int = 3) -> float:
    """Median wall time of fn (which synchronises itself, e.g. by copying to the host)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device, nbytes: int = 2**30) -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy (median of 20)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / device_seconds(lambda: dst.copy_(src), 20)


def measure(B: int, V: int, name: str, params: SamplingParams, scale: float, repeats: int, bandwidth: float,
            device: torch.device) -> dict:  # fmt: skip
    gen = torch.Generator(device).manual_seed(B)
    logits = torch.randn(B, V, generator=gen, device=device) * scale
    counts = TokenCounts(B, V, device)
    for row in range(B):
        counts.rebuild(row, list(range(0, 4000, 7)))
    plist, seeds, positions, rows_idx = [params] * B, list(range(B)), [100] * B, list(range(B))
    count_rows = rows_idx if params.has_penalties() else [-1] * B
    rows = sampling_rows(plist, seeds, positions, count_rows, device)
    uniforms = torch.rand(B, generator=gen, device=device)
    kernel = device_seconds(lambda: ops.sample(logits, rows, counts.data), repeats)
    call = wall_seconds(lambda: sample(logits, plist, seeds, positions, counts, rows_idx), repeats)
    baseline = device_seconds(lambda: sort_sample(logits, plist, uniforms), repeats)
    base_call = wall_seconds(lambda: sort_sample(logits, plist, uniforms).tolist(), repeats)
    fresh = TokenCounts(B, V, device)
    for row in range(B):
        fresh.rebuild(row, list(range(0, 4000, 7)))
    want = ops.sample(logits.clone(), rows, fresh.data.clone(), backend="torch")
    got = ops.sample(logits.clone(), rows, fresh.data.clone(), backend="triton")
    nbytes = B * V * 4
    return {
        "case": name, "rows": B, "vocab": V, "logit_scale": scale, "kernel_s": kernel, "call_s": call,
        "sort_s": baseline, "sort_call_s": base_call, "logits_bytes": nbytes, "floor_s": nbytes / bandwidth,
        "mismatches_vs_reference": int((want != got).sum()), "failed_rows": int((got < 0).sum()),
    }  # fmt: skip


def markdown(result: dict) -> str:
    lines = [
        f"# Sampling on {result['card']}", "",
        f"Vocabulary {result['vocab']}, float32 logits `randn * scale`; device copy bandwidth "
        f"{result['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s (read + write); torch {result['torch']}, "
        f"triton {result['triton']}. `kernel`: the sampler on device tensors; `call`: the engine's per-step call "
        "(parameters copied in, ids copied out, wall time); `sort`: the full-sort baseline (device time; "
        "`sort call` with its ids copied out). Floor: the logits read once at copy bandwidth.", "",
        "| case | scale | rows | kernel us | call us | sort us | sort call us | speedup (call) | floor us | kernel / floor | mismatches |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in result["runs"]:
        lines.append(
            f"| {r['case']} | {r['logit_scale']:g} | {r['rows']} | {r['kernel_s'] * 1e6:.1f} | {r['call_s'] * 1e6:.1f} | "
            f"{r['sort_s'] * 1e6:.1f} | {r['sort_call_s'] * 1e6:.1f} | {r['sort_call_s'] / r['call_s']:.1f}x | "
            f"{r['floor_s'] * 1e6:.2f} | {r['kernel_s'] / r['floor_s']:.1f} | {r['mismatches_vs_reference']} |"
        )  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,64,256")
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--scales", default="1,4", help="logit scales: 1 is flat (many rejection rounds), 4 peaked")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="writes OUT.json and OUT.md")
    args = ap.parse_args(argv)
    import triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke run (TRITON_INTERPRET=1)
    bandwidth = copy_bandwidth(device, 2**30 if device.type == "cuda" else 2**24)
    runs = [measure(B, args.vocab, name, params, scale, args.repeats, bandwidth, device)
            for scale in map(float, args.scales.split(",")) for name, params in CASES.items()
            for B in map(int, args.rows.split(","))]  # fmt: skip
    result = {"card": torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run)", "torch": torch.__version__, "triton": triton.__version__,
              "vocab": args.vocab, "copy_bandwidth_bytes_per_s": bandwidth, "runs": runs}  # fmt: skip
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
