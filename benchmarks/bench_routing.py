"""Session routing on Ray Serve: rwkvstate's request router against model multiplexing.

    python benchmarks/bench_routing.py --out docs/benchmarks/routing-cpu     # CPU, the bundled model

Two CPU replicas of the bundled model on a local Ray cluster (as tests/test_cluster.py runs
them), sessions in a Redis started here, run twice:

- `router`: the design of `rwkvstate serve --replicas` (cluster/routing.py): the ingress passes
  each request's session to SessionAffinityRouter, which sends it where the session was last
  (learnt from where it routed, and from the replica that answered a create or fork).
- `multiplex`: Ray Serve's model multiplexing with session ids as model ids: the ingress sends
  `handle.options(multiplexed_model_id=session)` through Ray's default router, which prefers
  replicas that reported the id; each replica's `@serve.multiplexed` loader registers a session
  (loading it from the store when it is not resident), and a replica that creates or forks a
  session registers it before answering. Built here only, for this comparison.

Each variant runs on --repeats fresh clusters, in the order A B B A ... (drift cancels). On each,
one client alone first sends --serial tiny requests without a session, then --serial turns of
one session (the per-request time without queueing); then creates --alone sessions one at a
time, each followed at once by two turns; then, in --rounds rounds, --sessions clients at once
each create a session and run --turns tiny turns right after each other (a short prompt,
--max-tokens tokens, greedy), pause --pause seconds and run --later-turns more. A turn is an
affinity hit when it reached the replica that served the session's previous request (where its
newest state is); otherwise the replica that got it loads the session from the store (a move).
Store loads are also counted at Redis: the store reads a session with HMGET only to load it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_cluster import free_port, start_redis  # noqa: E402
from common import write_results  # noqa: E402

from rwkvstate.cli import BUNDLED_MODEL  # noqa: E402

VARIANTS = ("router", "multiplex")
PROMPTS = ("def f(x):", "\n    return", " x", "\n")
REPLICA = "x-rwkvstate-replica"
MODEL = BUNDLED_MODEL.stem


# ---- the multiplexing variant -------------------------------------------------------------------------
def multiplex_app(config, max_sessions: int):
    """The application with session ids as multiplexed model ids (classes defined here so that
    Ray ships them by value: `rwkvstate serve` never uses them)."""
    from ray import serve

    from rwkvstate.cluster.serve import EngineReplica, Ingress, _asgi_call, build_app

    class MultiplexIngress(Ingress):
        async def _holder(self, session: str) -> str | None:
            return None  # Ray's multiplexing routes by the ids the replicas report, not the store's holder

        def send(self, raw: dict, session: str | None, holder: str | None = None):
            return self.engine.options(multiplexed_model_id=session or "").handle.remote(raw, session=session)

    class MultiplexReplica(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=max_sessions)
        async def hold(self, session: str) -> str:
            """Registers the session here; GET /v1/sessions/<id> makes the engine core load it
            from the store when its copy is missing or older (404 for a session not stored yet)."""
            raw = {"method": "GET", "path": f"/v1/sessions/{session}", "query": "", "body": b"", "headers": []}
            async for _ in _asgi_call(self.app, raw, self.replica):
                pass
            return session

        async def handle(self, request: dict, session: str | None = None, replica: str | None = None,
                         holder: str | None = None):  # fmt: skip
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                await self.hold(model_id)
            creates = request["method"] == "POST" and (request["path"] == "/v1/sessions" or
                                                       request["path"].endswith("/fork"))  # fmt: skip
            parts = [part async for part in super().handle(request)] if creates else None
            if parts is None:
                async for part in super().handle(request):
                    yield part
                return
            if parts and parts[0]["status"] == 200:
                await self.hold(json.loads(b"".join(parts[1:]))["id"])  # registered before the answer
            for part in parts:
                yield part

    return build_app(config, replica=MultiplexReplica, ingress=MultiplexIngress, router=None)


# ---- one variant on a fresh cluster ------------------------------------------------------------------
def run_variant(args, variant: str, redis_url: str) -> dict:
    import ray
    from ray import serve

    from rwkvstate.cluster.serve import ClusterConfig, build_app, run
    from rwkvstate.cluster.store import StoreConfig

    config = ClusterConfig(model=str(BUNDLED_MODEL), store=StoreConfig(url=redis_url, prefix=f"{variant}:"),
                           replicas=2, server={"slots": args.slots, "max_tokens_cap": 64}, torch_threads=1,
                           ingress_replicas=1)  # one router's decisions, as the multiplexing variant has  # fmt: skip
    app = build_app(config) if variant == "router" else multiplex_app(config, 4 * args.sessions * args.rounds)
    src = str(Path(__file__).resolve().parents[1] / "src")
    paths = os.pathsep.join(p for p in (src, str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": paths, "OMP_NUM_THREADS": "1"}})  # fmt: skip
    port = free_port()
    try:
        started = time.perf_counter()
        run(config, "127.0.0.1", port, blocking=False, app=app)
        startup = time.perf_counter() - started
        result = asyncio.run(drive(args, f"http://127.0.0.1:{port}", redis_url))
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"variant": variant, "startup_s": startup, **result}


# ---- the workload ------------------------------------------------------------------------------------
class Client:
    def __init__(self, http, args):
        self.http, self.args = http, args

    async def request(self, path: str, body: dict | None) -> tuple[float, str, dict]:
        t0 = time.perf_counter()
        r = await self.http.post(path, json=body)
        elapsed = time.perf_counter() - t0
        r.raise_for_status()
        return elapsed, r.headers[REPLICA], r.json()

    async def turn(self, session: str | None, i: int) -> tuple[float, str]:
        body = {"model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": self.args.max_tokens,
                "temperature": 0, "stop_token_ids": []}  # fmt: skip
        if session is not None:
            body["session"] = session
        elapsed, replica, _ = await self.request("/v1/completions", body)
        return elapsed, replica

    async def create(self) -> tuple[str, str]:
        _, replica, data = await self.request("/v1/sessions", None)
        return data["id"], replica


async def conversation(client: Client, turns: int, state: dict | None = None) -> tuple[dict, list[dict]]:
    """Creates a session (without `state`) or continues one, then `turns` turns right after
    each other; one row per turn: its index, time, replica, and whether it stayed."""
    if state is None:
        session, home = await client.create()
        state = {"session": session, "home": home, "turn": 0}
    rows = []
    for _ in range(turns):
        state["turn"] += 1
        elapsed, replica = await client.turn(state["session"], state["turn"])
        rows.append({"session": state["session"], "turn": state["turn"], "s": elapsed, "replica": replica,
                     "hit": replica == state["home"]})  # fmt: skip
        state["home"] = replica
    return state, rows


async def drive(args, url: str, redis_url: str) -> dict:
    import httpx
    import redis

    record = Recorder(redis.Redis.from_url(redis_url))
    limits = httpx.Limits(max_connections=args.sessions + 8, max_keepalive_connections=args.sessions + 8)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=300) as http:
        client = Client(http, args)
        for i in range(4):  # warm-up: both replicas' first requests
            await client.turn(None, i)
        serial = {"no_session": [(await client.turn(None, i))[0] for i in range(args.serial)]}
        _, rows = await conversation(client, args.serial)
        serial["session"], serial["session_hits"] = [r["s"] for r in rows], sum(r["hit"] for r in rows)
        for _ in range(args.alone):  # one client: create, then two turns at once
            await record.phase("alone", [conversation(client, 2)])
        for _ in range(args.rounds):
            await asyncio.sleep(args.pause)  # each round starts on a settled cluster
            states = await record.phase("first", [conversation(client, args.turns) for _ in range(args.sessions)])
            await asyncio.sleep(args.pause)
            await record.phase("later", [conversation(client, args.later_turns, state) for state in states])
    return {"serial": serial, "turns": record.turns, "store_loads": record.store_loads}


class Recorder:
    """Every turn's row, by phase, and the sessions loaded from the store in each phase: the
    store reads a blob (HMGET) only to load a session."""

    def __init__(self, redis):
        self.redis = redis
        self.turns: list[dict] = []
        self.store_loads: dict[str, int] = {}

    def loads(self) -> int:
        return int(self.redis.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))

    async def phase(self, name: str, conversations: list) -> list[dict]:
        before = self.loads()
        results = await asyncio.gather(*conversations)
        self.store_loads[name] = self.store_loads.get(name, 0) + self.loads() - before
        self.turns += [dict(r, phase=name) for _, rows in results for r in rows]
        return [state for state, _ in results]


# ---- summary and report --------------------------------------------------------------------------------
def summarize(runs: list[dict], variant: str, args: dict) -> dict:
    """One variant's turns over all its runs, in groups, with its moves and store loads."""
    mine = [r for r in runs if r["variant"] == variant]
    rows = [t for r in mine for t in r["turns"]]
    first, later = [t for t in rows if t["phase"] == "first"], [t for t in rows if t["phase"] == "later"]
    alone = [t for t in rows if t["phase"] == "alone"]
    n = args["sessions"]
    groups = {f"{n} at once: all turns": first + later,
              f"{n} at once: turn 1 (right after create)": [t for t in first if t["turn"] == 1],
              f"{n} at once: turn 2 (right after turn 1)": [t for t in first if t["turn"] == 2],
              f"{n} at once: turns 3-{args['turns']}": [t for t in first if t["turn"] > 2],
              f"{n} at once: after a {args['pause']:g} s pause": later,
              "one at a time: turn 1 (right after create)": [t for t in alone if t["turn"] == 1],
              "one at a time: turn 2 (right after turn 1)": [t for t in alone if t["turn"] == 2]}  # fmt: skip
    return {"variant": variant, "runs": len(mine), "groups": {name: timing(g) for name, g in groups.items() if g},
            "moves": sum(not t["hit"] for t in rows),
            "store_loads": sum(sum(r["store_loads"].values()) for r in mine),
            "hit_turns": quantiles([t["s"] for t in rows if t["hit"]]),
            "moved_turns": quantiles([t["s"] for t in rows if not t["hit"]]),
            "serial_no_session": quantiles([s for r in mine for s in r["serial"]["no_session"]]),
            "serial_session": quantiles([s for r in mine for s in r["serial"]["session"]]),
            "serial_session_hits": sum(r["serial"]["session_hits"] for r in mine),
            "run_medians_ms": [quantiles([t["s"] for t in r["turns"] if t["phase"] != "alone"])["median_ms"]
                               for r in mine]}  # fmt: skip


