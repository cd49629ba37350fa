"""The fused residual add + layer norm + token shift kernel (ops/token_shift.py) on a GPU, against
an earlier version of ops/token_shift.py given as a file: the kernel alone at decode batches and
widths (CUDA-graph replay of 50 calls, median of 7 replays; whether both write the same bits),
then the whole decode step with each (bench_decode's timer, the runtime's default path; "new2"
re-times the current kernel after the earlier one, so drift between the two shows).

    git show 205ef31:src/rwkvstate/ops/token_shift.py > /tmp/token_shift_before.py
    python benchmarks/bench_norm_shift.py --before /tmp/token_shift_before.py --out norm-shift.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

import bench_decode as bd  # benchmarks/ is on sys.path when run as a script
import rwkvstate.ops.token_shift as ts
from rwkvstate.model.packing import pack_decode


def load_before(path: Path):
    """The earlier module, imported inside the rwkvstate.ops package so its relative imports work."""
    spec = importlib.util.spec_from_file_location("rwkvstate.ops.token_shift_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def graph_us(fn, calls: int = 50) -> float:
    """Microseconds per call: a CUDA graph of `calls` calls, the median of 7 replays."""
    fn()
    torch.cuda.synchronize()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[3]


def alone(before, widths, batches) -> list[dict]:
    rows = []
    for C in widths:
        for B in batches:
            for K, with_delta in ((6, False), (1, True)):  # the time mix's norm (6 mixes), the channel mix's (1, after the residual add)
                g = torch.Generator(device="cuda").manual_seed(0)
                x, delta = (torch.randn(B, C, device="cuda", generator=g).half() for _ in range(2))
                ln_w, ln_b = (torch.randn(C, device="cuda", generator=g).half() for _ in range(2))
                mix = torch.rand(K, C, device="cuda", generator=g).half()
                shift = torch.randn(B + 1, C, device="cuda", generator=g).half()
                packed = pack_decode(torch.arange(B, device="cuda"), torch.zeros(B, dtype=torch.long, device="cuda"))
                d = delta if with_delta else None
                t_old = graph_us(lambda: before.norm_shift_mix_triton(x, d, ln_w, ln_b, shift, packed, mix))
                t_new = graph_us(lambda: ts.norm_shift_mix_triton(x, d, ln_w, ln_b, shift, packed, mix))
                s_old, s_new = shift.clone(), shift.clone()
                x_old, o_old = before.norm_shift_mix_triton(x, d, ln_w, ln_b, s_old, packed, mix)
                x_new, o_new = ts.norm_shift_mix_triton(x, d, ln_w, ln_b, s_new, packed, mix)
                same = torch.equal(o_old, o_new) and torch.equal(s_old, s_new) and torch.equal(x_old, x_new)
                rows.append({"C": C, "batch": B, "K": K, "delta": with_delta, "old_us": t_old, "new_us": t_new,
                             "identical": same})  # fmt: skip
                print(f"alone C={C} B={B} K={K} delta={with_delta}: old {t_old:.2f} us, new {t_new:.2f} us, "
                      f"identical {same}", flush=True)  # fmt: skip
    return rows


class _Timer:  # bench_decode.decode_time's arguments
    repeats, steps, max_spread = 3, 20, 0.25


def steps(before, shapes, batches) -> list[dict]:
    rows = []
    for shape in shapes:
        cfg = bd.config_for(shape)
        tensors = bd.random_checkpoint(cfg, seed=0, dtype=torch.float16, device="cuda")
        model = bd.Model.from_tensors(tensors, cfg, device="cuda", dtype=torch.float16)
        del tensors
        for B in batches:
            for which in ("new", "old", "new2"):
                current = ts.norm_shift_mix_triton
                if which == "old":
                    ts.norm_shift_mix_triton = before.norm_shift_mix_triton
                try:
                    t = bd.decode_time(model, bd.OURS, B, True, _Timer)
                finally:
                    ts.norm_shift_mix_triton = current
                rows.append({"shape": shape, "batch": B, "kernel": which, "step_ms": t["median_s"] * 1e3,
                             "spread": t["spread"]})  # fmt: skip
                print(f"step {shape} B={B} {which}: {t['median_s'] * 1e3:.3f} ms ({B / t['median_s']:,.0f} tok/s, "
                      f"spread {t['spread']:.0%})", flush=True)  # fmt: skip
        del model
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="an earlier ops/token_shift.py")
    parser.add_argument("--shapes", type=lambda s: [x for x in s.split(",") if x], default=["0.1B", "1.5B", "7.2B"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    before = load_before(args.before)
    result = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "before": str(args.before),
              "alone": alone(before, (768, 2048, 4096), (1, 8, 64, 256)),
              "step": steps(before, args.shapes, (1, 8, 256))}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
