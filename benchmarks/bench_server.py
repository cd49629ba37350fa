"""Serving, layer by layer: bare decode, the engine, the HTTP server, at 1, 64 and 256 streams.

    python benchmarks/bench_server.py --shape 1.5B --state-dtype fp16 --out docs/benchmarks/serving-h200   # a GPU
    python benchmarks/bench_server.py --levels 1,2 --max-tokens 4 --core thread --out /tmp/serving         # CPU smoke

For each level (streams at once), in one run and on one device:

- bare decode: `DecodeGraphs.decode` steps of that batch (captured graphs on a GPU): the ceiling;
- engine: `level` streams through `Engine` with top-p sampling (temperature 1, top_p 0.9,
  seeded), in `--waves` waves; tokens/s while every stream decodes (against bare decode), and
  from the first prompt to the last token (the server's workload, against the server);
- server: the same requests as streaming /v1/completions against `rwkvstate serve` (engine
  core in a process of its own, `--api-processes` HTTP processes), fired by `--client-processes`
  load-generator processes that wait at a barrier after their imports and start together;
  tokens/s (completion tokens from the usage chunks) from that common start to the last [DONE],
  time to the first text chunk (TTFT) and the gaps between text chunks (inter-token latency),
  p50 and p99. The spread of the generators' first requests is reported beside it, and where
  the slow gaps (20 ms or more) fall: how many, in how many 10 ms bins of time, and how many
  in the fullest bin (many streams slow at one instant: a shared stall; spread: per stream).

Generations never stop early (`stop_token_ids: []`), so every request produces --max-tokens
tokens. With `--shape`, random weights of a released shape (world vocabulary) replace the
bundled model. Writes OUT.json, OUT.md and OUT.png (a chart, with matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import multiprocessing
import os
import platform
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import config_for  # noqa: E402
from common import measure, process_cpu, write_results  # noqa: E402

from rwkvstate import Engine, Model, SamplingParams  # noqa: E402
from rwkvstate.cli import BUNDLED_MODEL  # noqa: E402
from rwkvstate.runtime.core import ModelSpec  # noqa: E402
from rwkvstate.runtime.graphs import DecodeGraphs  # noqa: E402
from rwkvstate.runtime.latency import BUCKETS, HISTOGRAMS, quantile  # noqa: E402
from rwkvstate.state.layout import dtype_name, parse_dtype  # noqa: E402

PROMPT = "def parse_arguments(argv):\n    parser = argparse.ArgumentParser(description=__doc__)\n"
TOP_P = dict(temperature=1.0, top_p=0.9)
SLOW_GAP_S = 0.02  # an inter-token gap this long counts as slow (several decode steps on a GPU)
STALL_BIN_S = 0.01  # slow gaps ending within one such bin are counted as one stall
SERVER_METHOD = ("server tokens/s: completion tokens (usage chunks) over the time from the common start of the "
                 "load generators (a barrier after their imports) to the last [DONE]")


def model_spec(args) -> ModelSpec:
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    dtype = args.dtype or ("fp16" if device == "cuda" else "fp32")
    if args.shape:
        return ModelSpec(device=device, dtype=dtype, synthetic={"config": asdict(config_for(args.shape)), "seed": 0})
    return ModelSpec(path=str(args.model or BUNDLED_MODEL), device=device, dtype=dtype)


def device_name(model: Model) -> str:
    if model.device.type == "cuda":
        return torch.cuda.get_device_name(model.device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(model: Model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


# ---- bare decode and the engine ---------------------------------------------------------------
def bare_decode(model: Model, level: int, state_dtype, steps: int) -> dict:
    """Graph decode steps of `level` rows, nothing else: tokens/s and the step time (the
    benchmarks' common timer: the median of 3 medians of `steps` steps)."""
    pool = model.new_pool(level, state_dtype)
    graphs = DecodeGraphs(model, pool, max_batch=level)
    slots, tokens = list(range(level)), [1] * level
    seconds = measure(lambda: graphs.decode(slots, tokens), model.device, repeats=3, calls=steps)["median_s"]
    return {"bare_tokens_per_s": level / seconds, "bare_step_ms": 1000 * seconds}


def prompt(i: int) -> str:
    return f"# request {i}\n{PROMPT}"


def engine_run(model: Model, level: int, waves: int, max_tokens: int, state_dtype) -> dict:
    """`level` streams at a time through one Engine: decode-phase and end-to-end tokens/s."""
    engine = Engine(model, slots=level, state_dtype=state_dtype)
    # warm-up: a whole wave of the level's prompts with top-p, so graph capture, kernel compilation
    # for the packed prompt shapes and the sampler's first use all stay out of the timed interval
    warm = [engine.session().generate(2, SamplingParams(**TOP_P, seed=i, stop_token_ids=[]), prompt=prompt(-1 - i))
            for i in range(level)]  # fmt: skip
    engine.run(warm)
    for s in warm:
        s.session.close()
    decode_tokens, decode_s, total, steps_ms = 0, 0.0, 0, []
    full_s, full_steps = 0.0, 0  # steps in which every one of the level's streams generated a token
    sync(model)
    start = time.perf_counter()
    for wave in range(waves):
        streams = [engine.session().generate(max_tokens, SamplingParams(**TOP_P, seed=i, stop_token_ids=[]),
                                             prompt=prompt(wave * level + i)) for i in range(level)]  # fmt: skip
        while any(not s.token_ids for s in streams):  # prompts, then every stream's first token
            engine.step()
        sync(model)
        t0, n0 = time.perf_counter(), engine.tokens_generated
        while engine.has_work:
            t, n = time.perf_counter(), engine.tokens_generated
            engine.step()
            took = time.perf_counter() - t
            steps_ms.append(1000 * took)
            if engine.tokens_generated - n == level:
                full_s, full_steps = full_s + took, full_steps + 1
        sync(model)
        decode_s += time.perf_counter() - t0
        decode_tokens += engine.tokens_generated - n0
        total += sum(len(s.token_ids) for s in streams)
        for s in streams:
            s.session.close()
    sync(model)
    wall = time.perf_counter() - start
    # the decode phase runs from the moment every stream has its first token; streams whose prompts
    # were read sooner (packed) than others (one token per step in the decode graph) started
    # decoding sooner and end sooner, so its last steps carry fewer streams; the full-batch rate
    # counts only steps that carry all of them, as bare decode does
    return {"engine_decode_tokens_per_s": decode_tokens / decode_s, "engine_tokens_per_s": total / wall,
            "engine_full_batch_tokens_per_s": level * full_steps / full_s if full_steps else None,
            "engine_full_batch_steps": full_steps, "engine_decode_steps": len(steps_ms),
            "engine_step_p50_ms": percentile(steps_ms, 50), "engine_step_p99_ms": percentile(steps_ms, 99)}  # fmt: skip


# ---- the server ---------------------------------------------------------------------------------
def _serve_main(spec: ModelSpec | None, config) -> None:
    """A server process: `rwkvstate serve` with this spec and config (engine core in its own process)."""
    from rwkvstate.server import serve

    sys.stdin = None  # type: ignore[assignment]  # uvicorn's workers would reopen this process's (closed) stdin
    serve(spec, config, log_level="warning")


class Server:
    """`rwkvstate serve` in a process of its own (core="process"), or the app on a thread of
    this process with its engine core on another thread (core="thread": quick CPU runs)."""

    def __init__(self, args, spec: ModelSpec | None, model: Model | None, slots: int, core_address: str | None = None):
        """core_address: API processes only, for a core already running there (bench_api.py)."""
        from rwkvstate.server import ServerConfig

        self.port = free_port()
        parser = getattr(args, "http_parser", None)  # bench_api.py's choice; else the server's default
        self.config = ServerConfig(port=self.port, slots=slots, state_dtype=args.state_dtype,
                                   max_tokens_cap=max(args.max_tokens, 8), max_queue=max(args.levels) * args.waves,
                                   request_timeout_s=None, prefix_cache_bytes=0, core_address=core_address,
                                   api_processes=args.api_processes if args.core == "process" else 1,
                                   **({"http": parser} if parser else {}))  # fmt: skip
        self.spec, self.model, self.core = spec, model, args.core
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        if self.core == "thread":
            from rwkvstate.server import BackgroundServer, create_app

            self.background = BackgroundServer(create_app(self.model, self.config), port=self.port).start()
        else:
            self.process = multiprocessing.get_context("spawn").Process(target=_serve_main, args=(self.spec, self.config))
            self.process.start()
        self._wait_healthy()
        return self

    def _wait_healthy(self, timeout: float = 600.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.core == "process" and not self.process.is_alive():
                break
            time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def pids(self) -> list[int]:
        """The server's processes: `serve` and everything it started (engine core, API
        processes); this process when the server runs on its threads."""
        import psutil

        if self.core == "thread":
            return [os.getpid()]
        root = psutil.Process(self.process.pid)
        return [root.pid] + [child.pid for child in root.children(recursive=True)]

    def model_name(self) -> str:
        import httpx

        return httpx.get(f"{self.url}/v1/models").json()["data"][0]["id"]

    def __exit__(self, *exc) -> None:
        if self.core == "thread":
            self.background.stop()
        else:
            self.process.terminate()  # SIGTERM: uvicorn shuts down, then the engine core
            self.process.join(120)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoadClient:
    """A load generator's HTTP client: aiohttp (the default) or httpx, behind the two calls the
    requests need. The client is the measuring instrument, so its cost per chunk matters: one
    that is busy reading some streams delays the arrival times it records for others, which
    shows as inter-token latency the server did not add. Against the simulated core of
    bench_api.py (this 2-core machine, 64 streams, one API process) httpx's streaming reader
    spent about 80 us of CPU per chunk and aiohttp's about 25 (docs/benchmarks/api-clients-cpu.md)."""

    KINDS = ("aiohttp", "httpx")

    def __init__(self, kind: str, connections: int):
        if kind not in self.KINDS:
            raise ValueError(f"load client {kind!r}: one of {', '.join(self.KINDS)}")
        self.kind, self.connections = kind, connections

    async def __aenter__(self) -> "LoadClient":
        if self.kind == "aiohttp":
            import aiohttp

            connector = aiohttp.TCPConnector(limit=self.connections)
            self._client = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600))
        else:
            import httpx

            limits = httpx.Limits(max_connections=self.connections, max_keepalive_connections=self.connections)
            self._client = httpx.AsyncClient(limits=limits, timeout=600)
        await self._client.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self._client.__aexit__(*exc)

    async def lines(self, url: str, body: dict):
        """The lines of a streamed POST's body, as bytes (an HTTP error status raises)."""
        if self.kind == "aiohttp":
            async with self._client.post(url, json=body) as response:
                response.raise_for_status()
                async for line in response.content:  # aiohttp's reader yields lines, ends included
                    yield line
        else:
            async with self._client.stream("POST", url, json=body) as response:
                response.raise_for_status()
                async for text in response.aiter_lines():
                    yield text.encode()

    async def post(self, url: str, body: dict) -> tuple[dict, dict]:
        """A whole POST: its JSON body and its headers (names in lower case)."""
        if self.kind == "aiohttp":
            async with self._client.post(url, json=body) as response:
                response.raise_for_status()
                return await response.json(), {k.lower(): v for k, v in response.headers.items()}
        response = await self._client.post(url, json=body)
        response.raise_for_status()
        return response.json(), {k.lower(): v for k, v in response.headers.items()}


