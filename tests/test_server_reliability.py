"""The server under hostile or careless use: one bad request fails alone, nothing acknowledged is
lost, bad files never stop it, /metrics cannot be written, limits hold, and every error is
OpenAI-shaped JSON without host paths. Bundled model on the CPU, servers on background threads."""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import json
import os
import socket
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from safetensors.torch import load as st_load  # noqa: E402
from test_server import _one_torch_thread, model  # noqa: E402,F401 (fixtures: one torch thread, the bundled model)
from test_server import KEY, MODEL, api, complete, state_of  # noqa: E402
from test_state_files import rewrite as resign  # noqa: E402

from rwkvstate.cli import BUNDLED_MODEL  # noqa: E402
from rwkvstate.server import BackgroundServer, ServerConfig, create_app  # noqa: E402
from rwkvstate.state import files  # noqa: E402

pytestmark = pytest.mark.skipif(not BUNDLED_MODEL.exists(), reason="the bundled model is not in this checkout")
ERROR_KEYS = {"message", "type", "param", "code"}


def serve(model, **options) -> BackgroundServer:
    options.setdefault("api_key", KEY)
    return BackgroundServer(create_app(model, ServerConfig(**options)))


def new_session(srv, **body) -> dict:
    r = api(srv, "POST", "/v1/sessions", json=body or None)
    assert r.status_code == 200, r.text
    return r.json()


def session_tokens(srv, sid) -> int:
    return api(srv, "GET", f"/v1/sessions/{sid}").json()["tokens"]


def assert_error(r: httpx.Response, status: int, code: str | None = None, *hidden: str) -> dict:
    """An OpenAI-shaped error with this status (and code), showing none of `hidden`."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS and isinstance(error["message"], str)
    if code is not None:
        assert error["code"] == code, error
    for text in hidden:
        assert text not in r.text
    return error


class FullDisk:
    """files.py's view of the os module, where fsync fails as on a full disk (ENOSPC): the
    temporary file is written, never renamed over the target, and removed."""

    def __init__(self):
        self.failing = True

    def __getattr__(self, name):
        return getattr(os, name)

    def fsync(self, fd):
        if self.failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.fsync(fd)


# ---- one bad stream fails alone ------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_32_concurrent_streams_with_one_poisoned(model):
    """One session's next-token logits are NaN (as a poisoned state gives): its request fails with
    a 500 of its own, the 31 others get exactly their texts of a run alone, and the poisoned
    session is as it was."""
    with serve(model, slots=32, max_tokens_cap=64) as srv:
        prompts = [f"def f{i}(x):\n    return x + {i}\n" for i in range(31)]
        alone = {p: complete(srv, p, max_tokens=6).choices[0].text for p in prompts}
        sid = new_session(srv)["id"]
        complete(srv, "import os\n", max_tokens=1, extra_body={"session": sid})
        tokens = session_tokens(srv, sid)

        def poison(engine):
            record = core_of(srv).store.records[sid]
            slot = record.session.slot
            engine.residency.set_logits(slot, torch.full((model.config.vocab_size,), float("nan")))

        on_worker(srv, poison)
        results = asyncio.run(_concurrently(srv, prompts, sid))
        poisoned, others = results[-1], results[:-1]
        assert isinstance(poisoned, openai.InternalServerError), poisoned
        assert poisoned.body["code"] == "generation_failed"
        assert others == [alone[p] for p in prompts]
        assert session_tokens(srv, sid) == tokens
        assert complete(srv, "x", max_tokens=3).choices[0].finish_reason == "length"  # the server goes on


def on_worker(srv, fn):
    """Runs fn(engine) on the server's engine core thread and waits for it."""
    done, out = threading.Event(), {}

    def run(core):
        try:
            fn(core.engine)
        except BaseException as e:  # noqa: BLE001 - reported below
            out["error"] = e
        done.set()

    state_of(srv).core.call_soon(run)
    assert done.wait(30) and "error" not in out, out


def core_of(srv):
    """The engine core of a server whose core runs on a thread of this process."""
    return state_of(srv).core.core


async def _concurrently(srv, prompts, sid):
    async_client = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(prompt, **extra):
        try:
            out = await async_client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                                        extra_body=extra)  # fmt: skip
            return out.choices[0].text
        except openai.APIStatusError as e:
            return e

    requests = [one(p) for p in prompts]
    requests.append(one("", session=sid, temperature=1.0))
    try:
        return await asyncio.gather(*requests)
    finally:
        await async_client.close()


