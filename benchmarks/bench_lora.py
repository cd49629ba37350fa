"""The time mix's low-rank chains at decode batch sizes on a GPU: the two Triton kernels
(ops/lora.py) in several launch configurations (the down kernel's step over C, the up kernel's
step over a chain's rows and its channel block), the batched GEMMs and the torch chains, at the
ranks of the released 1.5B and 7.2B models.

    python benchmarks/bench_lora.py --out docs/benchmarks/lora-h200
    python benchmarks/bench_lora.py --projection --batches 1,8 --out docs/benchmarks/lora-projection-h200
    python benchmarks/bench_lora.py --batches 64,256,4096 --out docs/benchmarks/lora-rows-h200

One layer's four chains (v, w, a, g; ranks 64/96/96/256 at C = 2048, 96/128/128/480 at C = 4096)
at batch B = 1, 2, 4, 8, 16 in fp16 (or --batches). Batches beyond 16 rows time the many-rows
kernels (lora_rows_triton) in the ROWS_CONFIGS launch configurations instead of CONFIGS. Packs rotated through at least ROTATE_BYTES (several times
the 50 MB L2 of an H200), one call per pack captured in one CUDA graph (bench_gemv's timer).
Bytes per call = both stacks + the six mixes read + the four outputs written; the floor is those
bytes over the copy bandwidth.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import bench_gemv  # noqa: E402  (benchmarks/ is the script's directory)
from bench_decode import copy_bandwidth  # noqa: E402
from bench_gemv import nbytes, run_info, time_call  # noqa: E402
from common import MAX_SPREAD, write_results  # noqa: E402
from rwkvstate.ops import lora as lo

SHAPES = {"1.5B": (2048, (64, 96, 96, 256)), "7.2B": (4096, (96, 128, 128, 480))}
CHAINS = ((2, "none"), (3, "tanh"), (4, "none"), (5, "sigmoid"))  # (mix, activation) of v, w, a, g
ROTATE_BYTES = 256 * 2**20
# Triton launch configurations, "down_block_c:up_block_r:up_block_c"; the first is the default's
CONFIGS = ["128:16:128", "256:16:128", "512:16:128", "512:32:64", "512:64:64", "512:64:128", "1024:64:64",
           "256:64:64"]  # fmt: skip


# the many-rows kernels' configurations, "block_t:block_r:block_k:splits:up_block_c:up_block_r:num_warps"
# (splits 0: rows_splits picks); the first is the default's
ROWS_CONFIGS = ["64:32:128:0:128:32:4", "64:32:128:1:128:32:4", "64:32:64:0:128:64:4", "64:32:64:0:64:32:4",
                "128:32:64:0:128:64:8", "64:64:64:0:128:64:4", "32:32:64:0:128:64:4", "64:32:256:0:128:32:4"]  # fmt: skip


def triton_call(config: str):
    down_c, up_r, up_c = (int(v) for v in config.split(":"))
    return lambda x, p: lo.lora_triton(x, p, down_block_c=down_c, up_block_r=up_r, block_c=up_c)


def rows_call(config: str):
    bt, br, bk, splits, uc, ur, warps = (int(v) for v in config.split(":"))
    return lambda x, p: lo.lora_rows_triton(x, p, block_t=bt, block_r=br, block_k=bk, splits=splits or None,
                                            up_block_c=uc, up_block_r=ur, num_warps=warps)  # fmt: skip


BACKENDS = {"bmm": lo.lora_bmm, "torch": lo.lora_reference}


def packs(C: int, ranks, dtype, count: int) -> list[lo.LoraPack]:
    device = bench_gemv.DEVICE
    return [lo.pack_lora((m, act, torch.randn(r, C, device=device, dtype=dtype) * C**-0.5,
                          torch.randn(C, r, device=device, dtype=dtype) * r**-0.5) for (m, act), r in zip(CHAINS, ranks))
            for _ in range(count)]  # fmt: skip


def _device() -> tuple[str, str, float]:
    """The device, its name and its measured copy bandwidth (printed)."""
    device = bench_gemv.DEVICE
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    bandwidth = copy_bandwidth(device)
    print(f"{card}: device-to-device copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    return device, card, bandwidth


def run(args) -> dict:
    device, card, bandwidth = _device()
    rows = []
    for shape in args.shapes:
        C, ranks = SHAPES[shape]
        one = packs(C, ranks, args.dtype, 1)[0]
        copies = max(2, -(-ROTATE_BYTES // nbytes(one.down, one.up_t)))
        all_packs = packs(C, ranks, args.dtype, copies)
        for batch in args.batches:
            x = torch.randn(6, batch, C, device=device, dtype=args.dtype)
            moved = nbytes(one.down, one.up_t, x) + len(CHAINS) * batch * C * x.element_size()
            want = lo.lora_reference(x, all_packs[0])
            configs = [f"triton {c}" for c in args.configs] if batch <= lo.MAX_ROWS else [f"rows {c}" for c in args.rows_configs]
            for name in configs + args.backends:
                calls = {"triton": triton_call, "rows": rows_call}
                fn = calls[name.split()[0]](name.split()[1]) if " " in name else BACKENDS[name]
                got = fn(x, all_packs[0])
                err = max(float((g.float() - w.float()).norm() / w.float().norm()) for g, w in zip(got, want))
                t = time_call(lambda p: fn(x, p), all_packs, args)
                floor_us = moved / bandwidth * 1e6
                print(f"  {shape} B={batch:<2} {name:<22} {t['us']:8.2f} us  floor {floor_us:5.2f} us  rel err {err:.1e}"
                      + ("  UNSTABLE" if t["unstable"] else ""), flush=True)  # fmt: skip
                rows.append({"shape": shape, "batch": batch, "backend": name, **t, "bytes": moved,
                             "floor_us": floor_us, "rel_err_vs_torch": err})  # fmt: skip
        del all_packs
        if device == "cuda":
            torch.cuda.empty_cache()
    return {**run_info(card, bandwidth, args, ROTATE_BYTES, "pack copy"), "rows": rows}


PROJECTION_CONFIGS = ["128:4", "64:4", "256:4", "128:8", "256:8"]  # block_k:num_warps; the first is the default's


def run_projection(args) -> dict:
    """--projection: the time mix's r/k/v projection and all four chains at batch 1-8 on one
    stream, as the GEMV kernel plus the two LoRA kernels (three launches) against
    lora_down_with_projection plus the up kernel (two) in each launch configuration. Bytes: the
    r/k/v weights, both stacks, the mixes read and the seven outputs written."""
    from rwkvstate.ops.gemv import gemv_triton

    device, card, bandwidth = _device()
    rows = []
    for shape in args.shapes:
        C, ranks = SHAPES[shape]
        rkv = torch.randn(3, C, C, device=device, dtype=args.dtype) * C**-0.5
        one = packs(C, ranks, args.dtype, 1)[0]
        copies = max(2, -(-ROTATE_BYTES // nbytes(rkv, one.down, one.up_t)))
        pairs = [(p, rkv.clone()) for p in packs(C, ranks, args.dtype, copies)]
        for batch in args.batches:
            x = torch.randn(6, batch, C, device=device, dtype=args.dtype)
            moved = nbytes(rkv, one.down, one.up_t, x) + (3 + len(CHAINS)) * batch * C * x.element_size()
            calls = {"gemv + two LoRA kernels": lambda pw: (gemv_triton(x[:3], pw[1]), lo.lora_triton(x, pw[0]))}
            for config in args.projection_configs:
                block_k, warps = (int(v) for v in config.split(":"))
                calls[f"fused {config}"] = lambda pw, k=block_k, w=warps: lo.lora_up_triton(
                    lo.lora_down_with_projection(x, pw[1], pw[0], block_k=k, num_warps=w)[1], pw[0])
            for name, fn in calls.items():
                t = time_call(fn, pairs, args)
                floor_us = moved / bandwidth * 1e6
                print(f"  {shape} B={batch:<2} {name:<24} {t['us']:8.2f} us  floor {floor_us:5.2f} us"
                      + ("  UNSTABLE" if t["unstable"] else ""), flush=True)  # fmt: skip
                rows.append({"shape": shape, "batch": batch, "backend": name, **t, "bytes": moved, "floor_us": floor_us})
        del pairs
        if device == "cuda":
            torch.cuda.empty_cache()
    return {**run_info(card, bandwidth, args, ROTATE_BYTES, "pack and r/k/v copy"), "projection": True, "rows": rows}


def markdown(result: dict) -> str:
    names = list(dict.fromkeys(r["backend"] for r in result["rows"]))
    out = [f"# LoRA chains at decode batch sizes, {result['card']}, {result['date']}", "",
           f"torch {result['torch']}, Triton {result['triton']}, {result['dtype']}; copy bandwidth "
           f"{result['copy_bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s. One layer's four chains; packs rotated "
           f"through {result['rotate_bytes'] >> 20} MiB; microseconds per call (floor: bytes / copy bandwidth). "
           + ("With the time mix's r/k/v projection, on one stream: the GEMV kernel and the two LoRA kernels, "
              "against `fused K:W`, the downs in the r/k/v launch (steps of K channels, W warps) and the up kernel."
              if result.get("projection") else
              "`triton D:R:N`: the down kernel steps over C by D channels, the up kernel over a chain's rows by R, "
              "N output channels per up program; `rows T:R:K:S:N:U:W` (beyond 16 rows): token tiles of T rows, "
              "down programs of R chain rows stepping over C by K in S splits (0: picked by rows_splits), up "
              "programs of N output channels stepping over a chain's rows by U, W warps."), "",
           "| shape | batch | floor us | " + " | ".join(f"{n} us" for n in names) + " |",
           "|---|---|---|" + "---|" * len(names)]  # fmt: skip
    by = {(r["shape"], r["batch"], r["backend"]): r for r in result["rows"]}
    for shape, batch in dict.fromkeys((r["shape"], r["batch"]) for r in result["rows"]):
        mine = [by.get((shape, batch, n)) for n in names]
        cells = ["-" if r is None else f"{r['us']:.2f}" + (" (unstable)" if r["unstable"] else "") for r in mine]
        floor = next(r for r in mine if r is not None)["floor_us"]
        out.append(f"| {shape} | {batch} | {floor:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=lambda s: s.split(","), default=list(SHAPES))
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 2, 4, 8, 16])
    parser.add_argument("--configs", type=lambda s: [c for c in s.split(",") if c], default=CONFIGS,
                        help="Triton launch configurations down_block_c:up_block_r:up_block_c")
    parser.add_argument("--rows-configs", type=lambda s: [c for c in s.split(",") if c], default=ROWS_CONFIGS,
                        help="many-rows configurations block_t:block_r:block_k:splits:up_block_c:up_block_r:num_warps")
    parser.add_argument("--backends", type=lambda s: [b for b in s.split(",") if b], default=list(BACKENDS))
    parser.add_argument("--dtype", type=lambda s: getattr(torch, s), default=torch.float16)
    parser.add_argument("--calls", type=int, default=20, help="timed graph replays per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-spread", type=float, default=MAX_SPREAD)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--projection", action="store_true",
                        help="time r/k/v and the chains together: three launches against the downs in the r/k/v launch")
    parser.add_argument("--projection-configs", type=lambda s: [c for c in s.split(",") if c],
                        default=PROJECTION_CONFIGS, help="block_k:num_warps of lora_down_with_projection")
    args = parser.parse_args(argv)
    if args.projection:
        result = run_projection(args)
        write_results(args.out, result, markdown(result))
        return
    unknown = [b for b in args.backends if b not in BACKENDS]
    if unknown:
        parser.error(f"unknown backends {unknown}; choose from {list(BACKENDS)}")
    result = run(args)
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
