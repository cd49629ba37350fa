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
from rwkvstate.ops import gemv as gemv_ops
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
    wkv: str | None = "triton"  # None: the runtime's choice (the token-by-token kernel on CUDA)
    wkv_prefill: str | None = None  # None: as wkv; "triton-chunked": the chunked-parallel kernel for prompts
    time_mix: str | None = "triton"  # "triton": fused elementwise prologue/epilogue around the WKV kernel;
    #                                  "triton-fused": the three in one launch (decode); None: the runtime's
    channel_mix: str | None = "torch"  # None: the runtime's choice (GEMV kernel for decode <= 8, else cuBLAS); "triton": sparse
    lora: str | None = "torch"  # "triton": the LoRA chains in two launches for batches of 1-16; None: and batched GEMMs beyond
    norm_shift: str | None = "torch"  # None: residual add + layer norm + token shift in one launch (decode)
    gemv: str | None = "torch"  # "triton": r/k/v in one launch and the output projection by the GEMV kernel (decode <= 8)
    lora_stream: bool | None = False  # True: the LoRA chains on a second stream beside r/k/v; None: the runtime's choice
    dependent_launches: bool | str | None = False  # programmatic dependent launches: "start"/"end" trigger, None: runtime's
    split_reduce: str | None = None  # how the GEMV kernels add a split K (ops/gemv.py SPLIT_REDUCE); None: its default


