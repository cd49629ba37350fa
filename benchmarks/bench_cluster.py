"""Replicas on Ray Serve: throughput of two replicas against one, moving a session, store bytes.

    python benchmarks/bench_cluster.py --shape 1.5B --streams 256 --out docs/benchmarks/cluster-h200x2   # 2 GPUs
    python benchmarks/bench_cluster.py --device cpu --streams 4 --max-tokens 8 --out /tmp/cluster          # CPU smoke

Needs a redis-server on PATH (or --redis-server PATH) and the cluster extra. Three parts:

1. Throughput: a local Ray cluster runs the application with one engine replica, then with
   two (one GPU each); `--streams` completions per replica are kept in flight (256 and 512; a
   closed loop of --waves requests per stream, sent by --clients load-generator processes),
   each exactly --max-tokens long (stop_token_ids: []), whole responses unless --stream.
   Aggregate completion tokens/s from the start to the last answer, and their ratio (target:
   >= 1.8). --direct sends them through Ray Serve handles instead (no HTTP proxy, no ingress).
2. Moving a session, in this process on one device: a session of --move-tokens tokens is
   saved to the store (snapshot, encode, Redis write) and loaded into another engine (Redis
   read, decode, verify, restore), per store format; median over --move-repeats.
3. Store bytes per turn: the blob a turn writes, per format (the whole state file each time).

With --shape, random weights of a released shape (world vocabulary) are written to a
safetensors file that every replica loads. Redis runs as a child process on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import config_for  # noqa: E402
from bench_server import fire, one_request, request_body  # noqa: E402
from common import CpuTimes, write_results  # noqa: E402

from rwkvstate.cli import BUNDLED_MODEL  # noqa: E402

FORMATS = ("fp32", "fp16", "int8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(binary: str, directory: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory,
            "--maxmemory", "0", "--proto-max-bulk-len", "1gb"]  # fmt: skip
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return process, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def model_file(args, directory: Path) -> tuple[str, str]:
    """(path, description) of the model every replica loads."""
    if not args.shape:
        return str(BUNDLED_MODEL), BUNDLED_MODEL.stem
    from safetensors.torch import save_file

    from rwkvstate.model.synthetic import random_checkpoint

    cfg = config_for(args.shape)
    path = directory / f"random-{args.shape}.safetensors"
    tensors = random_checkpoint(cfg, seed=0, dtype=torch.float16)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"tokenizer": "world"}))
    return str(path), f"{args.shape} shape, random weights"


# ---- 1. throughput ----------------------------------------------------------------------------------
def _load_main(args: tuple, stream: bool, barrier, results) -> None:
    """A load generator in its own process (spawned): bench_server's closed loop, whole responses
    unless `stream`. A failed request ends the run (its error goes back instead of rows, so the
    benchmark stops at once rather than waiting)."""
    try:
        one = one_request if stream else whole_request
        results.put(asyncio.run(fire(*args, barrier=barrier, stream=stream, one=one)))
    except BaseException as e:
        results.put(f"{type(e).__name__}: {e}")
        raise


def drive(url: str, model: str, streams: int, waves: int, max_tokens: int, clients: int, stream: bool) -> dict:
    """`streams` requests in flight at once, `waves` * `streams` in all, from `clients` load
    generator processes that start together at a barrier (one Python process cannot send
    hundreds of requests at once fast enough: its HTTP client's CPU time per request grows
    with the connections it holds). Whole responses unless `stream` (SSE through the ingress)."""
    import multiprocessing

    clients = max(1, min(clients, streams))
    ctx = multiprocessing.get_context("spawn")
    results, barrier = ctx.Queue(), ctx.Barrier(clients + 1)
    share = [list(range(c, waves * streams, clients)) for c in range(clients)]
    procs = [ctx.Process(target=_load_main, args=((url, model, idx, len(range(c, streams, clients)), max_tokens),
                                                  stream, barrier, results)) for c, idx in enumerate(share)]  # fmt: skip
    for proc in procs:
        proc.start()
    try:
        barrier.wait(180)  # imports take seconds; a generator that died before it breaks the barrier
        with CpuTimes() as cpu:  # from the common start: the generators' start-up is not the servers' time
            start = time.monotonic()  # one clock for every process of this machine
            batches = [results.get(timeout=900) for _ in procs]
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
    failed = [b for b in batches if isinstance(b, str)]
    if failed:
        raise RuntimeError(f"a load generator failed: {failed[0]}")
    rows = [row for batch in batches for row in batch]
    return summarise(rows, start, streams) | {"waves": waves, "requests": len(rows), "clients": clients,
                                              "cpu_top": cpu.top}  # fmt: skip


async def drive_direct(model: str, streams: int, waves: int, max_tokens: int) -> dict:
    """As drive(), but each request goes straight to the engine deployment through a Ray Serve
    handle from this process: no HTTP proxy, no ingress. Tells the replicas' own rate apart from
    what the path in front of them costs."""
    from ray import serve

    from rwkvstate.cluster.serve import APP_NAME, REPLICA_HEADER

    engine = serve.get_deployment_handle("engine", app_name=APP_NAME).options(stream=True)
    headers = [(b"content-type", b"application/json")]

    gate = asyncio.Semaphore(streams)

    async def one(i: int) -> dict:
        raw = {"method": "POST", "path": "/v1/completions", "query": "",
               "body": json.dumps(request_body(model, i, max_tokens, stream=False)).encode(), "headers": headers}  # fmt: skip
        async with gate:
            parts = [part async for part in engine.handle.remote(raw)]
        if parts[0]["status"] != 200:
            raise RuntimeError(f"replica answered {parts[0]['status']}: {b''.join(parts[1:])[:200]!r}")
        return {"tokens": json.loads(b"".join(parts[1:]))["usage"]["completion_tokens"], "end": time.monotonic(),
                "replica": dict(parts[0]["headers"]).get(REPLICA_HEADER, "?")}  # fmt: skip

    start = time.monotonic()
    results = await asyncio.gather(*(one(i) for i in range(waves * streams)))
    return summarise(results, start, streams) | {"waves": waves, "requests": len(results)}


def summarise(results: list[dict], start: float, streams: int) -> dict:
    """Aggregate tokens/s over the wall time, and where the requests went and when each ended."""
    wall = max(r["end"] for r in results) - start
    tokens = sum(r["tokens"] for r in results)
    out = {"streams": streams, "wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall}
    if "replica" in results[0]:
        per_replica: dict[str, list[float]] = {}
        for r in results:
            per_replica.setdefault(r["replica"], []).append(r["end"] - start)
        out["per_replica"] = [{"replica": replica, "requests": len(ends), "last_done_s": max(ends),
                               "median_done_s": statistics.median(ends)}
                              for replica, ends in sorted(per_replica.items(), key=lambda x: -len(x[1]))]  # fmt: skip
    return out


async def whole_request(client, url: str, body: dict) -> dict:
    from rwkvstate.cluster.serve import REPLICA_HEADER  # needs Ray, which rendering the results does not

    reply, headers = await client.post(url, body)
    return {"tokens": reply["usage"]["completion_tokens"], "end": time.monotonic(),
            "replica": headers.get(REPLICA_HEADER.lower(), "?")}  # fmt: skip


def throughput(args, model_path: str, redis_url: str, replicas: int) -> dict:
    import ray
    from ray import serve

    from rwkvstate.cluster.serve import APP_NAME, ClusterConfig, run
    from rwkvstate.cluster.store import StoreConfig

    device = "cuda" if args.device == "cuda" else "cpu"
    slots = args.streams
    config = ClusterConfig(model=model_path, store=StoreConfig(url=redis_url, prefix=f"bench{replicas}:"),
                           device=device, dtype="fp16" if device == "cuda" else "fp32", replicas=replicas,
                           server={"slots": slots, "max_queue": 4 * slots, "max_tokens_cap": args.max_tokens,
                                   "state_dtype": torch.float16 if device == "cuda" else torch.float32,
                                   "request_timeout_s": None, "model_name": "bench"},
                           torch_threads=None if device == "cuda" else 1,
                           ingress_replicas=args.ingress_replicas)  # fmt: skip
    port = free_port()
    env = {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ} | dict(e.split("=", 1) for e in args.env)
    ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        run(config, "127.0.0.1", port, blocking=False)
        url = f"http://127.0.0.1:{port}"
        streams = args.streams * replicas
        drive(url, "bench", streams, 1, min(8, args.max_tokens), args.clients, args.stream)  # warm-up: every path, graphs, allocator
        if args.direct:
            with CpuTimes() as cpu:
                row = asyncio.run(drive_direct("bench", streams, args.waves, args.max_tokens))
            row["cpu_top"] = cpu.top
        else:
            row = drive(url, "bench", streams, args.waves, args.max_tokens, args.clients, args.stream)
        engine = serve.get_deployment_handle("engine", app_name=APP_NAME)
        for r in row.get("per_replica", []):  # the process and device behind each replica
            info = engine.info.remote(replica=r["replica"]).result(timeout_s=60)
            r.update({k: v for k, v in info.items() if k != "replica"})
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"replicas": replicas, "path": "direct" if args.direct else "http",
            "ingress_replicas": args.ingress_replicas or replicas, **({"env": args.env} if args.env else {}),
            **row}


# ---- 2, 3. moving a session, bytes per turn -------------------------------------------------------------
def moves(args, model_path: str, redis_url: str) -> list[dict]:
    from rwkvstate import Engine, Model
    from rwkvstate.cluster.store import RedisStore, StoreConfig
    from rwkvstate.runtime.persist import load_session_bytes, session_bytes

    device = "cuda" if args.device == "cuda" else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    model = Model.load(model_path, device=device, dtype=dtype)
    source, target = Engine(model, slots=2, state_dtype=dtype), Engine(model, slots=2, state_dtype=dtype)
    session = source.session()
    session.feed([int(t) % model.config.vocab_size for t in range(1, args.move_tokens + 1)])
    rows = []
    for fmt in FORMATS:
        store = RedisStore(StoreConfig(url=redis_url, prefix=f"move-{fmt}:", format=fmt))
        saves, loads, version = [], [], 0
        for i in range(args.move_repeats):
            sync(device)
            t0 = time.perf_counter()
            blob = session_bytes(session, fmt)
            version = store.put("s", blob, expected=version, tokens=len(session.tokens), created=0)
            t1 = time.perf_counter()
            moved = target.session()
            load_session_bytes(moved, store.get("s").blob, "s")
            moved.slot  # brings the state into the pool: the move is done when it can decode
            sync(device)
            t2 = time.perf_counter()
            moved.close()
            saves.append(t1 - t0)
            loads.append(t2 - t1)
        state_bytes = sum(t.numel() for t in session.snapshot().state.values()) * {"fp32": 4, "fp16": 2, "int8": 1}[fmt]
        rows.append({"format": fmt, "blob_bytes": len(blob), "state_bytes": state_bytes, "tokens": len(session.tokens),
                     "save_ms": 1000 * statistics.median(saves), "load_ms": 1000 * statistics.median(loads),
                     "move_ms": 1000 * (statistics.median(saves) + statistics.median(loads))})  # fmt: skip
        store.close()
    return rows


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---- report ---------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    lines = [f"# Replicas on Ray Serve ({result['device']}, {result['model']})", "",
             f"{result['date']}; {result['max_tokens']} tokens per request, {result['streams_per_replica']} streams "
             f"per replica{_load(result)}, {'streamed' if result['stream'] else 'whole'} responses"
             f"{', requests sent to the replicas through Ray Serve handles (no HTTP proxy, no ingress)' if result['throughput'] and result['throughput'][0].get('path') == 'direct' else ''}.", "", "| replicas | ingresses | streams | wall s | tokens/s |", "|---|---|---|---|---|"]  # fmt: skip
    for row in result["throughput"]:
        fronts = "-" if row.get("path") == "direct" else row.get("ingress_replicas", 1)
        lines.append(f"| {row['replicas']} | {fronts} | {row['streams']} | {row['wall_s']:.1f} | "
                     f"{row['tokens_per_s']:,.0f} |")  # fmt: skip
    balance = [(row["replicas"], r) for row in result["throughput"] for r in row.get("per_replica", [])]
    if balance:
        lines += ["", "Where the requests went (whole responses: each request's completion time from the start):", "",
                  "| replicas | requests on this replica | median done s | last done s |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {n} | {r['requests']} | {r['median_done_s']:.2f} | {r['last_done_s']:.2f} |" for n, r in balance]
        devices = [f"pid {r['pid']}: {r['device']} {r.get('device_uuid', '')}".rstrip() for _, r in balance if "pid" in r]
        if devices:
            lines += ["", "Replica processes and their devices: " + "; ".join(devices) + "."]
    if "speedup" in result:
        lines += ["", f"Two replicas against one: **{result['speedup']:.2f}x** aggregate tokens/s."]
    for row in result["throughput"]:
        if "cpu_top" in row:
            # closed-loop rows: over the measured wall (the first such runs timed their CPU from
            # before the load generators' start-up, when the servers were idle)
            per = (lambda p: p["cpu_s"] / row["wall_s"]) if "waves" in row else (lambda p: p["per_wall_s"])
            busiest = ", ".join(f"`{p['process']}` {per(p):.2f}" for p in row["cpu_top"][:5])
            lines += ["", f"CPU seconds per second of the {row['replicas']}-replica run, busiest processes: {busiest}."]
    if not result["moves"]:
        return "\n".join(lines) + "\n"
    lines += ["", "Moving a session (save to the store, load on another engine):", "",
              "| format | state bytes | blob bytes (= store bytes per turn) | save ms | load ms | move ms |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for row in result["moves"]:
        lines.append(f"| {row['format']} | {row['state_bytes']:,} | {row['blob_bytes']:,} | {row['save_ms']:.2f} | "
                     f"{row['load_ms']:.2f} | {row['move_ms']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _load(result: dict) -> str:
    """How the load was offered (results from before the closed loop have one burst per stream)."""
    row = result["throughput"][0] if result["throughput"] else {}
    if "waves" not in row:
        return ""
    clients = f" from {row['clients']} load-generator processes" if "clients" in row else ""
    return f", {row['waves']} requests per stream one after another (closed loop){clients}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default=None, help="a released shape with random weights (e.g. 1.5B); default: bundled")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--streams", type=int, default=256, help="streams in flight per replica")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--replicas", default="1,2", help="replica counts to run, e.g. 1,2")
    p.add_argument("--ingress-replicas", type=int, default=None, help="ingresses (default: one per replica)")
    p.add_argument("--waves", type=int, default=3, help="requests per stream, one after another (closed loop)")
    p.add_argument("--clients", type=int, default=8, help="load generator processes")
    p.add_argument("--stream", action="store_true", help="streamed responses (every token through the ingress)")
    p.add_argument("--direct", action="store_true",
                   help="requests go to the engine replicas through a Ray Serve handle (no HTTP proxy, no ingress)")
    p.add_argument("--move-tokens", type=int, default=64)
    p.add_argument("--move-repeats", type=int, default=20)
    p.add_argument("--skip-moves", action="store_true", help="throughput only")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the replicas' environment (repeatable)")
    p.add_argument("--redis-server", default=shutil.which("redis-server"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.redis_server is None:
        p.error("no redis-server on PATH: pass --redis-server")
    directory = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    redis, url = start_redis(args.redis_server, str(directory))
    try:
        model_path, model = model_file(args, directory)
        rows = [throughput(args, model_path, url, int(n)) for n in args.replicas.split(",")]
        move_rows = [] if args.skip_moves else moves(args, model_path, url)
    finally:
        redis.terminate()
    device = torch.cuda.get_device_name() + f" x{torch.cuda.device_count()}" if args.device == "cuda" else "CPU"
    result = {"date": datetime.date.today().isoformat(), "device": device, "model": model, "max_tokens": args.max_tokens,
              "streams_per_replica": args.streams, "stream": args.stream and not args.direct, "throughput": rows, "moves": move_rows}  # fmt: skip
    by = {r["replicas"]: r["tokens_per_s"] for r in rows}
    if 1 in by and 2 in by:
        result["speedup"] = by[2] / by[1]
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
