"""Models by name: `rwkvstate pull`, `rwkvstate models` and `--model NAME`, against a local
stand-in for the Hugging Face hub (tests/fakehub.py); no network."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fakehub import FakeHub

from rwkvstate.cli import main
from rwkvstate.model import hub
from rwkvstate.model.synthetic import random_checkpoint, save_checkpoint, tiny_config

BYTE_CFG = tiny_config(n_layer=2, n_embd=64, head_size=32, vocab_size=256, ffn_dim=128,
                       decay_rank=8, aaa_rank=8, mv_rank=4, gate_rank=8, tokenizer="bytes")  # fmt: skip
WORLD_CFG = tiny_config(n_layer=1, n_embd=32, head_size=32, vocab_size=65536, ffn_dim=64,
                        decay_rank=4, aaa_rank=4, mv_rank=1, gate_rank=4, tokenizer="world")  # fmt: skip
TINY = hub.HubModel("tiny-bytes", "BlinkDL/tiny", "tiny-bytes-20260101.pth", tokenizer="bytes", about="test model")
REAL = hub.KNOWN_MODELS["rwkv7-g1d-0.1b"]  # a real entry, no published sha256: the hub's etag is checked
PINNED = hub.KNOWN_MODELS["rwkv7-g1-0.1b"]  # a real entry with a published sha256 and a pinned revision
ERROR = "rwkvstate: error: "


@pytest.fixture(scope="module")
def byte_bytes(tmp_path_factory) -> bytes:
    path = save_checkpoint(random_checkpoint(BYTE_CFG, seed=5), tmp_path_factory.mktemp("hub") / "b.pth")
    return path.read_bytes()


@pytest.fixture(scope="module")
def world_bytes(tmp_path_factory) -> bytes:
    tensors = random_checkpoint(WORLD_CFG, seed=6, dtype=torch.float16)
    return save_checkpoint(tensors, tmp_path_factory.mktemp("hub") / "w.pth").read_bytes()


@pytest.fixture
def fake(monkeypatch, tmp_path, byte_bytes, world_bytes):
    """A fake hub serving TINY (a byte model) and the real entry REAL (a tiny world model),
    with HF_ENDPOINT pointed at it and HF_HOME in a temp dir."""
    monkeypatch.setitem(hub.KNOWN_MODELS, TINY.name, TINY)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "RWKVSTATE_DEBUG", "RWKVSTATE_MODEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with FakeHub() as server:
        server.add(TINY.repo, TINY.filename, byte_bytes)
        server.add(REAL.repo, REAL.filename, world_bytes)
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str) -> str:
    assert rc == 1, err
    lines = [line for line in err.splitlines() if line.startswith(ERROR)]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0][len(ERROR):]


def cdn_gets(server: FakeHub) -> list:
    return [r for r in server.requests if r[0] == "GET" and r[1].startswith("/cdn/")]


# ---- the table ---------------------------------------------------------------------------------


def test_the_table_is_well_formed():
    names = list(hub.KNOWN_MODELS)
    assert len(names) == len(set(n.lower() for n in names)) >= 15
    for m in hub.KNOWN_MODELS.values():
        assert m.repo in ("BlinkDL/rwkv7-g1", "BlinkDL/rwkv-7-world") and m.tokenizer == "world"
        assert m.filename.endswith(".pth") and m.name.startswith("rwkv7-")
        assert m.revision == "main" or re.fullmatch(r"[0-9a-f]{40}", m.revision)
        assert m.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", m.sha256)
        assert (m.sha256 is None) == (m.revision == "main"), "a published sha256 goes with a pinned revision"
        assert hub.lookup(m.filename) is m and hub.lookup(m.stem.upper()) is m


def test_unknown_name_suggests_close_matches(capsys, fake):
    rc, out, err = run(capsys, "pull", "rwkv7-g1d-01b")
    message = one_line_error(rc, err)
    assert message.startswith("unknown model name 'rwkv7-g1d-01b'; did you mean rwkv7-g1d-0.1b, ")
    assert message.endswith("? (`rwkvstate models` lists the known names)")
    rc, _, err = run(capsys, "generate", "--model", "no-such-thing", "--prompt", "x")
    assert "unknown model name 'no-such-thing' (`rwkvstate models`" in one_line_error(rc, err)
    assert fake.requests == []


def test_a_path_like_value_is_a_file_not_a_name(capsys, fake, tmp_path):
    rc, _, err = run(capsys, "inspect", "--model", tmp_path / "missing.pth")
    assert one_line_error(rc, err).startswith("model file not found")
    assert fake.requests == []


# ---- pull, models, --model NAME ---------------------------------------------------------------------


def test_pull_downloads_verifies_and_caches(capsys, fake, byte_bytes, tmp_path):
    rc, out, err = run(capsys, "models")
    assert rc == 0 and re.search(r"^tiny-bytes\s+-\s+test model\s+BlinkDL/tiny/", out, re.M)
    rc, out, err = run(capsys, "pull", TINY.name)
    assert rc == 0, err
    path = Path(out.strip())
    assert path.read_bytes() == byte_bytes and str(path).startswith(str(tmp_path / "hf" / "hub"))
    sha = hashlib.sha256(byte_bytes).hexdigest()
    assert f"tiny-bytes: downloaded, sha256 {sha} verified; RWKV-7, 2 layers, n_embd 64, vocab 256" in err
    assert len(cdn_gets(fake)) == 1
    rc, listing, err = run(capsys, "models")
    assert re.search(rf"^tiny-bytes\s+cached\s+test model\s+{re.escape(str(path))}$", listing, re.M)
    # pulling again re-verifies the cached file without downloading it
    rc, out2, err = run(capsys, "pull", TINY.name)
    assert rc == 0 and out2 == out and "already cached, sha256" in err and len(cdn_gets(fake)) == 1


def test_model_by_name_generates_like_the_file(capsys, fake, byte_bytes, tmp_path):
    file = tmp_path / "same.pth"
    file.write_bytes(byte_bytes)
    argv = ["--prompt", "abc", "--max-tokens", 10, "--temperature", 0, "--quiet"]
    rc, by_name, err = run(capsys, "generate", "--model", TINY.name, *argv)
    assert rc == 0 and "downloaded tiny-bytes to" in err
    rc, by_path, _ = run(capsys, "generate", "--model", file, *argv)
    assert by_name == by_path and by_name.startswith("abc")
    rc, again, err = run(capsys, "generate", "--model", TINY.name, *argv)  # from the cache, silently
    assert again == by_name and err == "" and len(cdn_gets(fake)) == 1  # nothing on stderr: no download


def test_a_dropped_transfer_resumes_with_a_range_request(capsys, fake, byte_bytes, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # so the cut lands after whole chunks
    fake.drop_after = len(byte_bytes) // 2
    rc, out, err = run(capsys, "pull", TINY.name)
    assert rc == 0, err
    gets = cdn_gets(fake)
    assert len(gets) == 2 and gets[0][2] is None and gets[1][2].startswith("bytes=")
    assert int(gets[1][2][len("bytes="):-1]) > 0
    assert Path(out.strip()).read_bytes() == byte_bytes


def test_a_corrupt_download_is_refused_and_removed(capsys, fake, tmp_path):
    fake.corrupt = True
    rc, out, err = run(capsys, "pull", TINY.name)
    message = one_line_error(rc, err)
    assert message.startswith(f"{TINY.filename}: sha256 mismatch (got ") and "removed from the cache" in message
    assert out == "" and hub.cached_file(TINY) is None
    assert not [p for p in (tmp_path / "hf" / "hub").rglob("*") if p.is_file() and p.stat().st_size > 1000]
    fake.corrupt = False
    rc, out, err = run(capsys, "pull", TINY.name)  # the next attempt downloads afresh
    assert rc == 0, err


def test_a_wrong_size_is_refused(capsys, fake, byte_bytes):
    fake.lie_size = len(byte_bytes) + 10
    rc, out, err = run(capsys, "pull", TINY.name)
    message = one_line_error(rc, err)
    assert "tiny-bytes-20260101.pth" in message and str(len(byte_bytes) + 10) in message
    assert hub.cached_file(TINY) is None


def test_a_file_other_than_the_published_one_is_refused_before_download(capsys, fake, world_bytes):
    fake.add(PINNED.repo, PINNED.filename, world_bytes, commit=PINNED.revision, branch=None)
    rc, out, err = run(capsys, "pull", PINNED.name)
    message = one_line_error(rc, err)
    assert message.startswith(f"the hub now serves a different {PINNED.filename} (sha256 ")
    assert f"published {PINNED.sha256[:12]}" in message and cdn_gets(fake) == []


def test_a_real_name_resolves_to_its_repository_and_file(capsys, fake, world_bytes):
    rc, out, err = run(capsys, "pull", "RWKV7-G1D-0.1B")  # any case
    assert rc == 0, err
    assert out.strip().endswith(f"models--BlinkDL--rwkv7-g1/snapshots/{'0123456789abcdef' * 2}01234567/{REAL.filename}")
    assert ("HEAD", f"/{REAL.repo}/resolve/main/{REAL.filename}", None) in fake.requests
    rc, out, err = run(capsys, "inspect", "--model", REAL.stem)
    assert rc == 0 and re.search(r"^tokenizer\s+world$", out, re.M)


def test_a_file_that_is_not_rwkv7_is_refused_by_pull(capsys, fake, tmp_path):
    junk = tmp_path / "junk.pth"
    torch.save({"emb.weight": torch.zeros(4, 4), "blocks.0.att.time_first": torch.zeros(4)}, junk)
    fake.add(TINY.repo, TINY.filename, junk.read_bytes())
    rc, out, err = run(capsys, "pull", TINY.name)
    assert "looks like an RWKV-4 checkpoint; only RWKV-7 is supported" in one_line_error(rc, err)


def test_offline(capsys, fake, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, out, err = run(capsys, "generate", "--model", TINY.name, "--prompt", "x")
    message = one_line_error(rc, err)
    assert message.startswith("tiny-bytes is not in the cache (") and "HF_HUB_OFFLINE is set" in message
    assert fake.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert run(capsys, "pull", TINY.name)[0] == 0
    fake.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, out, err = run(capsys, "generate", "--model", TINY.name, "--prompt", "x", "--max-tokens", 3)
    assert rc == 0 and out.startswith("x") and fake.requests == []


def test_hub_errors_are_one_line(capsys, fake, monkeypatch):
    gone = hub.HubModel("gone", TINY.repo, "removed.pth", tokenizer="bytes")
    monkeypatch.setitem(hub.KNOWN_MODELS, gone.name, gone)
    rc, _, err = run(capsys, "pull", "gone")
    assert one_line_error(rc, err) == ("the hub has no BlinkDL/tiny/removed.pth@main (removed or renamed?); "
                                       "pass --model with a file path instead")  # fmt: skip
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    rc, _, err = run(capsys, "pull", TINY.name)
    assert one_line_error(rc, err).startswith("cannot reach the hub at http://127.0.0.1:9 (")


def test_the_cli_in_a_fresh_process_follows_the_environment(fake, world_bytes, tmp_path):
    """HF_ENDPOINT and HF_HOME as huggingface_hub itself reads them at import."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "rwkvstate.cli", "generate", "--model", REAL.name, "--prompt", "hi",
           "--max-tokens", "3", "--temperature", "0"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("hi") and f"downloaded {REAL.name} to {tmp_path / 'hf' / 'hub'}" in done.stderr