VARIANTS = [
    Variant("seed: fragmented f32, per-mix shift", "fragmented", torch.float32, "triton-per-mix", time_mix="torch"),
    Variant("fragmented f32, fused shift", "fragmented", torch.float32, "triton"),
    Variant("contiguous f32, per-mix shift", "contiguous", torch.float32, "triton-per-mix"),
    Variant("contiguous f32, fused shift", "contiguous", torch.float32, "triton"),
    Variant("contiguous f16, per-mix shift", "contiguous", torch.float16, "triton-per-mix"),
    Variant("contiguous f16, fused shift, unfused time mix", "contiguous", torch.float16, "triton", time_mix="torch"),
    Variant("contiguous f16, fused shift", "contiguous", torch.float16, "triton"),
    Variant("contiguous f16, all fused, sparse channel mix", "contiguous", torch.float16, "triton", channel_mix="triton"),
    Variant("same + LoRA, norm+shift fused", "contiguous", torch.float16, "triton", wkv=None,
            channel_mix="torch", lora="triton", norm_shift=None, gemv="torch"),
    # only when asked for (--variants 9): the runtime never chooses the chunked kernel by itself
    Variant("same + chunked WKV prefill", "contiguous", torch.float16, "triton", wkv=None,
            wkv_prefill="triton-chunked", channel_mix="torch", lora="triton", norm_shift=None, gemv="torch"),
    # only when asked for (--variants 10,11): the GEMV kernel (ops/gemv.py) for every projection it takes
    Variant("same + GEMV projections", "contiguous", torch.float16, "triton", wkv=None, channel_mix="torch",
            lora="triton", norm_shift=None, gemv="triton"),
    Variant("same + GEMV projections and feed-forward", "contiguous", torch.float16, "triton", wkv=None,
            channel_mix="triton-gemv", lora="triton", norm_shift=None, gemv="triton"),
    # the runtime's default: variant 8 + the GEMV kernel for r/k/v and the feed-forward of decode
    # batches of at most 8, r/k/v as batched GEMMs beyond, the LoRA kernels for every decode batch
    # (the many-rows ones beyond 16 rows, since f780713), batched GEMMs for the chains of prompts
    # (every backend None). Runs up to 2026-12-01 named it "default: + GEMV (batch <= 8), batched GEMMs"
    Variant("default (every backend None)", "contiguous", torch.float16, "triton", wkv=None,
            time_mix=None, channel_mix=None, lora=None, norm_shift=None, gemv=None, lora_stream=None,
            dependent_launches=None),
    # only when asked for (--variants 13): the default with the step WKV kernel for prompts too,
    # the prompt path before the prompt kernel (ops/wkv7.py); decode is variant 12's
    Variant("default, step WKV kernel for prompts", "contiguous", torch.float16, "triton", wkv=None,
            wkv_prefill="triton-step", channel_mix=None, lora=None, norm_shift=None, gemv=None, lora_stream=None,
            dependent_launches=None),
    # only when asked for (--variants 14): the default with the sparse feed-forward (GEMV key, the
    # sparse-input value projection: rows of zero activations are not read) for every decode batch
    # of <= 16 rows, not only where it pays (Model._sparse_ffn_pays)
    Variant("default + sparse feed-forward", "contiguous", torch.float16, "triton", wkv=None,
            channel_mix="triton", lora=None, norm_shift=None, gemv=None, lora_stream=None, dependent_launches=None),
    # only when asked for (--variants 15): the default before the sparse feed-forward, the LoRA
    # stream and dependent launches: one stream, the dense GEMV kernels for the feed-forward (with
    # today's GEMV launches: the key projection unsplit, the one-tile split-K reduce)
    Variant("previous default: one stream, dense GEMV feed-forward", "contiguous", torch.float16, "triton", wkv=None,
            channel_mix="triton-gemv", lora=None, norm_shift=None, gemv=None),
    # only when asked for (--variants 16): the default without dependent launches (the default
    # itself since they became opt-in; decode-options-h200 measured it beside them)
    Variant("default without dependent launches", "contiguous", torch.float16, "triton", wkv=None,
            channel_mix=None, lora=None, norm_shift=None, gemv=None, lora_stream=None),
    # only when asked for (--variants 17): the default with dependent launches triggered at each
    # kernel's start instead of its end
    Variant("default, dependent launches triggered at the start", "contiguous", torch.float16, "triton", wkv=None,
            channel_mix=None, lora=None, norm_shift=None, gemv=None, lora_stream=None, dependent_launches="start"),
    # only when asked for (--variants 18): the default with the channel mix's "cublas" backend for
    # every pass (relu^2 in one pass, the residual add inside the value GEMM); meant for batches
    # beyond 8 and prompts, where the default takes the reference (at 1-8 rows it replaces the
    # GEMV kernels with cuBLAS)
    Variant("default + folded cuBLAS feed-forward", "contiguous", torch.float16, "triton", wkv=None,
            channel_mix="cublas", lora=None, norm_shift=None, gemv=None, lora_stream=None, dependent_launches=None),
    # only when asked for (--variants 19): the default with the prologue, WKV-7 and epilogue of a
    # decode batch in one launch (time_mix "triton-fused")
    Variant("default + one-launch decode time mix", "contiguous", torch.float16, "triton", wkv=None,
            time_mix="triton-fused", channel_mix=None, lora=None, norm_shift=None, gemv=None, lora_stream=None,
            dependent_launches=None),
    # only when asked for (--variants 20, 21): the default with the three-kernel time mix for every
    # pass (before 2026-12-01 the default for decode batches too), and with the reference
    # feed-forward (cuBLAS GEMMs, relu, square and the residual add as separate kernels) for every
    # pass (before that date the default beyond 8 rows and for prompts)
    Variant("default, three-kernel time mix", "contiguous", torch.float16, "triton", wkv=None, channel_mix=None,
            lora=None, norm_shift=None, gemv=None, lora_stream=None, dependent_launches=None),
    Variant("default, reference feed-forward", "contiguous", torch.float16, "triton", wkv=None, time_mix=None,
            channel_mix="torch", lora=None, norm_shift=None, gemv=None, lora_stream=None, dependent_launches=None),
    # only when asked for (--variants 22): the default with the WKV step kernel in its token-loop
    # form for decode batches too (before the one-token form) and for prompts. Measured when decode
    # beyond 8 rows ran the WKV kernel on its own; since the one-launch time mix takes every decode
    # batch, it changes decode only with time_mix "triton"
    Variant("default, WKV step kernel with its token loop", "contiguous", torch.float16, "triton", wkv="triton-step",
            time_mix=None, channel_mix=None, lora=None, norm_shift=None, gemv=None, lora_stream=None,
            dependent_launches=None),
    # only when asked for (--variants 23, 24): the default with the LoRA chains in their two
    # kernels (on the second stream in graphs: the default of decode batches of 1-8 before the downs
    # joined the r/k/v launch), and with the downs in the r/k/v launch, the ups in their own launch
    # (lora "fused"), for every decode batch of 1-8 rows
    Variant("default, LoRA in two kernels", "contiguous", torch.float16, "triton", wkv=None, time_mix=None,
            channel_mix=None, lora="triton", norm_shift=None, gemv=None, lora_stream=None, dependent_launches=None),
    Variant("default, LoRA downs with r/k/v, ups in their own launch", "contiguous", torch.float16, "triton",
            wkv=None, time_mix=None, channel_mix=None, lora="fused", norm_shift=None, gemv=None,
            lora_stream=None, dependent_launches=None),
    # only when asked for (--variants 25, 26): the default with the output projection of decode
    # batches of 1-8 on the GEMV kernel too (gemv "triton"), and with every split K of the GEMV
    # kernels added by a second launch (before 2026-12-01; since then the default adds it in the
    # kernel up to 2048 outputs, ops/gemv.py SPLIT_REDUCE)
    Variant("default + GEMV output projection", "contiguous", torch.float16, "triton", wkv=None, time_mix=None,
            channel_mix=None, lora=None, norm_shift=None, gemv="triton", lora_stream=None, dependent_launches=None),
    Variant("default, split K added by a second launch", "contiguous", torch.float16, "triton", wkv=None,
            time_mix=None, channel_mix=None, lora=None, norm_shift=None, gemv=None, lora_stream=None,
            dependent_launches=None, split_reduce="launch"),
    # only when asked for (--variants 27): the default with lora "triton" for every pass: the
    # chains of batches beyond 16 rows and of prompts in the many-rows kernels (token tiles,
    # ops/lora.py lora_rows_triton) instead of batched GEMMs; at 1-16 rows variant 23's two kernels
    Variant("default, LoRA kernels for every pass", "contiguous", torch.float16, "triton", wkv=None,
            time_mix=None, channel_mix=None, lora="triton", norm_shift=None, gemv=None, lora_stream=None,
            dependent_launches=None),
    # only when asked for (--variants 28, 29): the default with the LoRA chains as batched GEMMs
    # for every pass (lora "bmm": the default beyond 16 rows before the many-rows kernels; at 1-16
    # rows it replaces the kernels too, so compare it beyond 16), and with the GEMV kernel's token
    # tiles for r/k/v and the output projection of every pass (gemv "triton-all") instead of cuBLAS
    Variant("default, LoRA as batched GEMMs", "contiguous", torch.float16, "triton", wkv=None, time_mix=None,
            channel_mix=None, lora="bmm", norm_shift=None, gemv=None, lora_stream=None, dependent_launches=None),
    Variant("default + GEMV kernel for every projection", "contiguous", torch.float16, "triton", wkv=None,
            time_mix=None, channel_mix=None, lora=None, norm_shift=None, gemv="triton-all", lora_stream=None,
            dependent_launches=None),
]
OPT_IN = VARIANTS[9:12] + VARIANTS[13:]  # left out of --variants all
OURS = VARIANTS[12]  # the runtime's default configuration (every backend None), the one compared with peers
OLD_DEFAULT = "contiguous f16, fused shift"  # the default of runs whose JSON names none
WARMUP = 3  # untimed calls before the first repeat (1 before each later repeat)
DEFAULT_SPLIT_REDUCE = gemv_ops.SPLIT_REDUCE
REFERENCE = Variant("pytorch reference, contiguous f32", "contiguous", torch.float32, "torch", "torch", "torch")


