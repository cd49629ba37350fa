#!/usr/bin/env python3
"""Albatross (BlinkDL's RWKV-7 inference engine) beside rwkvstate on one GPU: decode at batch 1
and 256 and one 4,096-token prefill, on the same random-weight checkpoint.

The peer's code is fetched, never committed: put an unchanged export of its `faster3a_2605/`
folder (its `rwkv7_fast_v3a.py` and `cuda/`, commit 343147a333fcd6dd0845de0d165089685402c012 of
github.com/BlinkDL/Albatross, 2026-06-24) under `.peers/albatross/` (git-ignored) and carry
`.peers` to the GPU machine. It needs torch and nvcc only (its CUDA extensions are compiled with
torch.utils.cpp_extension.load into $TORCH_EXTENSIONS_DIR, default /tmp/albatross_torch_ext).

For one shape (--shape 0.1B | 1.5B | 7.2B):
  1. makes (or reuses) an official-format .pth of random fp16 weights with
     rwkvstate.model.synthetic (seed 0, bench_decode.py's shapes), emb.weight and
     blocks.0.ln0.* in bf16 as in released files (the peer's loader takes nothing else);
     rwkvstate's Model.load reads the same file;
  2. loads it with the peer's RWKV7 (its defaults: fp16 WKV state unless --wkv fp32io16,
     embedding on the CPU, its sparse feed-forward for small batches);
  3. for decode B=1, decode B=256 and prefill B=1 T=--prefill-len measures: "peer_bench", the
     peer's own bench_case() (a CUDA graph of its forward, CUDA-event time of replays, p50);
     "graph", the same captured graph timed by benchmarks/common.py's measure (the timer of
     bench_decode.py); "graph_with_embed", that plus the peer's host-side embedding. Only the
     last position's logits are computed, as in the peer's benchmark;
  4. unless --no-check, compares the peer's logits with rwkvstate's (fp16 compute, fp32 state)
     after a 64-token prompt and one decode token.
Writes one JSON object to --out (after every case, so a timeout keeps what finished). Run
bench_decode.py in the same call for rwkvstate's figures.

    PYTHONPATH=src python benchmarks/bench_albatross.py --shape 1.5B --out albatross-1.5B.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEER_DIR = REPO / ".peers" / "albatross" / "faster3a_2605"
PEER_INFO = {
    "name": "Albatross (BlinkDL)",
    "repo": "github.com/BlinkDL/Albatross",
    "commit": "343147a333fcd6dd0845de0d165089685402c012",
    "commit_date": "2026-06-24",
    "read_from": "mirror github:AUXStar/Albatross (its main = upstream through 343147a, plus one later fork commit not used)",
    "path": "faster3a_2605/rwkv7_fast_v3a.py",
    "setup": "peer defaults: wkv fp16 state (unless --wkv fp32io16), emb on CPU, cmix_sparse no-fc, "
             "lowrank both, orig_linear_groups att_c2c,ffn_key,head, no PP, CUDA graph per (B,T)",
}
BF16_KEYS = ("emb.weight", "blocks.0.ln0.weight", "blocks.0.ln0.bias")  # as in released checkpoints

os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/albatross_torch_ext")  # outside the repository
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))

for p in (REPO / "benchmarks", REPO / "src"):  # src ends up first (PYTHONPATH=src puts it there anyway)
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402


def log(msg: str) -> None:
    print(f"[run_albatross] {msg}", flush=True)


from bench_decode import SHAPES, config_for  # noqa: E402  (benchmarks/ is on sys.path)
from common import measure as _measure  # noqa: E402

TIMER = "benchmarks/common.py:measure"


# ---- checkpoint ------------------------------------------------------------------------------
def ensure_checkpoint(shape: str, path: Path, seed: int) -> tuple[Path, dict]:
    cfg = config_for(shape)
    meta = {"shape": shape, "config": {k: getattr(cfg, k) for k in (
        "n_layer", "n_embd", "head_size", "vocab_size", "ffn_dim", "decay_rank", "aaa_rank", "mv_rank", "gate_rank")},
        "seed": seed, "dtype": "float16 (emb.weight, blocks.0.ln0.* bfloat16)",
        "made_by": "rwkvstate.model.synthetic.random_checkpoint + save_checkpoint"}  # fmt: skip
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        try:
            if json.loads(meta_path.read_text()) == meta:
                log(f"reusing checkpoint {path} ({path.stat().st_size / 2**30:.2f} GiB)")
                return path, meta
        except Exception:
            pass
    from rwkvstate.model.synthetic import random_checkpoint, save_checkpoint

    t0 = time.time()
    path.parent.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tensors = random_checkpoint(cfg, seed=seed, dtype=torch.float16, device=dev)
    for k in list(tensors):  # to CPU one at a time (never two copies of the model on the GPU)
        v = tensors[k]
        if k in BF16_KEYS:
            v = v.to(torch.bfloat16)
        tensors[k] = v.to("cpu").contiguous()
    if dev == "cuda":
        torch.cuda.empty_cache()
    tmp = path.with_name(path.name + ".tmp")
    save_checkpoint(tensors, tmp)  # .pth (zip format), official key names and [1,1,C] vectors
    os.replace(tmp, path)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    del tensors
    log(f"wrote checkpoint {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.time() - t0:.0f} s")
    return path, meta


# ---- the peer --------------------------------------------------------------------------------
def import_peer(ckpt: Path, wkv: str):
    if str(PEER_DIR) not in sys.path:
        sys.path.insert(0, str(PEER_DIR))
    import rwkv7_fast_v3a as peer  # the peer's module, unchanged

    # the same globals the peer's own main() sets from its argparse defaults
    peer.MODEL_PATH = str(ckpt)
    peer.WKV_MODE = wkv
    peer.EMB_DEVICE = "cpu"
    peer.RKV_MODE = "off"
    peer.CMIX_SPARSE = "no-fc"
    peer.LOWRANK_WEIGHT = "both"
    peer.ORIG_LINEAR_GROUPS = peer.parse_orig_linear_groups("att_c2c,ffn_key,head")
    peer.PP_DEVICES = []
    return peer


def peer_tokens(peer, B: int, T: int) -> torch.Tensor:
    """The peer's bench_case() tokens (CPU, since the peer keeps the embedding on the CPU)."""
    t = torch.arange(B * T, dtype=torch.long).view(B, T)
    return (t * 1103515245 + 12345) % peer.V


