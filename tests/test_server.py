"""The HTTP server (rwkvstate.server) driven through the official `openai` client.

Servers run in a background thread of this process on a free 127.0.0.1 port, with the
bundled byte-level model on the CPU and the engine core on a thread of this process (the
same messages over the same local socket as a core process; one test runs a core process and
kills it). Greedy outputs are compared with the engine run directly (a second copy of the
model) or with the same request run alone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("zmq")
pytest.importorskip("msgspec")

from rwkvstate import Engine, Model, SamplingParams  # noqa: E402
from rwkvstate.cli import BUNDLED_MODEL, main  # noqa: E402
from rwkvstate.runtime.core import ModelSpec  # noqa: E402
from rwkvstate.server import BackgroundServer, ServerConfig, create_app  # noqa: E402

KEY = "test-key"
MODEL = "stdlib-byte-l8-c256"
GREEDY = SamplingParams(temperature=0)

pytestmark = pytest.mark.skipif(not BUNDLED_MODEL.exists(), reason="the bundled model is not in this checkout")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The model is tiny: one intra-op thread is fastest, and on a shared two-core machine a
    second thread competing with the HTTP threads slows every step down many times."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return Model.load(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def ref_model():
    """A second copy for reference runs on the test thread while the server's engine core runs."""
    return Model.load(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def server(model, state_dir):
    config = ServerConfig(slots=8, api_key=KEY, max_tokens_cap=256, max_queue=128, max_request_bytes=64 << 10,
                          request_timeout_s=120, state_dir=state_dir)  # fmt: skip
    with BackgroundServer(create_app(model, config)) as srv:
        yield srv


def client(srv, key=KEY) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0, timeout=60)


def api(srv, method: str, path: str, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})}
    return httpx.request(method, srv.url + path, headers=headers, timeout=30, **kw)


def state_of(srv):
    return srv.app.state.context


def greedy(ref_model, *prompts: str, max_tokens: int, stop=()) -> list[str]:
    """Texts of successive greedy generations in one session, each after its prompt."""
    session = Engine(ref_model, slots=2).session()
    params = SamplingParams(temperature=0, stop=tuple(stop))
    return ["".join(session.generate(max_tokens, params, prompt=p)) for p in prompts]


def complete(srv, prompt, max_tokens=8, **kw):
    return client(srv).completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def pause_engine(srv) -> threading.Event:
    """Holds the engine's steps (the core still answers messages) until the returned event is set."""
    gate, paused = threading.Event(), threading.Event()

    def pause(core):
        step = core.engine.step
        core.engine.step = lambda: gate.is_set() and step()
        paused.set()

    state_of(srv).core.call_soon(pause)
    paused.wait(10)
    return gate


def stats(srv) -> dict:
    return state_of(srv).stats


def is_busy(srv, sid: str) -> bool:
    return api(srv, "GET", f"/v1/sessions/{sid}").json()["busy"]