def use(model, variant: Variant) -> None:
    model.backends.update(token_shift=variant.token_shift, wkv=variant.wkv, wkv_prefill=variant.wkv_prefill,
                          time_mix=variant.time_mix, channel_mix=variant.channel_mix, lora=variant.lora,
                          norm_shift=variant.norm_shift, gemv=variant.gemv)  # fmt: skip
    model.lora_stream = variant.lora_stream
    model.dependent_launches = variant.dependent_launches
    gemv_ops.SPLIT_REDUCE = variant.split_reduce or DEFAULT_SPLIT_REDUCE  # a module setting, not the model's


def config_for(shape: str) -> ModelConfig:
    s = SHAPES[shape]
    return ModelConfig(head_size=64, vocab_size=65536, ffn_dim=4 * s["n_embd"], tokenizer="world", **s)


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy (median of 20 calls)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / statistics.median(call_seconds(lambda: dst.copy_(src), device, 20, 3))


def matmul_rate(device) -> float:
    """FLOP/s of an 8192^3 fp16 matmul on random data (median of 10 calls): the prefill ceiling."""
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.float16) for _ in range(2))
    return 2 * 8192**3 / statistics.median(call_seconds(lambda: a @ b, device, 10, 3))


def prefill_flops(model, tokens: int, batch: int) -> int:
    """2 FLOPs per layer weight per token, plus the head for each sequence's last token."""
    head = model.weights.head.numel()
    layer_params = (weight_bytes(model, 0) - head * model.weights.head.element_size()) // model.weights.head.element_size()
    return 2 * layer_params * tokens + 2 * head * batch


