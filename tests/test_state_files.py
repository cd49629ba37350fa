"""State files (rwkvstate.state.files): round trips, and every way a file can be bad is refused
with a one-line message naming the problem, before the pool is touched."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from rwkvstate import Engine, Model, SamplingParams
from rwkvstate.cli import BUNDLED_MODEL, main
from rwkvstate.errors import StateError
from rwkvstate.model.synthetic import random_checkpoint, save_checkpoint, tiny_config
from rwkvstate.state import files
from rwkvstate.runtime.persist import load_session, save_session
from rwkvstate.state.files import inspect_state_file, read_state_file, save_state_file
from rwkvstate.state.layout import StateLayout

CFG = tiny_config(n_layer=2, n_embd=64, head_size=16, ffn_dim=128)
# another architecture: every state size differs
OTHER_CFG = tiny_config(
    n_layer=3, n_embd=96, head_size=32, ffn_dim=160, decay_rank=8, aaa_rank=8, mv_rank=4, gate_rank=8
)
# the same state shapes as CFG, but another vocabulary: only the fingerprint can tell
VOCAB_CFG = tiny_config(n_layer=2, n_embd=64, head_size=16, ffn_dim=128, vocab_size=300)
PROMPT = list(b"the state is a first-class resource")
MORE = list(b" and it moves.")


@pytest.fixture(scope="module")
def model():
    return Model.from_tensors(random_checkpoint(CFG, seed=7), CFG)


@pytest.fixture(scope="module")
def other_models():
    return {name: Model.from_tensors(random_checkpoint(cfg, seed=8), cfg)
            for name, cfg in (("architecture", OTHER_CFG), ("vocab", VOCAB_CFG))}  # fmt: skip


@pytest.fixture
def engine(model):
    return Engine(model, slots=3)


@pytest.fixture
def saved(engine, tmp_path) -> Path:
    """A good state file of a session that fed PROMPT (fp32 storage)."""
    s = engine.session()
    s.feed(PROMPT)
    path = save_session(s, tmp_path / "good.state")
    s.close()
    return path


# ---- helpers ---------------------------------------------------------------------------------


class PoolGuard:
    """Every slot of an engine's pool plus a session's token log and logits, to assert a failed
    load changed nothing."""

    def __init__(self, engine, session):
        self.engine, self.session = engine, session
        self.before = self._take()

    def _take(self):
        pool = self.engine.pool
        exports = [pool.export(slot) for slot in range(pool.num_slots)]
        return exports, list(self.session.tokens), self.session.logits

    def assert_unchanged(self):
        exports, tokens, logits = self._take()
        for old, new in zip(self.before[0], exports):
            assert all(torch.equal(old[k], new[k]) for k in old)
        assert tokens == self.before[1] and torch.equal(logits, self.before[2])


def busy_session(engine):
    """A session with some state, so that 'unchanged' means something."""
    s = engine.session()
    s.feed(list(b"existing context"))
    return s


def assert_refused(engine, path, *fragments) -> str:
    """load_session fails with a one-line StateError naming the path and every fragment,
    and the pool, token log and logits are unchanged."""
    s = busy_session(engine)
    guard = PoolGuard(engine, s)
    with pytest.raises(StateError) as info:
        load_session(s, path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    guard.assert_unchanged()
    s.close()
    return message


def header(data: bytes) -> tuple[dict, int]:
    """(safetensors JSON header, offset of the data section)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), 8 + n


def rewrite(path: Path, meta=None, tensors=None, *, fix_checksum=True) -> Path:
    """Rewrites a state file with changed metadata and/or tensors, optionally re-signing it,
    i.e. a file that is well-formed but says something else."""
    data = path.read_bytes()
    t = st_load(data)
    m = header(data)[0]["__metadata__"]
    m.update(meta or {})
    m = {k: v for k, v in m.items() if v is not None}
    t.update(tensors or {})
    if fix_checksum:
        m["checksum"] = files._checksum(m, t)
    path.write_bytes(st_save(t, metadata=m))
    return path


