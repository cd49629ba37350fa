"""HTTP serving: throughput, time to first token and latency of concurrent streaming requests.

    python benchmarks/bench_server.py --shape 1.5B --out docs/benchmarks/server        # on a GPU
    python benchmarks/bench_server.py --levels 1,4 --requests 8 --max-tokens 16 --out /tmp/server   # CPU smoke run

Starts `rwkvstate.server` in this process (uvicorn on a thread, 127.0.0.1, free port) on the GPU
if there is one, else on the CPU (the report says which), and fires streaming
/v1/completions requests at each concurrency level: `--requests` requests per level, at most
`level` in flight at once. Per request it records the time to the first text chunk and to
the last one; per level, completion tokens per second over the level's wall time and the
p50/p90/p99 of both latencies. The load generator runs in a process of its own (`--client
inprocess` puts it beside the server, sharing its interpreter lock). With `--shape`, random weights of a
released model shape (world vocabulary) replace the bundled model; generations never stop
early (`stop_token_ids: []`), so every request produces exactly --max-tokens tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import SHAPES, config_for  # noqa: E402
from common import write_results  # noqa: E402

from rwkvstate import Model  # noqa: E402
from rwkvstate.cli import BUNDLED_MODEL  # noqa: E402
from rwkvstate.state.layout import dtype_name, parse_dtype  # noqa: E402
from rwkvstate.model.synthetic import random_checkpoint  # noqa: E402
from rwkvstate.server import BackgroundServer, ServerConfig, create_app  # noqa: E402

PROMPT = "def parse_arguments(argv):\n    parser = argparse.ArgumentParser(description=__doc__)\n"


def load(args) -> Model:
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    dtype = parse_dtype(args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    if args.shape:
        cfg = config_for(args.shape)
        return Model.from_tensors(random_checkpoint(cfg, seed=0, dtype=dtype), cfg, device, dtype)
    return Model.load(args.model or BUNDLED_MODEL, device=device, dtype=dtype)


def device_name(model: Model) -> str:
    if model.device.type == "cuda":
        return torch.cuda.get_device_name(model.device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


async def one_request(client, url: str, body: dict) -> dict:
    """One streaming request: seconds to the first text chunk and to [DONE], completion tokens."""
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
    end = time.perf_counter() - start
    return {"ttft_s": first if first is not None else end, "e2e_s": end, "tokens": tokens}


async def run_level(base_url: str, model_name: str, level: int, n: int, max_tokens: int, offset: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=level + 4, max_keepalive_connections=level + 4)
    gate = asyncio.Semaphore(level)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:

        async def limited(i: int) -> dict:
            body = {"model": model_name, "prompt": f"# request {offset + i}\n{PROMPT}", "max_tokens": max_tokens,
                    "temperature": 1.0, "top_p": 0.9, "seed": i, "stream": True, "stop_token_ids": [],
                    "stream_options": {"include_usage": True}}  # fmt: skip
            async with gate:
                return await one_request(client, f"{base_url}/v1/completions", body)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(n)))
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    row = {"concurrency": level, "requests": n, "wall_s": wall, "completion_tokens": tokens,
           "tokens_per_s": tokens / wall, "requests_per_s": n / wall}  # fmt: skip
    for key in ("ttft_s", "e2e_s"):
        values = sorted(r[key] for r in results)
        for q in (50, 90, 99):
            row[f"{key[:-2]}_p{q}_ms"] = 1000 * percentile(values, q)
    return row


def _client_main(args: tuple, results) -> None:
    """A load generator in its own process (spawned): the client's parsing does not share the
    server's interpreter lock."""
    results.put(asyncio.run(run_level(*args)))


def run_level_elsewhere(*args) -> dict:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    client = ctx.Process(target=_client_main, args=(args, results))
    client.start()
    try:
        return results.get(timeout=1800)
    finally:
        client.join(30)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def engine_only(model, level: int, n: int, max_tokens: int, slots: int, state_dtype) -> dict:
    """The same requests straight through an Engine on this thread (no HTTP, no event loop):
    the ceiling the server can reach, `level` streams at a time."""
    from rwkvstate import Engine, SamplingParams

    engine = Engine(model, slots=slots, state_dtype=state_dtype)
    warm = engine.session()  # captures the CUDA graphs outside the timing
    engine.run([warm.generate(2, SamplingParams(temperature=0), prompt=PROMPT)])
    warm.close()
    done = 0
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for first in range(0, n, level):
        streams = []
        for i in range(first, min(first + level, n)):
            params = SamplingParams(temperature=1.0, top_p=0.9, seed=i, stop_token_ids=[])
            streams.append(engine.session().generate(max_tokens, params, prompt=f"# request {i}\n{PROMPT}"))
        engine.run(streams)
        done += sum(len(st.token_ids) for st in streams)
        for st in streams:
            st.session.close()
    sync()
    return {"concurrency": level, "tokens_per_s": done / (time.perf_counter() - start)}


