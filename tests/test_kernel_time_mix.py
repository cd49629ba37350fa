"""The fused time-mix prologue and epilogue kernels against their torch references, and the model
with every Triton kernel against the all-torch model (interpreted on CPU, tiny shapes)."""

import pytest
import torch

pytest.importorskip("triton")

# tests/conftest.py sets TRITON_INTERPRET=1 before rwkvstate is imported when there is no GPU
from conftest import poison_empty, random_tokens, rel_err  # noqa: E402
from rwkvstate import Model  # noqa: E402
from rwkvstate.model.synthetic import random_checkpoint, tiny_config  # noqa: E402
from rwkvstate.ops import lora as lo  # noqa: E402
from rwkvstate.ops import time_mix as tm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 1, 16), (7, 3, 16), (1, 3, 64), (7, 1, 64)]  # (T, H, N)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _tol(dtype):
    """fp32: float32 rounding; bf16: one rounding of the output (both sides round to nearest, but
    float32 intermediates that differ in the last bit can round to neighbouring bf16 values)."""
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)


class _Draw:
    def __init__(self, seed, dtype):
        self.gen, self.dtype = torch.Generator().manual_seed(seed), dtype

    def normal(self, *shape, scale=1.0, dtype=None):
        return (torch.randn(shape, generator=self.gen) * scale).to(DEVICE, dtype or self.dtype)

    def uniform(self, lo, hi, *shape):
        return (torch.rand(shape, generator=self.gen) * (hi - lo) + lo).to(DEVICE, self.dtype)


def _prologue_args(T, H, N, dtype, layer0, seed):
    """RWKV-7-like ranges: the parameter vectors as random_checkpoint draws them, LoRA outputs of
    order one, k and v a bit larger."""
    d, C = _Draw(seed, dtype), H * N
    k, v, v_first = d.normal(T, C, scale=2.0), d.normal(T, C, scale=2.0), d.normal(T, C, scale=2.0)
    w_lora, a_lora, v_lora = d.normal(T, C), d.normal(T, C), d.normal(T, C)
    w0, a0, v0 = d.uniform(-3, 2, C), d.uniform(-1, 1, C), d.uniform(-1, 1, C)
    k_k, k_a = d.uniform(0.5, 1.5, C), d.uniform(0, 1, C)
    if layer0:
        v_lora = v_first = v0 = None
    return (k, v, w_lora, a_lora, v_lora, v_first, w0, a0, v0, k_k, k_a, H, N)