def wait_for(condition, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def in_thread(fn):
    """Runs fn in a thread; returns a function that joins it and returns fn's result or raises."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join():
        thread.join(60)
        if "error" in out:
            raise out["error"]
        return out["value"]

    return join


# ---- info endpoints ----------------------------------------------------------------------------
def test_models_health_and_metrics(server):
    assert [m.id for m in client(server).models.list().data] == [MODEL]
    health = httpx.get(f"{server.url}/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    complete(server, "import os\n", max_tokens=2)
    text = api(server, "GET", "/metrics").text
    for name in ("generation_tokens_per_second", "queue_depth", "slots_in_use", "sessions_on_host",
                 "prefix_cache_hit_rate", "requests_total"):  # fmt: skip
        assert f"\nrwkvstate_{name}" in text
    for tier in ("pool", "host", "history", "prefix_cache"):
        assert f'rwkvstate_state_bytes{{tier="{tier}"}}' in text
    assert 'rwkvstate_requests_total{route="/v1/completions",status="2xx"} 1.0' in text


def latency_counts(srv) -> dict[str, tuple[float, float]]:
    """(count, sum) of each engine-core latency histogram in /metrics."""
    out = {}
    for line in api(srv, "GET", "/metrics").text.splitlines():
        name, _, value = line.rpartition(" ")
        for suffix in ("_seconds_count", "_seconds_sum"):
            if name.startswith("rwkvstate_") and name.endswith(suffix):
                key = name.removeprefix("rwkvstate_").removesuffix(suffix)
                count, total = out.get(key, (0.0, 0.0))
                out[key] = (float(value), total) if suffix == "_seconds_count" else (count, float(value))
    return out


def test_metrics_latency_histograms(server):
    """The core's histograms count each request once (its receipt, its first token) and each token
    message after the first; their durations lie inside the client's."""
    before = latency_counts(server)
    start = time.monotonic()
    for prompt in ("import os\n", "def f(x):\n", "class A:\n"):
        chunks = list(complete(server, prompt, max_tokens=5, stream=True))
        assert len([c for c in chunks if c.choices and c.choices[0].text]) >= 1
    wall = time.monotonic() - start
    after = latency_counts(server)
    delta = {k: (after[k][0] - before.get(k, (0.0, 0.0))[0], after[k][1] - before.get(k, (0.0, 0.0))[1]) for k in after}
    assert set(delta) == {"request_to_engine", "engine_first_token", "engine_token_gap", "engine_gc_pause", "engine_core_step",
                          "engine_core_between_steps"}  # fmt: skip
    assert delta["engine_core_step"][0] == delta["engine_core_between_steps"][0] >= 5  # at least one step per token
    assert delta["request_to_engine"][0] == delta["engine_first_token"][0] == 3
    assert 0 < delta["engine_token_gap"][0] <= 3 * 4  # at most one message per token after the first
    assert all(0 <= total < wall for _, total in delta.values())
    text = api(server, "GET", "/metrics").text
    assert 'rwkvstate_engine_first_token_seconds_bucket{le="+Inf"}' in text


def test_slow_engine_steps_are_logged(server, monkeypatch, caplog):
    from rwkvstate.runtime import core

    monkeypatch.setattr(core, "SLOW_STEP_S", 0.0)  # every step counts as slow
    with caplog.at_level("WARNING", logger="rwkvstate.core"):
        complete(server, "import os\n", max_tokens=2)
    assert "an engine step took" in caplog.text and "streams generating" in caplog.text


# ---- completions and chat ----------------------------------------------------------------------
def test_completion_matches_the_engine(server, ref_model):
    prompt = "def fibonacci(n):\n"
    out = complete(server, prompt, max_tokens=12)
    choice = out.choices[0]
    assert choice.text == greedy(ref_model, prompt, max_tokens=12)[0]
    assert choice.finish_reason == "length" and out.object == "text_completion"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt.encode()), 12)
    assert out.usage.total_tokens == len(prompt.encode()) + 12