# ---- durable saves ---------------------------------------------------------------------------------
def test_a_failed_save_is_a_503_and_changes_nothing(model, tmp_path, monkeypatch):
    with serve(model, slots=2, state_dir=tmp_path) as srv:
        sid = new_session(srv)["id"]
        complete(srv, "def main():\n", max_tokens=4, extra_body={"session": sid})
        path = tmp_path / "sessions" / f"{sid}.state"
        good, tokens = path.read_bytes(), session_tokens(srv, sid)
        disk = FullDisk()
        monkeypatch.setattr(files, "os", disk)

        r = api(srv, "POST", "/v1/completions", json={"model": MODEL, "prompt": "    x", "max_tokens": 4,
                                                      "temperature": 0, "session": sid})  # fmt: skip
        error = assert_error(r, 503, "storage_unavailable", str(tmp_path))
        assert "could not be saved" in error["message"] and "No space left on device" in error["message"]
        assert path.read_bytes() == good and session_tokens(srv, sid) == tokens
        assert sorted(os.listdir(path.parent)) == [path.name]  # no temporary file left
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert "No space left" in health.json()["storage"]["error"] and str(tmp_path) not in health.text
        metrics = api(srv, "GET", "/metrics").text
        assert "rwkvstate_storage_ok 0.0" in metrics and "rwkvstate_state_save_failures_total 1.0" in metrics

        stream = api(srv, "POST", "/v1/completions", json={"model": MODEL, "prompt": "    y", "max_tokens": 3,
                                                           "stream": True, "session": sid})  # fmt: skip
        assert '"code":"storage_unavailable"' in stream.text and session_tokens(srv, sid) == tokens
        r = api(srv, "POST", f"/v1/sessions/{sid}/rollback", json={"tokens": 3})
        assert_error(r, 503, "storage_unavailable", str(tmp_path))
        assert session_tokens(srv, sid) == tokens and path.read_bytes() == good  # the rollback was not applied
        assert_error(api(srv, "POST", f"/v1/sessions/{sid}/snapshot"), 503, "storage_unavailable", str(tmp_path))
        assert_error(api(srv, "POST", f"/v1/sessions/{sid}/fork"), 503, "storage_unavailable", str(tmp_path))
        assert_error(api(srv, "POST", "/v1/sessions"), 503, "storage_unavailable", str(tmp_path))
        assert [s["id"] for s in api(srv, "GET", "/v1/sessions").json()["data"]] == [sid]
        assert complete(srv, "one-off\n", max_tokens=2).choices[0].finish_reason == "length"  # no session: fine

        disk.failing = False
        after = complete(srv, "    z", max_tokens=4, extra_body={"session": sid})
        assert httpx.get(f"{srv.url}/health").json()["status"] == "ok"
        expected = session_tokens(srv, sid)
        assert expected == tokens + after.usage.prompt_tokens + after.usage.completion_tokens
    with serve(model, slots=2, state_dir=tmp_path) as srv:  # every acknowledged turn is there
        assert session_tokens(srv, sid) == expected


def test_a_read_only_state_dir_shows_at_startup(model, tmp_path, monkeypatch):
    monkeypatch.setattr("rwkvstate.runtime.storage._write_probe", _read_only)
    with serve(model, slots=1, state_dir=tmp_path) as srv:
        health = httpx.get(f"{srv.url}/health").json()
        assert health["status"] == "degraded" and "Read-only file system" in health["storage"]["error"]


def _read_only(path):
    from rwkvstate.errors import StorageError

    raise StorageError(f"cannot write to the state directory: {os.strerror(errno.EROFS)}")


