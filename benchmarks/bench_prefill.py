"""WKV-7 prefill: the in-place sequential kernel against fla-core's chunked-parallel kernel,
with the cost of adapting fla's state layout (gather + transpose, transpose + scatter).

    python benchmarks/bench_prefill.py --out docs/benchmarks/prefill-wkv
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import call_seconds  # benchmarks/ is on sys.path when run as a script
from rwkvstate.model.packing import pack
from rwkvstate.ops.wkv7 import wkv7, wkv7_reference
from rwkvstate.state.layout import StateLayout
from rwkvstate.state.pool import new_pool


def median_ms(fn, repeats=20, warmup=3) -> float:
    return statistics.median(call_seconds(fn, "cuda", repeats, warmup)) * 1e3


def inputs(T, H, N, dtype, gen):
    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=gen)

    r, k, v = (rnd(T, H, N).to(dtype) for _ in range(3))
    w = torch.exp(-math.exp(-0.5) * torch.sigmoid(rnd(T, H, N)))
    kk = F.normalize(rnd(T, H, N), dim=-1)
    a = torch.rand(T, H, N, device="cuda", generator=gen)
    return r, w, k, v, (-kk).to(dtype), (kk * a).to(dtype)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def case(batch, length, H, N, state_dtype, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    layout = StateLayout(2, H * N, N)
    packed = pack(list(range(batch)), [[0] * length] * batch, 1, "cuda")
    x = inputs(batch * length, H, N, dtype, gen)
    result = {"batch": batch, "length": length, "H": H, "N": N, "state": str(state_dtype), "compute": str(dtype)}
    pools = {}
    for backend in ("triton", "fla"):
        pool = new_pool(layout, batch, state_dtype, "contiguous", "cuda")
        view = pool.layer(1)[1]
        view.copy_(torch.randn(view.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)) * 0.3)
        start = view.clone()

        def run():
            view.copy_(start)
            return wkv7(view, packed, *x, backend=backend)

        copy_ms = median_ms(lambda: view.copy_(start))
        result[f"{backend}_ms"] = median_ms(run) - copy_ms
        result[f"{backend}_tokens_per_s"] = batch * length / result[f"{backend}_ms"] * 1e3
        pools[backend] = (run(), view.clone())
    slots = packed.live_slots
    result["fla_layout_ms"] = median_ms(
        lambda: view.index_copy_(0, slots, view.index_select(0, slots).float().transpose(-1, -2).contiguous()
                                 .transpose(-1, -2).to(view.dtype))
    )  # fmt: skip
    ref_state = start.clone()
    ref_y = wkv7_reference(ref_state, packed, *x)
    for backend, (y, s) in pools.items():
        result[f"{backend}_y_rel_err"] = rel(y, ref_y)
        result[f"{backend}_state_rel_err"] = rel(s[slots], ref_state[slots])
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    card = torch.cuda.get_device_name()
    rows = []
    for batch, length in ((1, 1024), (1, 4096), (8, 1024), (64, 256)):
        for state_dtype in (torch.float32, torch.float16):
            row = case(batch, length, 32, 64, state_dtype, torch.float16)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"card": card, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    text = markdown(result)
    print(text)
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        args.out.with_suffix(".md").write_text(text)


def markdown(result: dict) -> str:
    card, rows = result["card"], result["rows"]
    lines = [f"# WKV-7 prefill kernels, {card}, {result['date']}", "",
             "One layer of the 1.5B shape (H=32, N=64), fp16 inputs. `triton`: the in-place sequential kernel; "
             "`fla`: fla-core 0.6.0 `chunk_rwkv7` including the layout adaptation (gather, transpose, "
             "transpose back, scatter), whose cost alone is the last column. Errors against the float32 "
             "torch reference.", "",
             "| batch x length | state | triton ms | fla ms | triton tok/s | fla tok/s | triton y err | fla y err | fla state err | layout ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['batch']} x {r['length']} | {r['state'].removeprefix('torch.')} | {r['triton_ms']:.3f} | "
                     f"{r['fla_ms']:.3f} | {r['triton_tokens_per_s']:,.0f} | {r['fla_tokens_per_s']:,.0f} | "
                     f"{r['triton_y_rel_err']:.1e} | {r['fla_y_rel_err']:.1e} | {r['fla_state_rel_err']:.1e} | "
                     f"{r['fla_layout_ms']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