def per_cluster(run: dict) -> dict:
    """What the JSON keeps of one cluster's run (every turn's row would be megabytes)."""
    phases = sorted({t["phase"] for t in run["turns"]})
    return {"variant": run["variant"], "startup_s": run["startup_s"], "store_loads": run["store_loads"],
            "phases": {p: timing([t for t in run["turns"] if t["phase"] == p]) for p in phases},
            "serial_no_session": quantiles(run["serial"]["no_session"]),
            "serial_session": quantiles(run["serial"]["session"]), "serial_session_hits": run["serial"]["session_hits"]}  # fmt: skip


def timing(rows: list[dict]) -> dict:
    moved = quantiles([r["s"] for r in rows if not r["hit"]])
    return {"turns": len(rows), "hits": sum(r["hit"] for r in rows), "hit_rate": sum(r["hit"] for r in rows) / len(rows),
            **quantiles([r["s"] for r in rows]), "moved_median_ms": moved.get("median_ms")}  # fmt: skip


def quantiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0}
    ms = sorted(1000 * s for s in seconds)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {"n": len(ms), "median_ms": statistics.median(ms), "p99_ms": p99}


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [f"# Session routing on Ray Serve: request router against multiplexing ({result['device']})", "",
             f"{result['date']}; Ray {result['ray']}; two CPU replicas of {result['model']} (one torch thread each), "
             f"Redis on the same machine; each variant on {a['repeats']} fresh clusters (run order "
             f"{', '.join(result['order'])}). Per cluster: {a['alone']} sessions one at a time (create, then two "
             f"turns right away), then {a['rounds']} rounds of {a['sessions']} concurrent sessions (create, "
             f"{a['turns']} turns right after each other, a {a['pause']:g} s pause, {a['later_turns']} more turns); "
             f"{a['max_tokens']} tokens per turn. A hit: the turn reached the replica that served the session's "
             "previous request; otherwise that replica loads it from the store (a move).", "",
             "| variant: turns | turns | hit rate | hits | median ms | p99 ms | moved turns' median ms |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in result["summary"]:
        for name, g in s["groups"].items():
            moved = "-" if g["moved_median_ms"] is None else f"{g['moved_median_ms']:.1f}"
            lines.append(f"| {s['variant']}: {name} | {g['turns']} | {g['hit_rate']:.1%} | {g['hits']} | "
                         f"{g['median_ms']:.1f} | {g['p99_ms']:.1f} | {moved} |")  # fmt: skip
    lines += ["", "| variant | moves (turns on another replica) | store loads (Redis HMGET) | hit turns median / p99 ms "
              "| moved turns median / p99 ms | median ms of each cluster's concurrent turns |", "|---|---|---|---|---|---|"]  # fmt: skip
    for s in result["summary"]:
        lines.append(f"| {s['variant']} | {s['moves']} | {s['store_loads']} | {span(s['hit_turns'])} | "
                     f"{span(s['moved_turns'])} | {', '.join(f'{m:.0f}' for m in s['run_medians_ms'])} |")  # fmt: skip
    lines += ["", f"One client alone, {a['serial']} requests per cluster (no queueing):", "",
              "| variant | no session: median / p99 ms | one session's turns: median / p99 ms | its hits |",
              "|---|---|---|---|"]  # fmt: skip
    for s in result["summary"]:
        lines.append(f"| {s['variant']} | {span(s['serial_no_session'])} | {span(s['serial_session'])} | "
                     f"{s['serial_session_hits']}/{a['serial'] * s['runs']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def span(q: dict) -> str:
    return "-" if not q.get("n") else f"{q['median_ms']:.1f} / {q['p99_ms']:.1f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: router, multiplex")
    p.add_argument("--sessions", type=int, default=32, help="concurrent sessions")
    p.add_argument("--turns", type=int, default=4, help="turns right after each other, after creating")
    p.add_argument("--later-turns", type=int, default=2, help="turns after the pause")
    p.add_argument("--pause", type=float, default=2.0, help="seconds between the two phases")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--alone", type=int, default=20, help="sessions created and run one at a time (two turns each)")
    p.add_argument("--repeats", type=int, default=2, help="clusters per variant, in the order A B B A ...")
    p.add_argument("--max-tokens", type=int, default=2)
    p.add_argument("--serial", type=int, default=30, help="requests of the one-client phase")
    p.add_argument("--slots", type=int, default=32, help="pool slots per replica")
    p.add_argument("--redis-server", default=shutil.which("redis-server"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.redis_server is None:
        p.error("no redis-server on PATH: pass --redis-server")
    import ray

    redis, url = start_redis(args.redis_server, tempfile.mkdtemp(prefix="bench-routing-"))
    variants = args.variants.split(",")
    order = [v for i in range(args.repeats) for v in (variants if i % 2 == 0 else variants[::-1])]  # A B B A: drift cancels
    try:
        runs = [run_variant(args, v, url) for v in order]
    finally:
        redis.terminate()
    kept = {k: v for k, v in vars(args).items() if k not in ("out", "redis_server")}
    result = {"date": datetime.date.today().isoformat(), "device": f"CPU, {os.cpu_count()} cores", "ray": ray.__version__,
              "model": BUNDLED_MODEL.stem, "args": kept, "order": order,
              "summary": [summarize(runs, v, kept) for v in variants], "runs": [per_cluster(r) for r in runs]}  # fmt: skip
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