def run_peer_bench(peer, model, B: int, T: int, warmup: int, iters: int) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        peer.bench_case(model, B, T, warmup, iters, False)
    text = buf.getvalue()
    sys.stdout.write(text)
    m = re.search(r"RESULT B=(\d+) T=(\d+) iters=(\d+) p10_ms=([\d.]+) p50_ms=([\d.]+) p90_ms=([\d.]+) "
                  r"tok_s_p50=([\d.]+)", text)  # fmt: skip
    if not m:
        return {"error": "no RESULT line", "stdout": text[-2000:]}
    p10, p50, p90, tok = (float(m.group(i)) for i in (4, 5, 6, 7))
    return {"method": "peer bench_case: CUDA-event time of graph.replay(), p50 of iters (embedding outside)",
            "warmup": warmup, "iters": iters, "p10_ms": p10, "p50_ms": p50, "p90_ms": p90, "tokens_per_s": tok}


def run_ours_timer(peer, model, B: int, T: int, warmup: int, repeats: int, calls: int) -> dict:
    """The peer's forward captured exactly as its bench_case() does, timed by the repo's timer."""
    state = model.zero_state(B)
    tokens = peer_tokens(peer, B, T)
    path = peer.select_path(B, T)
    x = model.embed(tokens)  # the peer's cached (B,T) device input buffer
    for _ in range(max(1, warmup)):
        model.forward_from_x(x, state, path)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        model.forward_from_x(x, state, path)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph, stream=stream):
        out = model.forward_from_x(x, state, path)
    torch.cuda.synchronize()
    # the embedding writes into the captured buffer (emb on CPU: embed() returns the cached tensor)
    same_buffer = model.embed(tokens).data_ptr() == x.data_ptr()

    res = {}
    t = _measure(graph.replay, "cuda", repeats, calls, warmup)
    res["graph"] = {**t, "tokens_per_s": B * T / t["median_s"], "timer": TIMER, "repeats": repeats, "calls": calls}
    if same_buffer:
        def step():
            model.embed(tokens)
            graph.replay()

        t = _measure(step, "cuda", repeats, calls, warmup)
        res["graph_with_embed"] = {**t, "tokens_per_s": B * T / t["median_s"], "timer": TIMER,
                                   "repeats": repeats, "calls": calls}  # fmt: skip
    else:
        res["graph_with_embed"] = {"error": "peer embed() did not reuse the captured input buffer"}
    graph.replay()
    torch.cuda.synchronize()
    res["logits_shape"] = list(out.shape)
    res["logits_finite"] = bool(torch.isfinite(out).all().item())
    del graph, out, state, x
    torch.cuda.empty_cache()
    return res


