"""Two CPU replicas of the bundled model on a local Ray cluster, sessions in a real Redis.

One cluster for the module (startup is most of the time), two ingresses in front (the default:
one per replica), so every request may reach either: sessions move between replicas and
match an uninterrupted run, a killed replica's sessions resume on the other, the store goes
away and comes back, a corrupted blob is refused, 32 concurrent sessions all survive, each
on the replica that holds it whichever ingress routed it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import time

import pytest

from redis_server import RedisServer, free_port, require  # noqa: E402

require("ray.serve")
require("redis")

import httpx  # noqa: E402
import torch  # noqa: E402

from rwkvstate.cli import BUNDLED_MODEL  # noqa: E402
from rwkvstate.state.files import decode_state_file  # noqa: E402


pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

MODEL_PATH = BUNDLED_MODEL
MODEL = MODEL_PATH.stem
KEY = "cluster-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
REPLICA = "x-rwkvstate-replica"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"), durable=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(redis_server):
    import ray
    from ray import serve

    from rwkvstate.cluster.serve import APP_NAME, ClusterConfig, run
    from rwkvstate.cluster.store import StoreConfig

    port = free_port()
    config = ClusterConfig(model=str(MODEL_PATH), store=StoreConfig(url=redis_server.url, timeout_s=2.0), replicas=2,
                           server={"slots": 4, "api_key": KEY, "max_tokens_cap": 4096}, torch_threads=1)  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}})  # fmt: skip
    try:
        run(config, "127.0.0.1", port, blocking=False)
        engine = serve.get_deployment_handle("engine", APP_NAME)
        yield Cluster(f"http://127.0.0.1:{port}", engine, redis_server)
    finally:
        serve.shutdown()
        ray.shutdown()


class Cluster:
    def __init__(self, url: str, engine, redis):
        self.url, self.engine, self.redis = url, engine, redis
        self.http = httpx.Client(base_url=url, headers=HEADERS, timeout=120)

    def post(self, path: str, **body) -> httpx.Response:
        return self.http.post(path, json=body or None)

    def complete(self, session: str | None, prompt: str, max_tokens: int = 6, retries: int = 0, **extra) -> httpx.Response:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
        if session is not None:
            body["session"] = session
        for _ in range(retries + 1):
            r = self.http.post("/v1/completions", json=body)
            if r.status_code != 503:
                break
            time.sleep(1)
        return r

    def new_session(self) -> str:
        r = self.post("/v1/sessions")
        assert r.status_code == 200, r.text
        return r.json()["id"]

    # a request straight to one replica, past the ingress's affinity (the test's own router)
    def on_replica(self, replica: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict, bytes]:
        raw = {"method": method, "path": path, "query": "", "body": json.dumps(body).encode() if body else b"",
               "headers": [(b"authorization", f"Bearer {KEY}".encode()), (b"content-type", b"application/json")]}  # fmt: skip
        parts = list(_drain(self.engine.options(stream=True).handle.remote(raw, replica=replica)))
        return parts[0]["status"], dict(parts[0]["headers"]), b"".join(parts[1:])

    def replicas(self, timeout: float = 90) -> list[str]:
        """The two replicas' ids, once both are up (a killed one is replaced by Ray Serve)."""
        seen: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                seen[self.engine.info.remote().result(timeout_s=10)["replica"]] = time.monotonic()
            except Exception:  # routed to the replica that was just killed
                continue
            alive = [r for r, t in seen.items() if time.monotonic() - t < 5]
            if len(alive) == 2:
                return sorted(alive)
            time.sleep(0.1)
        raise AssertionError(f"two replicas expected, found {seen}")

    def stored(self, session: str):
        import redis

        blob = redis.Redis.from_url(self.redis.url).hget(f"rwkvstate:s:{session}", "blob")
        return decode_state_file(blob, name=session)


def _drain(gen):
    for part in gen:
        yield part


def _turns(cluster: Cluster, session: str, prompts, where=None) -> list[str]:
    """Runs greedy completions of `prompts` in the session; `where(i)` may name a replica for turn i."""
    texts = []
    for i, prompt in enumerate(prompts):
        replica = where(i) if where else None
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "session": session}
        if replica is None:
            r = cluster.complete(session, prompt)
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
        else:
            status, _, content = cluster.on_replica(replica, "POST", "/v1/completions", body)
            assert status == 200, content
            texts.append(json.loads(content)["choices"][0]["text"])
    return texts


PROMPTS = ["def add(a, b):", "\n    return", "\n\nclass Point:", "\n    def __init__(self"]


def _same_state(a, b) -> None:
    assert a.tokens == b.tokens
    for key in a.state:
        assert torch.equal(a.state[key], b.state[key]), key
    assert torch.equal(a.logits, b.logits)


def test_session_moves_between_replicas_and_matches_an_uninterrupted_run(cluster):
    first, second = cluster.replicas()
    moving, staying = cluster.new_session(), cluster.new_session()
    # turns alternate between the replicas; each move loads the session from the store
    moved = _turns(cluster, moving, PROMPTS, where=lambda i: (first, second)[i % 2])
    kept = _turns(cluster, staying, PROMPTS, where=lambda i: first)
    assert moved == kept
    _same_state(cluster.stored(moving), cluster.stored(staying))  # fp32 store: bit for bit
    # back through the ingress: its replica's copy is stale and is reloaded, not used
    r = cluster.complete(moving, "\n")
    s = cluster.complete(staying, "\n")
    assert r.json()["choices"][0]["text"] == s.json()["choices"][0]["text"]
    _same_state(cluster.stored(moving), cluster.stored(staying))


