"""Tests for rwkvstate.state.convert: canonical <-> rwkv package / web-rwkv / state-tuning."""

from __future__ import annotations

import copy
import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rwkvstate.state.convert import (
    KEY_VALUE,
    VALUE_KEY,
    from_rwkv_list,
    from_state_tuning,
    from_web_rwkv,
    load_state_tuning_file,
    to_rwkv_list,
    to_web_rwkv,
    validate_canonical,
    zero_state,
)


def random_state(L, H, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = H * N
    return {
        "att_shift": torch.randn(L, C, generator=g),
        "wkv": torch.randn(L, H, N, N, generator=g),
        "ffn_shift": torch.randn(L, C, generator=g),
    }


def assert_state_equal(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


SIZES = [(3, 3, 8), (3, 3, 64), (1, 1, 4), (2, 5, 16)]

# rwkv 0.8.32 builds its model with torch.jit.script, deprecated in recent torch.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")


# --- validation -------------------------------------------------------------------------------


def test_zero_state_shapes():
    s = zero_state(3, 24, 8)
    shapes = {k: tuple(v.shape) for k, v in s.items()}
    assert shapes == {"att_shift": (3, 24), "wkv": (3, 3, 8, 8), "ffn_shift": (3, 24)}
    assert all(v.dtype == torch.float32 and not v.any() for v in s.values())
    assert validate_canonical(s, 3, 24, 8)["wkv"].shape == (3, 3, 8, 8)


def test_validate_converts_dtype_and_copies():
    s = random_state(2, 3, 8)
    half = {k: v.to(torch.float16) for k, v in s.items()}
    out = validate_canonical(half, 2, 24, 8)
    assert all(v.dtype == torch.float32 for v in out.values())
    torch.testing.assert_close(out["wkv"], s["wkv"].half().float())
    dbl = {k: v.double() for k, v in s.items()}
    assert validate_canonical(dbl, 2, 24, 8)["att_shift"].dtype == torch.float32


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda s: s.pop("wkv"), r"missing key\(s\) \['wkv'\]"),
        (lambda s: s.update(extra=torch.zeros(1)), r"unknown key\(s\) \['extra'\]"),
        (lambda s: s.update(wkv=torch.zeros(2, 3, 8, 7)), r"state\['wkv'\] has shape \(2, 3, 8, 7\), expected \(2, 3, 8, 8\)"),
        (lambda s: s.update(att_shift=torch.zeros(2, 25)), r"state\['att_shift'\] has shape \(2, 25\), expected \(2, 24\)"),
        (lambda s: s["ffn_shift"].__setitem__((1, 5), float("nan")), r"state\['ffn_shift'\] has 1 non-finite values \(first at index \(1, 5\)\)"),
        (lambda s: s["wkv"].__setitem__((0, 2, 1, 3), float("inf")), r"state\['wkv'\] has 1 non-finite .*\(0, 2, 1, 3\)"),
        (lambda s: s.update(wkv=torch.zeros(2, 3, 8, 8, dtype=torch.complex64)), r"complex"),
    ],
)  # fmt: skip
def test_validate_rejects_with_specific_message(mutate, pattern):
    s = random_state(2, 3, 8)
    mutate(s)
    with pytest.raises(ValueError, match=pattern):
        validate_canonical(s, 2, 24, 8)


def test_validate_rejects_bad_sizes_and_non_dict():
    with pytest.raises(ValueError, match="not a multiple of head_size"):
        zero_state(2, 20, 8)
    with pytest.raises(ValueError, match="must be a dict"):
        validate_canonical([1, 2, 3], 2, 24, 8)


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("L,H,N", SIZES)
def test_rwkv_list_round_trip(L, H, N):
    s = random_state(L, H, N)
    lst = to_rwkv_list(s)
    assert len(lst) == 3 * L
    assert [tuple(t.shape) for t in lst[:3]] == [(H * N,), (H, N, N), (H * N,)]
    torch.testing.assert_close(lst[3 * (L - 1) + 1], s["wkv"][L - 1], rtol=0, atol=0)  # no transpose
    assert_state_equal(from_rwkv_list(lst, N), s)
    lst[1].add_(1.0)  # the package's CUDA path writes the wkv in place; must not alias ours
    assert_state_equal(from_rwkv_list(to_rwkv_list(s), N), s)
    half = to_rwkv_list(s, shift_dtype=torch.float16)  # e.g. for a "cuda fp16" strategy
    assert (half[0].dtype, half[1].dtype, half[2].dtype) == (torch.float16, torch.float32, torch.float16)


