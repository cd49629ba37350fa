"""The HTTP side alone: API processes and load generators against a simulated engine core.

    python benchmarks/bench_api.py --levels 64,256 --step-ms 4 --api-processes 4 --client-processes 8 \\
        --out docs/benchmarks/api-<machine>
    python benchmarks/bench_api.py --levels 8 --step-ms 10 --api-processes 1 --client-processes 1 --max-tokens 8  # smoke

A core that runs no model speaks the engine core's protocol (runtime/messages.py): it answers
Hello and Ping, takes Generate, Cancel and StopAt, and every `--step-ms` sends each API process
one Steps message with one token id for each of its running requests (a request ends after
max_tokens ids, "length", with its usage), as the real core does once per decode step. The ids
are printable bytes of the byte-level tokenizer. So what it measures is what the API processes,
HTTP and the clients add to a core that is never late: the server's tokens/s against the core's
(streams / step), time to first token, inter-token latency p50/p99 against the step, and the CPU
seconds per second of each API process and load generator, with the API processes' CPU per
token. With the step of a real decode (4 ms for the 1.5B shape at 256 rows on an H200,
docs/benchmarks/serving-warmup-h200.md) it reproduces the HTTP part of that serving run on any
machine with the cores for it.

Load generators, requests and the reported figures are bench_server.py's (server_level).
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import multiprocessing
import os
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_server import LoadClient, Server, fire, server_level  # noqa: E402
from common import write_results  # noqa: E402

from rwkvstate.runtime import messages as m  # noqa: E402
from rwkvstate.runtime.latency import HISTOGRAMS, Histogram  # noqa: E402
from rwkvstate.server.http import parser_name  # noqa: E402

PRINTABLE = list(range(97, 123))  # the ids sent: a .. z (the byte tokenizer decodes id b as byte b)


class SimulatedCore:
    """The engine core's side of the socket, with a fixed step and no model (a thread)."""

    def __init__(self, address: str, step_s: float, model_name: str = "simulated"):
        import zmq

        self.step_s, self.model_name = step_s, model_name
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(address)
        self.incarnation = secrets.token_hex(8)
        # (client, rid) -> [ids sent, max_tokens, prompt length, time.monotonic() at receipt]
        self.jobs: dict[tuple[bytes, int], list] = {}
        self.latency = {name: Histogram() for name in HISTOGRAMS}
        self.steps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="simulated-core", daemon=True)

    def start(self) -> "SimulatedCore":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.socket.close(0)
        self.context.term()

    def stats(self) -> dict:
        return {"steps": self.steps, "graph_steps": self.steps, "running": len(self.jobs), "queued": 0,
                "latency": {name: h.wire() for name, h in self.latency.items()}}  # fmt: skip

    def _run(self) -> None:
        import zmq

        next_step = time.monotonic() + self.step_s
        while not self._stop.is_set():
            wait_ms = max(0.0, next_step - time.monotonic()) * 1000
            if self.socket.poll(wait_ms):
                while True:
                    try:
                        client, payload = self.socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(client, m.decode_to_core(payload))
            if time.monotonic() >= next_step:
                next_step += self.step_s
                if self.jobs:
                    self._step()

    def _handle(self, client: bytes, msg) -> None:
        if isinstance(msg, m.Hello):
            self._send(client, m.Welcome(self.incarnation, self.model_name, 256, "bytes", self.stats()))
        elif isinstance(msg, m.Ping):
            self._send(client, m.Pong(self.incarnation, self.stats()))
        elif isinstance(msg, m.Generate):
            now = time.monotonic()
            if msg.arrived is not None:
                self.latency["request_to_engine"].observe(now - msg.arrived)
            prompt = len(msg.prompt) if isinstance(msg.prompt, list) else len(msg.prompt.encode())
            self.jobs[client, msg.rid] = [0, msg.max_tokens, prompt, now]
        elif isinstance(msg, (m.Cancel, m.StopAt)):
            job = self.jobs.get((client, msg.rid))
            if job is not None:
                job[1] = job[0]  # ends at the next step
        elif isinstance(msg, m.Call):
            self._send(client, m.Result(msg.cid, error=m.Error(501, "the simulated core has no sessions")))

    def _step(self) -> None:
        self.steps += 1
        now = time.monotonic()
        out: dict[bytes, list[m.Update]] = {}
        gaps = 0  # requests whose previous token left one step ago
        for (client, rid), job in list(self.jobs.items()):
            sent, limit, prompt, started = job
            updates = out.setdefault(client, [])
            if sent >= limit:
                del self.jobs[client, rid]
                updates.append(m.Update(rid, [], "length" if limit else "cancelled", prompt, sent))
                continue
            token = PRINTABLE[(rid + sent) % len(PRINTABLE)]
            job[0] = sent + 1
            if sent == 0:
                self.latency["engine_first_token"].observe(now - started)
            else:
                gaps += 1
            if job[0] >= limit:
                del self.jobs[client, rid]
                updates.append(m.Update(rid, [token], "length", prompt, job[0]))
            else:
                updates.append(m.Update(rid, [token]))
        self.latency["engine_token_gap"].observe(self.step_s, gaps)
        for client, updates in out.items():
            ended = any(u.finish is not None for u in updates)
            self._send(client, m.Steps(updates, self.stats() if ended else None))

    def _send(self, client: bytes, msg) -> None:
        import zmq

        try:
            self.socket.send_multipart([client, m.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass


def run(args) -> dict:
    address = f"ipc://{os.path.join(tempfile.mkdtemp(prefix='rwkvstate-sim-'), 'core.sock')}"
    core = SimulatedCore(address, args.step_ms / 1000).start()
    rows = []
    args.core, args.state_dtype = "process", "fp32"
    try:
        for repeat in range(args.repeats):  # the parsers in turn, so drift on the machine hits each alike
            for http in args.http:
                rows += _server_rows(args, address, http, repeat)
    finally:
        core.stop()
    import platform

    args.http = [parser_name(h) for h in args.http]
    return {"machine": platform.node() or "unknown", "date": datetime.date.today().isoformat(),
            "cpu_cores": len(os.sched_getaffinity(0)), "step_ms": args.step_ms, "max_tokens": args.max_tokens,
            "waves": args.waves, "api_processes": args.api_processes, "client_processes": args.client_processes,
            "http": args.http, "load_clients": args.load_clients, "repeats": args.repeats, "rows": rows}  # fmt: skip


def _server_rows(args, address: str, http: str, repeat: int) -> list[dict]:
    """One server (API processes with this parser) against the simulated core, every level with
    each kind of load generator in turn."""
    rows = []
    args.http_parser = http
    with Server(args, None, None, max(args.levels), core_address=address) as server:
        name = server.model_name()
        for level in args.levels:
            asyncio.run(fire(server.url, name, list(range(10**6, 10**6 + level)), level, 4))  # warm-up
            for client in args.load_clients:
                row = {"http": parser_name(http), "load_client": client, "repeat": repeat, "streams": level,
                       "core_tokens_per_s": level / (args.step_ms / 1000)}  # fmt: skip
                row.update(server_level(server.url, name, level, args.waves, args.max_tokens, args.client_processes,
                                        server.pids(), client))  # fmt: skip
                api_cpu = sum(row["server_cpu_per_wall"]) * row["server_wall_s"]
                tokens = row["server_tokens_per_s"] * row["server_wall_s"]
                row["api_cpu_us_per_token"] = 1e6 * api_cpu / tokens
                row["client_cpu_us_per_token"] = 1e6 * sum(row["client_cpu_per_wall"]) * row["server_wall_s"] / tokens
                row["itl_p99_vs_step"] = row["itl_p99_ms"] / args.step_ms
                rows.append(row)
                print(f"{row['http']}, {client}, {level} streams: {row['server_tokens_per_s']:,.0f} tok/s of "
                      f"{row['core_tokens_per_s']:,.0f}, inter-token p99 {row['itl_p99_ms']:.2f} ms, API "
                      f"{row['api_cpu_us_per_token']:.0f} us and load generators {row['client_cpu_us_per_token']:.0f} "
                      f"us of CPU per token", file=sys.stderr)  # fmt: skip
    return rows


def markdown(r: dict) -> str:
    clients = r.get("load_clients")  # recorded since the load generators could use aiohttp (httpx before)
    out = [f"# The HTTP side against a simulated engine core ({r['date']}, {r['cpu_cores']} CPU cores)", "",
           f"A core without a model sends one token id per running request every {r['step_ms']} ms; "
           f"{r['max_tokens']} tokens per request, {r['waves']} waves of `streams` requests; "
           f"{r['api_processes']} API process(es), {r['client_processes']} load-generator process(es); HTTP "
           f"parsers {', '.join(r['http'])} in turn, {r['repeats']} time(s)"
           f"{'' if clients is None else '; load generators on ' + ', '.join(clients) + ' in turn'} "
           f"(benchmarks/bench_api.py).", "",
           f"| parser |{'' if clients is None else ' load client |'} streams | core tok/s | server tok/s | TTFT p50 / "
           f"p99 ms | inter-token p50 / p99 ms (p99 vs step) | API CPU per token us |"
           f"{'' if clients is None else ' load generators CPU per token us |'} API processes CPU s/s | load "
           f"generators CPU s/s |", "|---" * (9 if clients is None else 11) + "|"]  # fmt: skip
    for row in r["rows"]:
        api = " / ".join(f"{c:.2f}" for c in row["server_cpu_per_wall"] if c >= 0.01)
        generators = " / ".join(f"{c:.2f}" for c in row["client_cpu_per_wall"])
        out.append(f"| {row['http']} |{'' if clients is None else ' ' + row['load_client'] + ' |'} {row['streams']} | "
                   f"{row['core_tokens_per_s']:,.0f} | {row['server_tokens_per_s']:,.0f} | "
                   f"{row['ttft_p50_ms']:.1f} / {row['ttft_p99_ms']:.1f} | {row['itl_p50_ms']:.2f} / "
                   f"{row['itl_p99_ms']:.2f} ({row['itl_p99_vs_step']:.1f}x) | {row['api_cpu_us_per_token']:.0f} |"
                   f"{'' if clients is None else ' %.0f |' % row['client_cpu_us_per_token']} {api} | {generators} |")  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[64, 256])
    parser.add_argument("--step-ms", type=float, default=4.0, help="the simulated decode step")
    parser.add_argument("--waves", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--api-processes", type=int, default=4)
    parser.add_argument("--client-processes", type=int, default=8)
    parser.add_argument("--http", type=lambda s: s.split(","), default=["auto"],
                        help="the API's HTTP parsers (auto, httptools, h11), comma-separated: each in turn")
    parser.add_argument("--load-clients", type=lambda s: s.split(","), default=["aiohttp"],
                        help="the load generators' HTTP clients (aiohttp, httpx), comma-separated: each in turn")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the parsers")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    unknown = [kind for kind in args.load_clients if kind not in LoadClient.KINDS]
    if unknown:  # checked here: a load generator that fails to start would leave the run waiting for it
        parser.error(f"--load-clients: unknown {', '.join(unknown)} (known: {', '.join(LoadClient.KINDS)})")
    multiprocessing.set_start_method("spawn", force=True)
    result = run(args)
    write_results(args.out, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