def _epilogue_args(T, H, N, dtype, seed):
    d, C = _Draw(seed, dtype), H * N
    y = d.normal(T, C, scale=3.0, dtype=torch.float32) + d.normal(1, C, dtype=torch.float32)
    r, k2, v2, g = (d.normal(T, C) for _ in range(4))
    r_k, ln_w, ln_b = d.normal(H, N, scale=0.3), d.uniform(0.7, 1.3, C), d.uniform(-0.1, 0.1, C)
    return (y, r, k2, v2, g, r_k, ln_w, ln_b, H, N)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty inside the ops returns NaN-filled memory, so unwritten outputs show."""
    poison_empty(monkeypatch, tm)


@pytest.mark.parametrize("layer0", [True, False], ids=["layer0", "layer1"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("T,H,N", SHAPES)
def test_prologue_matches_reference(T, H, N, dtype, layer0, poisoned_empty):
    args = _prologue_args(T, H, N, dtype, layer0, seed=T * 100 + H * 10 + N)
    want = tm.time_mix_prologue(*args, backend="torch")
    got = tm.time_mix_prologue(*args, backend="triton")
    for name, g, w in zip(("decay", "k2", "v2", "a_in", "b_in"), got, want):
        assert g.dtype == w.dtype == (torch.float32 if name == "decay" else dtype), name
        assert not g.isnan().any(), f"{name}: elements left unwritten"
        torch.testing.assert_close(g, w, **_tol(dtype), msg=name)
    if layer0:
        assert got[2] is args[1], "layer 0 passes v through"
    assert 0.545 < got[0].min() and got[0].max() < 1


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("T,H,N", SHAPES)
def test_epilogue_matches_reference(T, H, N, dtype, poisoned_empty):
    args = _epilogue_args(T, H, N, dtype, seed=T * 100 + H * 10 + N + 1)
    want = tm.time_mix_epilogue(*args, backend="torch")
    got = tm.time_mix_epilogue(*args, backend="triton")
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert not got.isnan().any(), "elements left unwritten"
    torch.testing.assert_close(got, want, **_tol(dtype))


def test_epilogue_bf16_rounds_once():
    """In bf16 the one reference and the fused op both do float32 math and round once, so each is
    within one bf16 rounding of the float32 result (and of each other)."""
    args = _epilogue_args(7, 3, 64, torch.bfloat16, seed=5)
    exact = tm.time_mix_epilogue_reference(args[0], *(t.float() for t in args[1:8]), *args[8:])
    fused = tm.time_mix_epilogue(*args, backend="triton")
    reference = tm.time_mix_epilogue(*args, backend="torch")
    assert rel_err(fused, exact) < 4e-3 and rel_err(reference, exact) < 4e-3  # one bf16 rounding
    assert rel_err(fused, reference) < 4e-3


def test_rejects_bad_shapes():
    args = list(_prologue_args(2, 2, 12, torch.float32, False, seed=0))
    with pytest.raises(ValueError, match="power-of-two"):
        tm.time_mix_prologue(*args, backend="triton")
    args = list(_prologue_args(2, 2, 16, torch.float32, False, seed=0))
    args[5] = None  # v_first missing in a later layer
    with pytest.raises(ValueError, match="all given"):
        tm.time_mix_prologue(*args, backend="triton")
    y, *rest = _epilogue_args(2, 2, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"must be \[T, 32\]"):
        tm.time_mix_epilogue(y[:, :16], *rest, backend="triton")


# ---- end to end --------------------------------------------------------------------------------
CFG = tiny_config(n_layer=3, n_embd=48, head_size=16, vocab_size=61, ffn_dim=96, decay_rank=4, aaa_rank=4,
                  mv_rank=4, gate_rank=8)  # fmt: skip
TRITON = {"token_shift": "triton", "wkv": "triton", "time_mix": "triton", "channel_mix": "triton", "lora": "triton",
          "norm_shift": "triton"}
TORCH = {"token_shift": "torch", "wkv": "torch", "time_mix": "torch", "channel_mix": "torch", "lora": "torch",
         "norm_shift": "torch"}


def test_model_with_fused_time_and_channel_mix_matches_torch():
    tensors = random_checkpoint(CFG, seed=33)
    seqs = [random_tokens(n, CFG.vocab_size, seed=10 + n) for n in (4, 0, 1, 6)]
    slots = [2, 0, 3, 1]
    outs = []
    for backends in (TORCH, TRITON):
        model = Model.from_tensors(tensors, CFG, device=DEVICE)
        model.backends.update(backends)
        pool = model.new_pool(4)
        prefill = model.forward(pool, slots, seqs, output="all")
        decode = model.forward(pool, [3, 1, 2], [[5], [6], [7]])
        outs.append((torch.cat(prefill), decode, [pool.export(s) for s in range(4)]))
    (a1, a2, sa), (b1, b2, sb) = outs
    assert rel_err(b1, a1) <= 1e-5 and rel_err(b2, a2) <= 1e-5
    for x, y in zip(sa, sb):
        for key in x:
            assert rel_err(y[key], x[key]) <= 1e-5 or not x[key].any(), key


def test_time_mix_backend_defaults_to_torch_off_cuda():
    model = Model.from_tensors(random_checkpoint(CFG, seed=1), CFG, device="cpu")
    assert model.backends["time_mix"] is None
    model.backends["time_mix"] = "bogus"
    with pytest.raises(ValueError, match="unknown backend"):
        model.forward(model.new_pool(1), [0], [[1]])


def _decode_args(B, H, N, dtype, layer0, seed, state_dtype):
    """A decode batch of B sequences over a pool of B + 2 slots (in shuffled slot order), the
    time mix's inputs for it, and a state with entries of order 0.1."""
    from rwkvstate.model.packing import pack_decode

    d, C = _Draw(seed, dtype), H * N
    k, v, w_lora, a_lora, v_lora, v_first, w0, a0, v0, k_k, k_a, _, _ = _prologue_args(B, H, N, dtype, layer0, seed)
    r, g = d.normal(B, C), d.normal(B, C)
    r_k, ln_w, ln_b = d.normal(H, N, scale=0.3), d.uniform(0.7, 1.3, C), d.uniform(-0.1, 0.1, C)
    gen = torch.Generator().manual_seed(seed + 1)
    state = (torch.randn(B + 2, H, N, N, generator=gen) * 0.1).to(DEVICE, state_dtype)
    slots = torch.randperm(B + 2, generator=gen)[:B].to(DEVICE)
    packed = pack_decode(slots, torch.zeros(B, dtype=torch.long, device=DEVICE))
    args = (r, w_lora, k, v, a_lora, g, v_lora, v_first, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b, H, N)
    return state, packed, args