# ---- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_continues_exactly(model, tmp_path, state_dtype):
    engine = Engine(model, slots=3, state_dtype=state_dtype)
    original = engine.session()
    original.feed(PROMPT)
    path = save_session(original, tmp_path / "s.state", extra={"note": "hi"})
    loaded = Engine(model, slots=2, state_dtype=state_dtype).session()
    sf = load_session(loaded, path)
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    assert sf.meta["storage_dtype"] == names[state_dtype]
    assert sf.extra["note"] == "hi" and sf.extra["from_zero"] is True and sf.meta["token_count"] == str(len(PROMPT))
    assert loaded.tokens == original.tokens == PROMPT
    assert torch.equal(loaded.logits, original.logits)
    exp_a, exp_b = original.snapshot().state, loaded.snapshot().state
    assert all(torch.equal(exp_a[k], exp_b[k]) for k in exp_a)  # storage dtype values are exact
    original.feed(MORE)
    loaded.feed(MORE)
    assert torch.equal(loaded.logits, original.logits)
    greedy = SamplingParams(temperature=0)
    assert list(loaded.generate(8, greedy)) == list(original.generate(8, greedy))


def test_file_size_follows_storage_dtype(model, tmp_path):
    sizes = {}
    for dtype in (torch.float32, torch.float16):
        s = Engine(model, slots=1, state_dtype=dtype).session()
        s.feed(PROMPT)
        sizes[dtype] = save_session(s, tmp_path / f"{dtype}.state").stat().st_size
    state_bytes = StateLayout(CFG.n_layer, CFG.n_embd, CFG.head_size).slot_nbytes(torch.float16)
    assert sizes[torch.float32] - sizes[torch.float16] == state_bytes


def test_session_without_tokens_round_trips_without_logits(engine, tmp_path):
    path = save_session(engine.session(), tmp_path / "empty.state")
    sf = read_state_file(path)
    assert sf.tokens == [] and sf.logits is None
    s = busy_session(engine)
    load_session(s, path)
    assert s.tokens == [] and all(not t.any() for t in s.snapshot().state.values())
    with pytest.raises(Exception, match="no logits"):
        s.logits


def test_fingerprint_is_dtype_independent_and_architecture_specific(model, other_models):
    half = Model.from_tensors(random_checkpoint(CFG, seed=7), CFG, dtype=torch.float16)
    assert half.fingerprint == model.fingerprint
    reseeded = Model.from_tensors(random_checkpoint(CFG, seed=99), CFG)
    assert reseeded.fingerprint == model.fingerprint  # metadata only, by design
    prints = {m.fingerprint for m in (model, *other_models.values())}
    assert len(prints) == 3 and all(len(p) == 32 for p in prints)
    assert model.description == "2 layers, n_embd 64, head_size 16, vocab 256"


# ---- refused files: the model ----------------------------------------------------------------


@pytest.mark.parametrize("which", ["architecture", "vocab"])
def test_file_of_another_model_is_refused(saved, other_models, which):
    other = Engine(other_models[which], slots=2)
    other_info = "vocab 300" if which == "vocab" else "3 layers"
    assert_refused(other, saved, "different model", "fingerprint", "2 layers, n_embd 64", "vocab 256", other_info)


def test_layout_check_without_fingerprint(saved):
    with pytest.raises(StateError, match=r"att_shift.*shape \(2, 64\), expected \(3, 96\).*n_layer=3"):
        read_state_file(saved, layout=StateLayout(3, 96, 32))


def test_tokens_outside_vocab_refused(model, engine, tmp_path):
    state = engine.pool.export(0)
    path = save_state_file(tmp_path / "t.state", state, fingerprint=model.fingerprint,
                           model_info="x", tokens=[1, 2, 256])  # fmt: skip
    assert_refused(engine, path, "token id 256 is outside the vocabulary [0, 256)")


def test_logits_of_wrong_length_refused(model, engine, tmp_path):
    path = save_state_file(tmp_path / "l.state", engine.pool.export(0), fingerprint=model.fingerprint,
                           model_info="x", tokens=[1], logits=torch.zeros(255))  # fmt: skip
    assert_refused(engine, path, "logits have 255 entries, the model's vocab is 256")


# ---- refused files: format, version, damage --------------------------------------------------


def test_wrong_version_refused(engine, saved):
    rewrite(saved, {"format_version": "2"})
    assert_refused(engine, saved, "format version '2' is not supported", "reads version 1", "newer rwkvstate")


