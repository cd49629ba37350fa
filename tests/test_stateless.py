"""Stateless mode: a request brings its state (a base64 state file) and takes the new one back."""

from __future__ import annotations

import base64

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from rwkvstate import Model  # noqa: E402
from rwkvstate.cli import BUNDLED_MODEL  # noqa: E402
from rwkvstate.server import BackgroundServer, ServerConfig, create_app  # noqa: E402
from rwkvstate.state.files import decode_state_file, encode_state_file  # noqa: E402

MODEL = "stdlib-byte-l8-c256"
pytestmark = pytest.mark.skipif(not BUNDLED_MODEL.exists(), reason="the bundled model is not in this checkout")


@pytest.fixture(scope="module")
def server():
    model = Model.load(BUNDLED_MODEL)
    with BackgroundServer(create_app(model, ServerConfig(slots=2, max_state_bytes=1 << 20))) as srv:
        srv.model = model
        yield srv


def post(srv, path: str, **body) -> httpx.Response:
    return httpx.post(srv.url + path, json={"model": MODEL, "temperature": 0, **body}, timeout=60)


def test_state_round_trip_matches_a_session(server):
    first = post(server, "/v1/completions", prompt="def add(a, b):", max_tokens=5, return_state=True)
    assert first.status_code == 200
    state = first.json()["state"]
    sf = decode_state_file(base64.b64decode(state), fingerprint=server.model.fingerprint)
    assert len(sf.tokens) == first.json()["usage"]["total_tokens"]
    second = post(server, "/v1/completions", prompt="\n    return", max_tokens=5, state=state, return_state=True)
    # the same two turns in a server session
    sid = httpx.post(server.url + "/v1/sessions", timeout=60).json()["id"]
    post(server, "/v1/completions", prompt="def add(a, b):", max_tokens=5, session=sid)
    kept = post(server, "/v1/completions", prompt="\n    return", max_tokens=5, session=sid)
    assert second.json()["choices"][0]["text"] == kept.json()["choices"][0]["text"]
    after = decode_state_file(base64.b64decode(second.json()["state"]))
    assert after.tokens[: len(sf.tokens)] == sf.tokens and len(after.tokens) == len(sf.tokens) + 16
    # a chat turn, streamed: the state comes with the last chunk
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                            "stream": True, "return_state": True, "state": state}) as r:  # fmt: skip
        events = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert '"state":' in events[-1] and '"finish_reason":null' not in events[-1]


def test_bad_states_are_refused(server):
    r = post(server, "/v1/completions", prompt="x", max_tokens=1, state="not base64!")
    assert r.status_code == 400 and r.json()["error"]["param"] == "state"
    other = {"att_shift": torch.zeros(2, 128), "wkv": torch.zeros(2, 2, 64, 64), "ffn_shift": torch.zeros(2, 128)}
    blob = encode_state_file(other, fingerprint="0" * 32, model_info="another model")
    r = post(server, "/v1/completions", prompt="x", max_tokens=1, state=base64.b64encode(blob).decode())
    assert r.status_code == 400 and "different model" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", prompt="x", max_tokens=1, state="AAAA", session="sess_0000000000000000")
    assert r.status_code == 400 and "session keeps its own state" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", prompt="x", max_tokens=1, state="A" * (2 << 20))
    assert r.status_code == 413
    assert post(server, "/v1/completions", prompt="x", max_tokens=1).status_code == 200  # nothing else affected