def weight_bytes(model: Model, batch: int) -> int:
    """Bytes of weights one decode step must read: everything but the embedding, plus B rows of it."""
    emb = model.weights.emb
    return model.weights.nbytes() - emb.numel() * emb.element_size() + batch * emb.shape[1] * emb.element_size()


def decode_time(model, variant: Variant, batch: int, graphs: bool, args) -> dict:
    """One decode step of `batch` sequences through the runner: the common timer's measurement."""
    use(model, variant)
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
    use(model, variant)
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


def channel_mix_rows(shape: str, batch: int, density: float, bandwidth: float) -> list[dict]:
    """The feed-forward alone (after its token shift, residual add included) at a chosen activation
    density: cuBLAS + elementwise ("torch") against the sparse kernels ("triton"), each call on its
    own copy of the weights (at least 1 GiB of them, so no call finds its weights in L2), timed
    as one CUDA-graph replay. Random weights give ~50% zeros, trained ones more
    (docs/benchmarks/ffn-sparsity.md). Here the inputs are positive and each row of K either
    positive (a non-zero activation) or -1/C (an exact zero), which fixes the density."""
    from rwkvstate.ops.channel_mix import channel_mix

    C = SHAPES[shape]["n_embd"]
    F = 4 * C
    copies = max(2, 2**30 // (2 * F * C * 2))
    k = torch.rand(batch, C, device="cuda", dtype=torch.float16) + 0.01
    residual = torch.randn(batch, C, device="cuda", dtype=torch.float16)
    weights = []
    for _ in range(copies):
        key = torch.randn(F, C, device="cuda", dtype=torch.float16).abs_() * C**-0.5  # live rows: act > 0
        key[torch.rand(F, device="cuda") >= density] = -1.0 / C
        weights.append((key, (torch.randn(F, C, device="cuda", dtype=torch.float16) * F**-0.5).t()))
    active = (torch.relu(k @ weights[0][0].t()) != 0).any(0).float().mean().item()
    rows = []
    for backend in ("torch", "triton"):
        for key, value in weights[:2]:  # compile and warm up outside the graph
            channel_mix(k, key, value, residual, backend=backend)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for key, value in weights:
                channel_mix(k, key, value, residual, backend=backend)
        seconds = statistics.median(call_seconds(graph.replay, "cuda", 20, 3)) / copies
        dense = (2 * F * C * 2) / bandwidth
        rows.append({"shape": shape, "batch": batch, "density": density, "rows_read": active, "backend": backend,
                     "us": seconds * 1e6, "dense_floor_us": dense * 1e6, "share_of_dense_floor": dense / seconds})  # fmt: skip
        print(f"  channel mix {shape} B={batch} density {density:.2f} (rows read {active:.2f}) {backend}: "
              f"{seconds * 1e6:.1f} us, {100 * dense / seconds:.0f}% of the dense floor", flush=True)  # fmt: skip
    del weights, graph
    torch.cuda.empty_cache()
    return rows


def run(args) -> dict:
    device = torch.device("cuda")
    card = torch.cuda.get_device_name(device)
    bandwidth = copy_bandwidth(device)
    rate = matmul_rate(device) if args.prefill_batches else None
    print(f"{card}: device-to-device copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    rows, prefill, official, ffn = [], [], [], []
    for shape in args.shapes:
        for density in args.ffn_densities:
            for batch in (1, 8):
                ffn += channel_mix_rows(shape, batch, density, bandwidth)
        cfg = config_for(shape)
        t0 = time.time()
        tensors = random_checkpoint(cfg, seed=0, dtype=torch.float16, device=device)
        model = Model.from_tensors(tensors, cfg, device=device, dtype=torch.float16)
        official_here = args.official and shape in args.official_shapes
        if not official_here:
            del tensors
        print(f"{shape}: {model.num_params() / 1e9:.2f} B params, built in {time.time() - t0:.0f} s", flush=True)
        for batch in args.batches:
            rows += decode_rows(model, shape, batch, bandwidth, args)
        for batch in args.prefill_batches:
            floor = prefill_flops(model, batch * args.prefill_len, batch) / rate
            for variant in prefill_variants(args):
                t = prefill_time(model, variant, batch, args.prefill_len, args)
                s = t["median_s"]
                prefill.append({"shape": shape, "batch": batch, "length": args.prefill_len, "variant": variant.name,
                                **t, "seconds": s, "tokens_per_s": batch * args.prefill_len / s,
                                "matmul_floor_ms": floor * 1e3, "share_of_floor": floor / s})  # fmt: skip
                print(f"  prefill B={batch} T={args.prefill_len} {variant.name}: {batch * args.prefill_len / s:,.0f} "
                      f"tok/s, {100 * floor / s:.0f}% of the fp16 matmul floor{flag(t)}", flush=True)  # fmt: skip
        del model
        torch.cuda.empty_cache()
        if official_here:
            t = official_time(tensors, args.workdir, args)
            del tensors
            official.append({"shape": shape, "batch": 1, **t, "tokens_per_s": 1 / t["median_s"]})
            print(f"  official rwkv package ({OFFICIAL_SETUP}), batch 1: {1 / t['median_s']:,.1f} tok/s{flag(t)}",
                  flush=True)  # fmt: skip
    return {"card": card, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "copy_bandwidth_bytes_per_s": bandwidth, "ours": OURS.name, "official_setup": OFFICIAL_SETUP,
            "method": {"timer": "wall clock per call, device synchronised", "repeats": args.repeats,
                       "calls": args.steps, "warmup": WARMUP, "max_spread": args.max_spread},
            "matmul_flops_per_s": rate, "decode": rows, "prefill": prefill, "official": official,
            **({"channel_mix": ffn} if ffn else {})}  # fmt: skip


def flag(t: dict) -> str:
    return f"  UNSTABLE (spread {t['spread']:.0%} after {t['attempts']} attempts)" if t.get("unstable") else ""


def variants_of(args) -> list[Variant]:
    """--variants: "all" (all but the opt-in ones: chunked prefill, GEMV), "default" (OURS) or
    comma-separated indices into VARIANTS."""
    if args.variants == "all":
        return [v for v in VARIANTS if v not in OPT_IN]
    if args.variants == "default":
        return [OURS]
    return [VARIANTS[int(i)] for i in args.variants.split(",")]


def prefill_variants(args) -> list[Variant]:
    """The prompt is timed for the first and last variant asked for, the default (OURS) and every
    variant with its own prefill backend (the chunked WKV kernel), in the order asked."""
    variants = variants_of(args)
    return list(dict.fromkeys(v for i, v in enumerate(variants)
                              if i in (0, len(variants) - 1) or v is OURS or v.wkv_prefill))  # fmt: skip


def decode_rows(model, shape, batch, bandwidth, args) -> list[dict]:
    rows = []
    slot_bytes = {dt: model.state_layout.slot_nbytes(dt) for dt in (torch.float32, torch.float16)}
    variants = [v for v in variants_of(args) if v.wkv_prefill is None]  # a prefill backend leaves decode as is
    variants = variants + ([REFERENCE] if batch in (1, 64) and args.variants == "all" and not args.no_reference else [])
    for variant in variants:
        for graphs in (True,) if args.graphs_only else (False, True):
            t = decode_time(model, variant, batch, graphs, args)
            s = t["median_s"]
            moved = weight_bytes(model, batch) + 2 * batch * slot_bytes[variant.state_dtype]
            floor = moved / bandwidth
            rows.append({"shape": shape, "batch": batch, "variant": variant.name, "graphs": graphs, **t,
                         "step_ms": s * 1e3, "tokens_per_s": batch / s, "floor_ms": floor * 1e3,
                         "floor_ratio": s / floor, "share_of_floor": floor / s,
                         "state_dtype": dtype_name(variant.state_dtype)})  # fmt: skip
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
    share = any("share_of_floor" in r for r in result["decode"])  # runs before that column rendered without it
    for shape in dict.fromkeys(r["shape"] for r in result["decode"]):
        out += [f"## {shape} ({card})", "", "| batch | variant | graphs | step ms | tokens/s | spread | floor ms | x floor |"
                + (" share of floor |" if share else ""), "|---|---|---|---|---|---|---|---|" + ("---|" if share else "")]  # fmt: skip
        for r in (r for r in result["decode"] if r["shape"] == shape):
            out.append(f"| {r['batch']} | {r['variant']} | {'on' if r['graphs'] else 'off'} | {r['step_ms']:.3f} | "
                       f"{r['tokens_per_s']:,.0f} | {_spread(r)} | {r['floor_ms']:.3f} | {r['floor_ratio']:.2f} |"
                       + (f" {100 / r['floor_ratio']:.0f}% |" if share else ""))  # fmt: skip
        out.append("")
    out += official_table(result) + channel_mix_table(result)
    if result["prefill"]:
        floors = any("matmul_floor_ms" in r for r in result["prefill"])
        out += [f"## Prefill ({card})", ""]
        if floors:
            out += [f"fp16 matmul floor: 2 FLOPs per layer weight per token over the measured 8192^3 fp16 matmul "
                    f"rate ({result['matmul_flops_per_s'] / 1e12:,.0f} TFLOP/s).", ""]  # fmt: skip
        out += ["| shape | batch | prompt | variant | tokens/s | spread |" + (" matmul floor ms | share of floor |" if floors else ""),
                "|---|---|---|---|---|---|" + ("---|---|" if floors else "")]  # fmt: skip
        for r in result["prefill"]:
            tail = f" {r['matmul_floor_ms']:.2f} | {100 * r['share_of_floor']:.0f}% |" if floors else ""
            out.append(f"| {r['shape']} | {r['batch']} | {r['length']} | {r['variant']} | {r['tokens_per_s']:,.0f} | "
                       f"{_spread(r)} |" + tail)  # fmt: skip
    return "\n".join(out) + "\n"


def channel_mix_table(result: dict) -> list[str]:
    """The feed-forward alone at fixed activation densities (runs with --ffn-densities)."""
    if not result.get("channel_mix"):
        return []
    out = [f"## Feed-forward alone at fixed activation densities ({result['card']})", "",
           "Dense floor: K and V read once over the copy bandwidth. `torch`: cuBLAS, relu, square, cuBLAS, add; "
           "`triton`: the sparse channel mix (3 launches).", "",
           "| shape | batch | density | rows of V read | backend | us | share of dense floor |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["channel_mix"]:
        out.append(f"| {r['shape']} | {r['batch']} | {r['density']:.2f} | {r['rows_read']:.2f} | {r['backend']} | "
                   f"{r['us']:.1f} | {100 * r['share_of_dense_floor']:.0f}% |")  # fmt: skip
    return out + [""]


def official_table(result: dict) -> list[str]:
    """Official package against ours with and without CUDA graphs, one fixed configuration of ours
    (the runtime's default, named in advance, not the fastest of the variants measured)."""
    if not result.get("official"):
        return []
    ours = result.get("ours", OLD_DEFAULT)
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
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",") if b], default=[1, 8, 64, 256])
    parser.add_argument("--prefill-batches", type=lambda s: [int(b) for b in s.split(",") if b], default=[1, 8])
    parser.add_argument("--prefill-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20, help="timed calls per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every measurement (their spread is checked)")
    parser.add_argument("--max-spread", type=float, default=MAX_SPREAD, help="spread above which a row is re-run")
    parser.add_argument("--variants", default="all",
                        help='"all" (every variant but 9-11: chunked WKV prefill, GEMV everywhere), "default" (only the runtime\'s default) or indices into VARIANTS, e.g. 6,7,8')
    parser.add_argument("--official", action="store_true", help="also time the official rwkv package at batch 1")
    parser.add_argument("--official-shapes", type=lambda s: s.split(","), default=list(SHAPES))
    parser.add_argument("--ffn-densities", type=lambda s: [float(d) for d in s.split(",") if d], default=[],
                        help="also time the feed-forward alone at these activation densities (e.g. 0.1,0.5,1)")
    parser.add_argument("--graphs-only", action="store_true", help="skip the eager rows")
    parser.add_argument("--no-reference", action="store_true", help="skip the pytorch-reference rows")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"), help="where the official package's .pth goes")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    result = run(args)
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