async def one_request(client: LoadClient, url: str, body: dict) -> dict:
    """One streaming request: when it started and ended, its first text chunk, the gaps between
    text chunks, and its completion tokens (from the usage chunk). Chunks are not parsed as
    JSON except the last ones, so the load generator stays light."""
    start = time.monotonic()
    arrivals, tokens = [], 0
    async for line in client.lines(url, body):
        if not line.startswith(b"data: {"):
            continue
        if b'"usage":{' in line:
            import json

            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        elif b'"error"' in line[:20]:
            raise RuntimeError(line.decode())
        elif b'"text":""' not in line:
            arrivals.append(time.monotonic())
    end = time.monotonic()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    slow = [(b, b - a) for a, b in zip(arrivals, arrivals[1:]) if b - a >= SLOW_GAP_S]
    return {"start": start, "end": end, "ttft_s": (arrivals[0] if arrivals else end) - start, "gaps": gaps,
            "slow": slow, "tokens": tokens}  # fmt: skip


def stalls(rows: list[dict]) -> dict:
    """Where the slow gaps (>= SLOW_GAP_S) fall: gaps of many streams ending within one STALL_BIN_S
    bin are one stall shared by those streams (the core, or one API process for its streams);
    gaps spread over many bins are each stream's own (its reader, its load generator)."""
    ends = sorted(t for r in rows for t, _ in r["slow"])
    bins: dict[int, int] = {}
    for t in ends:
        bins[int(t / STALL_BIN_S)] = bins.get(int(t / STALL_BIN_S), 0) + 1
    return {"slow_gaps": len(ends), "slow_gap_bins": len(bins),
            "slow_gaps_in_largest_bin": max(bins.values(), default=0)}  # fmt: skip


