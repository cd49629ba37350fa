"""The single server with its sessions in Redis (`serve --session-store`): two servers share
one store, so a session made on one continues on the other, through the engine core's own
session storage (loaded when missing or stale, saved before a request is answered)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from redis_server import RedisServer, free_port, require  # noqa: E402

require("redis")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from rwkvstate import Model  # noqa: E402
from rwkvstate.cli import BUNDLED_MODEL  # noqa: E402
from rwkvstate.cluster.store import StoreConfig  # noqa: E402
from rwkvstate.server import BackgroundServer, ServerConfig, create_app  # noqa: E402
from rwkvstate.state.files import decode_state_file  # noqa: E402


pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]
MODEL = BUNDLED_MODEL.stem
PROMPTS = ["def add(a, b):", "\n    return", "\n\nclass Point:"]


def complete(url: str, session: str, prompt: str) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "session": session}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def new_session(url: str) -> str:
    r = httpx.post(f"{url}/v1/sessions", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_two_servers_share_sessions_through_the_store(tmp_path):
    redis = RedisServer(tmp_path).start()
    port = free_port()
    # server A: the CLI's default deployment (an engine core process, two API processes), so the
    # store reaches the core through its pickled factory and the workers through their config.
    # Both servers compute on the CPU with one thread: states equal bit for bit need the same
    # arithmetic, and another thread count may split a matmul's sums differently (on the GPU
    # hosts, 16 and 32 cores, where the in-process server had torch's default thread count, the
    # states differed)
    cmd = [sys.executable, "-m", "rwkvstate.cli", "serve", "--port", str(port), "--api-processes", "2",
           "--device", "cpu", "--session-store", redis.url, "--log-level", "warning"]  # fmt: skip
    a_url = f"http://127.0.0.1:{port}"
    a = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # server B: a core on a thread of this process, on the same store
        config = ServerConfig(slots=2, session_store=StoreConfig(url=redis.url))
        with BackgroundServer(create_app(Model.load(BUNDLED_MODEL), config)) as b:
            deadline = time.monotonic() + 180
            while not _healthy(a_url):
                assert a.poll() is None and time.monotonic() < deadline, "server A did not start"
                time.sleep(0.2)
            moving, staying = new_session(a_url), new_session(b.url)
            moved = [complete((a_url, b.url)[i % 2], moving, p) for i, p in enumerate(PROMPTS)]
            kept = [complete(b.url, staying, p) for p in PROMPTS]
            assert all(r.status_code == 200 for r in moved + kept), [r.text for r in moved + kept]
            assert [r.json()["choices"][0]["text"] for r in moved] == [r.json()["choices"][0]["text"] for r in kept]
            import redis as client

            raw = client.Redis.from_url(redis.url)
            one, two = (decode_state_file(raw.hget(f"rwkvstate:s:{s}", "blob")) for s in (moving, staying))
            assert one.tokens == two.tokens and all((one.state[k] == two.state[k]).all() for k in one.state)
            # A's copy is stale now (B wrote the last turn): A reloads it, the answers agree
            assert complete(a_url, moving, "\n").json()["choices"][0]["text"] == \
                complete(b.url, staying, "\n").json()["choices"][0]["text"]  # fmt: skip
            listed = {s["id"] for s in httpx.get(f"{a_url}/v1/sessions", timeout=30).json()["data"]}
            assert {moving, staying} <= listed
            metrics = httpx.get(f"{a_url}/metrics", timeout=30).text
            assert "rwkvstate_store_up 1" in metrics and "rwkvstate_store_sessions 2" in metrics
            assert httpx.delete(f"{b.url}/v1/sessions/{moving}", timeout=30).status_code == 200
            assert complete(a_url, moving, "x").status_code == 404  # gone from the store: gone everywhere
    finally:
        torch.set_num_threads(threads)
        a.send_signal(signal.SIGINT)
        a.wait(60)
        redis.stop()


def test_a_failed_store_write_fails_the_request_and_changes_nothing(tmp_path):
    """A session whose new state does not fit the store (its byte cap is smaller than one state
    file) is not acknowledged: 507, and the session stays as the store has it."""
    redis = RedisServer(tmp_path).start()
    try:
        config = ServerConfig(slots=2, session_store=StoreConfig(url=redis.url, max_bytes=100_000))
        with BackgroundServer(create_app(Model.load(BUNDLED_MODEL), config)) as srv:
            sid = new_session(srv.url)  # an empty session's file holds no state: it fits
            r = complete(srv.url, sid, PROMPTS[0])
            assert r.status_code == 507 and r.json()["error"]["code"] == "session_store_full", r.text
            assert httpx.get(f"{srv.url}/v1/sessions/{sid}", timeout=30).json()["tokens"] == 0
            one_off = httpx.post(f"{srv.url}/v1/completions", timeout=60,
                                 json={"model": MODEL, "prompt": "x", "max_tokens": 2})  # fmt: skip
            assert one_off.status_code == 200  # requests without a session go on
    finally:
        redis.stop()