@pytest.mark.parametrize("L,H,N", SIZES)
def test_web_rwkv_round_trip_and_layout(L, H, N):
    s = random_state(L, H, N)
    t = to_web_rwkv(s)
    C = H * N
    assert t.shape == (L, N + 2, C) and t.is_contiguous()
    torch.testing.assert_close(t[:, 0], s["att_shift"], rtol=0, atol=0)
    torch.testing.assert_close(t[:, N + 1], s["ffn_shift"], rtol=0, atol=0)
    l, h, i, j = L - 1, H - 1, N - 1, 0  # [l, 1 + key j, h*N + value i] = wkv[l, h, value i, key j]
    assert t[l, 1 + j, h * N + i] == s["wkv"][l, h, i, j]
    assert t[l, 1 + i, h * N + j] == s["wkv"][l, h, j, i]
    assert_state_equal(from_web_rwkv(t, L, C, N), s)
    assert_state_equal(from_web_rwkv(t.flatten(), L, C, N), s)  # raw buffer read back from the GPU
    assert_state_equal(from_web_rwkv(t[None], L, C, N), s)  # web-rwkv [C, N+2, L, 1] in torch order


def test_from_web_rwkv_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"expected \(2, 10, 24\) \(web-rwkv \[24, 10, 2\]\)"):
        from_web_rwkv(torch.zeros(2, 24, 10), 2, 24, 8)


@settings(max_examples=40, deadline=None)
@given(L=st.integers(1, 3), H=st.integers(1, 4), N=st.sampled_from([1, 2, 4, 8, 12]), seed=st.integers(0, 2**16))
def test_round_trips_property(L, H, N, seed):
    s = random_state(L, H, N, seed)
    assert_state_equal(from_rwkv_list(to_rwkv_list(s), N), s)
    assert_state_equal(from_web_rwkv(to_web_rwkv(s), L, H * N, N), s)
    # going through both foreign formats in either order is lossless too
    assert_state_equal(from_web_rwkv(to_web_rwkv(from_rwkv_list(to_rwkv_list(s), N)), L, H * N, N), s)


def _web_rwkv_time_mix_step(t, l, H, N, r, w, k, v, a, b):
    """One token of web-rwkv's shaders/time_mix_v7.wgsl wkv update, indexed like the shader.

    The shader walks keys j (in vec4 groups: `compute_index(batch, j*4+1, index)` + c*stride),
    loading state row `1 + j` with vec4 column `index` covering values, and per value i computes
    sa[i] = sum_j S[1+j][i] * a[j]; S[1+j][i] = S*w[j] + k[j]*v[i] + sa[i]*b[j]; y[i] += r[j]*S.
    """
    y = torch.zeros(H * N)
    for h in range(H):
        cols = slice(h * N, (h + 1) * N)
        rows = t[l, 1 : N + 1, cols]  # [key j, value i]
        sa = (rows * a[cols, None]).sum(0)
        rows = rows * w[cols, None] + k[cols, None] * v[None, cols] + sa[None] * b[cols, None]
        t[l, 1 : N + 1, cols] = rows
        y[cols] = (r[cols, None] * rows).sum(0)
    return y


def _canonical_step(S, r, w, k, v, a, b):
    """The rwkv package's update in canonical (value, key) order, for one layer [H, N, N]."""
    H, N, _ = S.shape
    r, w, k, v, a, b = (x.view(H, N) for x in (r, w, k, v, a, b))
    S = S * w[:, None, :] + (S @ a[..., None]) * b[:, None, :] + v[..., None] * k[:, None, :]
    return S, (S @ r[..., None]).view(H * N)


def test_web_rwkv_layout_matches_shader_semantics():
    L, H, N = 2, 3, 8
    s = random_state(L, H, N, seed=7)
    g = torch.Generator().manual_seed(8)
    r, k, v, a, b = (torch.randn(H * N, generator=g) for _ in range(5))
    w = torch.rand(H * N, generator=g) * 0.5 + 0.5
    t = to_web_rwkv(s)
    y_web = _web_rwkv_time_mix_step(t, 1, H, N, r, w, k, v, a, b)
    S, y = _canonical_step(s["wkv"][1], r, w, k, v, a, b)
    torch.testing.assert_close(y_web, y)
    torch.testing.assert_close(from_web_rwkv(t, L, H * N, N)["wkv"][1], S)


