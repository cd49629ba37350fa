"""Tests for rwkvstate.model.checkpoint: every bad input gives one informative line,
and every valid layout (file format, dtype, vector shape, optional tensors) loads alike."""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import struct
from pathlib import Path

import pytest
import torch

from rwkvstate.errors import CheckpointError
from rwkvstate.model.checkpoint import (
    detect_version,
    infer_config,
    load_checkpoint,
    read_sidecar,
    read_tensors,
    validate,
)
from rwkvstate.model.rwkv7 import Model
from rwkvstate.model.synthetic import random_checkpoint, save_checkpoint, tiny_config

# Small, every size distinct so a swapped dimension cannot pass unnoticed:
# C=64, H=2, N=32, F=160, decay 8, iclr 12, value-mix 4, gate 20.
CFG = tiny_config(
    n_layer=2, n_embd=64, head_size=32, vocab_size=256, ffn_dim=160,
    decay_rank=8, aaa_rank=12, mv_rank=4, gate_rank=20, tokenizer="bytes",
)  # fmt: skip
PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 0, 255, 7]


# ---- helpers ---------------------------------------------------------------------------------


def good(cfg=CFG, seed=0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return random_checkpoint(cfg, seed=seed, dtype=dtype)


def one_line(message: str) -> str:
    assert message.strip(), "empty message"
    assert "\n" not in message and "\r" not in message, f"message is not one line: {message!r}"
    return message


def load_error(path, tokenizer=None) -> str:
    """load_checkpoint(path) must raise CheckpointError; returns its (one-line) message."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, tokenizer)
    return one_line(str(info.value))


def expect(path, pattern: str, tokenizer=None) -> str:
    message = load_error(path, tokenizer)
    assert re.search(pattern, message), f"{pattern!r} not found in {message!r}"
    return message


def logits(model: Model, tokens=PROMPT) -> torch.Tensor:
    pool = model.new_pool(slots=1)
    return model.forward(pool, [0], [tokens], output="all")[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """CFG's random tensors saved once as .pth and .safetensors (fp32)."""
    root = tmp_path_factory.mktemp("saved")
    tensors = good()
    return {
        "pth": save_checkpoint(tensors, root / "model.pth"),
        "safetensors": save_checkpoint(tensors, root / "model.safetensors"),
    }


# ---- unreadable files ------------------------------------------------------------------------


def test_missing_file(tmp_path):
    expect(tmp_path / "nope.pth", r"^model file not found: .*nope\.pth$")


def test_directory(tmp_path):
    d = tmp_path / "weights.pth"
    d.mkdir()
    expect(d, r"^model path is a directory, expected a \.pth or \.safetensors file: .*weights\.pth$")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_empty_file(tmp_path, suffix):
    p = tmp_path / f"empty{suffix}"
    p.write_bytes(b"")
    expect(p, rf"^model file is empty: .*empty{re.escape(suffix)}$")


def test_text_file_renamed_pth(tmp_path):
    p = tmp_path / "notes.pth"
    p.write_text("these are not weights\nline two\n")
    expect(p, r"^notes\.pth is not a PyTorch checkpoint \(no zip archive found; the file may be truncated")


def test_pth_truncated_to_half(tmp_path, saved):
    data = saved["pth"].read_bytes()
    p = tmp_path / "half.pth"
    p.write_bytes(data[: len(data) // 2])
    expect(p, r"^half\.pth is not a PyTorch checkpoint \(no zip archive found; the file may be truncated")


def test_zip_that_is_not_a_torch_archive(tmp_path):
    import zipfile

    p = tmp_path / "other.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "hello")
    expect(p, r"^other\.pth could not be read as a PyTorch checkpoint \(truncated\?\): ")


def test_safetensors_truncated(tmp_path, saved):
    data = saved["safetensors"].read_bytes()
    p = tmp_path / "half.safetensors"
    p.write_bytes(data[: len(data) // 2])
    expect(p, r"^half\.safetensors is not a readable safetensors file \(truncated or corrupt\?\): .*header")


def test_safetensors_garbage_header(tmp_path):
    p = tmp_path / "garbage.safetensors"
    junk = b"{this is not json at all}"
    p.write_bytes(struct.pack("<Q", len(junk)) + junk + b"\0" * 64)
    expect(p, r"^garbage\.safetensors is not a readable safetensors file \(truncated or corrupt\?\): .*JSON")


def test_safetensors_absurd_header_length(tmp_path):
    p = tmp_path / "noise.safetensors"
    p.write_bytes(b"\xff" * 100)
    expect(p, r"^noise\.safetensors is not a readable safetensors file \(truncated or corrupt\?\): ")


# ---- pickles with Python objects: refused, never unpickled -----------------------------------


def _touch(path):
    Path(path).write_text("the pickle ran code")
    return 0


class _Payload:
    """Unpickling this runs _touch(marker): the side effect a safe loader must never allow."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_touch, (self.marker,))


class _PlainObject:
    pass


def _some_function():
    return 42


REFUSED = r"holds Python objects other than plain tensors, refused by the safe loader \(weights_only=True\)"


def test_pickle_with_code_running_object_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "MARKER"
    p = tmp_path / "evil.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "x": _Payload(marker)}, p)
    assert not marker.exists()  # saving did not run it
    expect(p, rf"^evil\.pth {REFUSED}")
    assert not marker.exists(), "the checkpoint loader ran code from the pickle"
    # control: the payload is live, so the assertion above is meaningful
    torch.load(p, weights_only=False)
    assert marker.exists()


def test_pickle_with_plain_object_is_refused(tmp_path):
    p = tmp_path / "obj.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "x": _PlainObject()}, p)
    expect(p, rf"^obj\.pth {REFUSED}")


def test_ordered_dict_with_function_is_refused(tmp_path):
    p = tmp_path / "fn.pth"
    torch.save(collections.OrderedDict([("emb.weight", torch.zeros(2, 2)), ("fn", _some_function)]), p)
    expect(p, rf"^fn\.pth {REFUSED}")


def test_refusal_names_the_refused_global(tmp_path):
    p = tmp_path / "fn.pth"
    torch.save(collections.OrderedDict([("emb.weight", torch.zeros(2, 2)), ("fn", _some_function)]), p)
    message = load_error(p)
    assert "\x1b" not in message
    assert "_some_function" in message


def test_ordered_dict_of_tensors_is_accepted(tmp_path):
    p = tmp_path / "od.pth"
    torch.save(collections.OrderedDict(good()), p)
    _, cfg = load_checkpoint(p)
    assert cfg == CFG


# ---- containers that are not a flat dict of tensors ------------------------------------------


def test_nested_state_dict(tmp_path):
    p = tmp_path / "nested.pth"
    torch.save({"state_dict": good()}, p)
    expect(p, r"^nested\.pth is not a flat dict of tensors: entry 'state_dict' is a dict$")


def test_dict_with_a_non_tensor_value(tmp_path):
    p = tmp_path / "mixed.pth"
    torch.save({**good(), "step": 1000}, p)
    expect(p, r"^mixed\.pth is not a flat dict of tensors: entry 'step' is a int$")


@pytest.mark.parametrize(("obj", "kind"), [(torch.zeros(3), "Tensor"), ([torch.zeros(3)], "list")])
def test_not_a_dict(tmp_path, obj, kind):
    p = tmp_path / "thing.pth"
    torch.save(obj, p)
    expect(p, rf"^thing\.pth does not hold a dict of tensors \(found {kind}\)$")


# ---- RWKV-7 tensors missing, mis-shaped or extra ---------------------------------------------


def test_missing_tensor(tmp_path):
    tensors = good()
    del tensors["blocks.1.att.w2"]
    p = save_checkpoint(tensors, tmp_path / "m.safetensors")
    expect(p, r"^missing tensor 'blocks\.1\.att\.w2' \(expected shape \[8, 64\]\)$")


def test_missing_vector(tmp_path):
    tensors = good()
    del tensors["blocks.1.ffn.x_k"]
    p = save_checkpoint(tensors, tmp_path / "m.pth")
    expect(p, r"^missing tensor 'blocks\.1\.ffn\.x_k' \(expected shape \[64\]\)$")


def test_missing_tensor_needed_for_shape_inference(tmp_path):
    tensors = good()
    del tensors["blocks.0.att.w1"]
    p = save_checkpoint(tensors, tmp_path / "m.pth")
    expect(p, r"^missing tensor 'blocks\.0\.att\.w1'")


def test_mis_shaped_matrix(tmp_path):
    tensors = good()
    tensors["blocks.1.ffn.value.weight"] = torch.zeros(64, 161)
    p = save_checkpoint(tensors, tmp_path / "m.pth")
    expect(p, r"^'blocks\.1\.ffn\.value\.weight': expected shape \[64, 160\], found \[64, 161\]$")


def test_mis_shaped_vector(tmp_path):
    tensors = good()
    tensors["blocks.0.att.x_k"] = torch.zeros(1, 1, 63)
    p = save_checkpoint(tensors, tmp_path / "m.safetensors")
    expect(p, r"^'blocks\.0\.att\.x_k': expected shape \[64\], found \[1, 1, 63\]$")


def test_lora_rank_differs_between_layers(tmp_path):
    tensors = good()
    tensors["blocks.1.att.a1"] = torch.zeros(64, 13)
    p = save_checkpoint(tensors, tmp_path / "m.pth")
    expect(p, r"^'blocks\.1\.att\.a1': expected shape \[64, 12\], found \[64, 13\]$")


def test_integer_tensor(tmp_path):
    tensors = good()
    tensors["blocks.0.att.k_a"] = torch.zeros(1, 1, 64, dtype=torch.int64)
    p = save_checkpoint(tensors, tmp_path / "m.pth")
    expect(p, r"^'blocks\.0\.att\.k_a': expected a floating-point tensor, found torch\.int64$")


def test_unexpected_extra_tensor(tmp_path):
    tensors = good()
    tensors["blocks.0.att.lora_extra"] = torch.zeros(4)
    p = save_checkpoint(tensors, tmp_path / "m.pth")
    expect(p, r"^unexpected tensors for a plain RWKV-7 model \(1\): blocks\.0\.att\.lora_extra$")


def test_many_unexpected_tensors_are_abbreviated(tmp_path):
    tensors = good()
    for i in range(6):
        tensors[f"extra.{i}"] = torch.zeros(1)
    p = save_checkpoint(tensors, tmp_path / "m.safetensors")
    expect(p, r"^unexpected tensors for a plain RWKV-7 model \(6\): extra\.0, extra\.1, extra\.2, extra\.3 \.\.\.$")


def test_r_k_inconsistent_with_n_embd(tmp_path):
    tensors = good()
    tensors["blocks.0.att.r_k"] = torch.zeros(2, 16)
    p = save_checkpoint(tensors, tmp_path / "m.pth")
    expect(p, r"^'blocks\.0\.att\.r_k' has shape \[2, 16\], but n_head \* head_size must equal n_embd 64$")


def test_r_k_head_split_differs_between_layers(tmp_path):
    tensors = good()
    tensors["blocks.1.att.r_k"] = torch.zeros(4, 16)  # same numel, other head size
    p = save_checkpoint(tensors, tmp_path / "m.pth")
    expect(p, r"^'blocks\.1\.att\.r_k': expected shape \[2, 32\], found \[4, 16\]$")


def test_r_k_not_2d(tmp_path):
    tensors = good()
    tensors["blocks.0.att.r_k"] = torch.zeros(64)
    p = save_checkpoint(tensors, tmp_path / "m.pth")
    expect(p, r"^'blocks\.0\.att\.r_k': expected a 2-D tensor, found shape \[64\]$")


def test_gap_in_layer_numbering(tmp_path):
    tensors = good(dataclasses.replace(CFG, n_layer=3))
    tensors = {k: v for k, v in tensors.items() if not k.startswith("blocks.1.")}
    p = save_checkpoint(tensors, tmp_path / "m.pth")
    expect(p, r"^checkpoint skips layer\(s\) \[1\]: blocks must be numbered 0\.\.n_layer-1$")


def test_layer_zero_missing(tmp_path):
    tensors = good(dataclasses.replace(CFG, n_layer=3))
    # keep emb/head/ln_out and ln0, drop the rest of block 0
    tensors = {k: v for k, v in tensors.items() if not k.startswith("blocks.0.") or ".ln0." in k}
    tensors = {k.replace("blocks.0.ln0", "ln0_moved"): v for k, v in tensors.items()}
    p = save_checkpoint(tensors, tmp_path / "m.pth")
    expect(p, r"^checkpoint skips layer\(s\) \[0\]: blocks must be numbered 0\.\.n_layer-1$")


# ---- other RWKV generations and non-RWKV files -----------------------------------------------


def _old_style(version: str) -> dict[str, torch.Tensor]:
    C = 16

    def vec():
        return torch.zeros(1, 1, C)

    keys = {
        "RWKV-6": ["time_maa_x", "time_maa_w", "time_decay_w1", "time_decay_w2", "time_decay", "time_faaaa"],
        "RWKV-5": ["time_mix_k", "time_mix_v", "time_mix_r", "time_decay", "time_faaaa"],
        "RWKV-4": ["time_first", "time_decay", "time_mix_k", "time_mix_v", "time_mix_r"],
    }[version]
    out = {"emb.weight": torch.zeros(256, C), "head.weight": torch.zeros(256, C)}
    for layer in range(2):
        for key in keys:
            out[f"blocks.{layer}.att.{key}"] = vec()
        out[f"blocks.{layer}.att.key.weight"] = torch.zeros(C, C)
        out[f"blocks.{layer}.ffn.time_mix_k"] = vec()
    return out


@pytest.mark.parametrize("version", ["RWKV-6", "RWKV-5", "RWKV-4"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_older_rwkv_generation(tmp_path, version, suffix):
    tensors = _old_style(version)
    assert detect_version(tensors) == version
    p = save_checkpoint(tensors, tmp_path / f"old{suffix}")
    expect(p, rf"^old{re.escape(suffix)} looks like an {version} checkpoint; only RWKV-7 is supported$")


def test_not_rwkv_at_all(tmp_path):
    p = tmp_path / "mlp.pth"
    torch.save({"fc1.weight": torch.zeros(4, 4), "fc1.bias": torch.zeros(4), "fc2.weight": torch.zeros(2, 4)}, p)
    expect(p, r"^not an RWKV checkpoint: it has no 'emb\.weight' and no 'blocks\.N\.\*' tensors$")


def test_empty_dict(tmp_path):
    p = tmp_path / "nothing.pth"
    torch.save({}, p)
    expect(p, r"^not an RWKV checkpoint: it has no 'emb\.weight' and no 'blocks\.N\.\*' tensors$")


def test_unknown_rwkv_like_layout(tmp_path):
    p = tmp_path / "odd.pth"
    torch.save({"emb.weight": torch.zeros(256, 16), "blocks.0.mystery": torch.zeros(16)}, p)
    expect(p, r"^not an RWKV-7 checkpoint: it has no 'blocks\.0\.att\.r_k' and matches no known RWKV version$")


def test_detect_version_rwkv7():
    assert detect_version(good()) == "RWKV-7"


# ---- tokenizer kind: vocab size, sidecar, override -------------------------------------------


@pytest.fixture(scope="module")
def odd_vocab(tmp_path_factory) -> Path:
    """A model whose vocab (320, padded) matches neither known tokenizer."""
    root = tmp_path_factory.mktemp("odd_vocab")
    cfg = dataclasses.replace(CFG, n_layer=1, vocab_size=320, mv_rank=1)
    return save_checkpoint(good(cfg), root / "padded.pth")


def test_unknown_vocab_size_without_sidecar_or_override(odd_vocab):
    message = expect(odd_vocab, r"^cannot infer the tokenizer from vocab size 320 ")
    assert 'provide a <model>.json sidecar with {"tokenizer": "world"|"bytes"}' in message
    assert "--tokenizer world|bytes" in message


@pytest.mark.parametrize("kind", ["bytes", "world"])
def test_tokenizer_override_fixes_unknown_vocab_size(odd_vocab, kind):
    _, cfg = load_checkpoint(odd_vocab, tokenizer=kind)
    assert (cfg.vocab_size, cfg.tokenizer) == (320, kind)
    model = Model.load(odd_vocab, tokenizer=kind)
    assert model.config.tokenizer == kind


def test_sidecar_fixes_unknown_vocab_size(tmp_path, odd_vocab):
    p = tmp_path / "padded.pth"
    p.write_bytes(odd_vocab.read_bytes())
    (tmp_path / "padded.json").write_text(json.dumps({"tokenizer": "bytes"}))
    assert read_sidecar(p) == {"tokenizer": "bytes"}
    _, cfg = load_checkpoint(p)
    assert (cfg.vocab_size, cfg.tokenizer) == (320, "bytes")
    assert Model.load(p).config.tokenizer == "bytes"


def test_override_takes_precedence_over_sidecar(tmp_path, saved):
    p = tmp_path / "model.safetensors"
    p.write_bytes(saved["safetensors"].read_bytes())
    (tmp_path / "model.json").write_text('{"tokenizer": "world"}')
    assert load_checkpoint(p)[1].tokenizer == "world"
    assert load_checkpoint(p, tokenizer="bytes")[1].tokenizer == "bytes"


def test_no_sidecar_reads_as_empty(saved):
    assert read_sidecar(saved["pth"]) == {}


def test_sidecar_invalid_json(tmp_path, saved):
    p = tmp_path / "model.pth"
    p.write_bytes(saved["pth"].read_bytes())
    (tmp_path / "model.json").write_text('{"tokenizer": "bytes",')
    expect(p, r"^model sidecar model\.json is not valid JSON: ")


def test_sidecar_unknown_tokenizer(tmp_path, saved):
    p = tmp_path / "model.pth"
    p.write_bytes(saved["pth"].read_bytes())
    (tmp_path / "model.json").write_text('{"tokenizer": "gpt2"}')
    expect(p, r"^model sidecar model\.json: tokenizer must be 'world' or 'bytes'$")


def test_sidecar_not_an_object(tmp_path, saved):
    p = tmp_path / "model.pth"
    p.write_bytes(saved["pth"].read_bytes())
    (tmp_path / "model.json").write_text('["bytes"]')
    expect(p, r"^model sidecar model\.json must hold a JSON object$")


def test_sidecar_not_utf8(tmp_path, saved):
    p = tmp_path / "model.pth"
    p.write_bytes(saved["pth"].read_bytes())
    (tmp_path / "model.json").write_bytes(b'{"tokenizer": "\xff\xfe"}')
    expect(p, r"^model sidecar model\.json is not valid JSON: ")


# ---- positive: shapes are read back exactly --------------------------------------------------

SHAPES = {
    # n_layer 1: no layer carries att.v1, so mv_rank cannot be read and is reported as 1.
    "1-layer-C32-N16": tiny_config(
        n_layer=1, n_embd=32, head_size=16, vocab_size=256, ffn_dim=96,
        decay_rank=4, aaa_rank=6, mv_rank=1, gate_rank=10, tokenizer="bytes",
    ),
    "3-layer-C64-N32-world": tiny_config(
        n_layer=3, n_embd=64, head_size=32, vocab_size=65536, ffn_dim=224,
        decay_rank=8, aaa_rank=12, mv_rank=4, gate_rank=16, tokenizer="world",
    ),
    "2-layer-C128-N64": tiny_config(
        n_layer=2, n_embd=128, head_size=64, vocab_size=256, ffn_dim=448,
        decay_rank=24, aaa_rank=20, mv_rank=12, gate_rank=40, tokenizer="bytes",
    ),
    "2-layer-C96-N32-3heads": tiny_config(
        n_layer=2, n_embd=96, head_size=32, vocab_size=256, ffn_dim=384,
        decay_rank=16, aaa_rank=8, mv_rank=6, gate_rank=24, tokenizer="bytes",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", SHAPES)
def test_infer_config_returns_generating_config(name):
    cfg = SHAPES[name]
    ranks = (cfg.decay_rank, cfg.aaa_rank, cfg.mv_rank, cfg.gate_rank)
    assert len(set(ranks)) == 4
    tensors = good(cfg, dtype=torch.float16)
    assert detect_version(tensors) == "RWKV-7"
    assert infer_config(tensors) == cfg
    validate(tensors, cfg)


def test_one_layer_mv_rank_is_reported_as_one():
    cfg = dataclasses.replace(SHAPES["1-layer-C32-N16"], mv_rank=7)
    assert infer_config(good(cfg)) == dataclasses.replace(cfg, mv_rank=1)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_checkpoint_round_trip(tmp_path, suffix):
    cfg = SHAPES["2-layer-C96-N32-3heads"]
    tensors = good(cfg)
    p = save_checkpoint(tensors, tmp_path / f"m{suffix}")
    loaded, got = load_checkpoint(p)
    assert got == cfg
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value), key


def test_read_tensors_without_suffix(tmp_path, saved):
    """No suffix: a zip (torch) file is read as .pth, anything else as safetensors."""
    a = tmp_path / "a"
    a.write_bytes(saved["pth"].read_bytes())
    b = tmp_path / "b"
    b.write_bytes(saved["safetensors"].read_bytes())
    ta, tb = read_tensors(a), read_tensors(b)
    assert set(ta) == set(tb)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


# ---- positive: dtypes, file formats, optional and reshaped tensors ---------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def by_file_dtype(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dtypes")
    return {
        name: save_checkpoint(good(dtype=dtype), root / f"m-{name}.safetensors") for name, dtype in DTYPES.items()
    }


@pytest.mark.parametrize("file_dtype", DTYPES)
@pytest.mark.parametrize("compute", DTYPES)
def test_any_file_dtype_loads_into_any_compute_dtype(by_file_dtype, file_dtype, compute):
    tensors, _ = load_checkpoint(by_file_dtype[file_dtype])
    assert tensors["blocks.0.att.key.weight"].dtype == DTYPES[file_dtype]
    model = Model.load(by_file_dtype[file_dtype], dtype=compute)
    assert model.dtype == DTYPES[compute]
    layer = model.weights.layers[1]
    for w in (model.weights.emb, model.weights.head, layer.key, layer.w1, layer.mix, layer.r_k):
        assert w.dtype == DTYPES[compute]
    out = logits(model, PROMPT[:4])
    assert out.dtype == torch.float32 and out.shape == (4, 256)
    assert torch.isfinite(out).all()


def test_pth_and_safetensors_give_bit_identical_logits(saved):
    a = logits(Model.load(saved["pth"]))
    b = logits(Model.load(saved["safetensors"]))
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_layer0_value_mix_tensors_are_optional(tmp_path):
    base = good()
    with_v = dict(base)
    g = torch.Generator().manual_seed(5)
    with_v["blocks.0.att.v0"] = torch.randn(1, 1, 64, generator=g)
    with_v["blocks.0.att.v1"] = torch.randn(64, 4, generator=g)
    with_v["blocks.0.att.v2"] = torch.randn(4, 64, generator=g)
    a = save_checkpoint(base, tmp_path / "without.pth")
    b = save_checkpoint(with_v, tmp_path / "with.pth")
    assert load_checkpoint(b)[1] == load_checkpoint(a)[1] == CFG
    assert torch.equal(logits(Model.load(a)), logits(Model.load(b)))


def test_vector_shapes_1_1_C_and_C_load_alike(tmp_path):
    base = good()
    vectors = [k for k, v in base.items() if v.dim() == 3]
    assert "blocks.0.att.x_r" in vectors and "blocks.1.ffn.x_k" in vectors  # official [1, 1, C]
    flat = {k: (v.reshape(-1) if v.dim() == 3 else v) for k, v in base.items()}
    # and the other way round for the LayerNorm vectors that are stored as [C]
    lifted = {k: (v.view(1, 1, -1) if v.dim() == 1 else v) for k, v in base.items()}
    paths = [
        save_checkpoint(base, tmp_path / "official.pth"),
        save_checkpoint(flat, tmp_path / "flat.safetensors"),
        save_checkpoint(lifted, tmp_path / "lifted.pth"),
    ]
    outs = []
    for p in paths:
        _, cfg = load_checkpoint(p)
        assert cfg == CFG
        outs.append(logits(Model.load(p)))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
