"""Decode and prefill throughput on a GPU: state layouts, state dtypes, token-shift variants,
CUDA graphs, against the floor implied by the measured copy bandwidth.

    python benchmarks/bench_decode.py --out docs/benchmarks/decode
    python benchmarks/bench_decode.py --official --variants default --batches 1 --prefill-batches "" \
        --out docs/benchmarks/decode-official-h200        # ours with and without graphs vs the official package

Model shapes of the released RWKV-7 0.1B / 1.5B / 7.2B models with random fp16 weights.
Every figure in one run names the card; compare only within a run. Ours and the official package
go through one timer (benchmarks/common.py: same clock, statistic, warm-up and stability rule).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import MAX_SPREAD, call_seconds, measure, write_results  # noqa: E402  (benchmarks/ is the script's directory)
from rwkvstate import Model
from rwkvstate.config import ModelConfig
from rwkvstate.state.layout import dtype_name
from rwkvstate.model.synthetic import random_checkpoint
from rwkvstate.runtime.graphs import DecodeGraphs

# n_layer, n_embd, and LoRA ranks close to the released checkpoints (world vocab, FFN 4x)
SHAPES = {
    "0.1B": dict(n_layer=12, n_embd=768, decay_rank=64, aaa_rank=64, mv_rank=32, gate_rank=128),
    "1.5B": dict(n_layer=24, n_embd=2048, decay_rank=96, aaa_rank=96, mv_rank=64, gate_rank=256),
    "7.2B": dict(n_layer=32, n_embd=4096, decay_rank=128, aaa_rank=128, mv_rank=96, gate_rank=480),
}


@dataclass(frozen=True)
class Variant:
    name: str
    layout: str
    state_dtype: torch.dtype
    token_shift: str  # backend of token_shift_mix
    wkv: str = "triton"
    time_mix: str = "triton"  # "triton": fused elementwise prologue/epilogue around the WKV kernel


VARIANTS = [
    Variant("seed: fragmented f32, per-mix shift", "fragmented", torch.float32, "triton-per-mix", time_mix="torch"),
    Variant("fragmented f32, fused shift", "fragmented", torch.float32, "triton"),
    Variant("contiguous f32, per-mix shift", "contiguous", torch.float32, "triton-per-mix"),
    Variant("contiguous f32, fused shift", "contiguous", torch.float32, "triton"),
    Variant("contiguous f16, per-mix shift", "contiguous", torch.float16, "triton-per-mix"),
    Variant("contiguous f16, fused shift, unfused time mix", "contiguous", torch.float16, "triton", time_mix="torch"),
    Variant("contiguous f16, fused shift", "contiguous", torch.float16, "triton"),
]
OURS = VARIANTS[-1]  # the runtime's default configuration, the one compared with peers
WARMUP = 3  # untimed calls before the first repeat (1 before each later repeat)
REFERENCE = Variant("pytorch reference, contiguous f32", "contiguous", torch.float32, "torch", "torch", "torch")


def config_for(shape: str) -> ModelConfig:
    s = SHAPES[shape]
    return ModelConfig(head_size=64, vocab_size=65536, ffn_dim=4 * s["n_embd"], tokenizer="world", **s)


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy (median of 20 calls)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / statistics.median(call_seconds(lambda: dst.copy_(src), device, 20, 3))


def weight_bytes(model: Model, batch: int) -> int:
    """Bytes of weights one decode step must read: everything but the embedding, plus B rows of it."""
    emb = model.weights.emb
    return model.weights.nbytes() - emb.numel() * emb.element_size() + batch * emb.shape[1] * emb.element_size()


def decode_time(model, variant: Variant, batch: int, graphs: bool, args) -> dict:
    """One decode step of `batch` sequences through the runner: the common timer's measurement."""
    model.backends.update(token_shift=variant.token_shift, wkv=variant.wkv, time_mix=variant.time_mix)
    pool = model.new_pool(batch, state_dtype=variant.state_dtype, layout=variant.layout)
    for layer in range(model.config.n_layer):  # realistic, non-zero states
        for part in pool.layer(layer):
            part.normal_().mul_(0.5)
    runner = DecodeGraphs(model, pool, batch_sizes=[batch], enforce_eager=not graphs)
    slots = list(range(batch))
    tokens = torch.randint(0, model.config.vocab_size, (batch,)).tolist()
    t = measure(lambda: runner.decode(slots, tokens), "cuda", args.repeats, args.steps, WARMUP,
                max_spread=args.max_spread)  # fmt: skip
    del runner, pool
    torch.cuda.empty_cache()
    return t


def prefill_time(model, variant: Variant, batch: int, length: int, args) -> dict:
    model.backends.update(token_shift=variant.token_shift, wkv=variant.wkv, time_mix=variant.time_mix)
    pool = model.new_pool(batch, state_dtype=variant.state_dtype, layout=variant.layout)
    prompts = torch.randint(0, model.config.vocab_size, (batch, length)).tolist()
    t = measure(lambda: model.forward(pool, list(range(batch)), prompts, output="last"), "cuda", args.repeats, 3, 1,
                max_spread=args.max_spread)  # fmt: skip
    del pool
    torch.cuda.empty_cache()
    return t