# ---- startup with bad files --------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_startup_skips_logs_and_counts_every_bad_file(model, tmp_path, caplog, capsys, monkeypatch):
    with serve(model, slots=2, state_dir=tmp_path) as srv:
        ids = [new_session(srv)["id"] for _ in range(2)]
        complete(srv, "import sys\n", max_tokens=2, extra_body={"session": ids[0]})
    sessions = tmp_path / "sessions"
    good = (sessions / f"{ids[0]}.state").read_bytes()
    bad = {
        "extra a list": {"extra": json.dumps([1, 2])},
        "created not a number": {"extra": json.dumps({"server_session": {"id": "x", "created": "abc"}})},
        "record a list": {"extra": json.dumps({"server_session": []})},
        "from_zero a string": {"extra": json.dumps({"from_zero": "no"})},
    }
    names = []
    for i, meta in enumerate(bad.values()):
        path = sessions / f"sess_{i:016x}.state"
        path.write_bytes(good)
        resign(path, meta)
        names.append(path.name)
    huge = sessions / f"sess_{9:016x}.state"  # checksum valid, wkv x 1e30
    huge.write_bytes(good)
    resign(huge, tensors={"wkv": st_load(good)["wkv"] * 1e30})
    with open(sessions / f"sess_{10:016x}.state", "wb") as f:
        f.truncate(4 << 30)  # a 4 GiB file (sparse), refused before it is read
    (sessions / f"sess_{11:016x}.state").write_bytes(os.urandom(5000))
    (sessions / "notes.state").write_bytes(good)
    stale = sessions / f".{ids[1]}.state.abcdefgh.tmp"
    stale.write_bytes(b"half a file")
    with serve(model, slots=2, state_dir=tmp_path) as srv:
        loaded = {s["id"] for s in api(srv, "GET", "/v1/sessions").json()["data"]}
        assert loaded == set(ids)
        metrics = api(srv, "GET", "/metrics").text
        assert "rwkvstate_session_files_skipped_total 8.0" in metrics
        assert not stale.exists()
        state_file = f"sessions/{huge.name}"
        r = api(srv, "POST", "/v1/sessions", json={"state_file": state_file})
        assert_error(r, 400, None, str(tmp_path))  # sessions/ can be read, and the file is refused
    # the CLI: one line for every one of them
    monkeypatch.delenv("RWKVSTATE_DEBUG", raising=False)
    from rwkvstate.cli import main

    for name in [names[0], names[3], huge.name, f"sess_{10:016x}.state", f"sess_{11:016x}.state"]:
        capsys.readouterr()
        assert main(["state", "load", str(sessions / name), "--max-tokens", "1"]) == 1, name
        err = capsys.readouterr().err
        assert err.startswith("rwkvstate: error: ") and err.count("\n") == 1, err


# ---- /metrics -----------------------------------------------------------------------------------------
def test_metrics_cannot_be_written_by_requests(model):
    with serve(model, slots=1) as srv:
        paths = ["/healthz%0Afake_metric%201%0A", "/health%0Afake%201", "/v1/sessions/x%0Ay/fork",
                 "/v1/models/" + "m" * 20000, "/metrics/../x"] + [f"/v1/completions{i}" for i in range(200)]  # fmt: skip
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            for path in paths:
                http.get(path)  # unauthenticated: refused before routing
                http.get(path, headers={"Authorization": f"Bearer {KEY}"})
        text = api(srv, "GET", "/metrics").text
        assert "fake" not in text and len(text) < 20000
        routes = {line.split('route="')[1].split('"')[0] for line in text.splitlines()
                  if line.startswith("rwkvstate_requests_total{")}  # fmt: skip
        app_routes = {getattr(r, "path", None) for r in srv.app.routes}
        assert routes <= app_routes | {"unmatched", "refused"} and {"unmatched", "refused"} <= routes
        assert 'rwkvstate_requests_total{route="refused",status="4xx"}' in text
        assert 'rwkvstate_requests_total{route="/v1/models/{model_id:path}",status="4xx"}' in text


# ---- limits -------------------------------------------------------------------------------------------
def test_session_snapshot_and_disk_limits(model, tmp_path):
    with serve(model, slots=2, state_dir=tmp_path, max_sessions=2, max_snapshots=1) as srv:
        a = new_session(srv)["id"]
        empty = (tmp_path / "sessions" / f"{a}.state").stat().st_size
        assert empty < 1024  # an empty session stores no state
        complete(srv, "import re\n", max_tokens=2, extra_body={"session": a})
        full = (tmp_path / "sessions" / f"{a}.state").stat().st_size
        assert full > model.state_layout.slot_nbytes(torch.float32)  # it holds a state now
        b = new_session(srv)["id"]
        error = assert_error(api(srv, "POST", "/v1/sessions"), 429, "session_limit")
        assert "limit is 2" in error["message"]
        assert_error(api(srv, "POST", f"/v1/sessions/{a}/fork"), 429, "session_limit")
        assert api(srv, "POST", f"/v1/sessions/{a}/snapshot").status_code == 200
        assert_error(api(srv, "POST", f"/v1/sessions/{a}/snapshot"), 429, "snapshot_limit")
        assert api(srv, "DELETE", f"/v1/sessions/{b}").status_code == 200
        new_session(srv)
    limit = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) + full // 2
    with serve(model, slots=2, state_dir=tmp_path, max_state_dir_bytes=limit) as srv:
        error = assert_error(api(srv, "POST", f"/v1/sessions/{a}/fork"), 429, "state_dir_full")
        assert f"limit of {limit:,} bytes" in error["message"]
        new_session(srv)  # an empty session still fits