def test_wrong_format_name_refused(engine, saved, tmp_path):
    rewrite(saved, {"format": "someone-else"})
    assert_refused(engine, saved, "not an rwkvstate state file", "'someone-else'")
    # a model checkpoint is a safetensors file without our metadata at all
    ckpt = save_checkpoint(random_checkpoint(CFG, seed=1), tmp_path / "model.safetensors")
    assert_refused(engine, ckpt, "not an rwkvstate state file (no format name")


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.02, 0.5, 0.999])
def test_truncated_file_refused(engine, saved, fraction):
    data = saved.read_bytes()
    saved.write_bytes(data[: int(len(data) * fraction)])
    assert_refused(engine, saved, "is truncated or not a safetensors state file")


def test_cut_inside_header_and_trailing_bytes_refused(engine, saved):
    data = saved.read_bytes()
    _, start = header(data)
    for bad in (data[:5], data[:8], data[: start - 1], data[:start], data[:-1], data + b"\0"):
        saved.write_bytes(bad)
        assert_refused(engine, saved, "is truncated or not a safetensors state file")


@pytest.mark.parametrize("size", [1, 64, 5000])
def test_random_bytes_refused(engine, tmp_path, size):
    path = tmp_path / "noise.state"
    noise = torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(size), dtype=torch.uint8)
    path.write_bytes(noise.numpy().tobytes())
    assert_refused(engine, path, "is truncated or not a safetensors state file")


@pytest.mark.parametrize("tensor", ["att_shift", "wkv", "ffn_shift", "tokens", "logits"])
def test_flipped_tensor_byte_is_a_checksum_mismatch(engine, saved, tensor):
    data = bytearray(saved.read_bytes())
    head, start = header(bytes(data))
    lo, hi = head[tensor]["data_offsets"]
    data[start + (lo + hi) // 2] ^= 0x01  # low bit: the value stays finite and plausible
    saved.write_bytes(bytes(data))
    assert_refused(engine, saved, "checksum mismatch: the file was modified or corrupted")


def test_edited_metadata_is_a_checksum_mismatch(engine, saved):
    data = saved.read_bytes()
    assert data.count(b"n_embd 64") == 1
    saved.write_bytes(data.replace(b"n_embd 64", b"n_embd 65"))  # same length: still parses
    assert_refused(engine, saved, "checksum mismatch")
    rewrite(saved, {"token_count": "3"}, fix_checksum=False)
    assert_refused(engine, saved, "checksum mismatch")
    rewrite(saved, {"extra": '{"added": 1}'}, fix_checksum=False)
    assert_refused(engine, saved, "checksum mismatch")


def test_missing_checksum_or_metadata_refused(engine, saved):
    rewrite(saved, {"checksum": None}, fix_checksum=False)
    assert_refused(engine, saved, "metadata is missing ['checksum']")


def test_consistently_resigned_lies_are_still_caught(engine, saved):
    """A re-signed file (valid checksum) whose contents disagree with themselves."""
    rewrite(saved, {"token_count": "3"})
    assert_refused(engine, saved, f"metadata says 3 tokens, but the file holds {len(PROMPT)}")
    rewrite(saved, {"token_count": str(len(PROMPT)), "storage_dtype": "fp16"})
    assert_refused(engine, saved, "att_shift is torch.float32, but the file says fp16")
    rewrite(saved, {"storage_dtype": "fp32"}, {"tokens": torch.tensor(PROMPT, dtype=torch.int64)})
    assert_refused(engine, saved, "tokens must be int32")
    rewrite(saved, None, {"tokens": torch.tensor(PROMPT, dtype=torch.int32), "bonus": torch.zeros(1)})
    assert_refused(engine, saved, "unexpected ['bonus']")


def test_missing_file_and_directory_refused(engine, tmp_path):
    assert_refused(engine, tmp_path / "nope.state", "state file not found")
    assert_refused(engine, tmp_path, "is a directory")


# ---- non-finite and out-of-range values ------------------------------------------------------


def test_nan_state_refused_on_save_and_on_load(model, engine, saved, tmp_path):
    state = engine.pool.export(0)
    state["wkv"][1, 2, 3, 4] = float("nan")
    with pytest.raises(StateError, match=r"wkv'\] has 1 non-finite values"):
        save_state_file(tmp_path / "nan.state", state, fingerprint=model.fingerprint, model_info="x")
    assert not (tmp_path / "nan.state").exists()
    rewrite(saved, None, {"wkv": state["wkv"]})  # a well-formed, correctly signed file with a NaN
    assert_refused(engine, saved, "non-finite values (first at index (1, 2, 3, 4))")
    rewrite(saved, None, {"logits": torch.full((CFG.vocab_size,), float("inf"))})
    assert_refused(engine, saved, "non-finite")


def test_values_beyond_storage_range_refused(model, tmp_path):
    state = Engine(model, slots=1).pool.export(0)
    state["att_shift"][0, 0] = 1e6
    fp = model.fingerprint
    with pytest.raises(StateError, match="beyond the range of torch.float16 storage"):
        save_state_file(tmp_path / "big.state", state, fingerprint=fp, model_info="x", storage_dtype="fp16")
    path = save_state_file(tmp_path / "big.state", state, fingerprint=fp, model_info="x", tokens=[1])
    half = Engine(model, slots=2, state_dtype=torch.float16)
    assert_refused(half, path, "beyond the range of the pool's torch.float16")
    assert read_state_file(path).state["att_shift"][0, 0] == 1e6  # fine for an fp32 pool


# ---- atomic writes -------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["replace", "fsync", "interrupt"])
def test_failed_write_keeps_the_old_file_and_leaves_no_temp(engine, saved, monkeypatch, failing):
    good = saved.read_bytes()
    s = busy_session(engine)

    def fail(*args, **kwargs):
        raise KeyboardInterrupt if failing == "interrupt" else OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync" if failing == "fsync" else "replace", fail)
    expected = KeyboardInterrupt if failing == "interrupt" else StateError
    with pytest.raises(expected, match=None if failing == "interrupt" else "cannot write state file .*No space left"):
        save_session(s, saved)
    monkeypatch.undo()
    assert saved.read_bytes() == good
    assert sorted(os.listdir(saved.parent)) == [saved.name]
    read_state_file(saved)


def test_write_into_missing_directory_fails_cleanly(engine, tmp_path):
    with pytest.raises(StateError, match="cannot write state file"):
        save_session(engine.session(), tmp_path / "no" / "such" / "dir.state")


def test_overwrite_replaces_atomically(engine, saved):
    s = busy_session(engine)
    save_session(s, saved)
    assert read_state_file(saved).tokens == list(b"existing context")
    assert sorted(os.listdir(saved.parent)) == [saved.name]


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_new_file_gets_the_umask_mode_and_overwrite_keeps_the_mode(engine, tmp_path):
    old = os.umask(0o022)
    try:
        path = save_session(engine.session(), tmp_path / "mode.state")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o600)
    save_session(engine.session(), path)
    assert path.stat().st_mode & 0o777 == 0o600


