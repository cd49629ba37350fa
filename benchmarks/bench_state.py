"""State lifecycle costs: snapshot / restore / fork / host copies against slot size, bytes per
session by format, rollback against re-feeding, the prefix cache, lazy against eager host copies.

    python benchmarks/bench_state.py --out docs/benchmarks/state          # on a GPU
    python benchmarks/bench_state.py --tiny --out /tmp/state               # CPU smoke run

Shapes of the released RWKV-7 0.1B / 1.5B / 7.2B models with random fp16 weights. Latencies
come from the common timer (benchmarks/common.py: wall clock per call with the device
synchronised, host work included; medians of repeats, re-run when the repeats spread too far).
On a CPU the figures describe the CPU, not a GPU.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import SHAPES, config_for  # noqa: E402
from common import measure, sync, write_results  # noqa: E402

from rwkvstate import Engine, Model  # noqa: E402
from rwkvstate.config import ModelConfig  # noqa: E402
from rwkvstate.state.layout import dtype_name  # noqa: E402
from rwkvstate.model.synthetic import random_checkpoint, tiny_config  # noqa: E402
from rwkvstate.ops.quantize import fp8_supported  # noqa: E402
from rwkvstate.state.layout import StateLayout  # noqa: E402
from rwkvstate.state.pool import ContiguousPool  # noqa: E402
from rwkvstate.state.layout import SNAPSHOT_FORMATS  # noqa: E402
from rwkvstate.state.snapshot import decode, empty_encoded, encode, encoded_nbytes  # noqa: E402

TINY = tiny_config(n_layer=2, n_embd=64, head_size=16, ffn_dim=128, vocab_size=256)


REPEATS = 3  # repeats of every measurement, each the median of `calls` calls (--repeats)


def wall(fn, device, calls: int, setup=None) -> dict:
    """The common timer's measurement of fn: REPEATS medians of `calls` calls."""
    return measure(fn, device, REPEATS, calls, setup=setup)