def _three_kernels(state, packed, r, w_lora, k, v, a_lora, g, v_lora, v_first, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b,
                   H, N, rounding="nearest", seed=0):  # fmt: skip
    """The unfused Triton path: prologue, the WKV-7 step kernel, epilogue."""
    from rwkvstate.ops.wkv7 import wkv7

    decay, k2, v2, a_in, b_in = tm.time_mix_prologue(k, v, w_lora, a_lora, v_lora, v_first, w0, a0, v0, k_k, k_a, H, N,
                                                     backend="triton")  # fmt: skip
    T = r.shape[0]
    heads = [t.reshape(T, H, N) for t in (r, decay, k2, v2, a_in, b_in)]
    y = wkv7(state, packed, *heads, backend="triton-step", rounding=rounding, seed=seed).reshape(T, H * N)
    return tm.time_mix_epilogue(y, r, k2, v2, g, r_k, ln_w, ln_b, H, N, backend="triton")


@pytest.mark.parametrize("B,H,N", [(1, 1, 16), (3, 2, 16), (2, 2, 64), (5, 1, 32)])
@pytest.mark.parametrize("layer0", [True, False], ids=["layer0", "later"])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32)], ids=["fp32", "bf16", "fp16-f32state"])
def test_fused_decode_time_mix_matches_three_kernels(B, H, N, layer0, dtype, state_dtype, poisoned_empty):
    """One launch for prologue + WKV-7 + epilogue of a decode batch: the same output and state as the
    three kernels (their roundings, sums in another order) and as the torch reference."""
    state, packed, args = _decode_args(B, H, N, dtype, layer0, seed=B * 100 + N + layer0, state_dtype=state_dtype)
    want_state, ref_state = state.clone(), state.clone()
    got = tm.time_mix_decode_triton(state, packed, *args)
    want = _three_kernels(want_state, packed, *args)
    ref = tm.time_mix_decode_reference(ref_state, packed, *args)
    assert got.dtype == dtype and got.shape == want.shape and not got.isnan().any()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(state, want_state, **tol)
    torch.testing.assert_close(state, ref_state, **tol)
    untouched = torch.ones(state.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[packed.live_slots] = False
    assert torch.equal(state[untouched], want_state[untouched])  # other slots are not written


@pytest.mark.parametrize("num_warps", [1, 2, 4, 8])
def test_fused_decode_time_mix_any_warps(num_warps):
    """The one-launch kernel at any number of warps (the default picks by head size, decode_warps)
    gives the three kernels' output and state within rounding."""
    state, packed, args = _decode_args(3, 2, 64, torch.float16, False, seed=77, state_dtype=torch.float16)
    want_state = state.clone()
    got = tm.time_mix_decode_triton(state, packed, *args, num_warps=num_warps)
    want = _three_kernels(want_state, packed, *args)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(state, want_state, rtol=2e-2, atol=2e-2)
    assert tm.decode_warps(64) == 2 and tm.decode_warps(32) == 4 and tm.decode_warps(128) == 8


def test_fused_decode_time_mix_stochastic_rounding_and_errors():
    """Stochastic rounding of an fp16 state draws the same noise as the WKV-7 kernel (per slot,
    seed, head and element); bad calls are refused."""
    state, packed, args = _decode_args(2, 2, 16, torch.float32, False, seed=5, state_dtype=torch.float16)
    want_state = state.clone()
    tm.time_mix_decode_triton(state, packed, *args, rounding="stochastic", seed=123)
    _three_kernels(want_state, packed, *args, rounding="stochastic", seed=123)
    diff = (state.float() - want_state.float()).abs()
    assert (diff > 0).float().mean() < 0.01  # the same noise: equal but where the sums' order flips a bit
    with pytest.raises(ValueError, match="rounding must be one of"):
        tm.time_mix_decode_triton(state, packed, *args, rounding="up")
    from rwkvstate.model.packing import pack

    prompt = pack([0], [[1, 2]], 10, DEVICE)
    with pytest.raises(ValueError, match="decode batches"):
        tm.time_mix_decode_triton(state, prompt, *args)
    bad = list(args)
    bad[7] = None  # v_first missing in a later layer
    with pytest.raises(ValueError, match="all given"):
        tm.time_mix_decode_triton(state, packed, *bad)


def _decode_both_ways(seed: int, backends: list[dict], patched: str, real) -> None:
    """Prompts into slots 1-3 of a 4-slot pool, then two decode steps, once per backends dict;
    asserts that `patched` (a name in rwkv7, wrapping `real`) ran for every layer of both steps of
    the second way, and that logits and states agree within float32 rounding."""
    tensors = random_checkpoint(CFG, seed=seed)
    seqs = [random_tokens(n, CFG.vocab_size, seed=seed + n) for n in (3, 5, 1)]
    calls, outs = [], []
    for i, backend in enumerate(backends):
        model = Model.from_tensors(tensors, CFG, device=DEVICE)
        model.backends.update({**TRITON, **backend})
        pool = model.new_pool(4)
        model.forward(pool, [1, 2, 3], seqs)
        slots = torch.tensor([3, 1, 2], device=DEVICE)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(f"rwkvstate.model.rwkv7.{patched}", lambda *a, **k: (i and calls.append(1)) or real(*a, **k))
            steps = [model.decode_step(pool, slots, torch.tensor([4 + s, 7, 9 - s], device=DEVICE)) for s in range(2)]
        outs.append((torch.stack(steps), [pool.export(s) for s in range(4)]))
    assert len(calls) == 2 * CFG.n_layer  # the path ran for every layer of both decode steps
    (a, sa), (b, sb) = outs
    assert rel_err(b, a) <= 1e-5
    for x, y in zip(sa, sb):
        for key in x:
            assert rel_err(y[key], x[key]) <= 1e-5 or not x[key].any(), key


def test_model_with_the_fused_decode_time_mix_matches_three_kernels():
    """backends["time_mix"] = "triton-fused": decode steps take the one-launch kernel, prompts the
    three kernels; logits and states as with "triton" within float32 rounding."""
    from rwkvstate.model.rwkv7 import FUSED_TIME_MIX

    _decode_both_ways(34, [{"time_mix": "triton"}, {"time_mix": FUSED_TIME_MIX}], "time_mix_decode_triton",
                      tm.time_mix_decode_triton)  # fmt: skip


def test_model_with_the_lora_downs_in_the_projection_launch():
    """backends["lora"] = "fused": decode steps on the GEMV path compute the LoRA downs in the r/k/v
    launch and the ups in their own; prompts, which take neither kernel, fall back. Logits and
    states as with the two LoRA kernels."""
    from rwkvstate.model.rwkv7 import FUSED_TIME_MIX

    common = {"time_mix": FUSED_TIME_MIX, "gemv": "triton"}
    _decode_both_ways(35, [{**common, "lora": "triton"}, {**common, "lora": "fused"}], "lora_down_with_projection",
                      lo.lora_down_with_projection)  # fmt: skip


def test_lora_backend_choice(monkeypatch):
    """Model._lora_backend: None becomes "fused" on CUDA for a batch of one row whose r/k/v take the
    GEMV kernel, at C <= FUSED_LORA_MAX_C, and "triton" for other decode batches (any number of
    rows) but not for prompts; "fused" falls back to None off the GEMV path."""
    from rwkvstate.model import rwkv7
    from rwkvstate.model.packing import pack, pack_decode

    model = Model.from_tensors(random_checkpoint(CFG, seed=36), CFG, device=DEVICE)

    def decode(rows):
        return pack_decode(torch.arange(rows, device=DEVICE), torch.zeros(rows, dtype=torch.long, device=DEVICE))

    one, eight, wide = decode(1), decode(rwkv7.GEMV_ROWS), decode(17)
    prompt = pack([0], [[1, 2, 3]], CFG.vocab_size, DEVICE)
    monkeypatch.setattr(model, "_kernels", lambda: True)  # as on CUDA
    assert model._lora_backend(one, "triton") == "fused"
    assert model._lora_backend(eight, "triton") == "triton"  # two rows and more: the two kernels
    assert model._lora_backend(wide, "bmm") == "triton"  # beyond 16 rows: the many-rows kernels
    assert model._lora_backend(prompt, "bmm") is None  # prompts: lora's own choice
    assert model._lora_backend(one, "bmm") == "triton"  # r/k/v not on the GEMV kernel: not fused
    monkeypatch.setattr(rwkv7, "FUSED_LORA_MAX_C", CFG.n_embd - 1)
    assert model._lora_backend(one, "triton") is None  # wider models: r/k/v long enough to hide the chains
    model.backends["lora"] = "fused"
    assert model._lora_backend(eight, "triton") == "fused" and model._lora_backend(prompt, "bmm") is None
    model.backends["lora"] = "triton"
    assert model._lora_backend(one, "triton") == "triton" and model._lora_backend(wide, "bmm") == "triton"
    monkeypatch.setattr(model, "_kernels", lambda: False)  # the CPU: None stays None
    model.backends["lora"] = None
    assert model._lora_backend(one, "triton") is None
