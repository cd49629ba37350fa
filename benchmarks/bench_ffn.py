"""The feed-forward (channel mix) at decode batch sizes on a GPU: its value projection with the
sparse-input GEMV (ops/gemv.py gemv_sparse_input: rows of V^T whose activations are all zero are
never read) against the dense GEMV kernel and cuBLAS, at activation densities 1 / 0.5 / 0.1, its
key projection, and the whole channel mix per backend.

    python benchmarks/bench_ffn.py --out docs/benchmarks/ffn-h200 [--sweep]

Cases at batch B = 1, 2, 4, 8 in fp16, widths C of the released 0.1B / 1.5B / 7.2B (F = 4C):
    value      act [B, F] @ V^T [F, C] + residual, act with the given density of non-zero entries
               (random positions, each row its own), V stored as the model stores it
    key        relu(x K^T)^2, K [F, C]: the GEMV kernel with its default split and unsplit
    channel    the whole channel mix of random inputs and weights (about half of the squared-ReLU
               activations are zero): backends "torch" (cuBLAS), "triton-gemv" (dense GEMV kernel,
               the model's choice before this benchmark) and "triton" (GEMV key + sparse-input value)
Every call reads its own copy of the weights (rotated through ROTATE_BYTES, past the L2); the
calls of all copies are one CUDA graph and a call's time is the replay's over the copies
(bench_gemv.time_call). Bytes per call: dense weights + inputs + outputs, so TB/s of a sparse
call is what the dense bytes would need (its effective bandwidth); "read" is the share of V's rows
that the sparse kernel fetches (some activation of the row's column non-zero).
--sweep times a grid of the sparse kernel's launch configurations at B = 1, densities 1 and 0.5.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

import bench_gemv  # noqa: E402  (benchmarks/ is the script's directory)
from bench_decode import copy_bandwidth  # noqa: E402
from bench_gemv import nbytes, run_info, time_call  # noqa: E402
from common import MAX_SPREAD, write_results  # noqa: E402
from rwkvstate.ops import channel_mix as cm
from rwkvstate.ops import gemv as gm

SHAPES = {"0.1B": 768, "1.5B": 2048, "7.2B": 4096, "tiny": 64}  # tiny: the CPU smoke run
DEFAULT_SHAPES = ["0.1B", "1.5B", "7.2B"]
DENSITIES = (1.0, 0.5, 0.1)
ROTATE_BYTES = 512 * 2**20
SWEEP = [dict(block_n=n, block_k=k, num_warps=w, num_stages=3, programs_per_sm=p)
         for n, k, w, p in itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (1, 2, 4)) if n * k <= 16384]
DEVICE = "cuda"  # --device cpu (with TRITON_INTERPRET=1): a smoke run of the script, no graph


def _rotate() -> int:
    return ROTATE_BYTES if DEVICE == "cuda" else 0


def activations(batch: int, F: int, density: float, dtype, device) -> torch.Tensor:
    """[batch, F] squared-ReLU-like values, non-zero at a `density` share of random positions."""
    keep = torch.rand(batch, F, device=device) < density
    return (torch.randn(batch, F, device=device).square() * keep).to(dtype)


def _row(rows, bandwidth, **fields) -> None:
    t, moved = fields.pop("t"), fields.pop("bytes")
    tbs = moved / (t["us"] * 1e-6) / 1e12
    rows.append({**fields, **t, "bytes": moved, "tb_per_s": tbs, "share_of_copy_bandwidth": tbs * 1e12 / bandwidth})
    cfg = fields.get("config") or {}
    print(f"  {fields['shape']} {fields['case']:<8} B={fields['batch']} d={fields.get('density', '-')!s:<4} "
          f"{fields['backend']:<12} {' '.join(f'{k}={v}' for k, v in cfg.items()):<60} {t['us']:8.2f} us "
          f"{tbs:5.2f} TB/s" + ("  UNSTABLE" if t["unstable"] else ""), flush=True)  # fmt: skip


def measure_value(shape: str, batch: int, density: float, bandwidth: float, args, rows: list) -> None:
    C = SHAPES[shape]
    F = 4 * C
    copies = max(2, -(-_rotate() // (F * C * 2)))
    weights = [(torch.randn(F, C, device=DEVICE, dtype=args.dtype) * F**-0.5).t() for _ in range(copies)]
    x = activations(batch, F, density, args.dtype, DEVICE)
    residual = torch.randn(batch, C, device=DEVICE, dtype=args.dtype)
    moved = nbytes(weights[0], x, residual, residual)
    read = (x != 0).any(0).float().mean().item()
    common = dict(shape=shape, case="value", batch=batch, density=density, read=read)
    _row(rows, bandwidth, **common, backend="cublas", t=time_call(lambda w: gm.gemv_reference(x, w, residual), weights, args), bytes=moved)
    _row(rows, bandwidth, **common, backend="gemv", t=time_call(lambda w: gm.gemv_triton(x, w, residual), weights, args), bytes=moved)
    configs = [{}] + (SWEEP if args.sweep and batch == 1 and density in (1.0, 0.5) else [])
    for cfg in configs:
        t = time_call(lambda w: gm.gemv_sparse_input(x, w, residual, **cfg), weights, args)
        _row(rows, bandwidth, **common, backend="sparse", config=cfg or None, t=t, bytes=moved)
    del weights


def measure_key(shape: str, batch: int, bandwidth: float, args, rows: list) -> None:
    C = SHAPES[shape]
    copies = max(2, -(-_rotate() // (4 * C * C * 2)))
    weights = [torch.randn(4 * C, C, device=DEVICE, dtype=args.dtype) * C**-0.5 for _ in range(copies)]
    x = torch.randn(batch, C, device=DEVICE, dtype=args.dtype)
    moved = nbytes(weights[0], x) + batch * 4 * C * x.element_size()
    common = dict(shape=shape, case="key", batch=batch)
    _row(rows, bandwidth, **common, backend="cublas", t=time_call(lambda w: gm.gemv_reference(x, w, None, "relu2"), weights, args), bytes=moved)
    for cfg in ({}, {"num_splits": 1}):
        t = time_call(lambda w: gm.gemv_triton(x, w, None, "relu2", **cfg), weights, args)
        _row(rows, bandwidth, **common, backend="gemv", config=cfg or None, t=t, bytes=moved)
    del weights


def measure_channel(shape: str, batch: int, bandwidth: float, args, rows: list) -> None:
    C = SHAPES[shape]
    copies = max(2, -(-_rotate() // (8 * C * C * 2)))
    pairs = [(torch.randn(4 * C, C, device=DEVICE, dtype=args.dtype) * C**-0.5,
              (torch.randn(4 * C, C, device=DEVICE, dtype=args.dtype) * (4 * C) ** -0.5).t()) for _ in range(copies)]  # fmt: skip
    x = torch.randn(batch, C, device=DEVICE, dtype=args.dtype)
    residual = torch.randn(batch, C, device=DEVICE, dtype=args.dtype)
    act = torch.relu(torch.nn.functional.linear(x, pairs[0][0])).square()
    moved = nbytes(*pairs[0], x, residual, residual)
    common = dict(shape=shape, case="channel", batch=batch, density=(act != 0).float().mean().item(),
                  read=(act != 0).any(0).float().mean().item())  # fmt: skip
    ref = cm.channel_mix(x, *pairs[0], residual, backend="torch").float()
    for backend in ("torch", "triton-gemv", "triton"):
        err = (cm.channel_mix(x, *pairs[0], residual, backend=backend).float() - ref).abs().max().item()
        t = time_call(lambda p: cm.channel_mix(x, *p, residual, backend=backend), pairs, args)
        _row(rows, bandwidth, **common, backend=backend, t=t, bytes=moved, max_abs_diff_to_torch=err)
    del pairs


def run(args) -> dict:
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    bandwidth = copy_bandwidth(DEVICE)
    print(f"{card}: device-to-device copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows: list[dict] = []
    for shape in args.shapes:
        for batch in args.batches:
            if "channel" in args.cases:
                measure_channel(shape, batch, bandwidth, args, rows)
            if "key" in args.cases:
                measure_key(shape, batch, bandwidth, args, rows)
            if "value" in args.cases:
                for density in args.densities:
                    measure_value(shape, batch, density, bandwidth, args, rows)
    return {**run_info(card, bandwidth, args, ROTATE_BYTES, "weight copy"), "rows": rows}


def markdown(result: dict) -> str:
    out = [f"# The feed-forward at decode batch sizes, {result['card']}, {result['date']}", "",
           f"torch {result['torch']}, Triton {result['triton']}, {result['dtype']}; copy bandwidth "
           f"{result['copy_bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s. Weights rotated through "
           f"{result['rotate_bytes'] >> 20} MiB of copies. TB/s counts the dense bytes (weights + inputs + "
           "outputs) over the time, for sparse calls too; `read`: the share of V's rows the sparse kernel "
           "fetches. Backends: `cublas` F.linear (+ relu, square / + residual), `gemv` the dense GEMV kernel, "
           "`sparse` the sparse-input GEMV (value), `torch` / `triton-gemv` / `triton` the channel mix's.", "",
           "| shape | case | batch | density | read | backend | config | us | TB/s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        if r["backend"] == "sparse" and r.get("config"):
            continue
        cfg = " ".join(f"{k}={v}" for k, v in (r.get("config") or {}).items())
        density = f"{r['density']:.2f}" if "density" in r else ""
        read = f"{r['read']:.2f}" if "read" in r else ""
        mark = " (unstable)" if r["unstable"] else ""
        out.append(f"| {r['shape']} | {r['case']} | {r['batch']} | {density} | {read} | {r['backend']} | {cfg} | "
                   f"{r['us']:.2f}{mark} | {r['tb_per_s']:.2f} |")  # fmt: skip
    sweep = [r for r in result["rows"] if r["backend"] == "sparse" and r.get("config")]
    if sweep:
        out += ["", "## Launch configurations of the sparse-input GEMV (--sweep), fastest first", "",
                "| shape | batch | density | block_n | block_k | warps | stages | programs/SM | us | TB/s |",
                "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in sorted(sweep, key=lambda r: (r["shape"], r["batch"], -r["density"], r["us"])):
            c = r["config"]
            out.append(f"| {r['shape']} | {r['batch']} | {r['density']:.2f} | {c['block_n']} | {c['block_k']} | "
                       f"{c['num_warps']} | {c['num_stages']} | {c['programs_per_sm']} | {r['us']:.2f} | {r['tb_per_s']:.2f} |")  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=lambda s: s.split(","), default=DEFAULT_SHAPES)
    parser.add_argument("--cases", type=lambda s: s.split(","), default=["channel", "key", "value"])
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 2, 4, 8])
    parser.add_argument("--densities", type=lambda s: [float(d) for d in s.split(",")], default=list(DENSITIES))
    parser.add_argument("--dtype", type=lambda s: getattr(torch, s), default=torch.float16)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--calls", type=int, default=20, help="timed graph replays per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-spread", type=float, default=MAX_SPREAD)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = bench_gemv.DEVICE = args.device
    result = run(args)
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