def run(args) -> dict:
    model = load(args)
    slots = args.slots or max(args.levels)
    config = ServerConfig(slots=slots, state_dtype=args.state_dtype, max_tokens_cap=max(args.max_tokens, 1),
                          max_queue=max(args.requests, 1), request_timeout_s=None,
                          prefix_cache_bytes=int(args.prefix_cache_mb * (1 << 20)))  # fmt: skip
    app = create_app(model, config)
    rows = []
    with BackgroundServer(app) as server:
        name = app.state.context.model_name
        asyncio.run(run_level(server.url, name, 1, 2, min(args.max_tokens, 8), offset=-2))  # warm-up
        for i, level in enumerate(args.levels):
            level_args = (server.url, name, level, args.requests, args.max_tokens, 1000 * i)
            if args.client == "process":
                rows.append(run_level_elsewhere(*level_args))
            else:
                rows.append(asyncio.run(run_level(*level_args)))
            print(f"concurrency {level}: {rows[-1]['tokens_per_s']:,.1f} tokens/s", file=sys.stderr)
    for row in rows:  # in waves of `level` requests: a lower bound of the engine's continuous batching
        alone = engine_only(model, row["concurrency"], args.requests, args.max_tokens, slots, config.state_dtype)
        row["engine_only_tokens_per_s"] = alone["tokens_per_s"]
        print(f"engine alone, {row['concurrency']} at a time: {alone['tokens_per_s']:,.1f} tokens/s", file=sys.stderr)
    return {
        "device": device_name(model), "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "model": args.shape and f"random {args.shape} shape" or Path(str(model.path)).name,
        "compute_dtype": dtype_name(model.dtype), "state_dtype": dtype_name(config.state_dtype), "slots": slots,
        "max_tokens": args.max_tokens, "prompt_tokens": len(model.tokenizer.encode(PROMPT)) + 4,
        "prefix_cache_mb": args.prefix_cache_mb, "client": args.client, "rows": rows,
    }  # fmt: skip


def markdown(result: dict) -> str:
    r = result
    out = [f"# HTTP serving, {r['device']}, {r['date']}", "",
           f"Model {r['model']} (compute {r['compute_dtype']}, state {r['state_dtype']}), {r['slots']} slots, "
           f"prompts of about {r['prompt_tokens']} tokens, {r['max_tokens']} tokens generated per request, "
           f"streaming /v1/completions; client {'in its own process' if r.get('client') == 'process' else 'in the same process'}; "
           f"torch {r['torch']}.", "",
           "The last column runs the same requests through the Engine directly on one thread, in waves of "
           "`concurrency` requests (no HTTP, no event loop): what the engine alone sustains.", "",
           "| concurrency | requests | tokens/s | requests/s | TTFT p50/p90/p99 ms | end-to-end p50/p90/p99 ms | engine alone tokens/s |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in r["rows"]:
        ttft = " / ".join(f"{row[f'ttft_p{q}_ms']:.0f}" for q in (50, 90, 99))
        e2e = " / ".join(f"{row[f'e2e_p{q}_ms']:.0f}" for q in (50, 90, 99))
        out.append(f"| {row['concurrency']} | {row['requests']} | {row['tokens_per_s']:,.1f} | "
                   f"{row['requests_per_s']:.2f} | {ttft} | {e2e} | {row.get('engine_only_tokens_per_s', 0):,.1f} |")  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: the bundled model)")
    parser.add_argument("--shape", choices=list(SHAPES), default=None, help="random weights of a released shape")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto", help="auto: the GPU if there is one")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: fp16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--state-dtype", default="fp32")
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 128])
    parser.add_argument("--requests", type=int, default=128, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--slots", type=int, default=None, help="pool slots (default: the largest level)")
    parser.add_argument("--prefix-cache-mb", type=float, default=64.0)
    parser.add_argument("--client", choices=("process", "inprocess"), default="process",
                        help="run the load generator in its own process (default) or in the server's")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    result = run(args)
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
