"""Graph decode against eager decode with the CUDA caching allocator's free blocks poisoned.

Each run fills 4 GiB of free allocator blocks with NaN or 1e4 and releases them to the cache, then
feeds five prompts and generates greedily through an Engine (graphs on or off), as
tests/test_cuda.py::test_cuda_graph_decode_equals_eager does. A run's states are compared with a
reference run (eager, the allocator poisoned with zeros): a path that reads memory it never
wrote shows as a difference. Usage, on a GPU (repeats: runs per configuration and poison):

    PYTHONPATH=src python3 tools/diag_graph_poison.py [--repeats N]
    PYTHONPATH=src python3 tools/diag_graph_poison.py --once all-torch graph   # one run, no poison
    PYTHONPATH=src python3 tools/diag_graph_poison.py --dropped [--repeats N]    # tests/test_cuda.py's check

--shared-stream captures every DecodeGraphs on one stream, as torch's default capture stream did
before runtime/graphs.py gave each its own: the behaviour the fix removed, for comparison.

Prints one line per run and a count of differing runs per configuration and mode. --once runs a
single engine of one configuration (for compute-sanitizer, tools/gpu_graph_check.sh).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import SHAPES, random_tokens, rel_err  # noqa: E402
from test_cuda import dropped_graphs_check  # noqa: E402
from rwkvstate.runtime import graphs  # noqa: E402
from rwkvstate import Engine, SamplingParams  # noqa: E402
from rwkvstate.model.rwkv7 import Model  # noqa: E402
from rwkvstate.model.synthetic import random_checkpoint  # noqa: E402

TORCH = {"gemv": "torch", "channel_mix": "torch", "lora": "torch"}
CONFIGS = {  # backends, and decode_prompt_tokens (0: prompts never read inside the decode graph)
    "default": ({}, 64),
    "all-torch": (TORCH, 64),
    "all-torch, no prompt in graph": (TORCH, 0),
}


def poison(value: float) -> None:
    blocks = [torch.full((2**26,), value, dtype=torch.float32, device="cuda") for _ in range(16)]
    del blocks
    torch.cuda.synchronize()


def run(tensors, backends: dict, prompt_tokens: int, eager: bool, value: float):
    cfg = SHAPES["L3-C192-N64-V300"]
    model = Model.from_tensors(tensors, cfg, device="cuda", dtype=torch.float16)
    model.backends.update(backends)
    engine = Engine(model, slots=6, state_dtype=torch.float32, enforce_eager=eager, decode_prompt_tokens=prompt_tokens)
    poison(value)
    return scenario(engine)


def scenario(engine):
    """tests/test_cuda.py::test_cuda_graph_decode_equals_eager's workload on an engine of 6 slots:
    five prompts of 3, 7, ... tokens, then greedy replies of 12, 13, ... tokens. Returns (the
    replies' ids, the five states)."""
    vocab = engine.model.config.vocab_size
    sessions = [engine.session() for _ in range(5)]
    for i, s in enumerate(sessions):
        s.feed(random_tokens(3 + 4 * i, vocab, seed=20 + i))
    streams = [s.generate(12 + i, SamplingParams(temperature=0)) for i, s in enumerate(sessions)]
    engine.run(streams)
    return [st.token_ids for st in streams], [engine.pool.export(s.slot) for s in sessions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--once", nargs=2, metavar=("CONFIG", "MODE"), help=f"one of {list(CONFIGS)}, eager or graph")
    parser.add_argument("--dropped", action="store_true", help="run tests/test_cuda.py's dropped-graphs check")
    parser.add_argument("--shared-stream", action="store_true", help="every DecodeGraphs on one capture stream")
    args = parser.parse_args()
    if args.shared_stream:
        shared = torch.cuda.Stream()
        graphs.capture_stream = lambda device: shared
    label = "one shared capture stream" if args.shared_stream else "a capture stream per DecodeGraphs"
    if args.dropped:
        bad = 0
        for i in range(args.repeats):
            worst, changed = dropped_graphs_check()
            bad += changed > 0 or worst > 2e-3
            print(f"dropped-graphs check, {label}: largest logit difference {worst:.2e}, filler elements changed {changed}")
        print(f"dropped-graphs check, {label}: {bad} of {args.repeats} runs differ")
        return
    tensors = random_checkpoint(SHAPES["L3-C192-N64-V300"], seed=6)
    if args.once:
        name, mode = args.once
        backends, prompt_tokens = CONFIGS[name]
        ids, _ = run(tensors, backends, prompt_tokens, mode == "eager", 0.0)
        print(f"{name} {mode}: {sum(map(len, ids))} tokens generated")
        return
    repeats = args.repeats
    differing: Counter = Counter()
    largest: dict = {}
    for name, (backends, prompt_tokens) in CONFIGS.items():
        ref_ids, ref_states = run(tensors, backends, prompt_tokens, True, 0.0)
        for _ in range(repeats):
            for value in (float("nan"), 1e4):
                for eager in (True, False):
                    ids, states = run(tensors, backends, prompt_tokens, eager, value)
                    err = max(max(rel_err(b[k], a[k]) for k in a) for a, b in zip(ref_states, states))
                    print(f"{name:30s} {'eager' if eager else 'graph'} poison {value:g}: ids equal {ids == ref_ids}, "
                          f"largest relative state difference {err:.2e}", flush=True)  # fmt: skip
                    differing[(name, eager)] += err > 0 or ids != ref_ids
                    largest[(name, eager)] = max(largest.get((name, eager), 0.0), err)
    for (name, eager), n in sorted(differing.items()):
        print(f"{label}: {name:30s} {'eager' if eager else 'graph'}: {n} of {2 * repeats} runs differ (largest relative "
              f"state difference {largest[(name, eager)]:.2e})")


if __name__ == "__main__":
    main()