# ---- errors -------------------------------------------------------------------------------------------
def test_every_error_is_openai_shaped_without_host_paths(model, tmp_path, monkeypatch):
    with serve(model, slots=1, state_dir=tmp_path) as srv:
        sid = new_session(srv)["id"]
        hidden = str(tmp_path)
        cases = [
            ("POST", "/v1/sessions", {"state_file": "a" * 5000}, 400),
            ("POST", "/v1/sessions", {"state_file": "x/" * 2000 + "a"}, 400),
            ("POST", "/v1/sessions", {"state_file": "d/" * 40 + "a"}, 400),
            ("POST", "/v1/sessions", {"state_file": "\ud800.state"}, 400),
            ("POST", f"/v1/sessions/{sid}/snapshot", {"name": "n" * 300}, 400),
            ("POST", f"/v1/sessions/{sid}/snapshot", {"name": "x/" * 2000 + "a"}, 400),
            ("POST", f"/v1/sessions/{sid}/rollback", {"tokens": 10**30}, 400),
            ("GET", "/v1/" + "p" * 5000, None, 404),
            ("DELETE", "/v1/models", None, 405),
        ]
        for method, path, body, status in cases:
            r = api(srv, method, path, content=None if body is None else json.dumps(body),
                    headers={"content-type": "application/json"})  # fmt: skip
            error = assert_error(r, status, None, hidden)
            assert len(error["message"]) < 600, (path, error)
        (tmp_path / "link.state").symlink_to(tmp_path / "link.state")  # a loop
        assert_error(api(srv, "POST", "/v1/sessions", json={"state_file": "link.state"}), 400, None, hidden)

        def boom(*args, **kwargs):
            raise RuntimeError(f"something broke in {tmp_path}")

        monkeypatch.setattr(core_of(srv).store, "info", boom)
        error = assert_error(api(srv, "GET", f"/v1/sessions/{sid}"), 500, "internal_error", hidden)
        assert "RuntimeError" in error["message"]


# ---- connections ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("http", ["h11", pytest.param("httptools", marks=pytest.mark.skipif(
    importlib.util.find_spec("httptools") is None, reason="httptools is not installed"))])  # fmt: skip
def test_header_timeout_keep_alive_and_connection_limit(model, http):
    with serve(model, slots=1, header_timeout_s=0.5, keep_alive_s=0.5, max_connections=4, http=http) as srv:
        silent = socket.create_connection((srv.host, srv.port))
        slow = socket.create_connection((srv.host, srv.port))
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the end of the headers
        start = time.monotonic()
        assert _closed(silent) and _closed(slow) and time.monotonic() - start < 5
        held = [socket.create_connection((srv.host, srv.port)) for _ in range(4)]
        extra = socket.create_connection((srv.host, srv.port))
        assert _closed(extra, timeout=0.4)  # closed at once, before any header timeout
        for s in held:
            s.close()
        with httpx.Client(base_url=srv.url) as http:  # a kept-alive connection, then idle
            assert http.get("/health").status_code == 200
            time.sleep(1.0)
            assert http.get("/health").status_code == 200  # a new connection: the old one was closed
        for s in (silent, slow, extra):
            s.close()


def _closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_docs_are_off_by_default_and_behind_the_key(model):
    with serve(model, slots=1) as srv:
        assert api(srv, "GET", "/openapi.json").status_code == 404
        assert api(srv, "GET", "/docs").status_code == 404
    with serve(model, slots=1, docs=True) as srv:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert_error(httpx.get(srv.url + path), 401, "invalid_api_key")
            assert api(srv, "GET", path).status_code == 200


# ---- usage after a timeout ----------------------------------------------------------------------------
def test_prompt_tokens_after_a_timeout_count_only_what_was_read(model):
    options = dict(slots=1, request_timeout_s=0.5, engine_options={"max_prefill_chunk": 16})
    with serve(model, **options) as srv:
        sid = new_session(srv)["id"]
        prompt = "x = 1\n" * 3000  # 18,000 tokens, 16 per step: far more than 0.5 s
        out = complete(srv, prompt, max_tokens=4, extra_body={"session": sid})
        assert out.choices[0].finish_reason == "timeout"
        assert 0 < out.usage.prompt_tokens < len(prompt) and out.usage.completion_tokens == 0
        assert session_tokens(srv, sid) == out.usage.prompt_tokens  # what the session holds