def copy_bandwidth(device, repeats: int) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    size = 2**30 if device.type == "cuda" else 2**26
    src = torch.empty(size, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * size / wall(lambda: dst.copy_(src), device, repeats)["median_s"]



def formats_for(device) -> list[str]:
    return [f for f in SNAPSHOT_FORMATS if f != "fp8" or fp8_supported(device)]


# ---- 1. state operations against slot size ---------------------------------------------------
def state_ops(cfg: ModelConfig, shape: str, state_dtype, device, bandwidth, repeats) -> list[dict]:
    layout = StateLayout(cfg.n_layer, cfg.n_embd, cfg.head_size)
    pool = ContiguousPool(layout, 4, state_dtype, device)
    pool.data.normal_()
    group, numel, slot_bytes = layout.head_size, layout.slot_numel, pool.slot_nbytes
    rows = []

    def add(op, fmt, moved, t):
        rows.append({"shape": shape, "state_dtype": dtype_name(state_dtype), "op": op, "format": fmt,
                     "slot_bytes": slot_bytes, "bytes_moved": moved, **t,
                     "gb_per_s": moved / t["median_s"] / 1e9, "fraction_of_copy_bw": moved / t["median_s"] / bandwidth})  # fmt: skip

    add("fork (slot copy)", dtype_name(state_dtype), 2 * slot_bytes, wall(lambda: pool.copy(0, 1), device, repeats))
    for fmt in formats_for(device):
        snap = empty_encoded(fmt, numel, group, device)
        moved = slot_bytes + encoded_nbytes(fmt, numel, group)
        add("snapshot (encode)", fmt, moved, wall(lambda: encode(pool.slot_view(0), fmt, group, out=snap), device, repeats))
        add("restore (decode)", fmt, moved, wall(lambda: decode(snap, pool.slot_view(2)), device, repeats))

    def to_host():
        pool.begin_write([0])  # force the copy the lazy path would skip
        pool.host_copy(0)

    add("copy to host (pinned)", dtype_name(state_dtype), slot_bytes, wall(to_host, device, repeats))
    buffer = pool.host_copy(0)
    add("restore from host", dtype_name(state_dtype), slot_bytes,
        wall(lambda: pool.load_host(1, buffer, keep=False), device, repeats))  # fmt: skip
    return rows


def bytes_per_session(cfg: ModelConfig, shape: str, device) -> list[dict]:
    layout = StateLayout(cfg.n_layer, cfg.n_embd, cfg.head_size)
    logits = cfg.vocab_size * 4
    rows = []
    for fmt in SNAPSHOT_FORMATS:
        state = encoded_nbytes(fmt, layout.slot_numel, layout.head_size)
        rows.append({"shape": shape, "format": fmt, "state_bytes": state, "with_logits_bytes": state + logits,
                     "sessions_per_gb": 1e9 / (state + logits)})  # fmt: skip
    return rows


# ---- 2. workloads on a model ------------------------------------------------------------------
def build_model(cfg, device, dtype):
    tensors = random_checkpoint(cfg, seed=0, dtype=dtype, device=device)
    return Model.from_tensors(tensors, cfg, device=device, dtype=dtype)


TURN = 64  # tokens per conversation turn, and the ring's spacing: an entry every TURN tokens


def rollback_rows(model, shape, device, context: int, backs: list[int], calls: int) -> list[dict]:
    """Rollback through the ring history against resetting and re-feeding the kept prompt.

    Before every timed rollback the session holds `context` tokens fed as TURN-token turns, as a
    fresh conversation would: ring entries and undo points every TURN tokens, none planted near
    the target. Taking back n tokens then restores the entry at or below the target and re-feeds
    the rest, (context - n) mod TURN tokens (counted, and stored as tokens_refed)."""
    rng = random.Random(0)
    ids = [rng.randrange(model.config.vocab_size) for _ in range(context)]
    rows = []
    for fmt in ("fp16", "int8"):
        engine = Engine(model, slots=2, state_dtype=torch.float16, history_every=TURN, history_capacity=8,
                        history_format=fmt, enforce_eager=True)  # fmt: skip
        s = engine.session()
        feed_turns(s, ids, 0, context)
        for n in backs:
            refed = []

            def rollback():
                before = engine.tokens_fed
                s.rollback(n)
                refed.append(engine.tokens_fed - before)

            def back_to_full_context(n=n):  # untimed: rebuild the last turns as whole turns
                if len(s.tokens) < context:
                    if len(s.tokens) % TURN:
                        s.rollback(len(s.tokens) % TURN)
                    feed_turns(s, ids, len(s.tokens), context)

            t = wall(rollback, device, calls, setup=back_to_full_context)
            back_to_full_context()
            rows.append({"shape": shape, "history_format": fmt, "context": context, "tokens_back": n,
                         "method": "rollback (nearest ring entry + re-feed)", "ring_every": TURN,
                         "tokens_refed": statistics.median(refed), **t})  # fmt: skip
        turn = ids[:32]  # undo of a whole turn (a reply, a message): it starts at an undo point
        t = wall(lambda: s.undo(), device, calls, setup=lambda: s.feed(turn))
        rows.append({"shape": shape, "history_format": fmt, "context": context, "tokens_back": len(turn),
                     "method": "undo a turn (ring undo point)", "ring_every": TURN, "tokens_refed": 0, **t})  # fmt: skip
    s = Engine(model, slots=1, state_dtype=torch.float16, history_capacity=0, enforce_eager=True).session()
    for n in backs:
        t = wall(lambda: s.feed(ids[: context - n]), device, calls, setup=s.reset)
        rows.append({"shape": shape, "history_format": "-", "context": context, "tokens_back": n,
                     "method": "reset and re-feed the prompt", "tokens_refed": context - n, **t})  # fmt: skip
    return rows


def feed_turns(s, ids: list[int], start: int, end: int) -> None:
    """Feeds ids[start:end] as TURN-token turns aligned to multiples of TURN."""
    for i in range(start, end, TURN):
        s.feed(ids[i : min(end, (i // TURN + 1) * TURN)])


def prefix_cache_rows(model, shape, device, prefix: int, suffix: int, requests: int, every: int) -> list[dict]:
    """Requests sharing a long prefix (a system prompt), fed one after another."""
    rng = random.Random(1)
    V = model.config.vocab_size
    shared = [rng.randrange(V) for _ in range(prefix)]
    prompts = [shared + [rng.randrange(V) for _ in range(suffix)] for _ in range(requests)]
    rows = []
    for budget in (0, 1 << 30):
        engine = Engine(model, slots=2, state_dtype=torch.float16, prefix_cache_bytes=budget,
                        prefix_cache_every=every, enforce_eager=True)  # fmt: skip
        engine.session().feed(prompts[0])  # warm-up, and fills the cache with the shared prefix
        times = []
        for p in prompts[1:]:
            s = engine.session()
            sync(device)
            start = time.perf_counter()
            s.feed(p)
            sync(device)
            times.append(time.perf_counter() - start)
            s.close()
        rows.append({"shape": shape, "prefix": prefix, "suffix": suffix, "requests": requests - 1,
                     "prefix_cache": budget > 0, "median_s": statistics.median(times), "min_s": min(times),
                     "max_s": max(times), "stats": engine.stats()})  # fmt: skip
    return rows


def host_copy_rows(model, shape, device, sessions: int, turns: int, tokens: int) -> list[dict]:
    """A chat server that saves every session's state to the host after every turn: the seed
    design copies every state back eagerly; lazy copies only the slots that changed. The first
    save after the sessions start (every state is new to the host: cold) is reported apart from
    the later turns, where one session spoke (steady state)."""
    rows = []
    for policy in ("eager", "lazy"):
        engine = Engine(model, slots=sessions, state_dtype=torch.float16, enforce_eager=True)
        pool = engine.pool
        chats = [engine.session() for _ in range(sessions)]
        for c in chats:
            c.feed([1, 2, 3])
        rng = random.Random(2)

        def save():
            sync(device)
            start, moved = time.perf_counter(), pool.bytes_to_host
            for c in chats:
                if policy == "eager":
                    pool.begin_write([c.slot])  # what an eager copy-back does: copy whatever happened
                pool.host_copy(c.slot)
            sync(device)
            return time.perf_counter() - start, pool.bytes_to_host - moved

        first_s, first_bytes = save()  # cold: no session has a host copy yet
        times, moved = [], []
        for _ in range(turns):
            rng.choice(chats).feed([rng.randrange(model.config.vocab_size) for _ in range(tokens)])
            t, b = save()  # the save step alone: the turn's forward is the same for both
            times.append(t)
            moved.append(b)
        rows.append({"shape": shape, "policy": policy, "sessions": sessions, "turn_tokens": tokens,
                     "first_save_s": first_s, "first_save_bytes": first_bytes, "turns": turns,
                     "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                     "bytes_to_host_per_turn": statistics.median(moved)})  # fmt: skip
    return rows


# ---- driver -----------------------------------------------------------------------------------
def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (not a GPU figure)"
    bandwidth = copy_bandwidth(device, args.repeats)
    print(f"{card}: device copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    shapes = {"tiny": TINY} if args.tiny else {s: config_for(s) for s in args.shapes}
    out = {"card": card, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "copy_bandwidth_bytes_per_s": bandwidth, "ops": [], "bytes": [], "rollback": [], "prefix_cache": [],
           "host_copies": []}  # fmt: skip
    for shape, cfg in shapes.items():
        for dt in (torch.float32, torch.float16):
            out["ops"] += state_ops(cfg, shape, dt, device, bandwidth, args.repeats)
        out["bytes"] += bytes_per_session(cfg, shape, device)
        print(f"{shape}: state ops done", flush=True)
    for shape, cfg in shapes.items():
        if shape not in args.model_shapes and not args.tiny:
            continue
        model = build_model(cfg, device, torch.float16 if device.type == "cuda" else torch.float32)
        context = 128 if args.tiny else 2048
        out["rollback"] += rollback_rows(model, shape, device, context, [1, 16, 100], max(3, args.repeats // 4))
        out["prefix_cache"] += prefix_cache_rows(model, shape, device, 64 if args.tiny else 1024, 16, 9,
                                                 32 if args.tiny else 256)  # fmt: skip
        out["host_copies"] += host_copy_rows(model, shape, device, 4 if args.tiny else 32, 20, 16)
        print(f"{shape}: workloads done", flush=True)
        del model
    return out


def markdown(r: dict) -> str:
    card = r["card"]
    lines = [f"# State lifecycle costs, {card}, {r['date']}", "",
             f"torch {r['torch']}; device copy bandwidth {r['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s "
             "(read + write). Wall-clock medians with the device synchronised; min-max in brackets; spread = (max - min) / "
             "median of the repeats, **unstable** above the limit after re-runs (not a finding).", "",
             f"## Snapshot, restore, fork, host copies of one slot ({card})", "",
             "| shape | storage | op | format | slot MB | latency us | GB/s | of copy bw | spread |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for o in r["ops"]:
        lines.append(f"| {o['shape']} | {o['state_dtype']} | {o['op']} | {o['format']} | {o['slot_bytes'] / 1e6:.2f} | "
                     f"{o['median_s'] * 1e6:.0f} ({o['min_s'] * 1e6:.0f}-{o['max_s'] * 1e6:.0f}) | {o['gb_per_s']:.0f} | "
                     f"{o['fraction_of_copy_bw']:.0%} | {_spread(o)} |")  # fmt: skip
    lines += ["", "## Bytes per cached session by format", "",
              "| shape | format | state MB | with fp32 logits MB | sessions per GB |", "|---|---|---|---|---|"]  # fmt: skip
    for b in r["bytes"]:
        lines.append(f"| {b['shape']} | {b['format']} | {b['state_bytes'] / 1e6:.2f} | {b['with_logits_bytes'] / 1e6:.2f} | "
                     f"{b['sessions_per_gb']:.0f} |")  # fmt: skip
    spacing = next((b["ring_every"] for b in r["rollback"] if "ring_every" in b), None)
    lines += ["", f"## Rollback against re-feeding ({card})", "",
              (f"The context was fed as {spacing}-token turns, so the ring holds an entry every {spacing} tokens and "
               "a rollback re-feeds the tokens between the entry at or below its target and the target."
               if spacing else "This run planted an undo point 5 tokens before each rollback target (an older "
               "version of the benchmark), so every rollback re-fed at most 5 tokens whatever it took back."), "",
              "| shape | method | ring format | context | tokens back | tokens re-fed | ms | spread |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for b in r["rollback"]:
        lines.append(f"| {b['shape']} | {b['method']} | {b['history_format']} | {b['context']} | {b['tokens_back']} | "
                     f"{b.get('tokens_refed', '?')} | {b['median_s'] * 1e3:.2f} | {_spread(b)} |")  # fmt: skip
    lines += ["", f"## Prefix cache: requests sharing a prefix, one after another ({card})", "",
              "| shape | shared prefix | own tokens | cache | ms per request (median) | hit rate |", "|---|---|---|---|---|---|"]  # fmt: skip
    for b in r["prefix_cache"]:
        rate = b["stats"].get("prefix_cache_hit_rate", 0.0)
        lines.append(f"| {b['shape']} | {b['prefix']} | {b['suffix']} | {'on' if b['prefix_cache'] else 'off'} | "
                     f"{b['median_s'] * 1e3:.2f} | {rate:.0%} |")  # fmt: skip
    lines += host_copy_table(r)

    return "\n".join(lines) + "\n"


def _spread(r: dict) -> str:
    if "spread" not in r:
        return "-"
    return f"{r['spread']:.0%}" + (" **unstable**" if r.get("unstable") else "")


def host_copy_table(r: dict) -> list[str]:
    """The first (cold) save apart from the later turns' saves, where runs record it."""
    card, rows = r["card"], r["host_copies"]
    if rows and "first_save_bytes" not in rows[0]:
        lines = ["", f"## Saving every session to the host after every turn ({card})", "",
                 "Save ms: median over the turns; MB: mean over the turns including the first save, when every "
                 "state is new to the host (an older version of the benchmark, which did not separate it).", "",
                 "| shape | sessions | policy | save ms per turn | MB to host per turn |", "|---|---|---|---|---|"]  # fmt: skip
        return lines + [f"| {b['shape']} | {b['sessions']} | {b['policy']} | {b['median_s'] * 1e3:.2f} | "
                        f"{b['bytes_to_host_per_turn'] / 1e6:.2f} |" for b in rows]  # fmt: skip
    lines = ["", f"## Saving every session to the host after every turn ({card})", "",
             "First save: right after the sessions start, every state is new to the host (cold). Later turns: one "
             "session speaks per turn, then every session is saved (steady state, medians over the turns).", "",
             "| shape | sessions | policy | first save ms | first save MB | later turn: save ms | later turn: MB to host |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    return lines + [f"| {b['shape']} | {b['sessions']} | {b['policy']} | {b['first_save_s'] * 1e3:.2f} | "
                    f"{b['first_save_bytes'] / 1e6:.2f} | {b['median_s'] * 1e3:.2f} | "
                    f"{b['bytes_to_host_per_turn'] / 1e6:.2f} |" for b in rows]  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=lambda s: s.split(","), default=list(SHAPES))
    parser.add_argument("--model-shapes", type=lambda s: s.split(","), default=["0.1B", "1.5B"],
                        help="shapes whose workloads (rollback, prefix cache, host copies) run on a model")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per repeat (each measurement: 3 repeats)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke run, not GPU figures)")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    result = run(args)
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
