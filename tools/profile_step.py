"""Where a decode step's (and a long prefill's) GPU time goes, kernel by kernel.

    python tools/profile_step.py --out DIR [--shapes 0.1B,1.5B,7.2B] [--batches 1,256]
    python tools/profile_step.py --ncu-step --shapes 1.5B --batches 1   (one eager step in an
                                  NVTX range "step", for `ncu --nvtx --nvtx-include step/`)

Random fp16 weights with the released models' shapes, contiguous fp16 state, every fused
kernel (the model's default backends on CUDA). For each shape and batch:
- the step time of a CUDA-graph replay (median) against the dense floor (weight bytes read once
  + state bytes read and written, over the measured device-to-device copy bandwidth);
- torch.profiler over eager steps: every kernel with the op that launched it (and that op's
  input shapes) and the part of the layer it belongs to (time mix, channel mix, norms and
  residual adds, head), so launches per layer are counted, not guessed;
- torch.profiler over graph replays: the same kernels' durations inside the graph, their
  bytes (counted from the shapes, see `kernel_bytes`) and achieved bandwidth, and the idle
  time between kernels (step time minus the sum of kernel times);
- a per-layer roll-up: kernel time of one layer against that layer's share of the floor.
Then one 4,096-token prompt (batch 1) per shape: tokens/s, the fp16 matmul floor (2 FLOPs per
weight per token over the measured 8192^3 fp16 matmul rate) and the kernel time by category.
Writes DIR/profile.json (everything) and DIR/profile.md (the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_decode import SHAPES, config_for, copy_bandwidth, matmul_rate, weight_bytes  # noqa: E402
from common import call_seconds  # noqa: E402
from rwkvstate import Model  # noqa: E402
from rwkvstate.model.synthetic import random_checkpoint  # noqa: E402
from rwkvstate.runtime.graphs import DecodeGraphs  # noqa: E402

ELEM = {"c10::Half": 2, "c10::BFloat16": 2, "float": 4, "long int": 8, "long": 8, "int": 4, "bool": 1}
PARTS = {"_time_mix": "time_mix", "_channel_mix": "channel_mix", "_head": "head"}


def label_model_parts() -> None:
    """Wraps the model's sub-layer methods in profiler ranges (this process only)."""
    for method, label in PARTS.items():
        fn = getattr(Model, method)

        def wrapped(self, *args, __fn=fn, __label=label, **kwargs):
            with record_function(__label):
                return __fn(self, *args, **kwargs)

        setattr(Model, method, wrapped)


# ---- trace parsing ---------------------------------------------------------------------------
def trace_events(prof, path: Path) -> list[dict]:
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    path.unlink()
    return [e for e in events if e.get("ph") == "X"]


def gpu_events(events) -> list[dict]:
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return sorted(gpu, key=lambda e: e["ts"])


def enclosing(events_by_tid, tid, ts, cats):
    """Innermost event of a category in `cats` on thread tid whose span contains ts."""
    best = None
    for e in events_by_tid.get(tid, ()):
        if e["cat"] in cats and e["ts"] <= ts <= e["ts"] + e["dur"] and (best is None or e["dur"] < best["dur"]):
            best = e
    return best


def attribute(events) -> list[dict]:
    """Every GPU event with the CPU op that launched it, that op's input dims/types, and its label."""
    by_tid = defaultdict(list)
    launches = {}
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation"):
            by_tid[e["tid"]].append(e)
        elif e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = e
    gpu_ranges = [e for e in events if e.get("cat") == "gpu_user_annotation" and e["name"] in PARTS.values()]
    rows = []
    for k in gpu_events(events):
        launch = launches.get(k.get("args", {}).get("correlation"))
        op = label = None
        if launch is not None:
            op = enclosing(by_tid, launch["tid"], launch["ts"], ("cpu_op",))
            ann = enclosing(by_tid, launch["tid"], launch["ts"], ("user_annotation",))
            label = ann["name"] if ann and ann["name"] in PARTS.values() else None
        if label is None:  # no launch record (e.g. a driver-API launch): the GPU-side range
            inside = [g for g in gpu_ranges if g["ts"] <= k["ts"] <= g["ts"] + g["dur"]]
            label = inside[0]["name"] if inside else None
        args = op["args"] if op else {}
        rows.append({"kernel": k["name"], "dur_us": k["dur"], "op": op["name"] if op else None,
                     "dims": args.get("Input Dims"), "types": args.get("Input type"),
                     "part": label or "norms+residual"})  # fmt: skip
    return rows