# --- agreement with the official `rwkv` package -----------------------------------------------


@pytest.fixture(scope="module")
def rwkv_model_cls():
    with pytest.MonkeyPatch.context() as mp:  # rwkv.model reads these at import time only
        mp.setenv("RWKV_V7_ON", "1")
        mp.setenv("RWKV_CUDA_ON", "0")
        mod = importlib.import_module("rwkv.model")
        if not hasattr(mod, "RWKV_x070"):  # imported earlier without v7 support
            mod = importlib.reload(mod)
    return mod.RWKV_x070


def tiny_checkpoint(L=2, H=3, N=8, V=50, Dw=8, Da=8, Dv=4, Dg=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = H * N

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    z = {"emb.weight": rnd(V, C), "blocks.0.ln0.weight": 1 + rnd(C), "blocks.0.ln0.bias": rnd(C)}
    for l in range(L):
        p = f"blocks.{l}."
        for ln in ("ln1", "ln2"):
            z[p + ln + ".weight"], z[p + ln + ".bias"] = 1 + rnd(C), rnd(C)
        att = {f"x_{c}": rnd(1, 1, C) for c in "rwkvag"}
        att.update(w0=rnd(1, 1, C) - 0.5, w1=rnd(C, Dw), w2=rnd(Dw, C), a0=rnd(1, 1, C), a1=rnd(C, Da), a2=rnd(Da, C))
        att.update(v0=rnd(1, 1, C), v1=rnd(C, Dv), v2=rnd(Dv, C), g1=rnd(C, Dg), g2=rnd(Dg, C))
        att.update(k_k=1 + rnd(1, 1, C), k_a=1 + rnd(1, 1, C), r_k=rnd(H, N))
        att.update({f"{m}.weight": rnd(C, C) * 5 for m in ("receptance", "key", "value", "output")})
        att.update({"ln_x.weight": 1 + rnd(C), "ln_x.bias": rnd(C)})
        z.update({p + "att." + n: t for n, t in att.items()})
        z[p + "ffn.x_k"] = rnd(1, 1, C)
        z[p + "ffn.key.weight"], z[p + "ffn.value.weight"] = rnd(4 * C, C) * 5, rnd(C, 4 * C) * 5
    z.update({"ln_out.weight": 1 + rnd(C), "ln_out.bias": rnd(C), "head.weight": rnd(V, C)})
    return z


@pytest.fixture(scope="module")
def official(rwkv_model_cls, tmp_path_factory):
    L, H, N = 2, 3, 8
    path = tmp_path_factory.mktemp("ckpt") / "tiny-rwkv7"
    torch.save(tiny_checkpoint(L, H, N), str(path) + ".pth")
    return rwkv_model_cls(model=str(path), strategy="cpu fp32"), (L, H, N)


def test_official_state_round_trips(official):
    model, (L, H, N) = official
    _, state = model.forward([1, 7, 3, 42, 9], None)
    assert len(state) == 3 * L and state[1].shape == (H, N, N)
    assert state[1].abs().sum() > 0 and state[0].abs().sum() > 0  # a real, non-trivial state
    canon = from_rwkv_list(state, N)
    back = to_rwkv_list(canon)
    for ours, theirs in zip(back, state):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert_state_equal(from_web_rwkv(to_web_rwkv(canon), L, H * N, N), canon)


def test_official_package_runs_on_converted_state(official):
    """Continuing from a state that went canonical -> list gives the package's own result."""
    model, (L, H, N) = official
    _, state = model.forward([5, 11, 2], None)
    canon = from_rwkv_list(state, N)
    out_ref, state_ref = model.forward([8, 13], copy.deepcopy(state))
    via_web = from_web_rwkv(to_web_rwkv(canon), L, H * N, N)
    out, state_new = model.forward([8, 13], to_rwkv_list(via_web))
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    assert_state_equal(from_rwkv_list(state_new, N), from_rwkv_list(state_ref, N))


def test_official_package_accepts_random_canonical_state(official):
    model, (L, H, N) = official
    s = {k: v * 0.1 for k, v in random_state(L, H, N, seed=3).items()}
    before = copy.deepcopy(s)
    out1, st1 = model.forward([4], to_rwkv_list(s))
    assert_state_equal(s, before)  # the package never writes into our dict's tensors
    out2, _ = model.forward([4], to_rwkv_list(s))
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    new = from_rwkv_list(st1, N)
    assert not torch.equal(new["wkv"], s["wkv"]) and not torch.equal(new["att_shift"], s["att_shift"])
    # a different starting state must change the logits: the package really read ours
    out0, _ = model.forward([4], None)
    assert not torch.allclose(out0, out1)


# --- state tuning -----------------------------------------------------------------------------
# Orientation evidence (details in docs/state-formats.md):
# * RWKV-PEFT rwkvt/operator/rwkvop.py, Triton path: fw_attn_triton loads s0[b, h, r, c] as
#   `state` and outputs y = q @ state^T, i.e. y[r] = sum_c state[r, c] q[c]: rows are values.
#   FLA path: `s = s.transpose(1, 2)` before chunk_rwkv7, whose initial_state is [.., K, V]
#   (commit e02ce4b "fix v7 fla state tuning" added that transpose). So time_state[h] is
#   (value, key), the canonical order.
# * RWKV-Runner backend-python/utils/rwkv.py: for version >= 7 the time_state goes into the
#   rwkv package's state[i*3+1] untransposed (v5/v6 transpose); commit f85fba3.
# * web-rwkv's converter transposes time_state into `.st`, and runtime/v7.rs read_state then
#   puts st[h, p, q] at backed row 1+p (key), column h*N+q (value): the same state again.


def _time_state_dict(L, H, N, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {f"blocks.{l}.att.time_state": torch.randn(H, N, N, generator=g).to(dtype) for l in range(L)}


def test_state_tuning_orientation_known_asymmetric_matrix():
    L, H, N = 3, 2, 4
    ts = {f"blocks.{l}.att.time_state": torch.zeros(H, N, N) for l in range(L)}
    ts["blocks.2.att.time_state"][1, 0, 3] = 1.0  # time_state[h=1, value 0, key 3]
    s = from_state_tuning(ts, L, H * N, N)
    assert s["wkv"][2, 1, 0, 3] == 1.0 and s["wkv"].sum() == 1.0  # canonical [l, h, value, key]
    assert not s["att_shift"].any() and not s["ffn_shift"].any()
    # Reading it out with receptance on key 3 only yields value 0, as RWKV-PEFT's kernels would.
    r = torch.zeros(H, N)
    r[1, 3] = 1.0
    y = (s["wkv"][2] @ r[..., None])[..., 0]
    assert y[1, 0] == 1.0 and y.sum() == 1.0


def test_state_tuning_matches_peft_fla_convention():
    """RWKV-PEFT's FLA path: initial_state h = time_state.transpose(1, 2) as [K, V], o = r @ h."""
    L, H, N = 2, 3, 8
    ts = _time_state_dict(L, H, N)
    s = from_state_tuning(ts, L, H * N, N)
    r = torch.randn(H, N)
    for l in range(L):
        h_kv = ts[f"blocks.{l}.att.time_state"].transpose(1, 2)
        o_fla = torch.einsum("hk,hkv->hv", r, h_kv)
        o_ours = torch.einsum("hij,hj->hi", s["wkv"][l], r)  # y[i] = sum_j S[i, j] r[j]
        torch.testing.assert_close(o_ours, o_fla)


def test_state_tuning_web_rwkv_st_orientation_and_read_state_layout():
    L, H, N = 2, 3, 8
    pth = _time_state_dict(L, H, N, seed=1)
    st = {k: v.transpose(-1, -2).contiguous() for k, v in pth.items()}  # what the converter writes
    s = from_state_tuning(pth, L, H * N, N)
    assert_state_equal(from_state_tuning(st, L, H * N, N, orientation=KEY_VALUE), s)
    # web-rwkv read_state: transpose [H, P, Q] -> [P, H, Q], view as [N, C], blit to rows 1..N.
    web = to_web_rwkv(s)
    for l in range(L):
        rows = st[f"blocks.{l}.att.time_state"].permute(1, 0, 2).reshape(N, H * N)
        torch.testing.assert_close(web[l, 1 : N + 1], rows, rtol=0, atol=0)


def test_state_tuning_ignores_other_keys_and_converts_dtype():
    ts = _time_state_dict(2, 3, 8, dtype=torch.bfloat16)
    ts["blocks.0.att.something_else"] = torch.ones(3)
    s = from_state_tuning(ts, 2, 24, 8, orientation=VALUE_KEY)
    assert s["wkv"].dtype == torch.float32
    torch.testing.assert_close(s["wkv"][1], ts["blocks.1.att.time_state"].float())


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda d: d.pop("blocks.1.att.time_state"), r"layers \[0, 2\], but the model has 3 layers \(missing \[1\], surplus \[\]\)"),
        (lambda d: d.update({"blocks.3.att.time_state": torch.zeros(3, 8, 8)}), r"surplus \[3\]"),
        (lambda d: d.update({"blocks.2.att.time_state": torch.zeros(3, 8, 4)}), r"blocks\.2\.att\.time_state has shape \(3, 8, 4\), expected \(3, 8, 8\)"),
        (lambda d: d.clear() or d.update({"emb.weight": torch.zeros(2)}), r"no blocks\.\{l\}\.att\.time_state"),
        (lambda d: d["blocks.0.att.time_state"].__setitem__((0, 0, 0), float("nan")), r"non-finite"),
    ],
)  # fmt: skip
def test_state_tuning_errors(edit, pattern):
    ts = _time_state_dict(3, 3, 8)
    edit(ts)
    with pytest.raises(ValueError, match=pattern):
        from_state_tuning(ts, 3, 24, 8)