def steady(rows: list[dict], level: int) -> dict:
    """Tokens/s while every stream runs: from the moment the first `level` requests (the first
    wave, all started at the barrier) have all had their first token to the first end of a
    request after the last request started (from then on fewer than `level` run). The prompts
    and first tokens of later requests fall inside; the common start's burst and the tail do
    not. Tokens come from the text chunks' arrival times (a chunk counted as the request's
    tokens per chunk). None when the run is too short to have such a window."""
    if len(rows) <= level:
        return {"server_steady_tokens_per_s": None, "server_steady_window_s": 0.0}
    first_wave = sorted(rows, key=lambda r: r["start"])[:level]
    t_s = max(r["start"] + r["ttft_s"] for r in first_wave)
    last_start = max(r["start"] for r in rows)
    t_e = min(r["end"] for r in rows if r["end"] >= last_start)
    if t_e <= t_s:
        return {"server_steady_tokens_per_s": None, "server_steady_window_s": 0.0}
    tokens = 0.0
    for r in rows:
        arrivals = [r["start"] + r["ttft_s"]]
        for gap in r["gaps"]:
            arrivals.append(arrivals[-1] + gap)
        inside = sum(t_s <= t <= t_e for t in arrivals)
        tokens += inside * r["tokens"] / len(arrivals)
    return {"server_steady_tokens_per_s": tokens / (t_e - t_s), "server_steady_window_s": t_e - t_s}