# ---- bytes each kernel must move -------------------------------------------------------------
def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def op_bytes(row) -> int | None:
    """Bytes in + out of an aten op from its recorded input shapes (output ~ its largest input;
    mm: M*N; index: the gathered rows only)."""
    dims, types = row["dims"], row["types"]
    if not dims:
        return None
    tensors = [(d, ELEM.get(t, 2)) for d, t in zip(dims, types or []) if isinstance(d, list) and d]
    if not tensors:
        return None
    if row["op"] in ("aten::mm", "aten::addmm"):
        (a, ea), (b, eb) = tensors[-2], tensors[-1]
        return a[0] * a[1] * ea + b[0] * b[1] * eb + a[0] * b[1] * ea
    if row["op"] == "aten::index" and len(tensors) >= 2:
        (table, e), (idx, ei) = tensors[0], tensors[1]
        return 2 * _numel(idx) * table[-1] * e + _numel(idx) * ei
    ins = sum(_numel(d) * e for d, e in tensors)
    out = max(_numel(d) * e for d, e in tensors)
    return ins + out


def triton_bytes(row, T, C, N, state_elem, lora_rows=0) -> int | None:
    """Bytes of the fused Triton kernels (fp16 compute), from ops/README.md."""
    name = row["kernel"]
    if "wkv7" in name:
        return 2 * T * C * N * state_elem + T * C * (5 * 2 + 4) + T * C * 4
    if "token_shift_mix" in name:
        K = 6 if row["part"] == "time_mix" else 1
        return T * C * 2 + 2 * T * C * state_elem + K * T * C * 2 + K * C * 2
    if "prologue" in name:
        return 6 * T * C * 2 + T * C * 4 + 4 * T * C * 2
    if "epilogue" in name:
        return T * C * 4 + 5 * T * C * 2
    if "_gemv_rows" in name:  # the sparse channel mix's value projection (F = 4C), counted dense
        return 4 * C * C * 2 + 4 * T * C * 2
    if "_lora_" in name:  # one stack ([R, C], R ~ C / 4 at 1.5B-7.2B) plus 3-4 rows of C in or out
        return lora_rows * C * 2 + 4 * T * C * 2
    if "_norm_shift" in name:  # x (and delta, x_out), the state row read and written, K mixes out
        K = 6 if row["part"] == "time_mix" else 1
        return 3 * T * C * 2 + 2 * T * C * state_elem + K * T * C * 2
    return None


# ---- decode ----------------------------------------------------------------------------------
def median_seconds(fn, calls: int, warmup: int = 3) -> float:
    """Median wall-clock seconds of `calls` calls, device synchronised around each (the common timer)."""
    return statistics.median(call_seconds(fn, "cuda", calls, warmup))


def new_pool(model, batch):
    pool = model.new_pool(batch, state_dtype=torch.float16)
    for layer in range(model.config.n_layer):
        for part in pool.layer(layer):
            part.normal_().mul_(0.5)
    return pool


def profile_decode(model, batch, bandwidth, steps, workdir) -> dict:
    cfg = model.config
    pool = new_pool(model, batch)
    runner = DecodeGraphs(model, pool, batch_sizes=[batch])
    slots = list(range(batch))
    tokens = torch.randint(0, cfg.vocab_size, (batch,)).tolist()
    step_s = median_seconds(lambda: runner.decode(slots, tokens), steps)
    graph, _ = runner._graphs[batch]
    replay_s = median_seconds(graph.replay, steps)
    slot_t = torch.tensor(slots, device=model.device)
    tok_t = torch.tensor(tokens, device=model.device)
    for _ in range(2):
        model.decode_step(pool, slot_t, tok_t)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        model.decode_step(pool, slot_t, tok_t)
        torch.cuda.synchronize()
    eager = attribute(trace_events(prof, workdir / "eager.json"))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    in_graph = gpu_events(trace_events(prof, workdir / "graph.json"))
    del runner, pool
    torch.cuda.empty_cache()
    return summarise_decode(model, batch, bandwidth, step_s, replay_s, eager, in_graph)