def test_load_state_tuning_file_formats(tmp_path):
    from safetensors.torch import save_file

    L, H, N = 2, 3, 8
    ts = _time_state_dict(L, H, N, seed=2, dtype=torch.bfloat16)
    expected = from_state_tuning(ts, L, H * N, N)
    torch.save(ts, tmp_path / "s.pth")
    save_file(ts, str(tmp_path / "s.safetensors"))
    st = {k: v.transpose(-1, -2).half().contiguous() for k, v in ts.items()}
    save_file(st, str(tmp_path / "s.st"))
    assert_state_equal(load_state_tuning_file(tmp_path / "s.pth", L, H * N, N), expected)
    assert_state_equal(load_state_tuning_file(tmp_path / "s.safetensors", L, H * N, N), expected)
    assert_state_equal(load_state_tuning_file(tmp_path / "s.st", L, H * N, N), expected)  # bf16->f16 exact here
    wrong = load_state_tuning_file(tmp_path / "s.st", L, H * N, N, orientation=VALUE_KEY)
    assert_state_equal({**wrong, "wkv": wrong["wkv"].transpose(-1, -2)}, expected)


@pytest.mark.parametrize(
    "name, content, message",
    [("missing.pth", None, "state file not found"),
     ("garbage.pth", b"not a pickle", "is neither a PyTorch (.pth) nor a safetensors state file"),
     ("garbage.safetensors", b"\x00\x01junk", "is neither a PyTorch (.pth) nor a safetensors state file"),
     # torch 2.13 reads the zip directory and fails on its data; torch 2.11 does not take it for a zip
     ("cut.pth", "truncated-zip", ("cannot read", "is neither a PyTorch (.pth) nor a safetensors state file")),],
)  # fmt: skip
def test_load_state_tuning_file_failures_are_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "truncated-zip":
        torch.save({"blocks.0.att.time_state": torch.zeros(3, 8, 8)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] + data[-200:])  # the zip directory survives, the data does not
    elif content is not None:
        path.write_bytes(content)
    messages = (message,) if isinstance(message, str) else message
    with pytest.raises(ValueError, match="|".join(map(re.escape, messages))) as info:
        load_state_tuning_file(path, 2, 24, 8)
    assert "weights_only" not in str(info.value)
    assert "\n" not in str(info.value)


def test_load_state_tuning_file_rejects_non_dict_and_unsafe_pickle(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "t.pth")
    with pytest.raises(ValueError, match="holds a Tensor, not a dict"):
        load_state_tuning_file(tmp_path / "t.pth", 2, 24, 8)
    torch.save({"blocks.0.att.time_state": object()}, tmp_path / "o.pth")  # weights_only refuses
    with pytest.raises(ValueError, match="holds Python objects other than tensors") as info:
        load_state_tuning_file(tmp_path / "o.pth", 1, 24, 8)
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