# ---- inspect -------------------------------------------------------------------------------------


def test_inspect_reports_metadata_stats_and_verdict(model, saved):
    info = inspect_state_file(saved)
    assert info["problem"] is None and info["checksum_ok"]
    assert info["file_size"] == saved.stat().st_size
    assert info["metadata"]["model_fingerprint"] == model.fingerprint
    assert list(info["metadata"])[:2] == ["format", "format_version"]
    assert info["tensors"]["wkv"]["shape"] == [2, 4, 16, 16] and info["tensors"]["wkv"]["max_abs"] > 0
    assert info["tensors"]["tokens"] == {"dtype": "I32", "shape": [len(PROMPT)], "max_abs": None}
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0x01
    saved.write_bytes(bytes(data))
    info = inspect_state_file(saved)
    assert not info["checksum_ok"] and "checksum mismatch" in info["problem"]


# ---- CLI (bundled model) -----------------------------------------------------------------------


@pytest.fixture
def no_debug(monkeypatch):
    monkeypatch.delenv("RWKVSTATE_DEBUG", raising=False)


@pytest.mark.skipif(not BUNDLED_MODEL.exists(), reason="bundled model not present")
def test_cli_save_inspect_load(tmp_path, capsys, no_debug):
    path = tmp_path / "cli.state"
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("def add(a, b):\n")
    assert main(["state", "save", "--prompt-file", str(prompt_file), "--state-dtype", "fp16", "-o", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and f"saved 15 tokens (fp16 state" in err
    assert main(["state", "inspect", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "stdlib-byte-l8-c256.safetensors" in out and "(verified)" in out and out.rstrip().endswith("OK")
    argv = ["state", "load", str(path), "--prompt", "    return", "--max-tokens", "6", "--temperature", "0"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "loaded" in err and "15 tokens" in err and out.startswith("    return") and len(out) > len("    return")
    # the same continuation as a fresh session fed the whole text at once
    assert main(["generate", "--prompt", "def add(a, b):\n    return", "--max-tokens", "6", "--temperature", "0"]) == 0
    whole = capsys.readouterr()[0]
    assert whole.endswith(out)


@pytest.mark.skipif(not BUNDLED_MODEL.exists(), reason="bundled model not present")
def test_cli_bad_files_are_one_line_errors(tmp_path, capsys, no_debug):
    path = tmp_path / "cli.state"
    assert main(["state", "save", "--prompt", "x = 1", "-o", str(path)]) == 0
    capsys.readouterr()
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    assert main(["state", "inspect", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "MISMATCH" in out and "BAD" in out
    assert err.count("\n") == 1 and err.startswith("rwkvstate: error: ") and "checksum mismatch" in err
    path.write_bytes(b"junk")
    for argv in (["state", "inspect", str(path)], ["state", "load", str(path)]):
        assert main(argv) == 1
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and "truncated or not a safetensors state file" in err and "Traceback" not in err


@pytest.mark.skipif(not BUNDLED_MODEL.exists(), reason="bundled model not present")
def test_cli_load_into_another_model_is_refused(tmp_path, capsys, no_debug):
    path = tmp_path / "cli.state"
    assert main(["state", "save", "--prompt", "x = 1", "-o", str(path)]) == 0
    other = save_checkpoint(random_checkpoint(CFG, seed=2), tmp_path / "tiny.pth")
    capsys.readouterr()
    assert main(["state", "load", str(path), "--model", str(other)]) == 1
    err = capsys.readouterr()[1]
    assert err.count("\n") == 1 and "different model" in err and "8 layers" in err and "2 layers" in err


@pytest.mark.skipif(not BUNDLED_MODEL.exists(), reason="bundled model not present")
def test_cli_state_flag_takes_an_rwkvstate_state_file(tmp_path, capsys, no_debug):
    """--state accepts a file from `state save`: the session continues from its state, token
    log and logits, exactly like `state load`."""
    path = tmp_path / "saved.state"  # any suffix: the file is recognised by its header
    assert main(["state", "save", "--prompt", "def add(a, b):\n", "-o", str(path)]) == 0
    capsys.readouterr()
    argv = ["--prompt", "    return", "--max-tokens", "6", "--temperature", "0"]
    assert main(["generate", "--state", str(path), *argv]) == 0
    with_state, err = capsys.readouterr()
    assert main(["state", "load", str(path), *argv]) == 0
    loaded = capsys.readouterr()[0]
    assert with_state == loaded and "weights_only" not in err


@pytest.mark.skipif(not BUNDLED_MODEL.exists(), reason="bundled model not present")
def test_cli_state_save_refuses_to_overwrite_without_force(tmp_path, capsys, no_debug):
    path = tmp_path / "keep.state"
    path.write_bytes(b"precious")
    assert main(["state", "save", "--prompt", "x = 1", "-o", str(path)]) == 1
    err = capsys.readouterr()[1]
    assert err == f"rwkvstate: error: {path} exists; pass --force to overwrite it (-o/--output)\n"
    assert path.read_bytes() == b"precious"
    assert main(["state", "save", "--prompt", "x = 1", "-o", str(path), "--force"]) == 0
    assert files.is_state_file(path)


@pytest.mark.skipif(not BUNDLED_MODEL.exists(), reason="bundled model not present")
def test_cli_state_flag_never_suggests_unsafe_loading(tmp_path, capsys, no_debug):
    for name, data in (("junk.state", b"\x00" * 64), ("pickle.pth", None)):
        path = tmp_path / name
        if data is None:
            torch.save({"blocks.0.att.time_state": object()}, path)  # refused by the safe loader
        else:
            path.write_bytes(data)
        assert main(["generate", "--prompt", "x", "--state", str(path)]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith("rwkvstate: error: ")
        assert "weights_only" not in err and "unsafe" not in err.lower()
