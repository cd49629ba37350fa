"""Where and under what conditions graph decode leaves eager decode (the open graph-decode difference).

Runs tests/test_cuda.py::test_cuda_graph_decode_equals_eager's scenario (an eager engine, then a
graph engine, five streams fed prompts of 3, 7, ... tokens, then greedy replies of 12, 13, ...
tokens) `--repeats` times per variant, in one process, and prints per variant how many graph
runs differed from their eager run and the first differing (stream, token) of each:

    baseline        as the test
    no-gc           Python's cyclic garbage collector off during both runs
    sync-steps      the device synchronised after every engine step
    pure-torch      every op backend "torch" (no Triton kernel in the graph)
    capture-first   the graphs captured before any prompt is fed
    collect-before  the eager engine collected (gc.collect) before the graph engine is made
    torch-<op>      the one op's backend "torch" (norm_shift, token_shift, wkv, time_mix, gemv,
                    channel_mix, lora); torch-shift: norm_shift and token_shift both
    triton-gemv     the output projection through the GEMV kernel too (no cuBLAS GEMM in a decode
                    layer before the feed-forward's norm)
    only-norm-shift every op "torch" but the fused norm + token shift kernel
    norm-shift-row1 the fused norm + token shift kernel with one row per program
    norm-shift-w8   the fused norm + token shift kernel with 8 warps

Usage, on a GPU: PYTHONPATH=src python3 tools/diag_graph_step.py [--repeats N] [--variants a,b]

--decode-step runs Model.decode_step eagerly, once per graph size, with the padding rows the
graphs feed (the scratch slot repeated), and nothing else: the graphs' kernel sequence without a
capture, for compute-sanitizer with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (every tensor its own
allocation, so an access past a tensor's end or a read of bytes never written shows).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import SHAPES, random_tokens, rel_err  # noqa: E402
from rwkvstate import Engine  # noqa: E402
from rwkvstate.model.rwkv7 import Model  # noqa: E402
from rwkvstate.model.synthetic import random_checkpoint  # noqa: E402
from diag_graph_poison import scenario  # noqa: E402
from rwkvstate.ops import token_shift  # noqa: E402
from rwkvstate.runtime.stepper import Stepper  # noqa: E402

PURE_TORCH = {k: "torch" for k in ("token_shift", "wkv", "time_mix", "channel_mix", "lora", "norm_shift", "gemv")}
VARIANTS = ("baseline", "no-gc", "sync-steps", "pure-torch", "capture-first", "collect-before")
ONE_OP = {f"torch-{op}": {op: "torch"} for op in PURE_TORCH} | {"torch-shift": {"norm_shift": "torch", "token_shift": "torch"},
                                                                  "triton-gemv": {"gemv": "triton"}}  # fmt: skip


def one(tensors, variant: str, eager: bool):
    cfg = SHAPES["L3-C192-N64-V300"]
    model = Model.from_tensors(tensors, cfg, device="cuda", dtype=torch.float16)
    if variant == "pure-torch":
        model.backends.update(PURE_TORCH)
    model.backends.update(ONE_OP.get(variant, {}))
    if variant == "only-norm-shift":
        model.backends.update(PURE_TORCH)
        model.backends["norm_shift"] = None
    engine = Engine(model, slots=6, state_dtype=torch.float32, enforce_eager=eager)
    if variant == "capture-first" and not eager:
        engine.graphs.capture()
    return scenario(engine)


class _Launch:
    """The fused norm + token shift kernel with its launch changed: one row per program (row1) or
    8 warps (w8)."""

    def __init__(self, kernel, variant: str):
        self.kernel, self.variant = kernel, variant

    def __getitem__(self, grid):
        def launch(*args, **kw):
            if self.variant == "norm-shift-row1":
                kw["BLOCK_T"] = 1
                T = args[8]
                return self.kernel[(T,)](*args, **kw)
            kw["num_warps"] = 8
            return self.kernel[grid](*args, **kw)

        return launch


def first_difference(a: list[list[int]], b: list[list[int]]) -> tuple[int, int] | None:
    for stream, (x, y) in enumerate(zip(a, b)):
        for position, (p, q) in enumerate(zip(x, y)):
            if p != q:
                return stream, position
        if len(x) != len(y):
            return stream, min(len(x), len(y))
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--decode-step", action="store_true")
    args = parser.parse_args()
    tensors = random_checkpoint(SHAPES["L3-C192-N64-V300"], seed=6)
    if args.decode_step:
        cfg = SHAPES["L3-C192-N64-V300"]
        model = Model.from_tensors(tensors, cfg, device="cuda", dtype=torch.float16)
        pool = model.new_pool(6, state_dtype=torch.float32)
        for size in (1, 2, 4, 6):
            live = min(size, 5)
            slots = torch.tensor(list(range(live)) + [pool.scratch_slot] * (size - live), device="cuda")
            tokens = torch.tensor(random_tokens(size, cfg.vocab_size, seed=size), device="cuda")
            logits = model.decode_step(pool, slots, tokens)
            torch.cuda.synchronize()
            print(f"decode_step of {size} rows ({size - live} padding): logits finite {bool(logits.isfinite().all())}")
        return
    real_step = Stepper.step

    def synced_step(self, chunks):
        out = real_step(self, chunks)
        torch.cuda.synchronize()
        return out

    real_kernel = token_shift._norm_shift_mix_kernel
    for variant in args.variants.split(","):
        Stepper.step = synced_step if variant == "sync-steps" else real_step  # type: ignore[method-assign]
        token_shift._norm_shift_mix_kernel = _Launch(real_kernel, variant) if variant.startswith("norm-shift-") else real_kernel
        if variant == "no-gc":
            gc.disable()
        differing, where = 0, []
        for _ in range(args.repeats):
            ids_eager, states_eager = one(tensors, variant, True)
            if variant == "collect-before":
                gc.collect()
            ids_graph, states_graph = one(tensors, variant, False)
            err = max(max(rel_err(b[k], a[k]) for k in a) for a, b in zip(states_eager, states_graph))
            diff = first_difference(ids_eager, ids_graph)
            if diff is not None or err > 2e-3:
                differing += 1
                where.append(f"{diff} {err:.2e}")
        gc.enable()
        print(f"{variant:15s}: {differing} of {args.repeats} graph runs differ; first (stream, token), state error: "
              f"{'; '.join(where) or '-'}", flush=True)  # fmt: skip
    Stepper.step = real_step  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
