"""WKV-7 for prompts on a GPU: the step kernel (inputs loaded one token ahead) against the prompt
kernel (one warp, inputs copied to shared memory several tokens ahead), one layer, fp16 inputs,
from one 4,096-token prompt to 64 x 256 tokens; the prompt kernel's value rows per program; the
difference between the two kernels' outputs and states.

    python benchmarks/bench_wkv_prompt.py --out docs/benchmarks/wkv-prompt-h200
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench_prefill import inputs, rel  # benchmarks/ is on sys.path when run as a script
from common import call_seconds, write_results
from rwkvstate.model.packing import pack
from rwkvstate.ops.wkv7 import _prompt_block_v, wkv7_triton
from rwkvstate.state.layout import StateLayout, parse_dtype
from rwkvstate.state.pool import new_pool

# (sequences, tokens each, heads, state dtype): one long prompt at the 1.5B and 7.2B head counts,
# then more, shorter ones (a packed prefill step of the engine), and fp32 state for two of them
CASES = [(1, 4096, 32, "fp16"), (1, 4096, 64, "fp16"), (1, 1024, 32, "fp16"), (2, 2048, 32, "fp16"),
         (4, 1024, 32, "fp16"), (8, 1024, 32, "fp16"), (16, 512, 32, "fp16"), (64, 256, 32, "fp16"),
         (4, 1024, 64, "fp16"), (1, 4096, 32, "fp32"), (8, 1024, 32, "fp32")]  # fmt: skip
BLOCKS = (4, 8, 16, 32)
N = 64


def median_ms(fn, repeats: int, setup) -> float:
    return statistics.median(call_seconds(fn, "cuda", repeats, 3, setup)) * 1e3


def case(batch: int, length: int, H: int, state: str, repeats: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    packed = pack(list(range(batch)), [[0] * length] * batch, 1, "cuda")
    x = tuple(t.contiguous() for t in inputs(batch * length, H, N, torch.float16, gen))
    view = new_pool(StateLayout(2, H * N, N), batch, parse_dtype(state), "contiguous", "cuda").layer(1)[1]
    start = (torch.randn(view.shape, device="cuda", generator=gen) * 0.3).to(view.dtype)
    y = torch.empty(x[0].shape, dtype=torch.float32, device="cuda")

    def timed(**kw) -> float:  # the state is restored (untimed) before every call
        return median_ms(lambda: wkv7_triton(view, packed, *x, out=y, **kw), repeats, lambda: view.copy_(start))

    outputs = {}
    for kernel in ("step", "prompt"):
        view.copy_(start)
        outputs[kernel] = (wkv7_triton(view, packed, *x, kernel=kernel), view.clone())
    row = {"batch": batch, "length": length, "H": H, "N": N, "state": state,
           "step_ms": timed(kernel="step"), "prompt_ms": timed(kernel="prompt"),
           "prompt_block_v": _prompt_block_v(N, batch, H),
           "prompt_ms_by_block_v": {str(bv): timed(kernel="prompt", block_v=bv) for bv in BLOCKS},
           "y_rel_diff": rel(outputs["prompt"][0], outputs["step"][0]),
           "state_rel_diff": rel(outputs["prompt"][1], outputs["step"][1])}  # fmt: skip
    row["speedup"] = row["step_ms"] / row["prompt_ms"]
    print(f"B={batch} T={length} H={H} {state}: step {row['step_ms']:.3f} ms, prompt {row['prompt_ms']:.3f} ms "
          f"(BLOCK_V {row['prompt_block_v']}, {row['speedup']:.2f}x); by BLOCK_V "
          + ", ".join(f"{bv}: {ms:.3f}" for bv, ms in row["prompt_ms_by_block_v"].items()), flush=True)  # fmt: skip
    return row


def markdown(r: dict) -> str:
    blocks = list(r["rows"][0]["prompt_ms_by_block_v"])
    lines = [f"# WKV-7 for prompts: step kernel and prompt kernel ({r['device']}, {r['date']})", "",
             f"One layer, H heads of N = {N}, fp16 inputs (w float32), state in the pool's dtype read and "
             f"written once per call; median of {r['repeats']} calls (wall clock, device synchronised, "
             f"so a call's launch is in it), the state restored before each, untimed; torch {r['torch']}, "
             f"Triton {r['triton']}. The prompt kernel's BLOCK_V column is the heuristic's "
             "choice; the last columns time it at each BLOCK_V. Differences: relative RMS between the "
             "two kernels' y and stored state.", "",
             "| sequences x tokens | H | state | step kernel ms | prompt kernel ms | speedup | BLOCK_V | "
             + " | ".join(f"ms at {bv}" for bv in blocks) + " | y diff | state diff |",
             "|" + "---|" * (9 + len(blocks))]  # fmt: skip
    for row in r["rows"]:
        lines.append(f"| {row['batch']} x {row['length']} | {row['H']} | {row['state']} | {row['step_ms']:.3f} | "
                     f"{row['prompt_ms']:.3f} | {row['speedup']:.2f}x | {row['prompt_block_v']} | "
                     + " | ".join(f"{row['prompt_ms_by_block_v'][bv]:.3f}" for bv in blocks)
                     + f" | {row['y_rel_diff']:.1e} | {row['state_rel_diff']:.1e} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    result = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "repeats": args.repeats,
              "rows": [case(b, t, h, s, args.repeats) for b, t, h, s in CASES]}  # fmt: skip
    write_results(args.out, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