def test_streaming_completion_equals_non_streaming(server):
    prompt = "class Stack:\n"
    whole = complete(server, prompt, max_tokens=10).choices[0].text
    chunks = list(complete(server, prompt, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_stop_strings_and_token_prompts(server, ref_model):
    prompt = "import os\nimport sys\n"
    full = greedy(ref_model, prompt, max_tokens=20)[0]
    stop = full[3:5]  # a string the greedy continuation is known to contain
    out = complete(server, list(prompt.encode()), max_tokens=20, stop=[stop])
    assert out.choices[0].text == full[: full.index(stop)] and out.choices[0].finish_reason == "stop"


def test_chat_uses_the_template(server, ref_model):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
    rendered = "System: You write Python.\n\nUser: Sort a list.\n\nAssistant:"
    expected = greedy(ref_model, rendered, max_tokens=16, stop=["\n\n"])[0]
    expected = expected[1:] if expected.startswith(" ") else expected
    chat = client(server).chat.completions
    out = chat.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert out.choices[0].message.content == expected and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(rendered.encode())
    chunks = list(chat.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


# ---- sessions ------------------------------------------------------------------------------------
def new_session(srv, **body) -> dict:
    r = api(srv, "POST", "/v1/sessions", json=body or None)
    assert r.status_code == 200, r.text
    return r.json()


def test_session_continue_fork_rollback_delete(server, ref_model):
    sid = new_session(server)["id"]
    first, second = "def add(a, b):\n", "\n\ndef sub(a, b):\n"
    ref = greedy(ref_model, first, second, max_tokens=8)
    out1 = complete(server, first, extra_body={"session": sid})
    out2 = complete(server, second, extra_body={"session": sid})  # continues: the history is not resent
    assert [out1.choices[0].text, out2.choices[0].text] == ref
    assert out2.usage.prompt_tokens == len(second.encode())
    n1 = len(first.encode()) + 8
    info = api(server, "GET", f"/v1/sessions/{sid}").json()
    assert info["tokens"] == n1 + len(second.encode()) + 8 and info["busy"] is False

    child = api(server, "POST", f"/v1/sessions/{sid}/fork").json()
    assert child["tokens"] == info["tokens"] and child["id"] != sid
    r = api(server, "POST", f"/v1/sessions/{child['id']}/rollback", json={"turns": 1})
    assert r.status_code == 200 and r.json()["tokens"] == n1 and r.json()["removed"] == len(second.encode()) + 8
    again = complete(server, second, extra_body={"session": child["id"]})
    assert again.choices[0].text == ref[1]  # the rolled-back fork is the parent's earlier state
    r = api(server, "POST", f"/v1/sessions/{child['id']}/rollback", json={"tokens": 5})
    assert r.json()["tokens"] == info["tokens"] - 5

    for bad in ({"tokens": 1, "turns": 1}, {}, {"tokens": 10**6}, {"turns": 0}):
        r = api(server, "POST", f"/v1/sessions/{child['id']}/rollback", json=bad)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["code"] is not None
    r = api(server, "POST", f"/v1/sessions/{child['id']}/rollback", json={"tokens": 10**6})
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("rollback_not_possible", "tokens")
    assert api(server, "DELETE", f"/v1/sessions/{child['id']}").json()["deleted"] is True
    assert api(server, "GET", f"/v1/sessions/{child['id']}").status_code == 404
    assert api(server, "DELETE", f"/v1/sessions/{child['id']}").status_code == 404
    assert sid in [s["id"] for s in api(server, "GET", "/v1/sessions").json()["data"]]


def test_chat_session_feeds_only_new_messages(server):
    sid = new_session(server)["id"]
    chat = client(server).chat.completions
    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    out1 = chat.create(model=MODEL, messages=turn1, max_tokens=6, temperature=0, extra_body={"session": sid})
    out2 = chat.create(model=MODEL, messages=[{"role": "user", "content": "more"}], max_tokens=6, temperature=0,
                       extra_body={"session": sid})  # fmt: skip
    # a reply cut by max_tokens did not end its turn: the next one starts after a blank line
    separator = 0 if out1.choices[0].finish_reason == "stop" else 2
    assert out2.usage.prompt_tokens == len(b"User: more\n\nAssistant:") + separator
    total = out1.usage.total_tokens + out2.usage.total_tokens
    assert api(server, "GET", f"/v1/sessions/{sid}").json()["tokens"] == total
    r = api(server, "POST", f"/v1/sessions/{sid}/rollback", json={"turns": 1})
    assert r.json()["tokens"] == out1.usage.total_tokens


def test_busy_session_answers_409(server):
    sid = new_session(server)["id"]
    gate = pause_engine(server)
    try:
        first = in_thread(lambda: complete(server, "x = 1\n", max_tokens=4, extra_body={"session": sid}))
        wait_for(lambda: is_busy(server, sid))
        with pytest.raises(openai.ConflictError) as err:
            complete(server, "y = 2\n", extra_body={"session": sid})
        assert err.value.body["code"] == "session_busy" and err.value.body["param"] == "session"
        for method, path in (("DELETE", ""), ("POST", "/fork"), ("POST", "/snapshot")):
            assert api(server, method, f"/v1/sessions/{sid}{path}").status_code == 409
    finally:
        gate.set()
    assert first().choices[0].finish_reason == "length"
    assert api(server, "DELETE", f"/v1/sessions/{sid}").status_code == 200


def test_fork_on_a_one_slot_server(model):
    """A fork needs the source and the copy resident at once; with one slot it goes through a
    snapshot instead, and both sessions still continue identically."""
    with BackgroundServer(create_app(model, ServerConfig(slots=1, api_key=KEY))) as srv:
        sid = new_session(srv)["id"]
        complete(srv, "for i in range(3):\n", extra_body={"session": sid})
        child = api(srv, "POST", f"/v1/sessions/{sid}/fork").json()["id"]
        texts = [complete(srv, "    print", extra_body={"session": s}).choices[0].text for s in (sid, child)]
        assert texts[0] == texts[1]


# ---- state files -----------------------------------------------------------------------------------
def test_snapshot_and_state_files(server, state_dir, model, tmp_path):
    sid = new_session(server)["id"]
    complete(server, "import json\n", extra_body={"session": sid})
    snap = api(server, "POST", f"/v1/sessions/{sid}/snapshot").json()
    assert snap["name"].startswith("snapshots/") and (state_dir / snap["name"]).is_file()
    loaded = new_session(server, state_file=snap["name"])
    assert loaded["tokens"] == snap["tokens"] == len(b"import json\n") + 8
    named = api(server, "POST", f"/v1/sessions/{sid}/snapshot", json={"name": "mine/a.state"}).json()
    assert named["name"] == "mine/a.state"
    assert api(server, "POST", f"/v1/sessions/{sid}/snapshot", json={"name": "mine/a.state"}).status_code == 409
    for bad in ("../a.state", "/tmp/a.state", "sessions/x.state"):
        assert api(server, "POST", f"/v1/sessions/{sid}/snapshot", json={"name": bad}).status_code == 400

    # a state-tuning file (blocks.N.att.time_state) starts a session with no tokens
    c = model.config
    tuning = {f"blocks.{i}.att.time_state": 0.01 * torch.randn(c.n_head, c.head_size, c.head_size)
              for i in range(c.n_layer)}  # fmt: skip
    (state_dir / "tuning").mkdir()
    torch.save(tuning, state_dir / "tuning" / "t.pth")
    tuned = new_session(server, state_file="tuning/t.pth")
    assert tuned["tokens"] == 0
    assert complete(server, "def f():\n", extra_body={"session": tuned["id"]}).usage.completion_tokens == 8

    outside = tmp_path / "outside.state"
    outside.write_bytes((state_dir / snap["name"]).read_bytes())
    (state_dir / "link.state").symlink_to(outside)
    (state_dir / "junk.state").write_bytes(b"not a state file")
    cases = {"../outside.state": 400, str(outside): 400, "link.state": 400, "missing.state": 404, "junk.state": 400}
    for name, status in cases.items():
        r = api(server, "POST", "/v1/sessions", json={"state_file": name})
        assert r.status_code == status, (name, r.text)
        assert r.json()["error"]["param"] == "state_file" and str(state_dir) not in r.json()["error"]["message"]


def test_sessions_survive_a_restart(model, tmp_path):
    config = ServerConfig(slots=2, api_key=KEY, state_dir=tmp_path)
    with BackgroundServer(create_app(model, config)) as a:
        sid = new_session(a)["id"]
        complete(a, "def main():\n", extra_body={"session": sid})
        assert (tmp_path / "sessions" / f"{sid}.state").is_file()  # written after the request
        fork = api(a, "POST", f"/v1/sessions/{sid}/fork").json()["id"]
        expected = complete(a, "    return", extra_body={"session": fork}).choices[0].text
        tokens = api(a, "GET", f"/v1/sessions/{sid}").json()["tokens"]
    (tmp_path / "sessions" / "sess_0123456789abcdef.state").write_bytes(b"damaged")
    with BackgroundServer(create_app(model, config)) as b:
        ids = {s["id"] for s in api(b, "GET", "/v1/sessions").json()["data"]}
        assert ids == {sid, fork}  # the damaged file is skipped
        assert api(b, "GET", f"/v1/sessions/{sid}").json()["tokens"] == tokens
        assert complete(b, "    return", extra_body={"session": sid}).choices[0].text == expected


@pytest.mark.timeout(240)
def test_a_killed_engine_core_restarts_and_nothing_acknowledged_is_lost(ref_model, tmp_path):
    """The default deployment: the engine core in a process of its own. Killing it ends the
    requests in flight with an error; it restarts, and every saved session is back."""
    config = ServerConfig(slots=2, api_key=KEY, state_dir=tmp_path)
    with BackgroundServer(create_app(ModelSpec(path=str(BUNDLED_MODEL)), config)) as srv:
        core = state_of(srv).core
        sid = new_session(srv)["id"]
        first = complete(srv, "def main():\n", extra_body={"session": sid}).choices[0].text
        info = api(srv, "GET", f"/v1/sessions/{sid}").json()
        stream = complete(srv, "def forever():\n", max_tokens=250, stream=True)
        chunks = iter(stream)
        next(chunks)
        os.kill(core.pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="engine process stopped"):
            list(chunks)
        wait_for(lambda: httpx.get(f"{srv.url}/health").status_code == 200 and core.restarts == 1, timeout=120)
        assert api(srv, "GET", f"/v1/sessions/{sid}").json()["tokens"] == info["tokens"]
        second = complete(srv, "    return", extra_body={"session": sid}).choices[0].text
    assert [first, second] == greedy(ref_model, "def main():\n", "    return", max_tokens=8)


@pytest.mark.timeout(240)
def test_serve_with_two_api_processes(tmp_path):
    """`rwkvstate serve --api-processes 2`: two uvicorn workers on one port, one engine core."""
    with socket_port() as port:
        pass
    cmd = [sys.executable, "-m", "rwkvstate.cli", "serve", "--port", str(port), "--api-processes", "2",
           "--state-dir", str(tmp_path), "--api-key", KEY, "--log-level", "warning"]  # fmt: skip
    server = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _healthy(url), timeout=180)
        srv = type("Srv", (), {"url": url})()
        sid = new_session(srv)["id"]
        texts = [complete(srv, "import os\n", extra_body={"session": sid}).choices[0].text for _ in range(2)]
        assert api(srv, "GET", f"/v1/sessions/{sid}").json()["tokens"] == len(b"import os\n") * 2 + 16
        assert all(texts) and complete(srv, "import os\n").choices[0].text == texts[0]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
    assert (tmp_path / "sessions" / f"{sid}.state").is_file()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class socket_port:
    """A free TCP port on 127.0.0.1."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


# ---- errors and limits -----------------------------------------------------------------------------
def test_error_responses(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    with pytest.raises(openai.NotFoundError) as err:
        complete(server, "x", extra_body={"session": "sess_doesnotexist"})
    assert err.value.body["code"] == "session_not_found"
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as err:
        complete(server, "x", max_tokens=257)
    assert "limit of 256" in err.value.message and err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.APIStatusError) as err:
        complete(server, "x" * (65 << 10))
    assert err.value.status_code == 413
    with pytest.raises(openai.BadRequestError):
        complete(server, "")

    r = api(server, "POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "temperature": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = api(server, "POST", "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "tool"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0")
    r = api(server, "POST", "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = api(server, "POST", "/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    for bad in ({"temperature": 1e-40}, {"repetition_penalty": 1e-300}, {"min_p": 2}, {"logit_bias": {"5": 1000}},
                {"logit_bias": {"999999": 1}}, {"logit_bias": {"x": 1}}):  # fmt: skip
        r = api(server, "POST", "/v1/completions", json={"model": MODEL, "prompt": "x", **bad})
        assert r.status_code == 400, bad
    assert api(server, "GET", "/v1/nothing").json()["error"]["type"] == "invalid_request_error"


def test_queue_full_timeout_and_body_cap(model):
    config = ServerConfig(slots=1, max_queue=0, request_timeout_s=1.0, max_request_bytes=2048, max_tokens_cap=5000)
    with BackgroundServer(create_app(model, config)) as srv:
        gate = pause_engine(srv)
        try:
            waiting = in_thread(lambda: complete(srv, "a = 1\n", max_tokens=4))
            wait_for(lambda: state_of(srv).inflight == 1)
            with pytest.raises(openai.RateLimitError) as err:
                complete(srv, "b = 2\n")
            assert err.value.body["code"] == "queue_full"
            time.sleep(1.1)  # past the waiting request's deadline
        finally:
            gate.set()
        assert waiting().choices[0].finish_reason == "timeout"  # it waited in the queue past its deadline

        start = time.monotonic()
        out = complete(srv, "def long():\n", max_tokens=5000)  # far more than 1 s of decoding
        assert out.choices[0].finish_reason == "timeout" and time.monotonic() - start < 10
        chunks = list(complete(srv, "def long():\n", max_tokens=5000, stream=True))
        assert chunks[-1].choices[0].finish_reason == "timeout"
        assert complete(srv, "x = 3\n", max_tokens=3).choices[0].finish_reason == "length"  # the slot is free again
        with pytest.raises(openai.APIStatusError) as err:
            complete(srv, "y" * 4096)
        assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"


def test_client_disconnect_cancels_the_stream(server):
    state = state_of(server)
    wait_for(lambda: state.stats.get("running") == 0)
    sessions, generated = state.stats["sessions"], state.stats["tokens_generated"]
    stream = complete(server, "def forever():\n", max_tokens=250, stream=True)
    next(iter(stream))
    stream.close()
    wait_for(lambda: state.stats["running"] == 0 and state.inflight == 0)
    assert state.stats["sessions"] == sessions  # the per-request session was closed
    assert state.stats["tokens_generated"] - generated < 250


@pytest.mark.timeout(120)
def test_64_concurrent_streams_equal_their_requests_run_alone(server):
    prompts = [f"def f{i}(x):\n    return x {op} {i}\n" for i, op in enumerate("+-*/%&|^" * 2)]
    alone = {p: complete(server, p, max_tokens=10).choices[0].text for p in prompts}
    async_client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    async def one(prompt: str) -> str:
        stream = await async_client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                                       stream=True)  # fmt: skip
        pieces, finish = [], None
        async for chunk in stream:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "length"
        return "".join(pieces)

    async def run_all():
        requests = [prompts[i % len(prompts)] for i in range(64)]
        texts = await asyncio.wait_for(asyncio.gather(*(one(p) for p in requests)), timeout=90)
        await async_client.close()
        return requests, texts

    requests, texts = asyncio.run(run_all())
    assert texts == [alone[p] for p in requests]
    assert state_of(server).inflight == 0


def test_cli_serve_checks_its_options(capsys):
    rc = main(["serve", "--max-queue", "-1"])
    assert rc == 1 and "max_queue must be >= 0" in capsys.readouterr().err


def test_logit_bias_and_min_p(server):
    out = complete(server, "abc", max_tokens=5, logit_bias={str(ord("q")): 100})
    assert out.choices[0].text == "qqqqq"
    out = client(server).completions.create(model=MODEL, prompt="abc", max_tokens=5, temperature=1.0, seed=3,
                                            extra_body={"min_p": 1.0})  # fmt: skip
    assert out.choices[0].text == complete(server, "abc", max_tokens=5).choices[0].text  # min_p 1: the best token
