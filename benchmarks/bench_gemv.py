"""Projections at decode batch sizes on a GPU: the GEMV kernel (ops/gemv.py) against F.linear
(cuBLAS), at the widths of the released 1.5B and 7.2B models.

    python benchmarks/bench_gemv.py --out docs/benchmarks/gemv-h200

Cases, each at batch B = 1, 2, 4, 8 in fp16:
    rkv        the time mix's r, k, v: three [C, C] projections of three inputs (cuBLAS: three
               launches; the kernel: one grouped launch)
    output     the time mix's output projection, one [C, C]
    ffn_key    the feed-forward's key, [4C, C], relu^2 in the kernel's epilogue (cuBLAS: GEMM, relu, square)
    ffn_value  the feed-forward's value, [C, 4C] stored as the transposed view of [4C, C], + residual
Each call reads its own copy of the weights (copies rotated through at least ROTATE_BYTES, several
times the 50 MB L2 of an H200, so no call finds its weights in L2); all copies' calls are captured
in one CUDA graph, and a call's time is the graph replay's (the common timer, benchmarks/common.py)
divided by the copies. Bytes per call = weights + inputs + outputs (+ residual); TB/s = bytes / time.
--sweep also times a grid of launch configurations of the kernel for rkv and output at B = 1 and 8.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

from bench_decode import copy_bandwidth  # noqa: E402  (benchmarks/ is the script's directory)
from common import MAX_SPREAD, measure, sync, write_results  # noqa: E402
from rwkvstate.ops import gemv as gm

SHAPES = {"1.5B": 2048, "7.2B": 4096}
DEVICE = "cuda"  # a CPU smoke run (TRITON_INTERPRET=1) sets "cpu": no graph, same code otherwise
CASES = ("rkv", "output", "ffn_key", "ffn_value")
ROTATE_BYTES = 512 * 2**20
SWEEP = [dict(block_n=n, block_k=k, num_splits=s) for n, k, s in itertools.product((16, 32, 64), (128, 256), (None, 1))]
SWEEP += [dict(num_stages=2), dict(num_stages=4)]  # the default tiles with other pipeline depths


def case_tensors(case: str, C: int, batch: int, dtype, copies: int):
    """(x, [weights per copy], residual, activation) of one case."""
    G, N, K = {"rkv": (3, C, C), "output": (None, C, C), "ffn_key": (None, 4 * C, C), "ffn_value": (None, C, 4 * C)}[case]
    lead = () if G is None else (G,)
    x = torch.randn(*lead, batch, K, device=DEVICE, dtype=dtype)
    if case == "ffn_value":  # stored [K, N], used through its [N, K] view, as the model stores it
        weights = [(torch.randn(K, N, device=DEVICE, dtype=dtype) * K**-0.5).t() for _ in range(copies)]
    else:
        weights = [torch.randn(*lead, N, K, device=DEVICE, dtype=dtype) * K**-0.5 for _ in range(copies)]
    residual = torch.randn(batch, N, device=DEVICE, dtype=dtype) if case == "ffn_value" else None
    return x, weights, residual, "relu2" if case == "ffn_key" else "none"


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def time_call(call, weights: list, args) -> dict:
    """Seconds per call of call(w), one call per weight copy in one CUDA graph."""
    for w in weights[:2]:  # compile and warm up outside the graph
        call(w)
    sync(DEVICE)

    def replay():
        for w in weights:
            call(w)

    if DEVICE == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replay()
        replay = graph.replay
    t = measure(replay, DEVICE, args.repeats, args.calls, 3, max_spread=args.max_spread)
    return {**t, "us": t["median_s"] / len(weights) * 1e6}


def row(shape, case, batch, backend, config, t, moved, bandwidth) -> dict:
    tbs = moved / (t["us"] * 1e-6) / 1e12
    print(f"  {shape} {case:<9} B={batch} {backend:<6} {_label(config):<44} {t['us']:8.2f} us {tbs:5.2f} TB/s"
          + ("  UNSTABLE" if t["unstable"] else ""), flush=True)  # fmt: skip
    return {"shape": shape, "case": case, "batch": batch, "backend": backend, "config": config, **t,
            "bytes": moved, "tb_per_s": tbs, "share_of_copy_bandwidth": moved / (t["us"] * 1e-6) / bandwidth}  # fmt: skip


def measure_case(shape: str, case: str, batch: int, bandwidth: float, args) -> list[dict]:
    C = SHAPES[shape]
    per_copy = nbytes(*case_tensors(case, C, 1, args.dtype, 1)[1])
    copies = max(2, -(-ROTATE_BYTES // per_copy))
    x, weights, residual, act = case_tensors(case, C, batch, args.dtype, copies)
    out = gm.gemv_reference(x, weights[0], residual, act)
    moved = nbytes(weights[0], x, residual, out)
    rows = [row(shape, case, batch, "cublas", None, time_call(lambda w: gm.gemv_reference(x, w, residual, act), weights, args),
                moved, bandwidth)]  # fmt: skip
    configs = [{}] + (SWEEP if args.sweep and case in ("rkv", "output") and batch in (1, 8) else [])
    seen = set()
    for cfg in configs:
        chosen = gm.tiles(weights[0].shape[0] if x.dim() == 3 else 1, out.shape[-1], x.shape[-1], x.device,
                          cfg.get("block_n"), cfg.get("block_k"), cfg.get("num_splits"))  # fmt: skip
        label = {**chosen, "num_stages": cfg.get("num_stages", 3), "default": not cfg}
        if tuple(label.values())[:-1] in seen:  # the same launch as one already timed
            continue
        seen.add(tuple(label.values())[:-1])
        t = time_call(lambda w: gm.gemv_triton(x, w, residual, act, **cfg), weights, args)
        rows.append(row(shape, case, batch, "triton", label, t, moved, bandwidth))
    del weights
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return rows


def run(args) -> dict:
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    bandwidth = copy_bandwidth(DEVICE)
    print(f"{card}: device-to-device copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows = []
    for shape in args.shapes:
        for case in args.cases:
            for batch in args.batches:
                rows += measure_case(shape, case, batch, bandwidth, args)
    return {**run_info(card, bandwidth, args, ROTATE_BYTES, "weight copy"), "rows": rows}


def run_info(card: str, bandwidth: float, args, rotate_bytes: int, copy: str) -> dict:
    """What a result of these kernel benchmarks records besides its rows (bench_lora.py too)."""
    return {"card": card, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "dtype": str(args.dtype).removeprefix("torch."),
            "copy_bandwidth_bytes_per_s": bandwidth, "rotate_bytes": rotate_bytes,
            "method": {"timer": f"CUDA-graph replay of one call per {copy}, wall clock, device synchronised",
                       "repeats": args.repeats, "calls": args.calls, "max_spread": args.max_spread}}  # fmt: skip


def markdown(result: dict) -> str:
    card = result["card"]
    out = [f"# Projections at decode batch sizes, {card}, {result['date']}", "",
           f"torch {result['torch']}, Triton {result['triton']}, {result['dtype']}; copy bandwidth "
           f"{result['copy_bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s. Weights rotated through "
           f"{result['rotate_bytes'] >> 20} MiB of copies; bytes = weights + inputs + outputs (+ residual). "
           "`cublas`: F.linear per projection (the model's path), relu and square after `ffn_key`, the "
           "residual add after `ffn_value`; `triton`: ops/gemv.py with its default launch configuration.", "",
           "| shape | case | batch | cuBLAS us | cuBLAS TB/s | Triton us | Triton TB/s | splits | cuBLAS / Triton |",
           "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    key = lambda r: (r["shape"], r["case"], r["batch"])  # noqa: E731
    cublas = {key(r): r for r in result["rows"] if r["backend"] == "cublas"}
    for r in (r for r in result["rows"] if r["backend"] == "triton" and r["config"]["default"]):
        c = cublas[key(r)]
        out.append(f"| {r['shape']} | {r['case']} | {r['batch']} | {c['us']:.2f}{_mark(c)} | {c['tb_per_s']:.2f} | "
                   f"{r['us']:.2f}{_mark(r)} | {r['tb_per_s']:.2f} | {r['config']['num_splits']} | "
                   f"{c['us'] / r['us']:.2f} |")  # fmt: skip
    sweep = [r for r in result["rows"] if r["backend"] == "triton" and not r["config"]["default"]]
    if sweep:
        out += ["", "## Launch configurations of the kernel (--sweep)", "",
                "| shape | case | batch | block_n | block_k | splits | stages | us | TB/s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in sorted(sweep, key=lambda r: (*key(r), r["us"])):
            c = r["config"]
            out.append(f"| {r['shape']} | {r['case']} | {r['batch']} | {c['block_n']} | {c['block_k']} | "
                       f"{c['num_splits']} | {c['num_stages']} | {r['us']:.2f}{_mark(r)} | {r['tb_per_s']:.2f} |")  # fmt: skip
    return "\n".join(out) + "\n"


def _label(config: dict | None) -> str:
    if not config:
        return ""
    return " ".join(f"{k}={v}" for k, v in config.items() if k not in ("k_split", "default")) + (" (default)" if config["default"] else "")


def _mark(r: dict) -> str:
    return " (unstable)" if r.get("unstable") else ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=lambda s: s.split(","), default=list(SHAPES))
    parser.add_argument("--cases", type=lambda s: s.split(","), default=list(CASES))
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--dtype", type=lambda s: getattr(torch, s), default=torch.float16)
    parser.add_argument("--sweep", action="store_true", help="also time a grid of launch configurations")
    parser.add_argument("--calls", type=int, default=20, help="timed graph replays per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-spread", type=float, default=MAX_SPREAD)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    result = run(args)
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