def summarise_decode(model, batch, bandwidth, step_s, replay_s, eager, in_graph) -> dict:
    cfg = model.config
    C, N, L = cfg.n_embd, cfg.head_size, cfg.n_layer
    n = len(eager)
    graph_ok = len(in_graph) == 3 * n and n > 0
    for i, row in enumerate(eager):
        row["graph_us"] = in_graph[i]["dur"] if graph_ok else None  # same kernels, same order
        lora_rows = model.weights.layers[min(1, L - 1)].lora.down.shape[0]
        row["bytes"] = triton_bytes(row, batch, C, N, 2, lora_rows) if row["op"] is None else op_bytes(row)
        us = row["graph_us"] or row["dur_us"]
        row["gb_per_s"] = row["bytes"] / us / 1e3 if row["bytes"] else None
    slot_bytes = model.state_layout.slot_nbytes(torch.float16)
    moved = weight_bytes(model, batch) + 2 * batch * slot_bytes
    floor_s = moved / bandwidth
    layer_w = sum(t.numel() * t.element_size() for t in vars_tensors(model.weights.layers[min(1, L - 1)]))
    layer_floor_us = (layer_w + 2 * batch * slot_bytes / L) / bandwidth * 1e6
    per_part = defaultdict(lambda: {"launches": 0, "us": 0.0, "bytes": 0})
    for row in eager:
        p = per_part[row["part"]]
        p["launches"] += 1
        p["us"] += row["graph_us"] or row["dur_us"]
        p["bytes"] += row["bytes"] or 0
    kernel_sum_us = sum(r["graph_us"] or r["dur_us"] for r in eager)
    return {
        "batch": batch, "step_ms": step_s * 1e3, "replay_ms": replay_s * 1e3, "tokens_per_s": batch / step_s,
        "floor_ms": floor_s * 1e3, "share_of_floor": floor_s / step_s, "kernels_per_step": n,
        "kernel_sum_ms": kernel_sum_us / 1e3, "idle_ms": replay_s * 1e3 - kernel_sum_us / 1e3,
        "graph_durations_matched": graph_ok, "layer_weight_bytes": layer_w, "layer_floor_us": layer_floor_us,
        "per_part": {k: dict(v, launches_per_layer=v["launches"] / (L if k != "head" else 1)) for k, v in per_part.items()},
        "layer_kernels": layer_rows(eager, L), "kernels": eager,
    }  # fmt: skip


def vars_tensors(lw) -> list[torch.Tensor]:
    out = []
    for v in vars(lw).values():
        out += [t for t in (v if isinstance(v, tuple) else (v,)) if torch.is_tensor(t)]
    return out


