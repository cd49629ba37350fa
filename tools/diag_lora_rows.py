"""Per-kernel device times of the LoRA chains of many rows: lora_rows_triton's down and up kernels
in several launch configurations, and lora_bmm's GEMMs and activations, at the 1.5B and 7.2B ranks.

Usage, on a GPU: PYTHONPATH=src python3 tools/diag_lora_rows.py [--batches 64,256] [--configs ...]

Each call runs eagerly (weights L2-resident after the first: this is for comparing kernels with
each other, not for floors) under torch.profiler; prints the mean device microseconds per call
of every kernel, grouped by call.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_lora import SHAPES, packs, rows_call  # noqa: E402

from rwkvstate.ops import lora as lo  # noqa: E402

# the default (ops/lora.py ROWS_*) first, then it unsplit, then others
CONFIGS = ["64:32:128:0:128:32:4", "64:32:128:1:128:32:4", "64:32:64:0:128:64:4", "64:32:64:0:64:32:4",
           "64:64:64:0:128:64:4", "128:32:64:0:128:64:8", "32:32:64:0:128:64:4"]  # fmt: skip


def kernel_times(fn, calls: int) -> dict[str, float]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.name[:60]] += e.device_time / calls
    return dict(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[64, 256])
    parser.add_argument("--shapes", type=lambda s: s.split(","), default=list(SHAPES))
    parser.add_argument("--configs", type=lambda s: s.split(","), default=CONFIGS)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    for shape in args.shapes:
        C, ranks = SHAPES[shape]
        pack = packs(C, ranks, torch.float16, 1)[0]
        for batch in args.batches:
            x = torch.randn(6, batch, C, device="cuda", dtype=torch.float16)
            calls = {"bmm": lambda: lo.lora_bmm(x, pack)}
            for c in args.configs:
                calls[f"rows {c}"] = lambda f=rows_call(c): f(x, pack)
            for name, fn in calls.items():
                try:
                    times = kernel_times(fn, args.calls)
                except Exception as e:  # a configuration past the GPU's limits
                    print(f"{shape} B={batch} {name}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                    continue
                parts = ", ".join(f"{k} {v:.1f}" for k, v in times.items())
                print(f"{shape} B={batch} {name}: total {sum(times.values()):.1f} us  [{parts}]", flush=True)


if __name__ == "__main__":
    main()
