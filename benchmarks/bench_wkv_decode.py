"""WKV-7 for decode on a GPU (one token per sequence): the step kernel's launch configurations
(value rows per program, warps) and its two forms (with the token loop and loads one token ahead,
and the one-token form without them), at the 1.5B and 7.2B head counts, batches 1 to 256, fp16
state; and the whole time mix between its projections: the three kernels (prologue, WKV-7,
epilogue) against the one-launch decode kernel at 1, 2, 4 and 8 warps (--time-mix). Each call replays a CUDA graph that runs the kernel once per layer of a pool of several
layers, whose states together are larger than the L2 cache, as in a decode step, where a layer's
state is not in L2 when its kernel starts; times are per layer. Bytes are the state read and written plus the inputs and y.

    python benchmarks/bench_wkv_decode.py --out docs/benchmarks/wkv-decode-h200
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from bench_prefill import inputs, rel  # benchmarks/ is on sys.path when run as a script
from common import call_seconds, write_results
from rwkvstate.model.packing import pack_decode
from rwkvstate.ops import time_mix as tm
from rwkvstate.ops.wkv7 import _launch_config, wkv7_triton
from rwkvstate.state.layout import StateLayout, parse_dtype
from rwkvstate.state.pool import new_pool

N = 64
CASES = [(256, 32), (256, 64), (64, 32), (64, 64), (8, 32), (8, 64), (1, 32), (1, 64)]  # (batch, heads)
CONFIGS = [(64, 2), (64, 4), (64, 8), (32, 1), (32, 2), (32, 4), (16, 1), (16, 2)]  # (block_v, num_warps)
POOL_BYTES = 512 << 20  # states of all layers together: about ten times an H200's L2


def case(batch: int, H: int, repeats: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(batch * 100 + H)
    slot_bytes = H * N * N * 2
    layers = max(2, min(1024, POOL_BYTES // (slot_bytes * batch)))
    pool = new_pool(StateLayout(layers, H * N, N), batch, parse_dtype("fp16"), "contiguous", "cuda")
    views = [pool.layer(i)[1] for i in range(layers)]
    for view in views:
        view.copy_((torch.randn(view.shape, device="cuda", generator=gen) * 0.3).to(view.dtype))
    slots = torch.arange(batch, device="cuda")
    packed = pack_decode(slots, slots)
    x = tuple(t.contiguous() for t in inputs(batch, H, N, torch.float16, gen))
    y = torch.empty(x[0].shape, dtype=torch.float32, device="cuda")

    def per_layer_us(**kw) -> float:  # one CUDA graph of the layers' launches, replayed
        for view in views:  # compiles outside the capture
            wkv7_triton(view, packed, *x, out=y, **kw)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for view in views:
                wkv7_triton(view, packed, *x, out=y, **kw)
        return statistics.median(call_seconds(graph.replay, "cuda", repeats, 3)) / layers * 1e6

    # the two forms give the same bits (the same operations; only the loads ahead differ)
    start = views[0].clone()
    got = [wkv7_triton(views[0], packed, *x, one_token=True).clone(), views[0].clone()]
    views[0].copy_(start)
    want = [wkv7_triton(views[0], packed, *x, one_token=False).clone(), views[0].clone()]
    moved = batch * (2 * H * N * N * 2 + H * N * (5 * 2 + 4 + 4))  # state r+w, r k v a b (fp16), w and y (fp32)
    default = _launch_config(N, batch, H)
    row = {"batch": batch, "H": H, "N": N, "layers": layers, "bytes": moved, "default_config": list(default),
           "same_bits": all(torch.equal(a, b) for a, b in zip(got, want)), "y_rel_diff": rel(got[0], want[0]),
           "loop_us": per_layer_us(one_token=False),
           "us": {f"{bv}x{nw}": per_layer_us(block_v=bv, num_warps=nw) for bv, nw in CONFIGS}}  # fmt: skip
    row["default_us"] = row["us"][f"{default[0]}x{default[1]}"]
    best = min(row["us"], key=row["us"].get)
    print(f"B={batch} H={H}: loop form {row['loop_us']:.1f} us, one-token form (default {default}) "
          f"{row['default_us']:.1f} us, best {best} {row['us'][best]:.1f} us "
          f"({moved / row['us'][best] / 1e3:,.0f} GB/s); same bits: {row['same_bits']}", flush=True)  # fmt: skip
    return row


WARPS = (1, 2, 4, 8)


def time_mix_case(batch: int, H: int, repeats: int) -> dict:
    """Microseconds per layer of the time mix between its projections (a later layer: with the
    value residual), fp16 compute and state, over a pool of layers larger than L2."""
    gen = torch.Generator(device="cuda").manual_seed(batch * 10 + H)
    C = H * N
    layers = max(2, min(1024, POOL_BYTES // (H * N * N * 2 * batch)))
    pool = new_pool(StateLayout(layers, C, N), batch, parse_dtype("fp16"), "contiguous", "cuda")
    views = [pool.layer(i)[1] for i in range(layers)]
    for view in views:
        view.copy_((torch.randn(view.shape, device="cuda", generator=gen) * 0.1).to(view.dtype))

    def rnd(*shape, scale=1.0, lo=None, hi=None):
        t = torch.randn(*shape, device="cuda", generator=gen) * scale
        if lo is not None:
            t = torch.rand(*shape, device="cuda", generator=gen) * (hi - lo) + lo
        return t.half()

    r, g, w_lora, a_lora, v_lora = (rnd(batch, C) for _ in range(5))
    k, v, v_first = (rnd(batch, C, scale=2.0) for _ in range(3))
    w0, a0, v0 = rnd(C, lo=-3, hi=2), rnd(C, lo=-1, hi=1), rnd(C, lo=-1, hi=1)
    k_k, k_a, r_k = rnd(C, lo=0.5, hi=1.5), rnd(C, lo=0, hi=1), rnd(H, N, scale=0.3)
    ln_w, ln_b = rnd(C, lo=0.7, hi=1.3), rnd(C, lo=-0.1, hi=0.1)
    slots = torch.arange(batch, device="cuda")
    packed = pack_decode(slots, slots)
    params = (w0, a0, v0, k_k, k_a)

    def three(view):
        decay, k2, v2, a_in, b_in = tm.time_mix_prologue(k, v, w_lora, a_lora, v_lora, v_first, *params, H, N,
                                                         backend="triton")  # fmt: skip
        heads = [t.view(batch, H, N) for t in (r, decay, k2, v2, a_in, b_in)]
        y = wkv7_triton(view, packed, *heads).view(batch, C)
        return tm.time_mix_epilogue(y, r, k2, v2, g, r_k, ln_w, ln_b, H, N, backend="triton")

    def fused(view, num_warps):
        return tm.time_mix_decode_triton(view, packed, r, w_lora, k, v, a_lora, g, v_lora, v_first, *params, r_k,
                                         ln_w, ln_b, H, N, num_warps=num_warps)  # fmt: skip

    def per_layer_us(step) -> float:
        for view in views:
            step(view)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for view in views:
                step(view)
        return statistics.median(call_seconds(graph.replay, "cuda", repeats, 3)) / layers * 1e6

    row = {"batch": batch, "H": H, "N": N, "layers": layers, "default_warps": tm.decode_warps(N),
           "three_kernels_us": per_layer_us(three),
           "fused_us": {str(w): per_layer_us(lambda view, w=w: fused(view, w)) for w in WARPS}}  # fmt: skip
    best = min(row["fused_us"], key=row["fused_us"].get)
    print(f"time mix B={batch} H={H}: three kernels {row['three_kernels_us']:.1f} us, one launch "
          + ", ".join(f"{w} warps {us:.1f}" for w, us in row["fused_us"].items()) + f" us (best {best})", flush=True)
    return row


def markdown(result: dict) -> str:
    lines = [f"# WKV-7 decode kernel, {result['device']}, {result['date']}", ""]
    if result["rows"]:
        lines += wkv_table(result)
    if result.get("time_mix"):
        lines += time_mix_table(result)
    return "\n".join(lines) + "\n"


def wkv_table(result: dict) -> list[str]:
    configs = list(result["rows"][0]["us"])
    lines = [f"torch {result['torch']}, Triton {result['triton']}; fp16 state, N = {N}; microseconds per layer "
             "(each call replays a CUDA graph of the kernel over a pool of layers larger than L2). `loop`: the step kernel with its "
             "token loop at the default configuration; the other columns: the one-token form at BLOCK_V x warps. "
             "GB/s: state read and written, inputs and y, over the default's time.", "",
             "| batch | heads | loop | default | " + " | ".join(configs) + " | GB/s | same bits |",
             "|---|---|---|---|" + "---|" * len(configs) + "---|---|"]  # fmt: skip
    for r in result["rows"]:
        d = f"{r['default_us']:.1f} ({r['default_config'][0]}x{r['default_config'][1]})"
        lines.append(f"| {r['batch']} | {r['H']} | {r['loop_us']:.1f} | {d} | "
                     + " | ".join(f"{r['us'][c]:.1f}" for c in configs)
                     + f" | {r['bytes'] / r['default_us'] / 1e3:,.0f} | {'yes' if r['same_bits'] else 'no'} |")  # fmt: skip
    return lines


def time_mix_table(result: dict) -> list[str]:
    lines = ["", "## The time mix between its projections (prologue, WKV-7, epilogue)", "",
             f"torch {result['torch']}, Triton {result['triton']}. Microseconds per layer, a later layer (with the "
             "value residual), fp16 compute and state: the three kernels against the one-launch decode kernel at "
             "1, 2, 4 and 8 warps (the default's count in the last column).", "",
             "| batch | heads | three kernels | " + " | ".join(f"one launch, {w} warps" for w in WARPS)
             + " | default warps |", "|---|---|---|" + "---|" * len(WARPS) + "---|"]  # fmt: skip
    for r in result["time_mix"]:
        lines.append(f"| {r['batch']} | {r['H']} | {r['three_kernels_us']:.1f} | "
                     + " | ".join(f"{r['fused_us'][str(w)]:.1f}" for w in WARPS) + f" | {r['default_warps']} |")
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--time-mix", action="store_true", help="also time the whole time mix between projections")
    parser.add_argument("--no-wkv", action="store_true", help="skip the WKV kernel's table")
    args = parser.parse_args(argv)
    import datetime

    import triton

    result = {"device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "triton": triton.__version__,
              "rows": [] if args.no_wkv else [case(batch, H, args.repeats) for batch, H in CASES]}  # fmt: skip
    if args.time_mix:
        result["time_mix"] = [time_mix_case(batch, H, args.repeats) for batch, H in CASES]
    write_results(args.out, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
