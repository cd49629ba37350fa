"""The seed design note's "Estimated Impact" table, measured: each of the six state ideas against
its baseline, in one process, with the workload where that idea matters.

    rwkvstate bench impact --out docs/benchmarks/impact --doc docs/impact.md       # on a GPU
    rwkvstate bench impact --shapes 7.2B --out /tmp/impact-7b                       # one shape per run
    rwkvstate bench impact --merge /tmp/impact-small.json /tmp/impact-7b.json \\
        --out docs/benchmarks/impact --doc docs/impact.md                          # render merged runs
    python benchmarks/bench_impact.py --tiny --out /tmp/impact                      # CPU smoke run

Rows (numbered as in the seed's table):
  1 contiguous state   decode step (CUDA graphs) and prefill step: fragmented fp32 vs contiguous fp32
  2 f16 state          contiguous fp32 vs contiguous fp16 pool (memory: pool bytes)
  3 lazy host copies   a chat loop that saves every session to the host after every turn: eager vs lazy
  4 compression        bytes per cached session by snapshot format; encode + decode time per session
  5 fused token shift  per-mix vs fused token shift on the contiguous fp16 pool
  6 ring buffer        rollback through the ring history vs resetting and re-feeding the kept context
Rows 1, 2 and 5 form a chain (each changes one thing) with the fused time mix throughout; the seed
design itself (fragmented fp32, per-mix shift, unfused time mix) is timed in the same run too.

Shapes of the released RWKV-7 0.1B / 1.5B / 7.2B models with random fp16 weights (bench_decode).
Speed figures: every measurement is `repeats` medians of `steps` calls timed by the common timer
(benchmarks/common.py: wall clock per call, device synchronised), the variants of one row
interleaved repeat by repeat, and a speed-up is the median of the per-repeat paired ratios with
their min-max. A cell whose repeats spread too far, or whose paired ratio and medians disagree on
which side is faster, is re-run (at most MAX_RERUNS times) and, if still so, marked in the report
and left out of its findings. The quality column comes from the state-precision harness's stored
results.
On a CPU (--tiny) every figure describes the CPU and tiny shapes, not a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import SHAPES, Variant, config_for, weight_bytes  # noqa: E402
from bench_state import TINY, build_model, formats_for  # noqa: E402
from common import MAX_RERUNS, call_seconds, measure, summary, sync  # noqa: E402
from impact_report import CPU_NOTE, pair_flag, render, write_charts  # noqa: E402

from rwkvstate import Engine  # noqa: E402
from rwkvstate.config import EngineConfig  # noqa: E402
from rwkvstate.state.layout import dtype_name  # noqa: E402
from rwkvstate.model.checkpoint import weight_shapes  # noqa: E402
from rwkvstate.runtime.graphs import DecodeGraphs  # noqa: E402
from rwkvstate.state.layout import StateLayout  # noqa: E402
from rwkvstate.state.pool import ContiguousPool  # noqa: E402
from rwkvstate.state.layout import SNAPSHOT_FORMATS  # noqa: E402
from rwkvstate.state.snapshot import decode, empty_encoded, encode, encoded_nbytes  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"

F32, F16 = torch.float32, torch.float16
SEED_DESIGN = Variant("seed design: fragmented fp32, per-mix shift, unfused time mix", "fragmented", F32,
                      "triton-per-mix", time_mix="torch")  # fmt: skip
FRAG32 = Variant("fragmented fp32, per-mix shift", "fragmented", F32, "triton-per-mix")
CONT32 = Variant("contiguous fp32, per-mix shift", "contiguous", F32, "triton-per-mix")
CONT16 = Variant("contiguous fp16, per-mix shift", "contiguous", F16, "triton-per-mix")
OURS = Variant("contiguous fp16, fused shift", "contiguous", F16, "triton")
VARIANTS = [SEED_DESIGN, FRAG32, CONT32, CONT16, OURS]
# (key, label, baseline, ours): rows 1, 2, 5 change one thing each; the last two are cumulative
PAIRS = [
    ("contiguous", "1 contiguous state", FRAG32, CONT32),
    ("f16", "2 f16 state", CONT32, CONT16),
    ("fused_shift", "5 fused token shift", CONT16, OURS),
    ("rows_1_2_5", "rows 1+2+5 together", FRAG32, OURS),
    ("vs_seed", "this runtime vs the seed design", SEED_DESIGN, OURS),
]


# ---- measurement helpers -------------------------------------------------------------------------
def step_seconds(fn, device, steps: int, warmup: int = 1) -> float:
    """Median seconds of `steps` calls of the common timer (the same on a GPU and a CPU)."""
    return statistics.median(call_seconds(fn, device, steps, warmup))


def spread(values: list[float], attempts: int = 1) -> dict:
    """Per-repeat values with their median, min-max, spread and stability verdict."""
    return summary(values, attempts)


def interleaved(fns: dict, device, repeats: int, steps: int) -> dict:
    """{name: per-repeat medians}: every fn timed once per repeat, in turn, so that a drift of the
    machine hits all of them alike. fns maps a name to (prepare, fn): prepare() runs untimed first."""
    times = {name: [] for name in fns}
    for r in range(repeats):
        for name, (prepare, fn) in fns.items():
            prepare()
            times[name].append(step_seconds(fn, device, steps, warmup=2 if r == 0 else 1))
    return times


def until_stable(measure_once, pairs: list[tuple[str, str]]) -> tuple[dict, int]:
    """Runs measure_once() -> {name: repeats} again while any (baseline, ours) pair is flagged
    (impact_report.pair_flag), at most MAX_RERUNS more times; returns the last result and attempts."""
    for attempt in range(1, MAX_RERUNS + 2):
        times = measure_once()
        if not any(pair_flag(summary(times[b]), summary(times[o])) for b, o in pairs):
            break
    return times, attempt


def set_backends(model, variant: Variant, device) -> None:
    """The variant's kernels on a GPU; the torch reference (one token-shift kind) on a CPU."""
    if device.type == "cuda":
        model.backends.update(token_shift=variant.token_shift, wkv=variant.wkv, time_mix=variant.time_mix)
    else:
        model.backends.update(token_shift="torch", wkv="torch", time_mix="torch")