def test_killed_replica_sessions_resume_elsewhere(cluster):
    victim_session, reference = cluster.new_session(), cluster.new_session()
    for session in (victim_session, reference):
        assert cluster.complete(session, PROMPTS[0]).status_code == 200
    home = cluster.complete(victim_session, PROMPTS[1])
    assert home.status_code == 200
    assert cluster.complete(reference, PROMPTS[1]).status_code == 200
    victim = home.headers[REPLICA]
    pid = cluster.engine.info.remote(replica=victim).result()["pid"]

    # a long streamed request in flight on the victim, then the victim dies
    body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 4000, "temperature": 0, "session": victim_session,
            "stream": True, "stop_token_ids": []}  # fmt: skip
    with cluster.http.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        os.kill(pid, signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data:")]
    assert any('"replica_failed"' in line for line in rest), rest[-3:]
    assert not any('"finish_reason":"length"' in line for line in rest)  # never acknowledged

    # the next request continues on the other replica from the last stored state
    after = cluster.complete(victim_session, PROMPTS[2], retries=10)
    assert after.status_code == 200, after.text
    assert after.headers[REPLICA] != victim
    expected = cluster.complete(reference, PROMPTS[2])
    assert after.json()["choices"][0]["text"] == expected.json()["choices"][0]["text"]
    _same_state(cluster.stored(victim_session), cluster.stored(reference))


def test_store_down_then_up(cluster):
    session = cluster.new_session()
    assert cluster.complete(session, PROMPTS[0]).status_code == 200
    tokens = cluster.stored(session).tokens
    cluster.redis.stop()
    try:
        r = cluster.complete(session, PROMPTS[1])
        assert r.status_code == 503 and r.json()["error"]["code"] == "session_store_unavailable"
        assert "unreachable" in r.json()["error"]["message"]
        assert cluster.post("/v1/sessions").status_code == 503
        assert cluster.complete(None, "x = 1").status_code == 200  # requests without a session go on
    finally:
        cluster.redis.start()
    assert cluster.stored(session).tokens == tokens  # nothing lost, nothing half-written
    r = cluster.complete(session, PROMPTS[1], retries=5)
    assert r.status_code == 200, r.text
    assert cluster.stored(session).tokens[: len(tokens)] == tokens and len(cluster.stored(session).tokens) > len(tokens)


def test_corrupted_blob_is_refused(cluster):
    import redis

    session = cluster.new_session()
    assert cluster.complete(session, PROMPTS[0]).status_code == 200
    client = redis.Redis.from_url(cluster.redis.url)
    key = f"rwkvstate:s:{session}"
    blob = bytearray(client.hget(key, "blob"))
    blob[-10] ^= 0x40  # one bit of the state
    client.hset(key, mapping={"blob": bytes(blob), "version": int(client.hget(key, "version")) + 1})
    r = cluster.complete(session, PROMPTS[1])
    assert r.status_code == 500 and r.json()["error"]["code"] == "stored_state_refused"
    assert "checksum" in r.json()["error"]["message"]
    metrics = cluster.http.get("/metrics").text
    assert "rwkvstate_store_refused_total 1" in metrics
    assert re.search(r"^rwkvstate_replicas [12]$", metrics, re.M)  # the killed one may be back by now


def _affinity_counts(cluster: Cluster) -> tuple[int, int]:
    text = cluster.http.get("/metrics").text
    return tuple(int(re.search(rf"^rwkvstate_affinity_{k}_total (\d+)$", text, re.M)[1]) for k in ("hits", "moves"))


def test_32_concurrent_sessions_over_both_replicas(cluster):
    cluster.replicas()  # both up (the one killed above is back)
    # and known to both ingresses, whether or not they routed anything since the kill: /metrics
    # asks every replica its ingress's router knows (a dead one left in that list would cost 5 s)
    deadline, streak = time.monotonic() + 60, 0
    while streak < 6:
        assert time.monotonic() < deadline, "the ingresses did not learn the replaced replica"
        start = time.monotonic()
        text = cluster.http.get("/metrics", timeout=30).text
        whole = re.search(r"^rwkvstate_replicas 2$", text, re.M) is not None
        if whole and streak:  # once both are known, every scrape is quick
            assert time.monotonic() - start < 4, "an ingress waited on a replica it should not know"
        streak = streak + 1 if whole else 0
    time.sleep(1.5)  # every ingress's counts written (once a second)
    hits_before, moves_before = _affinity_counts(cluster)
    created = [cluster.post("/v1/sessions") for _ in range(32)]
    assert all(r.status_code == 200 for r in created)
    sessions = [(r.json()["id"], r.headers[REPLICA]) for r in created]

    def conversation(item: tuple[str, str]) -> tuple[set, int]:
        session, home = item
        client = httpx.Client(base_url=cluster.url, headers=HEADERS, timeout=120)
        replicas, tokens = {home}, 0
        for prompt in PROMPTS[:2]:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "session": session}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            replicas.add(r.headers[REPLICA])
            tokens += r.json()["usage"]["total_tokens"]
        return replicas, tokens

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(conversation, sessions))
    # each session's turns ran where it was created, whichever ingress each request reached
    assert all(len(replicas) == 1 for replicas, _ in results)
    assert len(set().union(*(r for r, _ in results))) == 2  # and both replicas served
    listed = {s["id"]: s for s in cluster.http.get("/v1/sessions").json()["data"]}
    for (session, _), (_, tokens) in zip(sessions, results):
        assert tokens > 0 and listed[session]["tokens"] == tokens and len(cluster.stored(session).tokens) == tokens
    # the affinity counters over both ingresses: 64 more hits, no move
    deadline = time.monotonic() + 15
    while True:
        hits, moves = _affinity_counts(cluster)
        if hits - hits_before >= 64 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert (hits - hits_before, moves - moves_before) == (64, 0)