def check_against_ours(peer, model, ckpt: Path, n_prompt: int = 64) -> dict:
    from rwkvstate import Model

    ours = Model.load(ckpt, device="cuda", dtype=torch.float16, progress=False)
    prompt = [int(t) for t in peer_tokens(peer, 1, n_prompt + 1).view(-1)]
    pool = ours.new_pool(1, state_dtype=torch.float32)
    o1 = ours.forward(pool, [0], [prompt[:n_prompt]]).float()[0]
    o2 = ours.forward(pool, [0], [prompt[n_prompt:]]).float()[0]
    state = model.zero_state(1)
    p1 = model.forward(torch.tensor([prompt[:n_prompt]]), state).float().reshape(-1)
    p2 = model.forward(torch.tensor([prompt[n_prompt:]]), state).float().reshape(-1)
    torch.cuda.synchronize()

    def cmp(a, b):
        return {"cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
                "max_abs_diff": float((a - b).abs().max()), "ours_absmax": float(a.abs().max()),
                "argmax_equal": bool(a.argmax() == b.argmax()), "finite": bool(torch.isfinite(b).all())}  # fmt: skip

    res = {"prompt_tokens": n_prompt, "after_prompt": cmp(o1, p1), "after_one_decode_token": cmp(o2, p2),
           "ours": "rwkvstate Model.load(fp16 compute), fp32 state"}  # fmt: skip
    del ours, pool
    torch.cuda.empty_cache()
    return res


def nvcc_version() -> str:
    import subprocess

    try:
        from torch.utils.cpp_extension import CUDA_HOME

        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else "nvcc"
        return subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[-1]
    except Exception as e:
        return f"unknown ({type(e).__name__})"