def prefill_length(batch: int, tiny: bool) -> int:
    """Tokens per sequence of a prefill step: a token budget per step, clamped."""
    budget, low, high = (64, 4, 32) if tiny else (4096, 16, 1024)
    return max(low, min(high, budget // batch))


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


# ---- rows 1, 2, 5: decode and prefill steps --------------------------------------------------------
def speed_rows(model, shape: str, batch: int, device, opts) -> list[dict]:
    """Every variant's decode step (graphs on) and prefill step at one batch size, interleaved."""
    pools, runners = {}, {}
    for v in VARIANTS:  # variants with the same layout and dtype share a pool
        key = (v.layout, v.state_dtype)
        if key not in pools:
            pools[key] = model.new_pool(batch, state_dtype=v.state_dtype, layout=v.layout)
            for layer in range(model.config.n_layer):  # realistic, non-zero states
                for part in pools[key].layer(layer):
                    part.normal_().mul_(0.5)
        set_backends(model, v, device)  # a graph freezes the backends it was captured with
        runners[v.name] = DecodeGraphs(model, pools[key], max_batch=batch, batch_sizes=[batch])
        runners[v.name].capture()
    slots = list(range(batch))
    tokens = random_ids(batch, model.config.vocab_size, 0)
    length = prefill_length(batch, opts.tiny)
    prompts = [random_ids(length, model.config.vocab_size, 1 + i) for i in range(batch)]
    work = {
        "decode": lambda v: (lambda: runners[v.name].decode(slots, tokens)),
        "prefill": lambda v: (lambda: model.forward(pools[(v.layout, v.state_dtype)], slots, prompts, output="last")),
    }  # fmt: skip
    steps = {"decode": opts.steps, "prefill": opts.prefill_steps}
    pairs = [(base.name, ours.name) for _, _, base, ours in PAIRS]
    rows = []
    for w, make in work.items():
        fns = {v.name: (lambda v=v: set_backends(model, v, device), make(v)) for v in VARIANTS}
        times, attempts = until_stable(lambda: interleaved(fns, device, opts.repeats, steps[w]), pairs)
        for v in VARIANTS:
            rows.append({"shape": shape, "batch": batch, "workload": w, "tokens_per_seq": 1 if w == "decode" else length,
                         "variant": v.name, "layout": v.layout, "state_dtype": dtype_name(v.state_dtype),
                         "token_shift": v.token_shift, "time_mix": v.time_mix,
                         "pool_bytes": pools[(v.layout, v.state_dtype)].nbytes, **spread(times[v.name], attempts)})  # fmt: skip
    del runners, pools
    empty_cache(device)
    return rows


def traffic_row(model, shape: str, batch: int) -> dict:
    """Bytes a decode step must move: weights read once, state read and written."""
    lay = model.state_layout
    return {"shape": shape, "batch": batch, "n_layer": model.config.n_layer,
            "weight_bytes": weight_bytes(model, batch), "state_bytes_fp32": 2 * batch * lay.slot_nbytes(F32),
            "state_bytes_fp16": 2 * batch * lay.slot_nbytes(F16)}  # fmt: skip


def empty_cache(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- row 3: lazy host copies in a chat loop ---------------------------------------------------------
def lazy_rows(model, shape: str, batch: int, device, opts) -> list[dict]:
    """B sessions; each turn, B/8 of them (at least one) feed a 16-token message in one packed
    forward, then the server saves every session's state to the host. Eager: one bulk copy of
    every slot (the seed copies every state back); lazy: the pool's host copies, which skip
    slots not written since their last copy. Same pool (contiguous fp16), same buffers reused."""
    pool = model.new_pool(batch, state_dtype=F16, layout="contiguous")
    set_backends(model, OURS, device)
    speakers, length = max(1, batch // 8), opts.turn_tokens
    V = model.config.vocab_size
    model.forward(pool, list(range(batch)), [random_ids(length, V, i) for i in range(batch)], output="none")
    bulk = torch.empty(tuple(pool.data[:batch].shape), dtype=pool.dtype, pin_memory=device.type == "cuda")
    state = {"turn": 0, "eager_bytes": 0}

    def save(policy):
        if policy == "eager":
            bulk.copy_(pool.data[:batch], non_blocking=True)
            state["eager_bytes"] += bulk.numel() * bulk.element_size()
        else:
            for slot in range(batch):
                pool.host_copy(slot)

    def turn(policy):
        i = state["turn"] = state["turn"] + 1
        slots = [(i * speakers + j) % batch for j in range(speakers)]
        ids = [random_ids(length, V, 1000 * i + j) for j in range(speakers)]
        sync(device)
        t0 = time.perf_counter()
        model.forward(pool, slots, ids, output="last")
        sync(device)
        t1 = time.perf_counter()
        save(policy)
        sync(device)
        return t1 - t0, time.perf_counter() - t1

    save("eager")  # allocates every pinned buffer before timing
    save("lazy")

    def measure_once():
        per = {p: {"forward": [], "save": [], "turn": [], "bytes": []} for p in ("eager", "lazy")}
        for _ in range(opts.repeats):
            for policy in ("eager", "lazy"):
                save("lazy")  # untimed: the lazy copies catch up with the eager turns before
                before = pool.bytes_to_host + state["eager_bytes"]
                turns = [turn(policy) for _ in range(opts.turns)]
                d = per[policy]
                d["forward"].append(statistics.median(f for f, _ in turns))
                d["save"].append(statistics.median(s for _, s in turns))
                d["turn"].append(statistics.median(f + s for f, s in turns))
                d["bytes"].append((pool.bytes_to_host + state["eager_bytes"] - before) / opts.turns)
        return per

    for attempts in range(1, MAX_RERUNS + 2):
        per = measure_once()
        if not pair_flag(summary(per["eager"]["turn"]), summary(per["lazy"]["turn"])):
            break
    rows = [{"shape": shape, "batch": batch, "sessions": batch, "speakers": speakers, "turn_tokens": length,
             "policy": p, "state_dtype": "fp16", "slot_bytes": pool.slot_nbytes,
             "forward": spread(d["forward"], attempts), "save": spread(d["save"], attempts),
             "turn": spread(d["turn"], attempts),
             "bytes_to_host_per_turn": statistics.median(d["bytes"])} for p, d in per.items()]  # fmt: skip
    del pool, bulk
    empty_cache(device)
    return rows


# ---- row 4: compressed snapshots of cached sessions -------------------------------------------------
def compression_rows(cfg, shape: str, device, opts) -> list[dict]:
    """Bytes per cached session by format against fp32 (the seed's storage), and the time to
    encode a slot into the format and decode it back (snapshot and restore), on the device."""
    layout = StateLayout(cfg.n_layer, cfg.n_embd, cfg.head_size)
    pool = ContiguousPool(layout, 3, F32, device)
    pool.data.normal_()
    group, numel = layout.head_size, layout.slot_numel
    formats = formats_for(device)
    snaps = {f: empty_encoded(f, numel, group, device) for f in formats}
    fns = {}
    for f in formats:
        fns["encode", f] = (lambda: None, lambda f=f: encode(pool.slot_view(0), f, group, out=snaps[f]))
        fns["decode", f] = (lambda: None, lambda f=f: decode(snaps[f], pool.slot_view(2)))
    pairs = [(("encode", "fp32"), ("encode", f)) for f in formats] + [(("decode", "fp32"), ("decode", f)) for f in formats]
    times, attempts = until_stable(lambda: interleaved(fns, device, opts.repeats, opts.steps), pairs)
    enc = {f: times["encode", f] for f in formats}
    dec = {f: times["decode", f] for f in formats}
    logits = cfg.vocab_size * 4
    rows = []
    for f in SNAPSHOT_FORMATS:
        size = encoded_nbytes(f, numel, group)
        row = {"shape": shape, "format": f, "group": group, "state_bytes": size, "logits_bytes": logits,
               "sessions_per_gb": 1e9 / size, "sessions_per_gb_with_logits": 1e9 / (size + logits)}  # fmt: skip
        if f in formats:
            both = [a + b for a, b in zip(enc[f], dec[f])]
            row.update(encode=spread(enc[f], attempts), decode=spread(dec[f], attempts),
                       encode_decode=spread(both, attempts))  # fmt: skip
        rows.append(row)
    return rows


# ---- row 6: ring-buffer rollback ----------------------------------------------------------------
def timed_ops(fn, setup, device, repeats: int, steps: int) -> dict:
    """`repeats` medians of `steps` calls of fn, each after an untimed setup(): the common timer,
    re-run while its repeats spread too far (benchmarks/common.py)."""
    return measure(fn, device, repeats, steps, warmup=1, setup=setup)


def ring_rows(model, shape: str, device, opts) -> tuple[list[dict], list[dict]]:
    """Batch 1 (a per-session operation). Undo/regenerate: take back n tokens of a long context.
    Speculative: verify k draft tokens in one forward, reject the last r. Ours: the engine's
    rollback (restore the nearest ring entry, re-feed the few tokens after it). Baseline, the
    seed design, which has no rollback: reset and re-feed the kept context. Also shown: a copy
    of the slot before each draft (needs no ring, only whole-slot copies).

    Every case starts from a fresh session whose ring holds an entry every `every` tokens, with
    room for every timed cycle. An undo takes back a turn fed as one piece, so it lands on the
    undo point where that turn began (a restore); a speculative rollback lands inside the draft
    and re-feeds the accepted tokens after the nearest entry. The time of one rollback does not
    depend on the ring's size; the memory rows give the bytes of the default ring
    (opts.ring_capacity periodic entries plus the undo-point entries)."""
    set_backends(model, OURS, device)
    every, context = (16, 128) if opts.tiny else (64, 2048)
    k, rejects, backs = 8, (1, 4), (1, every // 4, every + every // 2 + 4)
    ids = random_ids(context + k, model.config.vocab_size, 7)
    capacity = context // every + opts.repeats * opts.ring_steps + 2
    engine = Engine(model, slots=1, state_dtype=F16, history_every=every, history_capacity=capacity,
                    enforce_eager=True)  # fmt: skip
    plain = Engine(model, slots=1, state_dtype=F16, history_capacity=0, enforce_eager=True).session()
    rows = []

    def fresh():
        for old in list(engine.sessions.values()):
            old.close()
        s = engine.session()
        for i in range(0, context, every):  # a conversation of `every`-token turns: one ring entry per turn
            s.feed(ids[i : i + every])
        return s

    def back_to(s, position):  # the ring session at exactly `position` tokens
        if len(s.tokens) > position:
            s.rollback(len(s.tokens) - position)
        if len(s.tokens) < position:
            s.feed(ids[len(s.tokens) : position])

    def measure(fn, setup=lambda: None):
        return timed_ops(fn, setup, device, opts.repeats, opts.ring_steps)

    def refeed(n):
        return measure(lambda: (plain.reset(), plain.feed(ids[:n])))

    def add(case, method, n, t, **extra):
        rows.append({"shape": shape, "batch": 1, "case": case, "method": method, "context": context,
                     "tokens": n, **extra, **t})  # fmt: skip

    for n in backs:
        s = fresh()
        add("undo", "ring rollback", n, measure(lambda: s.rollback(n), lambda: back_to(s, context)))
        add("undo", "reset and re-feed the kept context", n, refeed(context - n))
    for r in rejects:
        s = fresh()
        setup = lambda: (back_to(s, context), s.feed(ids[context:]))  # noqa: E731
        add("speculative", "ring rollback", r, measure(lambda: s.rollback(r), setup), draft=k)
        add("speculative", "reset and re-feed the kept context", r, refeed(context + k - r), draft=k)
        copied = copy_before_draft(model, ids, context, k, r, device, opts)
        add("speculative", "copy the slot before the draft", r, copied, draft=k)
    memory = ring_memory(model, shape, every, opts.ring_capacity)
    del engine, plain
    empty_cache(device)
    return rows, memory


def copy_before_draft(model, ids, context: int, k: int, r: int, device, opts) -> dict:
    """Per draft: copy the slot aside before it; on rejection copy it back and re-feed the
    accepted k - r tokens. Timed: both copies and the re-feed, not the draft itself."""
    pool = model.new_pool(2, state_dtype=F16, layout="contiguous")
    model.forward(pool, [0], [ids[:context]], output="none")
    draft = ids[context : context + k]

    def once() -> float:
        sync(device)
        t0 = time.perf_counter()
        pool.copy(0, 1)
        sync(device)
        t1 = time.perf_counter()
        model.forward(pool, [0], [draft], output="last")  # the draft's verification: not timed
        sync(device)
        t2 = time.perf_counter()
        pool.copy(1, 0)
        model.forward(pool, [0], [draft[: k - r]], output="last")
        sync(device)
        return t1 - t0 + time.perf_counter() - t2

    once()  # warm-up, as the common timer does
    for attempts in range(1, MAX_RERUNS + 2):
        result = spread([statistics.median(once() for _ in range(opts.ring_steps)) for _ in range(opts.repeats)],
                        attempts)  # fmt: skip
        if not result["unstable"]:
            break
    return result


def ring_memory(model, shape: str, every: int, capacity: int) -> list[dict]:
    """Bytes a ring of `capacity` entries adds per slot (states plus fp32 logits), in the format
    timed (fp16, the pool's) and in int8, against one fp16 slot."""
    lay, V = model.state_layout, model.config.vocab_size
    slot = lay.slot_nbytes(F16)
    rows = []
    capacity += EngineConfig().history_marks  # the undo-point entries come with every ring
    for fmt in ("fp16", "int8"):
        ring = capacity * (encoded_nbytes(fmt, lay.slot_numel, lay.head_size) + 4 * V)
        rows.append({"shape": shape, "format": fmt, "capacity": capacity, "every": every, "slot_bytes": slot,
                     "ring_bytes_per_slot": ring, "measured": fmt == "fp16"})  # fmt: skip
    return rows


# ---- quality: stored results of the state-precision harness -------------------------------------
def load_quality() -> dict:
    """KL mean and greedy agreement of fp16/bf16 storage (row 2) and snapshot formats (row 4)."""
    out = {"storage": {}, "snapshots": {}, "sources": []}
    storage = _quality_results("state-precision")
    for fmt in ("fp16", "bf16"):
        hit = storage["rows"].get(f"{fmt} storage")
        if hit:
            out["storage"][fmt] = hit
    snaps = _quality_results("state-precision-snapshots-h200")
    for fmt in ("fp16", "bf16", "int8", "fp8"):
        every = snaps["rows"].get(f"{fmt} snapshot every 64 tokens")
        once = snaps["rows"].get(f"{fmt} snapshot once, at the prompt's end")
        if every or once:
            out["snapshots"][fmt] = {"every_64": every, "once": once}
    out["sources"] = [s for s in (storage["source"], snaps["source"]) if s]
    out["device"] = storage["device"] or snaps["device"]
    return out


def _quality_results(stem: str) -> dict:
    """{name: {kl_mean, greedy_agreement}} from DOCS/stem.json, else from the table in stem.md."""
    path = DOCS / f"{stem}.json"
    if path.exists():
        data = json.loads(path.read_text())
        rows = {r["name"]: {k: r[k] for k in ("kl_mean", "greedy_agreement")} for r in data["results"]}
        return {"rows": rows, "source": f"docs/benchmarks/{path.name}", "device": data.get("meta", {}).get("device")}
    path = path.with_suffix(".md")
    if not path.exists():
        return {"rows": {}, "source": None, "device": None}
    return {"rows": _markdown_rows(path.read_text()), "source": f"docs/benchmarks/{path.name}", "device": None}


def _markdown_rows(text: str) -> dict:
    lines = [l for l in text.splitlines() if l.startswith("|")]
    if len(lines) < 3:
        return {}
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    kl, greedy = head.index("KL mean"), head.index("greedy agreement")
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = {"kl_mean": float(cells[kl]), "greedy_agreement": float(cells[greedy])}
    return rows


# ---- driver --------------------------------------------------------------------------------------
def shape_fits(cfg, batches: list[int], device) -> tuple[bool, str]:
    """Whether the shape's weights (twice, while they are built) and its largest pools fit."""
    if device.type != "cuda":
        return True, ""
    weights = 2 * sum(math.prod(s) for s in weight_shapes(cfg).values())
    slot = StateLayout(cfg.n_layer, cfg.n_embd, cfg.head_size).slot_nbytes(F32)
    pools = 2.5 * (max(batches) + 1) * slot  # fragmented fp32 + contiguous fp32 + contiguous fp16
    need = max(2 * weights, weights + pools) + 3 * 2**30
    free = torch.cuda.mem_get_info(device)[0]
    if need > free:
        return False, f"needs about {need / 2**30:.0f} GiB of GPU memory, {free / 2**30:.0f} GiB free"
    return True, ""


def run(args) -> dict:
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench impact measures GPU figures and sees no CUDA device; --tiny runs a CPU smoke test")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (not a GPU figure)"
    if args.tiny:
        print(f"NOTE: {CPU_NOTE}.", flush=True)
    shapes = {"tiny": TINY} if args.tiny else {s: config_for(s) for s in args.shapes}
    result = new_result(card, args, list(shapes))
    start = time.time()
    for shape, cfg in shapes.items():
        fits, why = shape_fits(cfg, args.batches, device)
        if not fits:
            result["skipped"].append({"shape": shape, "reason": why})
            print(f"{shape}: skipped, {why}", flush=True)
            continue
        run_shape(result, shape, cfg, device, args, start)
        if args.out:  # a partial result survives a run cut short
            write_json(result, args.out)
    result["meta"]["seconds"] = time.time() - start
    result["quality"] = load_quality()
    return result


def new_result(card: str, args, shapes: list[str]) -> dict:
    meta = {"card": card, "cpu": args.tiny, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "weights": "fp32" if args.tiny else "fp16", "ours": OURS.name,
            "timer": "wall clock per call with the device synchronised (benchmarks/common.py), for every row",
            "pairs": [(key, label, base.name, ours.name) for key, label, base, ours in PAIRS],
            "shapes": shapes, "batches": args.batches, "repeats": args.repeats, "steps": args.steps,
            "prefill_steps": args.prefill_steps, "turns": args.turns, "turn_tokens": args.turn_tokens,
            "ring_capacity": args.ring_capacity, "runs": [{"card": card, "shapes": shapes,
                                                           "date": time.strftime("%Y-%m-%d")}]}  # fmt: skip
    return {"meta": meta, "speed": [], "traffic": [], "lazy": [], "compression": [], "rollback": [],
            "ring_memory": [], "skipped": [], "quality": {}}  # fmt: skip


def run_shape(result: dict, shape: str, cfg, device, args, start: float) -> None:
    log = lambda what: print(f"{shape}: {what} ({time.time() - start:.0f} s)", flush=True)  # noqa: E731
    result["compression"] += compression_rows(cfg, shape, device, args)
    log("compression done")
    model = build_model(cfg, device, F16 if device.type == "cuda" else F32)
    log(f"model built, {model.num_params() / 1e6:,.1f} M params")
    for batch in args.batches:
        result["speed"] += speed_rows(model, shape, batch, device, args)
        result["traffic"].append(traffic_row(model, shape, batch))
        log(f"decode and prefill at batch {batch} done")
    for batch in args.batches:
        result["lazy"] += lazy_rows(model, shape, batch, device, args)
    log("lazy host copies done")
    rows, memory = ring_rows(model, shape, device, args)
    result["rollback"] += rows
    result["ring_memory"] += memory
    log("ring rollback done")
    del model
    empty_cache(device)


LISTS = ("speed", "traffic", "lazy", "compression", "rollback", "ring_memory", "skipped")


def merge(results: list[dict]) -> dict:
    """One result from several runs; a shape measured in a later run replaces an earlier one."""
    out = json.loads(json.dumps(results[0]))
    for later in results[1:]:
        shapes = set(later["meta"]["shapes"]) | {s["shape"] for s in later["skipped"]}
        for key in LISTS:
            out[key] = [r for r in out[key] if r["shape"] not in shapes] + later[key]
        out["meta"]["runs"] += later["meta"]["runs"]
        out["meta"]["shapes"] = [s for s in out["meta"]["shapes"] if s not in shapes] + later["meta"]["shapes"]
        out["meta"]["cpu"] = out["meta"]["cpu"] or later["meta"]["cpu"]
        out["quality"] = later["quality"] or out["quality"]
    out["skipped"] = [s for s in out["skipped"] if s["shape"] not in out["meta"]["shapes"]]
    cards = list(dict.fromkeys(r["card"] for r in out["meta"]["runs"]))
    out["meta"]["card"] = " + ".join(cards)
    out["meta"]["batches"] = sorted({r["batch"] for r in out["speed"]})
    return out


# ---- entry points -------------------------------------------------------------------------------
def write_json(result: dict, prefix: Path) -> Path:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    path = prefix.parent / f"{prefix.name}.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `rwkvstate bench impact`, which mirrors them."""
    p.add_argument("--out", type=Path, default=None, help="write OUT.json, OUT-*.png charts and (without --doc) OUT.md")
    p.add_argument("--doc", type=Path, default=None, help="write the markdown here instead (e.g. docs/impact.md)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated, of 0.1B,1.5B,7.2B (default: all; none with --merge)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,64,256; 1,4,16 with --tiny)")
    p.add_argument("--repeats", type=int, default=None, help="repeats of each measurement (default 5; 3 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps per repeat (default 20; 5 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: a smoke run, not GPU figures")
    p.add_argument("--merge", type=Path, nargs="+", default=[], help="earlier JSON results to merge into this one")


def resolve(args) -> argparse.Namespace:
    """Fills the defaults that depend on --tiny and --merge."""
    tiny = args.tiny
    shapes = args.shapes
    if shapes is None:
        shapes = "" if args.merge else ",".join(SHAPES)
    a = argparse.Namespace(**vars(args))
    a.shapes = [x for x in shapes.split(",") if x]
    unknown = [x for x in a.shapes if x not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape(s) {', '.join(unknown)}; expected some of {', '.join(SHAPES)}")
    a.batches = [int(b) for b in (args.batches or ("1,4,16" if tiny else "1,64,256")).split(",") if b]
    a.repeats = args.repeats or (3 if tiny else 5)
    a.steps = args.steps or (5 if tiny else 20)
    a.prefill_steps = 2 if tiny else 3
    a.turns, a.turn_tokens = (3, 4) if tiny else (4, 16)
    a.ring_steps = 2 if tiny else 10
    a.ring_capacity = 4
    a.run = tiny or bool(a.shapes)
    return a


def run_from_args(args) -> int:
    a = resolve(args)
    results = [json.loads(Path(p).read_text()) for p in a.merge]
    if a.run:
        threads = torch.get_num_threads()
        if a.tiny:
            torch.set_num_threads(1)  # tiny ops: threads only add contention on a shared machine
        try:
            results.append(run(a))
        finally:
            torch.set_num_threads(threads)
    if not results:
        raise ValueError("nothing to do: give --shapes, --tiny or --merge FILE.json")
    result = merge(results) if len(results) > 1 else results[0]
    charts = {}
    if a.out:
        print(f"wrote {write_json(result, a.out)}", flush=True)
        charts = write_charts(result, a.out)
    # the markdown goes to --doc when given, else next to the JSON; image links are relative to it
    doc = a.doc or (a.out.parent / f"{a.out.name}.md" if a.out else None)
    text = render(result, doc, charts)
    print(text)
    if doc:
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(text)
        print(f"wrote {doc} and {len(charts)} charts", flush=True)
    if result["meta"]["cpu"]:
        print(f"NOTE: {CPU_NOTE}.", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