def request_body(model_name: str, i: int, max_tokens: int, stream: bool = True) -> dict:
    """Request i of a run: its own prompt and seed, top-p, exactly max_tokens long."""
    return {"model": model_name, "prompt": prompt(i), "max_tokens": max_tokens, **TOP_P, "seed": i, "stream": stream,
            "stop_token_ids": [], **({"stream_options": {"include_usage": True}} if stream else {})}  # fmt: skip


async def fire(url: str, model_name: str, indices: list[int], concurrency: int, max_tokens: int,
               barrier=None, clock: dict | None = None, stream: bool = True, one=one_request,
               client: str = "aiohttp") -> list[dict]:  # fmt: skip
    """The requests `indices`, `concurrency` at a time (a closed loop: each finished request
    makes room for the next), each sent by `one` (default: streamed, one_request) through a
    LoadClient of kind `client`. With `barrier` (a multiprocessing Barrier), every load
    generator waits there once its imports and its client are ready, so they all start sending
    together; `clock` gets this process's CPU time at that start."""
    gate = asyncio.Semaphore(concurrency)
    async with LoadClient(client, concurrency + 4) as session:
        if barrier is not None:
            await asyncio.get_running_loop().run_in_executor(None, barrier.wait, 600)
        if clock is not None:
            clock["cpu0"] = time.process_time()

        async def limited(i: int) -> dict:
            async with gate:
                return await one(session, f"{url}/v1/completions", request_body(model_name, i, max_tokens, stream))

        return await asyncio.gather(*(limited(i) for i in indices))


def _client_main(args: tuple, barrier, results, client: str) -> None:
    """A load generator in its own process (spawned); it starts sending when all are ready, and
    reports its rows and the CPU seconds it spent from then on."""
    clock: dict = {}
    rows = asyncio.run(fire(*args, barrier=barrier, clock=clock, client=client))
    results.put({"rows": rows, "cpu_s": time.process_time() - clock["cpu0"]})