def layer_rows(eager, L) -> list[dict]:
    """The kernels of the middle layer. A layer ends with the residual add after its channel-mix
    kernels, so layers are cut at the first other kernel after each run of channel-mix ones."""
    layers, current, prev = [], [], None
    for row in eager:
        if row["part"] == "head":
            break
        current.append(row)
        if prev == "channel_mix" and row["part"] != "channel_mix":
            layers.append(current)
            current = []
        prev = row["part"]
    return layers[L // 2] if len(layers) > L // 2 else []


# ---- prefill ---------------------------------------------------------------------------------
def profile_prefill(model, length, rate, workdir) -> dict:
    cfg = model.config
    pool = new_pool(model, 1)
    prompt = [torch.randint(0, cfg.vocab_size, (length,)).tolist()]
    seconds = median_seconds(lambda: model.forward(pool, [0], prompt, output="last"), 3, 1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        model.forward(pool, [0], prompt, output="last")
        torch.cuda.synchronize()
    rows = attribute(trace_events(prof, workdir / "prefill.json"))
    by_cat = defaultdict(float)
    for r in rows:
        by_cat[category(r)] += r["dur_us"]
    params = (weight_bytes(model, 0) - model.weights.head.numel() * 2) / 2  # every layer weight once per token
    flops = 2 * params * length + 2 * model.weights.head.numel()
    floor_s = flops / rate
    del pool
    torch.cuda.empty_cache()
    return {"length": length, "seconds": seconds, "tokens_per_s": length / seconds, "matmul_floor_ms": floor_s * 1e3,
            "share_of_floor": floor_s / seconds, "kernel_ms_by_category": {k: v / 1e3 for k, v in by_cat.items()},
            "kernels": len(rows)}  # fmt: skip


def category(row) -> str:
    name = row["kernel"]
    if row["op"] in ("aten::mm", "aten::addmm", "aten::bmm") or "gemm" in name.lower() or "sm90" in name:
        return "gemm"
    for key in ("wkv7_chunk", "wkv7", "token_shift", "norm_shift", "prologue", "epilogue"):
        if key in name:
            return key
    return "other"


# ---- report ----------------------------------------------------------------------------------
def markdown(result) -> str:
    out = [f"# Decode step profile, {result['card']}, {result['date']}", "",
           f"torch {result['torch']}, triton {result['triton']}; copy bandwidth {result['copy_bw'] / 1e9:,.0f} GB/s; "
           f"fp16 matmul {result['matmul_rate'] / 1e12:,.0f} TFLOP/s. Random fp16 weights, contiguous fp16 state, "
           "all fused kernels; kernel times are in-graph (torch.profiler over CUDA-graph replays).", ""]  # fmt: skip
    for s in result["shapes"]:
        for d in s["decode"]:
            out += [f"## {s['shape']}, batch {d['batch']}", "",
                    f"step {d['step_ms']:.3f} ms (replay alone {d['replay_ms']:.3f}), {d['tokens_per_s']:,.0f} tok/s, "
                    f"floor {d['floor_ms']:.3f} ms = {100 * d['share_of_floor']:.0f}% of floor; {d['kernels_per_step']} "
                    f"kernels, their sum {d['kernel_sum_ms']:.3f} ms, idle between them {d['idle_ms']:.3f} ms. "
                    f"One layer's floor {d['layer_floor_us']:.1f} us.", "",
                    "| part | launches per layer | us per layer | GB/s |", "|---|---|---|---|"]  # fmt: skip
            L = s["n_layer"]
            for part, p in d["per_part"].items():
                div = 1 if part == "head" else L
                gbs = p["bytes"] / p["us"] / 1e3 if p["us"] else 0
                out.append(f"| {part} | {p['launches_per_layer']:.1f} | {p['us'] / div:.1f} | {gbs:,.0f} |")
            out += ["", "| kernel | op | dims | us | GB/s |", "|---|---|---|---|---|"]
            for r in d["layer_kernels"]:
                us = r["graph_us"] or r["dur_us"]
                gbs = f"{r['gb_per_s']:,.0f}" if r["gb_per_s"] else ""
                out.append(f"| {r['kernel'][:60]} | {r['op'] or 'triton'} | {r['dims'] if r['op'] else ''} | {us:.1f} | {gbs} |")
            out.append("")
        p = s.get("prefill")
        if p:
            cats = ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(p["kernel_ms_by_category"].items(), key=lambda kv: -kv[1]))
            out += [f"## {s['shape']}, prefill of one {p['length']}-token prompt", "",
                    f"{p['seconds'] * 1e3:.1f} ms, {p['tokens_per_s']:,.0f} tok/s; fp16 matmul floor "
                    f"{p['matmul_floor_ms']:.1f} ms = {100 * p['share_of_floor']:.0f}% of floor; kernels: {cats}", ""]  # fmt: skip
    return "\n".join(out) + "\n"


def run(args) -> dict:
    device = torch.device("cuda")
    label_model_parts()
    import triton

    bandwidth, rate = copy_bandwidth(device), matmul_rate(device)
    print(f"copy {bandwidth / 1e9:,.0f} GB/s, fp16 matmul {rate / 1e12:,.0f} TFLOP/s", flush=True)
    result = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "triton": triton.__version__, "copy_bw": bandwidth, "matmul_rate": rate, "shapes": []}  # fmt: skip
    for shape in args.shapes:
        cfg = config_for(shape)
        model = Model.from_tensors(random_checkpoint(cfg, 0, torch.float16, device), cfg, device, torch.float16)
        entry = {"shape": shape, "n_layer": cfg.n_layer, "decode": []}
        for batch in args.batches:
            d = profile_decode(model, batch, bandwidth, args.steps, args.out)
            entry["decode"].append(d)
            print(f"{shape} B={batch}: {d['step_ms']:.3f} ms, {100 * d['share_of_floor']:.0f}% of floor, "
                  f"{d['kernels_per_step']} kernels, idle {d['idle_ms']:.3f} ms", flush=True)  # fmt: skip
        if args.prefill_len:
            entry["prefill"] = p = profile_prefill(model, args.prefill_len, rate, args.out)
            print(f"{shape} prefill {p['length']}: {p['tokens_per_s']:,.0f} tok/s, "
                  f"{100 * p['share_of_floor']:.0f}% of matmul floor", flush=True)  # fmt: skip
        result["shapes"].append(entry)
        save(args.out, result)  # after every shape: a timeout keeps what was measured
        del model
        torch.cuda.empty_cache()
    return result


def ncu_step(args) -> None:
    """One eager decode step inside NVTX range "step", after a warm-up outside it."""
    device = torch.device("cuda")
    cfg = config_for(args.shapes[0])
    model = Model.from_tensors(random_checkpoint(cfg, 0, torch.float16, device), cfg, device, torch.float16)
    batch = args.batches[0]
    pool = new_pool(model, batch)
    slots = torch.arange(batch, device=device)
    tokens = torch.randint(0, cfg.vocab_size, (batch,), device=device)
    for _ in range(2):
        model.decode_step(pool, slots, tokens)
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("step")
    model.decode_step(pool, slots, tokens)
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=lambda s: s.split(","), default=list(SHAPES))
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 256])
    parser.add_argument("--prefill-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--ncu-step", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    args = parser.parse_args(argv)
    if args.ncu_step:
        return ncu_step(args)
    args.out.mkdir(parents=True, exist_ok=True)
    print(save(args.out, run(args)))


def save(out: Path, result: dict) -> str:
    (out / "profile.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (out / "profile.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
