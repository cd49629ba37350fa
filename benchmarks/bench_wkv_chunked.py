"""WKV-7 for prompts: the in-place token-by-token kernel against the in-place chunked-parallel
kernel (and fla-core's chunk_rwkv7 with its state-layout adaptation, when installed), errors
against the float32 recurrence; then launch configurations of the chunked kernel.

    python benchmarks/bench_wkv_chunked.py --out docs/benchmarks/prefill-chunked-h200 [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench_prefill import inputs, rel  # benchmarks/ is on sys.path when run as a script
from common import call_seconds
from rwkvstate.model.packing import pack
from rwkvstate.ops.wkv7 import wkv7, wkv7_chunked, wkv7_reference
from rwkvstate.state.layout import StateLayout
from rwkvstate.state.pool import new_pool


def median_ms(fn, repeats=20, warmup=3) -> float:
    return statistics.median(call_seconds(fn, "cuda", repeats, warmup)) * 1e3


def backends() -> tuple[str, ...]:
    try:
        import fla.ops.rwkv7  # noqa: F401
    except ImportError:
        return ("triton", "triton-chunked")
    return ("triton", "triton-chunked", "fla")


def setup(batch, length, H, N, state_dtype, dtype):
    """(packed, inputs, the pool's WKV view, its random starting state)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    packed = pack(list(range(batch)), [[0] * length] * batch, 1, "cuda")
    x = inputs(batch * length, H, N, dtype, gen)
    view = new_pool(StateLayout(2, H * N, N), batch, state_dtype, "contiguous", "cuda").layer(1)[1]
    view.copy_(torch.randn(view.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)) * 0.3)
    return packed, x, view, view.clone()


def timed_ms(fn, view, start) -> float:
    """Milliseconds of fn after restoring the state, minus the restoring copy alone."""
    def run():
        view.copy_(start)
        return fn()

    return median_ms(run) - median_ms(lambda: view.copy_(start))


def case(batch, length, H, N, state_dtype, dtype):
    packed, x, view, start = setup(batch, length, H, N, state_dtype, dtype)
    result = {"batch": batch, "length": length, "H": H, "N": N, "state": str(state_dtype), "compute": str(dtype)}
    ref_state = start.clone()
    ref_y = wkv7_reference(ref_state, packed, *x)
    slots = packed.live_slots
    for backend in backends():
        ms = timed_ms(lambda: wkv7(view, packed, *x, backend=backend), view, start)
        view.copy_(start)
        y = wkv7(view, packed, *x, backend=backend)
        result[backend] = {"ms": ms, "tokens_per_s": batch * length / ms * 1e3, "y_rel_err": rel(y, ref_y),
                           "state_rel_err": rel(view[slots], ref_state[slots])}  # fmt: skip
    if "fla" in result:
        result["fla_layout_ms"] = median_ms(
            lambda: view.index_copy_(0, slots, view.index_select(0, slots).float().transpose(-1, -2).contiguous()
                                     .transpose(-1, -2).to(view.dtype))
        )  # fmt: skip
    return result


def chunk_configs(batch, length, H, N) -> list[dict]:
    """The chunked kernel's chunk size, value rows per program and warps, fp16 state."""
    packed, x, view, start = setup(batch, length, H, N, torch.float16, torch.float16)
    rows = []
    for chunk, block_v, num_warps in ((16, 16, 4), (16, 32, 4), (16, 64, 4), (16, 64, 8), (32, 16, 4), (32, 64, 8)):
        kw = dict(chunk=chunk, block_v=block_v, num_warps=num_warps)
        ms = timed_ms(lambda: wkv7_chunked(view, packed, *x, **kw), view, start)
        rows.append({"batch": batch, "length": length, **kw, "ms": ms, "tokens_per_s": batch * length / ms * 1e3})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="fp16 state only, fewer shapes (about a minute)")
    args = parser.parse_args(argv)
    card = torch.cuda.get_device_name()
    shapes = ((1, 4096), (8, 1024), (64, 256)) if args.quick else ((1, 1024), (1, 4096), (8, 1024), (64, 256))
    states = (torch.float16,) if args.quick else (torch.float32, torch.float16)
    rows = []
    for batch, length in shapes:
        for state_dtype in states:
            rows.append(case(batch, length, 32, 64, state_dtype, torch.float16))
            print(json.dumps(rows[-1]), flush=True)
    configs = chunk_configs(1, 4096, 32, 64) + chunk_configs(8, 1024, 32, 64)
    result = {"card": card, "date": time.strftime("%Y-%m-%d"), "rows": rows, "chunk_configs": configs}
    text = markdown(result)
    print(text)
    if args.out:
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)


def markdown(result: dict) -> str:
    rows, configs = result["rows"], result["chunk_configs"]
    names = [b for b in ("triton", "triton-chunked", "fla") if b in rows[0]]
    lines = [f"# WKV-7 for prompts, {result['card']}, {result['date']}", "",
             "One layer of the 1.5B shape (H=32, N=64), fp16 inputs. `triton`: the in-place token-by-token "
             "kernel; `triton-chunked`: the in-place chunked-parallel kernel (default launch configuration); "
             "`fla`: fla-core `chunk_rwkv7` including the layout adaptation (gather, transpose, transpose back, "
             "scatter). ms per call (median of 20, the state restore subtracted); errors (y, state) against the "
             "float32 torch recurrence.", "",
             "| batch x length | state | " + " | ".join(f"{n} ms | {n} tok/s | {n} err y / state" for n in names) + " |",
             "|---|---|" + "---|---|---|" * len(names)]  # fmt: skip
    for r in rows:
        cells = [f"{r[n]['ms']:.3f} | {r[n]['tokens_per_s']:,.0f} | {r[n]['y_rel_err']:.1e} / {r[n]['state_rel_err']:.1e}"
                 for n in names]  # fmt: skip
        lines.append(f"| {r['batch']} x {r['length']} | {r['state'].removeprefix('torch.')} | " + " | ".join(cells) + " |")
    lines += ["", "Chunked kernel launch configurations (fp16 state):", "",
              "| batch x length | chunk | block_v | warps | ms | tok/s |", "|---|---|---|---|---|---|"]
    for c in configs:
        lines.append(f"| {c['batch']} x {c['length']} | {c['chunk']} | {c['block_v']} | {c['num_warps']} | "
                     f"{c['ms']:.3f} | {c['tokens_per_s']:,.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