# ---- main ------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.5B")
    ap.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="official-format .pth; default /tmp/rwkvstate-peer-ckpt/rwkv7-random-SHAPE.pth (made if absent)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wkv", choices=("fp16", "fp32io16"), default="fp16",
                    help="peer WKV state: fp16 (its default, fastest) or fp32io16 (fp32 state)")
    ap.add_argument("--decode-batches", default="1,256")
    ap.add_argument("--prefill-len", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peer-iters", type=int, default=10, help="replays timed by the peer's bench_case (README: 10)")
    ap.add_argument("--repeats", type=int, default=5, help="repo timer: medians of --calls calls")
    ap.add_argument("--decode-calls", type=int, default=50)
    ap.add_argument("--prefill-calls", type=int, default=10)
    ap.add_argument("--no-check", action="store_true", help="skip the logits comparison with our runtime")
    ap.add_argument("--prepare-only", action="store_true", help="only make the checkpoint")
    ap.add_argument("--compile-only", action="store_true", help="only compile/load the peer's CUDA extensions")
    args = ap.parse_args()

    if not PEER_DIR.joinpath("rwkv7_fast_v3a.py").exists():
        sys.exit(f"peer sources missing under {PEER_DIR}")
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: the peer runs on CUDA only")
    out = args.out
    ckpt = args.checkpoint or Path(f"/tmp/rwkvstate-peer-ckpt/rwkv7-random-{args.shape}.pth")

    result: dict = {"peer": PEER_INFO, "shape": args.shape, "wkv": args.wkv, "card": torch.cuda.get_device_name(),
                    "torch": torch.__version__, "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d"),
                    "torch_extensions_dir": os.environ["TORCH_EXTENSIONS_DIR"], "results": {}}  # fmt: skip

    def write():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

    if not args.compile_only:
        if args.checkpoint and args.checkpoint.exists():
            result["checkpoint"] = {"path": str(ckpt), "made": False}
        else:
            _, meta = ensure_checkpoint(args.shape, ckpt, args.seed)
            result["checkpoint"] = {"path": str(ckpt), **meta}
        if args.prepare_only:
            return

    peer = import_peer(ckpt, args.wkv)
    result["nvcc"] = nvcc_version()
    t0 = time.time()
    try:
        peer.load_extensions(args.wkv)
    except Exception as e:
        # nvcc 13.0's front end was seen (on a CPU box, torch 2.13 headers) to abort on
        # rwkv7_v3a_ops.cu under -std=c++20 ("internal error ... lexical.c", "catastrophic error");
        # -std=c++17 compiles it. Retry once with that override (nvcc keeps the last -std).
        if "NVCC_APPEND_FLAGS" in os.environ or not any(s in str(e) for s in ("catastrophic error", "internal error")):
            raise
        log("nvcc front-end crash while compiling the peer; retrying with NVCC_APPEND_FLAGS=-std=c++17")
        os.environ["NVCC_APPEND_FLAGS"] = "-std=c++17"
        peer.load_extensions(args.wkv)
    result["nvcc_append_flags"] = os.environ.get("NVCC_APPEND_FLAGS", "")
    result["compile_or_load_extensions_s"] = time.time() - t0
    log(f"peer CUDA extensions ready in {result['compile_or_load_extensions_s']:.0f} s")
    if args.compile_only:
        return

    t0 = time.time()
    model = peer.RWKV7()
    result["peer_model_load_s"] = time.time() - t0
    result["peer_detected"] = {"L": peer.L, "C": peer.C, "H": peer.H, "N": peer.N, "V": peer.V}
    write()

    cases = [(f"decode_b{b}", int(b), 1) for b in args.decode_batches.replace(",", " ").split()]
    cases.append((f"prefill_{args.prefill_len}", 1, args.prefill_len))
    for name, B, T in cases:
        calls = args.decode_calls if T == 1 else args.prefill_calls
        entry: dict = {"batch": B, "tokens_per_sequence": T, "output": "last-position logits [B, V]"}
        log(f"{name}: B={B} T={T}")
        try:
            entry["peer_bench"] = run_peer_bench(peer, model, B, T, args.warmup, args.peer_iters)
            entry.update(run_ours_timer(peer, model, B, T, args.warmup, args.repeats, calls))
            g = entry["graph"]["tokens_per_s"]
            log(f"{name}: peer bench {entry['peer_bench'].get('tokens_per_s', float('nan')):,.1f} tok/s, "
                f"repo timer {g:,.1f} tok/s (graph), "
                f"{entry['graph_with_embed'].get('tokens_per_s', float('nan')):,.1f} tok/s (graph + embedding)")
        except Exception as e:  # keep the other cases
            entry["error"] = f"{type(e).__name__}: {e}"
            entry["traceback"] = traceback.format_exc()[-3000:]
            log(f"{name}: FAILED {entry['error']}")
            torch.cuda.empty_cache()
        result["results"][name] = entry
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        write()

    if not args.no_check:
        try:
            result["check_vs_ours"] = check_against_ours(peer, model, ckpt)
            log(f"check vs ours: {json.dumps(result['check_vs_ours'])}")
        except Exception as e:
            result["check_vs_ours"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            log(f"check vs ours FAILED: {e}")
    write()
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