OFFICIAL_SETUP = "rwkv==0.8.32, RWKV_V7_ON=1, RWKV_CUDA_ON=1 (its CUDA kernel), strategy cuda fp16"


def official_time(tensors: dict, workdir: Path, args) -> dict:
    """The official rwkv package at its fastest documented setting (OFFICIAL_SETUP) decoding one
    sequence with the same weights, timed by the same timer as ours (measure)."""
    os.environ["RWKV_V7_ON"], os.environ["RWKV_CUDA_ON"] = "1", "1"
    from rwkv.model import RWKV

    path = workdir / "official.pth"
    torch.save({k: v.cpu() for k, v in tensors.items()}, path)
    model = RWKV(model=str(path.with_suffix("")), strategy="cuda fp16")
    path.unlink()
    box = {"state": None, "i": 0}

    def step():
        box["i"] += 1
        _, box["state"] = model.forward([box["i"] % 1000], box["state"])

    t = measure(step, "cuda", args.repeats, args.steps, WARMUP, max_spread=args.max_spread)
    del model, box
    torch.cuda.empty_cache()
    return t


def run(args) -> dict:
    device = torch.device("cuda")
    card = torch.cuda.get_device_name(device)
    bandwidth = copy_bandwidth(device)
    print(f"{card}: device-to-device copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows, prefill, official = [], [], []
    for shape in args.shapes:
        cfg = config_for(shape)
        t0 = time.time()
        tensors = random_checkpoint(cfg, seed=0, dtype=torch.float16, device=device)
        model = Model.from_tensors(tensors, cfg, device=device, dtype=torch.float16)
        if not args.official:
            del tensors
        print(f"{shape}: {model.num_params() / 1e9:.2f} B params, built in {time.time() - t0:.0f} s", flush=True)
        for batch in args.batches:
            rows += decode_rows(model, shape, batch, bandwidth, args)
        for batch in args.prefill_batches:
            for variant in (VARIANTS[0], OURS):
                t = prefill_time(model, variant, batch, args.prefill_len, args)
                prefill.append({"shape": shape, "batch": batch, "length": args.prefill_len, "variant": variant.name,
                                **t, "seconds": t["median_s"], "tokens_per_s": batch * args.prefill_len / t["median_s"]})  # fmt: skip
                print(f"  prefill B={batch} T={args.prefill_len} {variant.name}: "
                      f"{batch * args.prefill_len / t['median_s']:,.0f} tok/s{flag(t)}", flush=True)  # fmt: skip
        del model
        torch.cuda.empty_cache()
        if args.official:
            t = official_time(tensors, args.workdir, args)
            del tensors
            official.append({"shape": shape, "batch": 1, **t, "tokens_per_s": 1 / t["median_s"]})
            print(f"  official rwkv package ({OFFICIAL_SETUP}), batch 1: {1 / t['median_s']:,.1f} tok/s{flag(t)}",
                  flush=True)  # fmt: skip
    return {"card": card, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "copy_bandwidth_bytes_per_s": bandwidth, "ours": OURS.name, "official_setup": OFFICIAL_SETUP,
            "method": {"timer": "wall clock per call, device synchronised", "repeats": args.repeats,
                       "calls": args.steps, "warmup": WARMUP, "max_spread": args.max_spread},
            "decode": rows, "prefill": prefill, "official": official}  # fmt: skip


def flag(t: dict) -> str:
    return f"  UNSTABLE (spread {t['spread']:.0%} after {t['attempts']} attempts)" if t.get("unstable") else ""


def decode_rows(model, shape, batch, bandwidth, args) -> list[dict]:
    rows = []
    slot_bytes = {dt: model.state_layout.slot_nbytes(dt) for dt in (torch.float32, torch.float16)}
    variants = [OURS] if args.variants == "default" else VARIANTS + ([REFERENCE] if batch in (1, 64) else [])
    for variant in variants:
        for graphs in (False, True):
            t = decode_time(model, variant, batch, graphs, args)
            s = t["median_s"]
            moved = weight_bytes(model, batch) + 2 * batch * slot_bytes[variant.state_dtype]
            floor = moved / bandwidth
            rows.append({"shape": shape, "batch": batch, "variant": variant.name, "graphs": graphs, **t,
                         "step_ms": s * 1e3, "tokens_per_s": batch / s, "floor_ms": floor * 1e3,
                         "floor_ratio": s / floor, "state_dtype": dtype_name(variant.state_dtype)})  # fmt: skip
            print(f"  B={batch:<3} graphs={graphs!s:<5} {variant.name:<40} {s * 1e3:8.3f} ms "
                  f"{batch / s:10,.0f} tok/s  floor {floor * 1e3:.3f} ms (x{s / floor:.2f}){flag(t)}", flush=True)  # fmt: skip
    return rows


# ---- markdown: every figure rendered from the JSON (tests/test_benchmark_docs.py re-renders it) ----
def _spread(r: dict) -> str:
    """A row's spread over repeats, marked when unstable; '-' for runs made before repeats were kept."""
    if "spread" not in r:
        return "-"
    return f"{r['spread']:.0%}" + (" **unstable**" if r.get("unstable") else "")


def markdown(result: dict) -> str:
    card, bw = result["card"], result["copy_bandwidth_bytes_per_s"]
    method = result.get("method")
    timing = (f"Every time (ours and the official package's alike) is the median of {method['repeats']} repeats, each "
              f"the median of {method['calls']} calls timed by the wall clock with the device synchronised around "
              f"each call, after {method['warmup']} untimed calls; spread = (max - min) / median of the repeats, "
              f"and a row above {method['max_spread']:.0%} was re-run and, if still above, is marked **unstable** "
              "and is not a finding." if method else
              "This run predates the common timer: its step times are medians of CUDA-event-timed steps (host "
              "work included), the official package's the wall-clock mean of 50 steps, so the two sides were not "
              "timed by one method; it kept no repeats, so it has no spread.")  # fmt: skip
    out = [f"# Decode throughput, {card}, {result['date']}", "",
           f"torch {result['torch']}; measured device-to-device copy bandwidth {bw / 1e9:.0f} GB/s (read + write). "
           "Floor = (weight bytes read once + state bytes read and written) / that bandwidth. "
           f"Random fp16 weights, world vocabulary. {timing}", ""]  # fmt: skip
    for shape in dict.fromkeys(r["shape"] for r in result["decode"]):
        out += [f"## {shape} ({card})", "", "| batch | variant | graphs | step ms | tokens/s | spread | floor ms | x floor |",
                "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in (r for r in result["decode"] if r["shape"] == shape):
            out.append(f"| {r['batch']} | {r['variant']} | {'on' if r['graphs'] else 'off'} | {r['step_ms']:.3f} | "
                       f"{r['tokens_per_s']:,.0f} | {_spread(r)} | {r['floor_ms']:.3f} | {r['floor_ratio']:.2f} |")  # fmt: skip
        out.append("")
    out += official_table(result)
    if result["prefill"]:
        out += [f"## Prefill ({card})", "", "| shape | batch | prompt | variant | tokens/s | spread |",
                "|---|---|---|---|---|---|"]  # fmt: skip
        for r in result["prefill"]:
            out.append(f"| {r['shape']} | {r['batch']} | {r['length']} | {r['variant']} | {r['tokens_per_s']:,.0f} | "
                       f"{_spread(r)} |")  # fmt: skip
    return "\n".join(out) + "\n"


def official_table(result: dict) -> list[str]:
    """Official package against ours with and without CUDA graphs, one fixed configuration of ours
    (the runtime's default, named in advance, not the fastest of the variants measured)."""
    if not result.get("official"):
        return []
    ours = result.get("ours", OURS.name)
    setup = result.get("official_setup", "rwkv==0.8.32, RWKV_CUDA_ON=1, strategy cuda fp16")
    out = [f"## Against the official rwkv package, batch 1 ({result['card']})", "",
           f"Official: {setup}; same random weights. Ours: `{ours}` (the runtime's default), without and with "
           "CUDA graphs. Ratio = official step time / ours (above 1: ours is faster).", "",
           "| shape | official tokens/s | ours, no graphs | ratio | ours, CUDA graphs | ratio |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for o in result["official"]:
        mine = {r["graphs"]: r for r in result["decode"]
                if r["shape"] == o["shape"] and r["batch"] == 1 and r["variant"] == ours}  # fmt: skip
        cells = []
        for graphs in (False, True):
            r = mine.get(graphs)
            cells += [f"{r['tokens_per_s']:,.1f}", _ratio(o, r)] if r else ["-", "-"]
        out.append(f"| {o['shape']} | {o['tokens_per_s']:,.1f}{_mark(o)} | " + " | ".join(cells) + " |")
    return out + [""]


def _mark(r: dict) -> str:
    return " (unstable)" if r.get("unstable") else ""


def _ratio(official: dict, ours: dict) -> str:
    ratio = ours["tokens_per_s"] / official["tokens_per_s"]
    shaky = official.get("unstable") or ours.get("unstable")
    return f"{ratio:.2f}x" + (" (unstable, not a finding)" if shaky else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=lambda s: s.split(","), default=list(SHAPES))
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8, 64, 256])
    parser.add_argument("--prefill-batches", type=lambda s: [int(b) for b in s.split(",") if b], default=[1, 8])
    parser.add_argument("--prefill-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20, help="timed calls per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every measurement (their spread is checked)")
    parser.add_argument("--max-spread", type=float, default=MAX_SPREAD, help="spread above which a row is re-run")
    parser.add_argument("--variants", choices=("all", "default"), default="all",
                        help="every state variant, or only the runtime's default (with and without graphs)")
    parser.add_argument("--official", action="store_true", help="also time the official rwkv package at batch 1")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"), help="where the official package's .pth goes")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    result = run(args)
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
