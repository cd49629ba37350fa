"""State files that are well-formed and correctly signed but still must not load: values
beyond the magnitude bound, another model's weights, session metadata of the wrong kind,
files past the size cap; and the compact file of an empty session."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load as st_load

from rwkvstate import Engine, Model
from rwkvstate.cli import main
from rwkvstate.errors import StateError
from rwkvstate.model.synthetic import random_checkpoint, save_checkpoint, tiny_config
from rwkvstate.runtime.persist import load_session, save_session
from rwkvstate.state import files
from rwkvstate.state.files import inspect_state_file, read_state_file, remove_stale_temp_files
from rwkvstate.state.layout import MAX_STATE_ABS
from test_state_files import rewrite as resign

CFG = tiny_config(n_layer=2, n_embd=64, head_size=16, ffn_dim=128)
PROMPT = list(b"state files carry their model's name")


@pytest.fixture(scope="module")
def model():
    return Model.from_tensors(random_checkpoint(CFG, seed=7), CFG)


@pytest.fixture
def saved(model, tmp_path):
    s = Engine(model, slots=2).session()
    s.feed(PROMPT)
    return save_session(s, tmp_path / "good.state")


def refused(model, path, *fragments, **kwargs):
    s = Engine(model, slots=2).session()
    s.feed([1, 2, 3])
    before = s.snapshot()
    with pytest.raises(StateError) as info:
        load_session(s, path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert s.tokens == before.tokens and torch.equal(s.snapshot().state["wkv"], before.state["wkv"])
    return message


# ---- magnitude bound ----------------------------------------------------------------------------
def test_huge_but_finite_values_are_refused_everywhere(model, saved, tmp_path):
    wkv = st_load(saved.read_bytes())["wkv"] * 1e30  # finite in fp32, and poison to every later token
    resign(saved, tensors={"wkv": wkv})
    refused(model, saved, "state['wkv'] has values up to", "beyond the bound of 1048576")
    assert "beyond the bound" in inspect_state_file(saved)["problem"]
    state = Engine(model, slots=1).pool.export(0)
    state["att_shift"][1, 3] = 2 * MAX_STATE_ABS
    s = Engine(model, slots=1).session()
    with pytest.raises(StateError, match=r"att_shift'\] has values up to 2\.097e\+06 .*first at index \(1, 3\)"):
        s.load_state(state)  # e.g. a state-tuning file
    with pytest.raises(StateError, match="beyond the bound"):
        files.save_state_file(tmp_path / "x.state", state, fingerprint="f", model_info="m")
    state["att_shift"][1, 3] = MAX_STATE_ABS  # the bound itself is allowed
    s.load_state(state)


def test_cli_inspect_calls_a_huge_state_bad(saved, capsys):
    resign(saved, tensors={"wkv": st_load(saved.read_bytes())["wkv"] * 1e30})
    assert main(["state", "inspect", str(saved)]) == 1
    out, err = capsys.readouterr()
    assert "verdict" in out and "BAD" in out and err.count("\n") == 1 and "beyond the bound" in err


# ---- weights fingerprint ----------------------------------------------------------------------------
def test_a_file_of_other_weights_of_the_same_shape_is_refused_unless_allowed(model, saved):
    tuned = Model.from_tensors(random_checkpoint(CFG, seed=8), CFG)  # a "fine-tune": same shapes
    message = refused(tuned, saved, "same shape with other weights", model.fingerprint.split(":")[1],
                      tuned.fingerprint.split(":")[1], "--allow-other-weights")  # fmt: skip
    assert message.count("2 layers, n_embd 64") == 2  # both models named
    s = Engine(tuned, slots=1).session()
    s.load(saved, allow_other_weights=True)
    assert s.tokens == PROMPT
    old = resign(saved, {"model_fingerprint": model.fingerprint.split(":")[0]})  # written before weights counted
    Engine(tuned, slots=1).session().load(old)


def test_weights_digest_reads_samples_of_every_tensor(tmp_path):
    tensors = random_checkpoint(CFG, seed=7)
    base = Model.from_tensors(dict(tensors), CFG).weights_digest
    half = {k: v.to(torch.bfloat16).float() for k, v in tensors.items()}
    assert Model.from_tensors(half, CFG).weights_digest != base
    # exactly representable values: the same digest whatever the file's dtype
    assert Model.from_tensors({k: v.to(torch.bfloat16) for k, v in half.items()}, CFG).weights_digest == (
        Model.from_tensors(half, CFG).weights_digest
    )
    changed = dict(tensors)
    changed["head.weight"] = tensors["head.weight"].clone()
    changed["head.weight"].view(-1)[0] += 1.0  # index 0 is always sampled
    assert Model.from_tensors(changed, CFG).weights_digest != base
    path = save_checkpoint(tensors, tmp_path / "m.pth")
    assert Model.load(path).fingerprint == Model.from_tensors(tensors, CFG).fingerprint


def test_cli_load_with_other_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RWKVSTATE_DEBUG", raising=False)
    a = save_checkpoint(random_checkpoint(CFG, seed=1), tmp_path / "base.pth")
    b = save_checkpoint(random_checkpoint(CFG, seed=2), tmp_path / "tuned.pth")
    out = tmp_path / "s.state"
    common = ["--tokenizer", "bytes"]
    assert main(["state", "save", "--model", str(a), *common, "--prompt", "abc", "-o", str(out)]) == 0
    capsys.readouterr()
    load = ["state", "load", str(out), "--model", str(b), *common, "--max-tokens", "2", "--temperature", "0"]
    assert main(load) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "base.pth" in err and "tuned.pth" in err and "--allow-other-weights" in err
    assert main([*load, "--allow-other-weights"]) == 0


# ---- session metadata, sizes, temp files --------------------------------------------------------------
BAD_EXTRA = {
    "a list": ([1, 2], "'extra' must be a JSON object"),
    "from_zero not a bool": ({"from_zero": "yes"}, "from_zero must be true or false"),
    "undo points not ints": ({"from_zero": True, "undo_points": ["a"]}, "undo_points must be a list"),
}


@pytest.mark.parametrize("case", BAD_EXTRA)
def test_bad_session_metadata_is_refused_in_one_line(model, saved, case):
    extra, fragment = BAD_EXTRA[case]
    resign(saved, {"extra": json.dumps(extra)})
    refused(model, saved, fragment)


def test_the_size_cap_comes_before_reading(model, saved):
    layout = Engine(model, slots=1).pool.layout
    cap = files.max_file_bytes(layout, CFG.vocab_size)
    with open(saved, "r+b") as f:
        f.truncate(cap + 1)  # sparse: nothing is written, and nothing must be read
    with pytest.raises(StateError, match=rf"is {cap + 1:,} bytes, more than a state file can be here"):
        read_state_file(saved, layout=layout, vocab_size=CFG.vocab_size)
    with open(saved, "r+b") as f:
        f.truncate(4 << 30)  # 4 GiB
    with pytest.raises(StateError, match="more than a state file can be here"):
        inspect_state_file(saved)


def test_an_empty_session_costs_a_few_hundred_bytes(model, tmp_path):
    engine = Engine(model, slots=2)
    empty = save_session(engine.session(), tmp_path / "empty.state")
    assert empty.stat().st_size < 1024
    full = engine.session()
    full.feed(PROMPT)
    assert save_session(full, tmp_path / "full.state").stat().st_size > engine.pool.layout.slot_nbytes(torch.float32)
    sf = read_state_file(empty)
    assert sf.is_empty and sf.meta["format_version"] == "2" and all(not t.any() for t in sf.state.values())
    fresh = engine.session()
    fresh.load(empty)
    assert fresh.location == "none"  # loading it took no slot and no host memory
    full.load(empty)  # into a used session: back to the zero state
    assert full.tokens == [] and not full.snapshot().state["wkv"].any()
    resign(empty, {"zero_state": json.dumps({"n_layer": 3, "n_embd": 64, "head_size": 16})})
    refused(model, empty, "the zero state has n_layer=3")


def test_stale_temp_files_are_found_exactly(tmp_path):
    (tmp_path / "sub").mkdir()
    stale = [tmp_path / ".a.state.abcd_123.tmp", tmp_path / "sub" / ".sess_0.state.zzzzzzzz.tmp"]
    kept = [tmp_path / "a.tmp", tmp_path / ".hidden.tmp", tmp_path / "a.state"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "sub"))
