"""The Redis session store against a real redis-server, and state files as bytes (int8 too)."""

from __future__ import annotations

import time

import pytest
import torch

from redis_server import RedisServer, free_port, require

require("redis")

from rwkvstate.cluster.store import RedisStore, StoreConfig, StoreConflict, StoreFull, StoreUnavailable  # noqa: E402
from rwkvstate.errors import StateError  # noqa: E402
from rwkvstate.state.files import decode_state_file, encode_state_file  # noqa: E402

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture
def store(redis_url, request):
    made = []

    def make(**options):
        prefix = f"t{len(made)}-{request.node.name}:"
        s = RedisStore(StoreConfig(url=redis_url, prefix=prefix, **options))
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_put_get_versions_and_conflicts(store):
    s = store()
    assert s.get("a") is None and s.version("a") == 0
    assert s.put("a", b"one", expected=0, tokens=3, created=11) == 1
    assert s.put("a", b"two!", expected=1, tokens=5, created=11) == 2
    entry = s.get("a")
    assert (entry.version, entry.blob, entry.tokens, entry.created) == (2, b"two!", 5, 11)
    with pytest.raises(StoreConflict, match="changed by another replica"):
        s.put("a", b"stale", expected=1, tokens=4, created=11)
    with pytest.raises(StoreConflict):
        s.put("a", b"again", expected=0, tokens=1, created=11)  # "must not exist yet"
    assert s.get("a").blob == b"two!"
    assert s.stats()["bytes"] == 4 and s.stats()["sessions"] == 1
    assert s.delete("a") and not s.delete("a")
    assert s.stats()["bytes"] == 0 and s.get("a") is None


def test_every_write_names_its_holder_and_counts_add_up(store):
    first, second, anonymous = store(holder="replica-1"), None, None
    prefix = first.config.prefix
    second = RedisStore(StoreConfig(url=first.config.url, prefix=prefix, holder="replica-2"))
    anonymous = RedisStore(StoreConfig(url=first.config.url, prefix=prefix))
    try:
        assert first.holder("a") is None  # no such session
        first.put("a", b"one", expected=0, tokens=1, created=1)
        assert second.holder("a") == "replica-1"  # any process reads who wrote it
        second.put("a", b"two", expected=1, tokens=2, created=1)
        assert first.holder("a") == "replica-2"
        anonymous.put("a", b"three", expected=2, tokens=3, created=1)
        assert first.holder("a") is None  # a writer that names none leaves no stale name
        assert first.summed_counts() == {}
        first.set_counts("ingress-a", {"hits": 3, "moves": 0})
        second.set_counts("ingress-b", {"hits": 2, "moves": 1})
        first.set_counts("ingress-a", {"hits": 3, "moves": 0})  # totals: writing again counts nothing twice
        assert anonymous.summed_counts() == {"hits": 5, "moves": 1}
        assert anonymous.summed_counts(skip="ingress-a") == {"hits": 2, "moves": 1}
        first.set_counts("ingress-a", {"hits": 7, "moves": 0})
        assert anonymous.summed_counts() == {"hits": 9, "moves": 1}
    finally:
        second.close()
        anonymous.close()


def test_byte_cap_evicts_least_recently_used(store):
    s = store(max_bytes=250)
    for i in range(3):
        s.put(f"s{i}", bytes(100), expected=0, tokens=1, created=0)
        time.sleep(0.002)
    # s0 went when s2 came (300 > 250); a use of s1 makes s2 the oldest
    assert s.get("s0") is None and s.version("s1") == 1
    time.sleep(0.002)
    s.put("s3", bytes(100), expected=0, tokens=1, created=0)
    assert s.get("s2") is None and s.get("s1") is not None and s.get("s3") is not None
    stats = s.stats()
    assert stats["evicted"] == 2 and stats["bytes"] == 200 and stats["sessions"] == 2
    with pytest.raises(StoreFull):
        s.put("big", bytes(300), expected=0, tokens=1, created=0)


def test_ttl_expires_and_is_counted(store):
    s = store(ttl_s=1)
    s.put("old", b"x" * 10, expected=0, tokens=1, created=0)
    time.sleep(2.1)
    assert s.get("old") is None
    s.put("new", b"y", expected=0, tokens=1, created=0)  # a write sweeps what expired
    stats = s.stats()
    assert stats["expired"] == 1 and stats["bytes"] == 1 and s.ids() == ["new"]


def test_unreachable_store_is_a_clear_error():
    s = RedisStore(StoreConfig(url=f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5))
    with pytest.raises(StoreUnavailable, match="unreachable.*retry"):
        s.version("a")
    with pytest.raises(StoreUnavailable):
        s.put("a", b"x", expected=0, tokens=0, created=0)


def _state(seed=0, L=2, C=128, N=64):
    g = torch.Generator().manual_seed(seed)
    return {"att_shift": torch.randn(L, C, generator=g), "wkv": torch.randn(L, C // N, N, N, generator=g) * 3,
            "ffn_shift": torch.randn(L, C, generator=g)}  # fmt: skip


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8"])
def test_state_file_bytes_round_trip(fmt):
    state = _state()
    data = encode_state_file(state, fingerprint="f" * 32, model_info="m", storage_dtype=fmt, tokens=[1, 2, 3],
                             logits=torch.zeros(5))  # fmt: skip
    sf = decode_state_file(data, name="blob", fingerprint="f" * 32, vocab_size=5)
    assert sf.tokens == [1, 2, 3] and sf.meta["storage_dtype"] == fmt
    for key, t in state.items():
        err = ((sf.state[key] - t).norm() / t.norm()).item()
        assert err == 0 if fmt == "fp32" else err < (1e-3 if fmt == "fp16" else 1e-2), (key, err)
    if fmt == "int8":  # one byte per value plus a float32 scale per 64
        assert len(data) < 0.3 * len(encode_state_file(state, fingerprint="f" * 32, model_info="m"))


def test_state_file_bytes_refused_when_corrupt_or_foreign():
    data = bytearray(encode_state_file(_state(), fingerprint="f" * 32, model_info="m", storage_dtype="int8"))
    with pytest.raises(StateError, match="blob x was saved from a different model"):
        decode_state_file(bytes(data), name="blob x", fingerprint="e" * 32)
    data[-3] ^= 1
    with pytest.raises(StateError, match="blob x: checksum mismatch"):
        decode_state_file(bytes(data), name="blob x", fingerprint="f" * 32)
    with pytest.raises(StateError, match="truncated"):
        decode_state_file(bytes(data[:100]), name="blob x")