# ---- fuzz -----------------------------------------------------------------------------------------------
FUZZ_FIELDS = ("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
               "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "stop",
               "stop_token_ids", "stream", "stream_options", "n", "session", "logprobs", "logit_bias", "echo",
               "state_file", "tokens", "turns", "name")  # fmt: skip


def _strategies(sid: str):
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
               | st.sampled_from([0, 1, -1, 1e-40, 1e-300, 1e300, 2**63, "", "..", "/etc/passwd", "x/" * 300]))  # fmt: skip
    anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)  # fmt: skip
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]) | anything,
                                     "content": st.text(max_size=12) | anything})  # fmt: skip
    likely = {
        "model": st.just(MODEL), "prompt": st.text(max_size=16) | st.lists(st.integers(-3, 300), max_size=4),
        "messages": st.lists(message, max_size=3), "max_tokens": st.integers(-1, 6), "stream": st.booleans(),
        "temperature": st.floats(0, 3) | st.sampled_from([1e-40, 1e-300, 1e-8]), "session": st.just(sid),
        "repetition_penalty": st.sampled_from([1e-300, 1e-30, 0.5, 50.0]), "seed": st.integers(-(2**64), 2**65),
        "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=20), "tokens": st.integers(-1, 2**40),
        "turns": st.integers(-1, 5), "name": st.text(max_size=300) | st.just("n" * 300), "state_file": anything,
    }  # fmt: skip
    fields = st.sampled_from(FUZZ_FIELDS).flatmap(lambda k: st.tuples(st.just(k), likely.get(k, anything) | anything))
    valid = {
        "/v1/completions": {"model": MODEL, "prompt": "x = ", "max_tokens": 3},
        "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        "/v1/sessions": {}, f"/v1/sessions/{sid}/rollback": {"tokens": 1}, f"/v1/sessions/{sid}/snapshot": {},
        f"/v1/sessions/{sid}/fork": {},
    }  # fmt: skip

    @st.composite
    def request(draw):
        """A valid request with up to three fields changed, or now and then any JSON at all."""
        path = draw(st.sampled_from(sorted(valid)))
        if draw(st.integers(0, 9)) == 0:
            return path, draw(anything)
        return path, {**valid[path], **dict(draw(st.lists(fields, max_size=3)))}

    return request()


class Steady(threading.Thread):
    """The same greedy request, again and again, while the fuzz runs: every answer must be the same."""

    def __init__(self, srv, prompt: str):
        super().__init__(daemon=True)
        self.srv, self.prompt, self.stop, self.texts = srv, prompt, threading.Event(), []

    def run(self):
        while not self.stop.is_set():
            self.texts.append(complete(self.srv, self.prompt, max_tokens=12).choices[0].text)


@pytest.mark.timeout(240)
def test_fuzzed_requests_never_500_and_never_touch_a_concurrent_stream(model, tmp_path):
    from hypothesis import HealthCheck, given, settings

    options = dict(slots=4, state_dir=tmp_path, max_tokens_cap=12, default_max_tokens=4, request_timeout_s=30)
    with serve(model, **options) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        sid = new_session(srv)["id"]
        expected = complete(srv, "def steady():\n", max_tokens=12).choices[0].text
        requests, statuses = _strategies(sid), []
        steady = Steady(srv, "def steady():\n")
        steady.start()

        @settings(max_examples=80, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=requests)
        def request(case):
            path, body = case
            r = http.post(path, content=json.dumps(body), headers={"Authorization": f"Bearer {KEY}",
                                                                   "content-type": "application/json"})  # fmt: skip
            statuses.append(r.status_code)
            assert r.status_code < 500, (path, body, r.text)
            if r.headers["content-type"].startswith("application/json") and r.status_code >= 400:
                assert set(r.json()["error"]) == ERROR_KEYS and str(tmp_path) not in r.text
            assert '"server_error"' not in r.text, (path, body, r.text)  # nor inside an event stream

        try:
            request()
        finally:
            steady.stop.set()
            steady.join(60)
        assert steady.texts and set(steady.texts) == {expected}
        assert statuses.count(200) >= 10 and 400 in statuses  # the fuzz reached generation and refusals