def engine_figures(url: str) -> tuple[float, float, dict[str, list[float]]]:
    """The core's (steps, graph steps) counters and its latency histograms (per-bucket counts by
    name, runtime/latency.py) from /metrics."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    values, cumulative = {}, {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in ("rwkvstate_engine_steps_total", "rwkvstate_decode_graph_steps_total"):
            values[name] = float(value)
        base, _, labels = name.partition("_seconds_bucket{")
        if labels and base.removeprefix("rwkvstate_") in HISTOGRAMS:
            cumulative.setdefault(base.removeprefix("rwkvstate_"), []).append(float(value))
    counts = {k: [b - a for a, b in zip([0.0] + c[:-1], c)] for k, c in cumulative.items()}
    return values["rwkvstate_engine_steps_total"], values["rwkvstate_decode_graph_steps_total"], counts


def latency_figures(before: dict, after: dict) -> dict:
    """p50 and p99 (ms) of each core histogram over a level: the counts it added."""
    out = {}
    for name in HISTOGRAMS:
        counts = [b - a for a, b in zip(before.get(name, [0.0] * len(after.get(name, []))), after.get(name, []))]
        for q in (50, 99):
            value = quantile(counts, q / 100) if counts else None
            out[f"{name}_p{q}_ms"] = None if value is None else 1000 * value
        out[f"{name}_count"] = int(sum(counts))
        out[f"{name}_over_5ms"] = int(sum(n for bound, n in zip((0.0, *BUCKETS), counts) if bound >= 0.005))
    return out


def server_level(url: str, model_name: str, level: int, waves: int, max_tokens: int, clients: int,
                 server_pids: list[int], load_client: str = "aiohttp") -> dict:  # fmt: skip
    """`level` requests at a time, waves * level in all, split over `clients` processes (each a
    LoadClient of kind `load_client`); with the
    CPU seconds per second of wall time of each server process (`server_pids`: the engine core
    and the API processes) and of each load generator (from its start at the barrier): a
    process near 1.0 is saturated."""
    steps_before, graph_before, latency_before = engine_figures(url)
    server_cpu = {pid: cpu for pid, (_, cpu) in process_cpu(server_pids).items()}
    clients = max(1, min(clients, level))
    ctx = multiprocessing.get_context("spawn")
    results, barrier = ctx.Queue(), ctx.Barrier(clients)
    share = [list(range(c, waves * level, clients)) for c in range(clients)]
    procs = [ctx.Process(target=_client_main, args=((url, model_name, idx, len(range(c, level, clients)), max_tokens),
                                                    barrier, results, load_client)) for c, idx in enumerate(share)]  # fmt: skip
    for p in procs:
        p.start()
    batches = [results.get(timeout=1800) for _ in procs]
    server_cpu = {pid: cpu - server_cpu.get(pid, 0.0) for pid, (_, cpu) in process_cpu(server_pids).items()}
    for p in procs:
        p.join(30)
    rows = [r for batch in batches for r in batch["rows"]]
    # every generator's first request starts right after the barrier (monotonic clocks are one
    # clock across processes here): the spread of those starts says how together they began
    starts = [min(r["start"] for r in batch["rows"]) for batch in batches]
    wall = max(r["end"] for r in rows) - min(starts)
    gaps = [g for r in rows for g in r["gaps"]]
    ttft = [r["ttft_s"] for r in rows]
    time.sleep(0.3)  # the core's stats reach the API processes with its heartbeat (every 0.1 s)
    steps_after, graph_after, latency_after = engine_figures(url)
    steps = steps_after - steps_before
    cpu = {"server_cpu_per_wall": sorted((c / wall for c in server_cpu.values()), reverse=True),
           "client_cpu_per_wall": sorted((b["cpu_s"] / wall for b in batches), reverse=True)}
    return {"server_tokens_per_s": sum(r["tokens"] for r in rows) / wall, "server_requests": len(rows),
            "server_engine_steps": int(steps), "server_packed_steps": int(steps - (graph_after - graph_before)), **cpu,
            "server_wall_s": wall, "client_start_spread_ms": 1000 * (max(starts) - min(starts)), **stalls(rows),
            **steady(rows, level), **latency_figures(latency_before, latency_after),
            "ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99),
            "itl_p50_ms": 1000 * percentile(gaps, 50), "itl_p99_ms": 1000 * percentile(gaps, 99)}  # fmt: skip


# ---- the run ------------------------------------------------------------------------------------
def run(args) -> dict:
    spec = model_spec(args)
    model = spec.load()
    device = device_name(model)
    state_dtype = parse_dtype(args.state_dtype)
    slots = max(args.levels)
    rows = []
    for level in args.levels:
        row = {"streams": level}
        row.update(bare_decode(model, level, state_dtype, args.steps))
        row.update(engine_run(model, level, args.waves, args.max_tokens, state_dtype))
        rows.append(row)
        print(f"{level} streams: bare {row['bare_tokens_per_s']:,.0f}, engine {row['engine_decode_tokens_per_s']:,.0f} "
              f"tok/s", file=sys.stderr)  # fmt: skip
    if args.core == "process":  # the server's core loads its own copy
        model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    with Server(args, spec, model, slots) as server:
        name = server.model_name()
        for row in rows:
            # warm-up as for the engine: a wave of the level's requests, 4 tokens each
            warm = list(range(10**6, 10**6 + row["streams"]))  # prompts and seeds the timed requests do not use
            asyncio.run(fire(server.url, name, warm, row["streams"], 4))
            for k, kind in enumerate(args.load_clients):  # the first one's figures are the row's
                level = server_level(server.url, name, row["streams"], args.waves, args.max_tokens,
                                     args.client_processes, server.pids(), kind)  # fmt: skip
                if k == 0:
                    row.update(level)
                else:
                    row.setdefault("other_load_clients", {})[kind] = level
                print(f"{row['streams']} streams, {kind} load generators: server {level['server_tokens_per_s']:,.0f} "
                      f"tok/s, inter-token p99 {level['itl_p99_ms']:.2f} ms", file=sys.stderr)  # fmt: skip
    for row in rows:
        row["engine_vs_bare"] = row["engine_decode_tokens_per_s"] / row["bare_tokens_per_s"]
        row["server_vs_engine"] = row["server_tokens_per_s"] / row["engine_tokens_per_s"]
        row["itl_p99_vs_bare_step"] = row["itl_p99_ms"] / row["bare_step_ms"]
    return {
        "device": device, "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "model": f"random {args.shape} shape" if args.shape else Path(spec.path).name,
        "compute_dtype": spec.dtype, "state_dtype": dtype_name(state_dtype), "max_tokens": args.max_tokens,
        "waves": args.waves, "core": args.core, "api_processes": args.api_processes if args.core == "process" else 1,
        "client_processes": args.client_processes, "load_client": args.load_clients[0], "sampling": TOP_P, "server_method": SERVER_METHOD,
        "cpu_cores": len(os.sched_getaffinity(0)), "rows": rows,
    }  # fmt: skip


def markdown(r: dict) -> str:
    if r["rows"] and "concurrency" in r["rows"][0]:
        return markdown_http_only(r)
    cores = f" on {r['cpu_cores']} CPU cores" if "cpu_cores" in r else ""  # recorded since 2026-11-30
    out = [f"# Serving: bare decode, engine, HTTP server ({r['device']}, {r['date']})", "",
           f"Model {r['model']} (compute {r['compute_dtype']}, state {r['state_dtype']}); {r['max_tokens']} tokens "
           f"per request, top-p sampling (temperature 1, top_p 0.9), {r['waves']} waves of `streams` requests; "
           f"server: engine core in {'its own process' if r['core'] == 'process' else 'a thread'}, "
           f"{r['api_processes']} API process(es), {r['client_processes']} load-generator process(es)"
           f"{' (' + r['load_client'] + ')' if 'load_client' in r else ''}"
           f"{cores}; "
           f"torch {r['torch']}.", ""]  # fmt: skip
    if "server_method" in r:  # results written before the load generators had a barrier have none
        out += [f"Method: {r['server_method']}.", ""]
    out += ["| streams | bare decode tok/s | engine decode tok/s (vs bare) | engine end-to-end tok/s | "
            "server tok/s (vs engine) | TTFT p50 / p99 ms | inter-token p50 / p99 ms (p99 vs bare step) |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in r["rows"]:
        out.append(f"| {row['streams']} | {row['bare_tokens_per_s']:,.0f} | {row['engine_decode_tokens_per_s']:,.0f} "
                   f"({100 * row['engine_vs_bare']:.0f}%) | {row['engine_tokens_per_s']:,.0f} | "
                   f"{row['server_tokens_per_s']:,.0f} ({100 * row['server_vs_engine']:.0f}%) | "
                   f"{row['ttft_p50_ms']:.1f} / {row['ttft_p99_ms']:.1f} | {row['itl_p50_ms']:.2f} / "
                   f"{row['itl_p99_ms']:.2f} ({row['itl_p99_vs_bare_step']:.1f}x of {row['bare_step_ms']:.2f}) |")  # fmt: skip
    if any(row.get("engine_full_batch_tokens_per_s") for row in r["rows"]):  # recorded since 2026-12-01
        full = ", ".join(f"{row['engine_full_batch_tokens_per_s']:,.0f} tok/s at {row['streams']} streams "
                         f"({100 * row['engine_full_batch_tokens_per_s'] / row['bare_tokens_per_s']:.0f}% of bare; "
                         f"{row['engine_full_batch_steps']} of {row['engine_decode_steps']} decode steps)"
                         for row in r["rows"] if row.get("engine_full_batch_tokens_per_s"))  # fmt: skip
        out += ["", f"The engine at a full batch (only the decode steps in which every stream generated a token, as "
                    f"in bare decode; streams whose prompts were read later end later, so the decode phase ends "
                    f"with fewer streams): {full}."]  # fmt: skip
    if any(row.get("server_steady_tokens_per_s") for row in r["rows"]):
        window = ", ".join(f"{row['server_steady_tokens_per_s']:,.0f} tok/s at {row['streams']} streams (over "
                           f"{row['server_steady_window_s']:.2f} s)" for row in r["rows"] if row["server_steady_tokens_per_s"])  # fmt: skip
        out += ["", f"Server while every stream runs (from the first wave's last first token to the first end after the "
                    f"last request started): {window}."]  # fmt: skip
    if any(row.get("engine_first_token_p50_ms") is not None for row in r["rows"]):
        out += ["", "Where a request's time goes, p50 / p99 ms: the client's view, and the engine core's latency "
                    "histograms (/metrics; interpolated inside their buckets, so coarse): from the API process "
                    "receiving a request to the core receiving it; from the core receiving it to its first token "
                    "leaving the core; between a request's token messages leaving the core.", "",
                "| streams | client TTFT | API -> core | core receipt -> first token out | client inter-token | "
                "core token gap |", "|---|---|---|---|---|---|"]  # fmt: skip

        def pair(row: dict, name: str) -> str:
            low, high = row.get(f"{name}_p50_ms"), row.get(f"{name}_p99_ms")
            return "-" if low is None or high is None else f"{low:.1f} / {high:.1f}"

        for row in r["rows"]:
            out.append(f"| {row['streams']} | {row['ttft_p50_ms']:.1f} / {row['ttft_p99_ms']:.1f} | "
                       f"{pair(row, 'request_to_engine')} | {pair(row, 'engine_first_token')} | "
                       f"{row['itl_p50_ms']:.2f} / {row['itl_p99_ms']:.2f} | {pair(row, 'engine_token_gap')} |")
    if any(row.get("engine_core_step_p99_ms") is not None for row in r["rows"]):
        loop = ", ".join(f"{row['engine_core_step_p50_ms']:.2f} / {row['engine_core_step_p99_ms']:.2f} and "
                         f"{row['engine_core_between_steps_p50_ms']:.2f} / {row['engine_core_between_steps_p99_ms']:.2f} ms at "
                         f"{row['streams']} streams" for row in r["rows"] if row.get("engine_core_step_p99_ms") is not None)  # fmt: skip
        out += ["", f"The engine core's loop, p50 / p99: each engine step and the rest of its iteration (requests in, "
                    f"token messages out): {loop}."]  # fmt: skip
    if any(row.get("engine_gc_pause_count") is not None for row in r["rows"]):
        gcs = ", ".join(f"{row['engine_gc_pause_count']:,} at {row['streams']} streams ({row['engine_gc_pause_over_5ms']} "
                        f"longer than 5 ms)" for row in r["rows"])  # fmt: skip
        out += ["", f"Garbage collections in the engine core's process during each level: {gcs}."]
    others = sorted({kind for row in r["rows"] for kind in row.get("other_load_clients", {})})
    for kind in others:
        out += ["", f"The same server, each level run again right after with {kind} load generators (same processes "
                    f"and requests): what the measuring client adds.", "",
                f"| streams | server tok/s ({r.get('load_client', '?')} / {kind}) | inter-token p50 / p99 ms "
                f"({r.get('load_client', '?')}) | inter-token p50 / p99 ms ({kind}) | load generators' CPU s/s, "
                f"highest ({r.get('load_client', '?')} / {kind}) |", "|---|---|---|---|---|"]  # fmt: skip
        for row in r["rows"]:
            other = row.get("other_load_clients", {}).get(kind)
            if other is not None:
                out.append(f"| {row['streams']} | {row['server_tokens_per_s']:,.0f} / {other['server_tokens_per_s']:,.0f} | "
                           f"{row['itl_p50_ms']:.2f} / {row['itl_p99_ms']:.2f} | {other['itl_p50_ms']:.2f} / "
                           f"{other['itl_p99_ms']:.2f} | {max(row['client_cpu_per_wall']):.2f} / "
                           f"{max(other['client_cpu_per_wall']):.2f} |")  # fmt: skip
    if all("server_packed_steps" in row for row in r["rows"]):
        steps = ", ".join(f"{row['server_engine_steps']:,} steps at {row['streams']} streams, {row['server_packed_steps']:,} "
                          "of them eager packed forwards" for row in r["rows"])  # fmt: skip
        out += ["", f"Engine core during the server runs: {steps} (the others replayed the decode graph)."]
    for row in r["rows"]:
        if "server_cpu_per_wall" in row:
            server = " / ".join(f"{c:.2f}" for c in row["server_cpu_per_wall"] if c >= 0.01)
            clients = " / ".join(f"{c:.2f}" for c in row["client_cpu_per_wall"])
            out += ["", f"CPU seconds per second of wall time at {row['streams']} streams (1.00: a saturated process): "
                        f"server processes {server}; load generators {clients}."]  # fmt: skip
    out += ["", "Targets (H200, 1.5B, fp16 state): engine >= 90% of bare decode at 1 and 64 streams, >= 85% at 256; "
            "server >= 85% of the engine at 64 and 256 streams and >= 40,000 tok/s at 256; inter-token p99 at 256 "
            "<= 2x the bare step.", ""]  # fmt: skip
    return "\n".join(out)


def markdown_http_only(r: dict) -> str:
    """The table of this script's earlier form (the HTTP server alone, against waves of the
    engine), which results under docs/benchmarks/ (server-h200*) were written with."""
    client = "in its own process" if r.get("client") == "process" else "in the same process"
    out = [f"# HTTP serving, {r['device']}, {r['date']}", "",
           f"Model {r['model']} (compute {r['compute_dtype']}, state {r['state_dtype']}), {r['slots']} slots, "
           f"prompts of about {r['prompt_tokens']} tokens, {r['max_tokens']} tokens generated per request, "
           f"streaming /v1/completions; client {client}; torch {r['torch']}.", "",
           "The last column runs the same requests through the Engine directly on one thread, in waves of "
           "`concurrency` requests (no HTTP, no event loop): what the engine alone sustains.", "",
           "| concurrency | requests | tokens/s | requests/s | TTFT p50/p90/p99 ms | end-to-end p50/p90/p99 ms | "
           "engine alone tokens/s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in r["rows"]:
        ttft = " / ".join(f"{row[f'ttft_p{q}_ms']:.0f}" for q in (50, 90, 99))
        e2e = " / ".join(f"{row[f'e2e_p{q}_ms']:.0f}" for q in (50, 90, 99))
        out.append(f"| {row['concurrency']} | {row['requests']} | {row['tokens_per_s']:,.1f} | "
                   f"{row['requests_per_s']:.2f} | {ttft} | {e2e} | {row.get('engine_only_tokens_per_s', 0):,.1f} |")  # fmt: skip
    return "\n".join(out) + "\n"


def chart(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["rows"]
    labels = [str(row["streams"]) for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.27
    for k, (key, name) in enumerate((("bare_tokens_per_s", "bare decode"), ("engine_decode_tokens_per_s", "engine"),
                                     ("server_tokens_per_s", "server"))):  # fmt: skip
        left.bar([i + (k - 1) * width for i in range(len(rows))], [row[key] for row in rows], width, label=name)
    left.set(xticks=range(len(rows)), xticklabels=labels, xlabel="streams", ylabel="tokens/s", yscale="log",
             title="throughput")  # fmt: skip
    left.legend()
    for key, name in (("bare_step_ms", "bare step"), ("itl_p50_ms", "inter-token p50"), ("itl_p99_ms", "inter-token p99")):
        right.plot(labels, [row[key] for row in rows], marker="o", label=name)
    right.set(xlabel="streams", ylabel="ms", title="latency (server, client in its own process)")
    right.legend()
    fig.suptitle(f"{r['model']}, {r['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: the bundled model)")
    parser.add_argument("--shape", choices=("0.1B", "1.5B", "7.2B"), default=None, help="random weights of a shape")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto", help="auto: the GPU if there is one")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: fp16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--state-dtype", default="fp16")
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64, 256])
    parser.add_argument("--waves", type=int, default=2, help="waves of `level` requests per level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="timed bare decode steps per level")
    parser.add_argument("--core", choices=("process", "thread"), default="process",
                        help="the server's engine core in its own process (default) or on a thread")
    parser.add_argument("--api-processes", type=int, default=4, help="HTTP processes of the server")
    parser.add_argument("--client-processes", type=int, default=4, help="load-generator processes")
    parser.add_argument("--load-clients", type=lambda s: s.split(","), default=["aiohttp"],
                        help="the load generators' HTTP client (aiohttp, httpx); with several, each level runs "
                             "with each in turn and the first one's figures fill the main table")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json, OUT.md and OUT.png")
    args = parser.parse_args(argv)
    unknown = [kind for kind in args.load_clients if kind not in LoadClient.KINDS]
    if unknown:  # checked here: a load generator that fails to start would leave the run waiting for it
        parser.error(f"--load-clients: unknown {', '.join(unknown)} (known: {', '.join(LoadClient.KINDS)})")
    result = run(args)
    write_results(args.out, result, markdown(result))
    if args.out:
        chart(result, args.out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
