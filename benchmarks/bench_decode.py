"""Decode and prefill throughput on a GPU: state layouts, state dtypes, token-shift variants,
CUDA graphs, against the floor implied by the measured copy bandwidth.

    python benchmarks/bench_decode.py --out docs/benchmarks/decode

Model shapes of the released RWKV-7 0.1B / 1.5B / 7.2B models with random fp16 weights.
Every figure in one run names the card; compare only within a run.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import write_results  # noqa: E402  (benchmarks/ is the script's directory)
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
REFERENCE = Variant("pytorch reference, contiguous f32", "contiguous", torch.float32, "torch", "torch", "torch")


def config_for(shape: str) -> ModelConfig:
    s = SHAPES[shape]
    return ModelConfig(head_size=64, vocab_size=65536, ffn_dim=4 * s["n_embd"], tokenizer="world", **s)


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy (median of 20)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_seconds(lambda: dst.copy_(src), 20)


def median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def weight_bytes(model: Model, batch: int) -> int:
    """Bytes of weights one decode step must read: everything but the embedding, plus B rows of it."""
    emb = model.weights.emb
    return model.weights.nbytes() - emb.numel() * emb.element_size() + batch * emb.shape[1] * emb.element_size()


def decode_time(model, variant: Variant, batch: int, graphs: bool, steps: int) -> float:
    model.backends.update(token_shift=variant.token_shift, wkv=variant.wkv, time_mix=variant.time_mix)
    pool = model.new_pool(batch, state_dtype=variant.state_dtype, layout=variant.layout)
    for layer in range(model.config.n_layer):  # realistic, non-zero states
        for part in pool.layer(layer):
            part.normal_().mul_(0.5)
    runner = DecodeGraphs(model, pool, batch_sizes=[batch], enforce_eager=not graphs)
    slots = list(range(batch))
    tokens = torch.randint(0, model.config.vocab_size, (batch,)).tolist()
    seconds = median_seconds(lambda: runner.decode(slots, tokens), steps)
    del runner, pool
    torch.cuda.empty_cache()
    return seconds


def prefill_time(model, variant: Variant, batch: int, length: int, repeats: int) -> float:
    model.backends.update(token_shift=variant.token_shift, wkv=variant.wkv, time_mix=variant.time_mix)
    pool = model.new_pool(batch, state_dtype=variant.state_dtype, layout=variant.layout)
    prompts = torch.randint(0, model.config.vocab_size, (batch, length)).tolist()
    seconds = median_seconds(lambda: model.forward(pool, list(range(batch)), prompts, output="last"), repeats, 1)
    del pool
    torch.cuda.empty_cache()
    return seconds


def official_tokens_per_s(tensors: dict, workdir: Path, steps: int) -> float:
    """The official rwkv package (RWKV_CUDA_ON=1, cuda fp16) decoding one sequence, same weights."""
    import os

    os.environ["RWKV_V7_ON"], os.environ["RWKV_CUDA_ON"] = "1", "1"
    from rwkv.model import RWKV

    path = workdir / "official.pth"
    torch.save({k: v.cpu() for k, v in tensors.items()}, path)
    model = RWKV(model=str(path.with_suffix("")), strategy="cuda fp16")
    state = None
    token = 0
    for _ in range(3):
        logits, state = model.forward([token], state)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        logits, state = model.forward([i % 1000], state)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    del model, state
    path.unlink()
    torch.cuda.empty_cache()
    return 1 / seconds


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
            for variant in (VARIANTS[0], VARIANTS[-1]):
                s = prefill_time(model, variant, batch, args.prefill_len, 3)
                prefill.append({"shape": shape, "batch": batch, "length": args.prefill_len, "variant": variant.name,
                                "seconds": s, "tokens_per_s": batch * args.prefill_len / s})  # fmt: skip
                print(f"  prefill B={batch} T={args.prefill_len} {variant.name}: {batch * args.prefill_len / s:,.0f} tok/s", flush=True)
        del model
        torch.cuda.empty_cache()
        if args.official:
            tps = official_tokens_per_s(tensors, args.workdir, 50)
            del tensors
            official.append({"shape": shape, "batch": 1, "tokens_per_s": tps})
            print(f"  official rwkv package (RWKV_CUDA_ON=1, fp16), batch 1: {tps:,.1f} tok/s", flush=True)
    return {"card": card, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "copy_bandwidth_bytes_per_s": bandwidth, "decode": rows, "prefill": prefill,
            "official": official}  # fmt: skip


def decode_rows(model, shape, batch, bandwidth, args) -> list[dict]:
    rows = []
    slot_bytes = {dt: model.state_layout.slot_nbytes(dt) for dt in (torch.float32, torch.float16)}
    variants = VARIANTS + ([REFERENCE] if batch in (1, 64) else [])
    for variant in variants:
        for graphs in (False, True):
            s = decode_time(model, variant, batch, graphs, args.steps)
            moved = weight_bytes(model, batch) + 2 * batch * slot_bytes[variant.state_dtype]
            floor = moved / bandwidth
            rows.append({"shape": shape, "batch": batch, "variant": variant.name, "graphs": graphs,
                         "step_ms": s * 1e3, "tokens_per_s": batch / s, "floor_ms": floor * 1e3,
                         "floor_ratio": s / floor, "state_dtype": dtype_name(variant.state_dtype)})  # fmt: skip
            print(f"  B={batch:<3} graphs={graphs!s:<5} {variant.name:<40} {s * 1e3:8.3f} ms "
                  f"{batch / s:10,.0f} tok/s  floor {floor * 1e3:.3f} ms (x{s / floor:.2f})", flush=True)  # fmt: skip
    return rows


def markdown(result: dict) -> str:
    card, bw = result["card"], result["copy_bandwidth_bytes_per_s"]
    out = [f"# Decode throughput, {card}, {result['date']}", "",
           f"torch {result['torch']}; measured device-to-device copy bandwidth {bw / 1e9:.0f} GB/s (read + write). "
           "Floor = (weight bytes read once + state bytes read and written) / that bandwidth. "
           "Random fp16 weights, world vocabulary; step time is the median of timed decode steps "
           "(host work included: slot/token upload, and with graphs the replay).", ""]  # fmt: skip
    for shape in dict.fromkeys(r["shape"] for r in result["decode"]):
        out += [f"## {shape} ({card})", "", "| batch | variant | graphs | step ms | tokens/s | floor ms | x floor |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in (r for r in result["decode"] if r["shape"] == shape):
            out.append(f"| {r['batch']} | {r['variant']} | {'on' if r['graphs'] else 'off'} | {r['step_ms']:.3f} | "
                       f"{r['tokens_per_s']:,.0f} | {r['floor_ms']:.3f} | {r['floor_ratio']:.2f} |")  # fmt: skip
        out.append("")
    if result.get("official"):
        out += [f"## Official rwkv package, batch 1 ({card})", "",
                "`rwkv==0.8.32`, `RWKV_CUDA_ON=1`, strategy `cuda fp16`, same random weights; our best batch-1 row beside it.",
                "", "| shape | official tokens/s | rwkvstate tokens/s (best variant, batch 1) |", "|---|---|---|"]  # fmt: skip
        for o in result["official"]:
            ours = max(r["tokens_per_s"] for r in result["decode"] if r["shape"] == o["shape"] and r["batch"] == 1)
            out.append(f"| {o['shape']} | {o['tokens_per_s']:,.1f} | {ours:,.1f} |")
        out.append("")
    if result["prefill"]:
        out += [f"## Prefill ({card})", "", "| shape | batch | prompt | variant | tokens/s |", "|---|---|---|---|---|"]
        for r in result["prefill"]:
            out.append(f"| {r['shape']} | {r['batch']} | {r['length']} | {r['variant']} | {r['tokens_per_s']:,.0f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=lambda s: s.split(","), default=list(SHAPES))
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8, 64, 256])
    parser.add_argument("--prefill-batches", type=lambda s: [int(b) for b in s.split(",") if b], default=[1, 8])
    parser.add_argument("--prefill-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--official", action="store_true", help="also time the official rwkv package at batch 1")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"), help="where the official package's .pth goes")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    result = run(args)
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
