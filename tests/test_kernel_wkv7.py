"""The Triton WKV-7 kernel against the torch reference, on real pools (strided slot views).

Without CUDA the kernel runs in Triton's CPU interpreter, so shapes are tiny."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are decorated

import copy
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from conftest import rel_err  # noqa: E402
from rwkvstate.model.packing import pack  # noqa: E402
from rwkvstate.ops.wkv7 import (  # noqa: E402
    stochastic_round_reference,
    wkv7,
    wkv7_chunked,
    wkv7_reference,
    wkv7_triton,
)
from rwkvstate.state.layout import StateLayout  # noqa: E402
from rwkvstate.state.pool import new_pool  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_LAYERS, LAYER, NUM_SLOTS = 3, 1, 6  # the middle layer, so the slot stride is not the layer size
BATCHES = {  # (slots, lengths): uneven with an empty sequence, decode, one long sequence
    "uneven": ([4, 1, 0, 2], [13, 0, 1, 7]),
    "decode": ([3, 0, 5], [1, 1, 1]),
    "long": ([2], [63]),
}
POOLS = {  # (layout, storage dtype)
    "contiguous-fp32": ("contiguous", torch.float32),
    "fragmented-fp32": ("fragmented", torch.float32),
    "contiguous-fp16": ("contiguous", torch.float16),
    "contiguous-bf16": ("contiguous", torch.bfloat16),
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_pool(kind: str, dtype, H: int, N: int, seed: int):
    """A pool whose every element (shift vectors, every layer, scratch slot) is random."""
    pool = new_pool(StateLayout(NUM_LAYERS, H * N, N), NUM_SLOTS, dtype, kind, DEVICE)
    for raw in storages(pool):
        raw.copy_(torch.randn(raw.shape, generator=_gen(seed)) * 0.5)
        seed += 1
    return pool


def storages(pool) -> list[torch.Tensor]:
    return [pool.data] if hasattr(pool, "data") else list(pool.tensors)


def make_batch(name: str, H: int, N: int, dtype, seed: int):
    """Packed batch and RWKV-7-like inputs r, w, k, v, a, b [T, H, N]."""
    slots, lengths = BATCHES[name]
    packed = pack(slots, [[1] * n for n in lengths], 2, DEVICE)
    T, g = packed.num_tokens, _gen(seed)
    r, k, v = (torch.randn(T, H, N, generator=g) for _ in range(3))
    w = 0.55 + 0.45 * torch.rand(T, H, N, generator=g)
    kk = torch.nn.functional.normalize(torch.randn(T, H, N, generator=g), dim=-1)
    a, b = -kk, kk * torch.rand(T, H, N, generator=g)
    inputs = [t.to(DEVICE, dtype) for t in (r, k, v, a, b)]
    return packed, (inputs[0], w.to(DEVICE), *inputs[1:])  # w stays float32, as the model passes it


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Half-precision values as integers that count ulps (sign-magnitude -> two's complement)."""
    bits = x.view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def touched_mask(pool, slots) -> list[torch.Tensor]:
    """True exactly where the op may write: layer LAYER's wkv of the given slots."""
    lay = pool.layout
    mask = new_pool(lay, pool.num_slots, torch.float32, pool.layout_name, DEVICE)
    mask.layer(LAYER)[1][slots] = 1
    return [m != 0 for m in storages(mask)]


def _cases():
    """Every pool x batch once; H, N and the compute dtype alternate so each value meets each pool."""
    cases = []
    for i, (pool, batch) in enumerate((p, b) for p in POOLS for b in BATCHES):
        H, N, dtype = (1, 3)[i % 2], (16, 64)[(i // 2) % 2], (torch.float32, torch.bfloat16)[(i // 3) % 2]
        cases.append(pytest.param(pool, batch, H, N, dtype, id=f"{pool}-{batch}-H{H}-N{N}-{str(dtype)[6:]}"))
    return cases


@pytest.mark.parametrize("kernel", ["step", "prompt"])
@pytest.mark.parametrize("pool_name, batch, H, N, dtype", _cases())
def test_kernel_matches_reference(pool_name, batch, H, N, dtype, kernel):
    kind, storage = POOLS[pool_name]
    pool = make_pool(kind, storage, H, N, seed=7)
    before = [t.clone() for t in storages(pool)]
    ref_pool = copy.deepcopy(pool)
    packed, inputs = make_batch(batch, H, N, dtype, seed=11)
    y = torch.full(inputs[0].shape, float("nan"), device=DEVICE)

    assert wkv7_triton(pool.layer(LAYER)[1], packed, *inputs, out=y, kernel=kernel) is y
    y_ref = wkv7_reference(ref_pool.layer(LAYER)[1], packed, *inputs)

    assert not y.isnan().any(), "some outputs were never written"
    assert rel_err(y, y_ref) <= 1e-5
    live = packed.live_slots
    state, state_ref = pool.layer(LAYER)[1][live], ref_pool.layer(LAYER)[1][live]
    if storage == torch.float32:
        assert rel_err(state, state_ref) <= 1e-5
    else:  # the reference rounds its float32 state once; the kernel's float32 state may differ in the last bit
        assert (ordered_bits(state) - ordered_bits(state_ref)).abs().max() <= 1
    for raw, old, mask in zip(storages(pool), before, touched_mask(pool, live)):
        assert torch.equal(raw[~mask].view(torch.uint8), old[~mask].view(torch.uint8))  # guard band: bit-unchanged


@pytest.mark.parametrize("kernel", ["step", "prompt"])
@pytest.mark.parametrize("N", [32, 128])
def test_other_head_sizes(N, kernel):
    pool = make_pool("contiguous", torch.float32, 1, N, seed=3)
    ref_pool = copy.deepcopy(pool)
    packed, inputs = make_batch("decode" if kernel == "step" else "uneven", 1, N, torch.float32, seed=4)
    y = wkv7_triton(pool.layer(LAYER)[1], packed, *inputs, kernel=kernel)
    y_ref = wkv7_reference(ref_pool.layer(LAYER)[1], packed, *inputs)
    assert rel_err(y, y_ref) <= 1e-5
    assert rel_err(pool.data, ref_pool.data) <= 1e-5


def test_block_v_split_and_num_warps_do_not_change_results():
    packed, inputs = make_batch("uneven", 1, 64, torch.float32, seed=5)
    results = []
    for block_v, num_warps in ((64, 2), (16, 4), (8, 1)):
        pool = make_pool("contiguous", torch.float32, 1, 64, seed=6)
        y = wkv7_triton(pool.layer(LAYER)[1], packed, *inputs, block_v=block_v, num_warps=num_warps)
        results.append((y, pool.data))
    for y, data in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(data, results[0][1])


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_one_token_form_equals_the_loop_form(rounding):
    """For decode batches the step kernel runs without its token loop (nothing loaded ahead): the
    same operations, so the same bits as the loop form, y and the stored fp16 state alike."""
    packed, inputs = make_batch("decode", 2, 64, torch.float16, seed=12)
    assert packed.is_decode
    results = []
    for one_token in (True, False):
        pool = make_pool("contiguous", torch.float16, 2, 64, seed=13)
        y = wkv7_triton(pool.layer(LAYER)[1], packed, *inputs, rounding=rounding, seed=99, one_token=one_token)
        results.append((y, pool.data))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_prompt_kernel_row_blocks_agree_with_the_step_kernel():
    """Every BLOCK_V of the prompt kernel picks its own rows of v out of the head's row: a block
    that took another block's values would differ from the step kernel."""
    packed, inputs = make_batch("uneven", 2, 64, torch.float32, seed=5)
    pool = make_pool("contiguous", torch.float32, 2, 64, seed=6)
    y_step = wkv7_triton(pool.layer(LAYER)[1], packed, *inputs, kernel="step")
    for block_v in (4, 16, 64):
        other = make_pool("contiguous", torch.float32, 2, 64, seed=6)
        y = wkv7_triton(other.layer(LAYER)[1], packed, *inputs, kernel="prompt", block_v=block_v)
        assert rel_err(y, y_step) <= 1e-6 and rel_err(other.data, pool.data) <= 1e-6, block_v


def test_default_kernel_is_step_for_decode_and_prompt_otherwise(monkeypatch):
    import rwkvstate.ops.wkv7 as mod

    launched = []
    for name in ("_wkv7_kernel", "_wkv7_prompt_kernel"):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, _Recorder(real, name, launched))
    for batch in ("decode", "uneven"):
        packed, inputs = make_batch(batch, 1, 16, torch.float32, seed=1)
        pool = make_pool("contiguous", torch.float32, 1, 16, seed=2)
        wkv7_triton(pool.layer(LAYER)[1], packed, *inputs)
    assert launched == ["_wkv7_kernel", "_wkv7_prompt_kernel"]
    with pytest.raises(ValueError, match="kernel must be one of"):
        wkv7_triton(pool.layer(LAYER)[1], packed, *inputs, kernel="chunked")


class _Recorder:
    """Stands in for a Triton kernel: records its name at launch, then launches it."""

    def __init__(self, kernel, name, launched):
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]


def test_empty_inputs_and_bad_arguments():
    pool = make_pool("contiguous", torch.float32, 1, 16, seed=1)
    before = pool.data.clone()
    state = pool.layer(LAYER)[1]
    packed = pack([0, 1], [[], []], 2, DEVICE)
    empty = [torch.empty(0, 1, 16, device=DEVICE) for _ in range(6)]
    for backend in ("torch", "triton"):
        assert wkv7(state, packed, *empty, backend=backend).shape == (0, 1, 16)
    assert torch.equal(pool.data, before)
    with pytest.raises(ValueError, match="backend"):
        wkv7(state, packed, *empty, backend="cuda")
    with pytest.raises(ValueError, match="rounding"):
        wkv7(state, packed, *empty, backend="triton", rounding="up")
    odd = make_pool("contiguous", torch.float32, 1, 24, seed=1)
    with pytest.raises(ValueError, match="head sizes"):
        wkv7_triton(odd.layer(LAYER)[1], packed, *[torch.empty(0, 1, 24, device=DEVICE)] * 6)


def test_public_function_picks_a_backend():
    pool = make_pool("contiguous", torch.float32, 3, 16, seed=2)
    pools = [copy.deepcopy(pool) for _ in range(3)]
    packed, inputs = make_batch("uneven", 3, 16, torch.float32, seed=3)
    ys = [wkv7(p.layer(LAYER)[1], packed, *inputs, backend=be) for p, be in zip(pools, (None, "torch", "triton"))]
    default_is_triton = DEVICE == "cuda"
    assert torch.equal(ys[0], ys[2] if default_is_triton else ys[1])
    assert rel_err(ys[2], ys[1]) <= 1e-5


# ---- rounding of the stored state --------------------------------------------------------------
def identity_update(H: int, N: int, v: torch.Tensor):
    """One decode step with w = 1, a = b = 0, k = 1: S_new = S + v[:, None] exactly as torch adds it."""
    packed = pack([2], [[1]], 2, DEVICE)
    ones, zeros = torch.ones(1, H, N, device=DEVICE), torch.zeros(1, H, N, device=DEVICE)
    return packed, (zeros, ones, ones, v.view(1, H, N).to(DEVICE), zeros, zeros)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nearest_store_equals_torch_cast(dtype):
    N = 16
    pool = make_pool("contiguous", dtype, 1, N, seed=9)
    state = pool.layer(LAYER)[1]
    old = state[2].float().clone()  # [1, N, N], representable in dtype
    ulp = torch.finfo(dtype).eps * old.abs().amax(-1)  # per-row offsets around half an ulp of the largest entry
    v = torch.cat([ulp[0, : N // 2].cpu() / 2, torch.randn(N // 2, generator=_gen(1)) * 1e-2])  # ties and random
    packed, inputs = identity_update(1, N, v)
    wkv7_triton(state, packed, *inputs)
    expected = (old + inputs[3].view(1, N, 1).float()).to(dtype)
    assert torch.equal(state[2].view(torch.int16), expected.view(torch.int16))


def _neighbours(x: torch.Tensor, dtype):
    """The two values of dtype around float32 x (equal when x is representable)."""
    lo = x.to(dtype)
    lo = torch.where(lo.float().abs() > x.abs(), (lo.view(torch.int16) - 1).view(dtype), lo)
    bump = (lo.float().abs() < x.abs()).to(torch.int16)
    hi = (lo.view(torch.int16) + bump).view(dtype)
    return lo.float(), hi.float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_round_reference_is_unbiased(dtype):
    g = _gen(0)
    x = torch.cat([
        torch.randn(200, generator=g) * 10,
        torch.randn(40, generator=g) * 1e-6,  # fp16 subnormals
        torch.tensor([1.0, -2.5, 0.0, 3.0e-8]),
    ])  # fmt: skip
    draws = 4000
    u = torch.rand(draws, x.numel(), generator=g)
    out = stochastic_round_reference(x.expand(draws, -1), dtype, u)
    lo, hi = _neighbours(x, dtype)
    assert ((out.float() == lo) | (out.float() == hi)).all()
    assert torch.equal(stochastic_round_reference(lo, dtype, u[0]).float(), lo)  # representable: unchanged
    rounds = hi != lo  # elsewhere x is representable and every draw equals it
    err = ((out.double().mean(0) - x) / (hi - lo))[rounds]  # in ulps; each mean has std <= 0.5 / sqrt(draws)
    assert err.abs().max() < 5 * 0.5 / draws**0.5
    assert err.mean().abs() < 5 * 0.5 / (draws * err.numel()) ** 0.5
    assert (out.float() == x)[:, ~rounds].all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_stochastic_store_is_unbiased(dtype):
    N, num_seeds = 16, 48
    pool = make_pool("contiguous", dtype, 1, N, seed=9)
    state = pool.layer(LAYER)[1]
    old = state[2].clone()
    v = torch.rand(N, generator=_gen(2)) * torch.finfo(dtype).eps * 2  # a fraction of an ulp for |S| ~ 1
    packed, inputs = identity_update(1, N, v)
    target = old.float() + inputs[3].view(1, N, 1).float()
    lo, hi = _neighbours(target, dtype)
    outs = []
    for seed in range(num_seeds):
        state[2] = old
        wkv7_triton(state, packed, *inputs, rounding="stochastic", seed=seed)
        outs.append(state[2].float().clone())
    outs = torch.stack(outs)
    assert ((outs == lo) | (outs == hi)).all()
    assert not torch.equal(outs[0], outs[1])  # the seed changes the noise
    err = ((outs.double().mean(0) - target) / (hi - lo))[hi != lo]  # in ulps, where rounding happens
    assert err.mean().abs() < 5 * 0.5 / (num_seeds * err.numel()) ** 0.5
    assert err.abs().max() < 0.5  # no element is stuck at the nearest value
    state[2] = old
    wkv7_triton(state, packed, *inputs, rounding="stochastic", seed=num_seeds - 1)
    assert torch.equal(state[2].float(), outs[-1])  # same seed, same result
    # 1 + half an ulp everywhere: one call must round about half the elements up (independent noise)
    state[2] = 1.0
    packed, inputs = identity_update(1, N, torch.full((N,), torch.finfo(dtype).eps / 2))
    wkv7_triton(state, packed, *inputs, rounding="stochastic", seed=5)
    assert 0.35 < (state[2] > 1).float().mean() < 0.65


def test_torch_backend_stochastic_rounding_stays_within_one_ulp():
    pool = make_pool("contiguous", torch.bfloat16, 3, 16, seed=5)
    ref_pool = copy.deepcopy(pool)
    packed, inputs = make_batch("uneven", 3, 16, torch.float32, seed=6)
    y = wkv7(pool.layer(LAYER)[1], packed, *inputs, backend="torch", rounding="stochastic", seed=3)
    y_ref = wkv7_reference(ref_pool.layer(LAYER)[1], packed, *inputs)
    assert torch.equal(y, y_ref)
    diff = ordered_bits(pool.data) - ordered_bits(ref_pool.data)
    assert diff.abs().max() == 1  # some elements rounded the other way, none further


def test_module_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from rwkvstate.ops import wkv7 as m\n"
        "from rwkvstate.model.packing import pack\n"
        "assert not m.HAS_TRITON\n"
        "p = pack([0], [[1, 1]], 2, 'cpu'); s = torch.zeros(1, 1, 16, 16); x = torch.ones(2, 1, 16)\n"
        "assert m.wkv7(s, p, x, x * 0.9, x, x, -x / 4, x / 4).shape == (2, 1, 16)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ---- the chunked-parallel kernel -------------------------------------------------------------------
DECAYS = {  # (low, high) of the uniform decay w: the model's range, strong decays, almost none
    "model": (0.545, 1.0),
    "near-0": (1e-4, 1e-2),
    "near-1": (0.999, 1.0),
}
CHUNK_BATCHES = {  # lengths 1, 13, 63, 200: empty, shorter than a chunk, odd chunk tails
    "mixed": ([4, 1, 0, 2], [13, 1, 0, 63]),
    "long": ([3], [200]),
}


def chunk_batch(name: str, H: int, N: int, decay: str, seed: int):
    """make_batch's inputs for CHUNK_BATCHES with the decay drawn from DECAYS[decay]."""
    slots, lengths = CHUNK_BATCHES[name]
    packed = pack(slots, [[1] * n for n in lengths], 2, DEVICE)
    T, g = packed.num_tokens, _gen(seed)
    r, k, v = (torch.randn(T, H, N, generator=g) for _ in range(3))
    low, high = DECAYS[decay]
    w = low + (high - low) * torch.rand(T, H, N, generator=g)
    kk = torch.nn.functional.normalize(torch.randn(T, H, N, generator=g), dim=-1)
    a, b = -kk, kk * torch.rand(T, H, N, generator=g)
    return packed, [t.to(DEVICE) for t in (r, w, k, v, a, b)]


@pytest.mark.parametrize(
    "batch, decay, chunk, H, N",
    [("mixed", "model", 16, 3, 16), ("mixed", "near-0", 32, 1, 32), ("mixed", "near-1", 16, 2, 16),
     ("long", "model", 32, 1, 16), ("long", "near-0", 16, 1, 16), ("long", "near-1", 16, 1, 32)],
)  # fmt: skip
def test_chunked_matches_reference(batch, decay, chunk, H, N):
    pool = make_pool("contiguous", torch.float32, H, N, seed=21)
    before = pool.data.clone()
    ref_pool = copy.deepcopy(pool)
    packed, inputs = chunk_batch(batch, H, N, decay, seed=22)
    y = torch.full(inputs[0].shape, float("nan"), device=DEVICE)

    assert wkv7_chunked(pool.layer(LAYER)[1], packed, *inputs, out=y, chunk=chunk) is y
    y_ref = wkv7_reference(ref_pool.layer(LAYER)[1], packed, *inputs)

    assert not y.isnan().any(), "some outputs were never written"
    assert rel_err(y, y_ref) <= 1e-5
    live = packed.live_slots
    assert rel_err(pool.layer(LAYER)[1][live], ref_pool.layer(LAYER)[1][live]) <= 1e-5
    mask = touched_mask(pool, live)[0]
    assert torch.equal(pool.data[~mask].view(torch.int32), before[~mask].view(torch.int32))  # guard band


@pytest.mark.parametrize("kind, storage", [("fragmented", torch.float32), ("contiguous", torch.bfloat16)])
def test_chunked_on_other_pools_and_input_dtypes(kind, storage):
    pool = make_pool(kind, storage, 2, 16, seed=23)
    ref_pool = copy.deepcopy(pool)
    packed, inputs = make_batch("uneven", 2, 16, torch.bfloat16, seed=24)  # bf16 inputs, float32 w
    y = wkv7_chunked(pool.layer(LAYER)[1], packed, *inputs)
    y_ref = wkv7_reference(ref_pool.layer(LAYER)[1], packed, *inputs)
    assert rel_err(y, y_ref) <= 1e-5
    live = packed.live_slots
    state, state_ref = pool.layer(LAYER)[1][live], ref_pool.layer(LAYER)[1][live]
    if storage == torch.float32:
        assert rel_err(state, state_ref) <= 1e-5
    else:
        assert (ordered_bits(state) - ordered_bits(state_ref)).abs().max() <= 1


def test_chunked_block_v_split_agrees():
    packed, inputs = chunk_batch("mixed", 1, 32, "model", seed=25)
    results = []
    for block_v in (32, 16):
        pool = make_pool("contiguous", torch.float32, 1, 32, seed=26)
        results.append((wkv7_chunked(pool.layer(LAYER)[1], packed, *inputs, block_v=block_v), pool.data))
    (y0, s0), (y1, s1) = results
    assert rel_err(y1, y0) <= 1e-6 and rel_err(s1, s0) <= 1e-6


def test_chunked_stochastic_store_stays_within_one_ulp():
    pool = make_pool("contiguous", torch.float16, 1, 16, seed=27)
    ref_pool = copy.deepcopy(pool)
    packed, inputs = make_batch("uneven", 1, 16, torch.float32, seed=28)
    y = wkv7_chunked(pool.layer(LAYER)[1], packed, *inputs, rounding="stochastic", seed=1)
    wkv7_reference(ref_pool.layer(LAYER)[1], packed, *inputs)
    diff = (ordered_bits(pool.data) - ordered_bits(ref_pool.data)).abs()
    assert diff.max() == 1 and not y.isnan().any()


def test_chunked_bad_arguments_change_nothing():
    pool = make_pool("contiguous", torch.float32, 1, 16, seed=1)
    before = pool.data.clone()
    packed, inputs = make_batch("uneven", 1, 16, torch.float32, seed=2)
    for kwargs, match in (({"chunk": 24}, "chunk"), ({"block_v": 8}, "block_v"), ({"rounding": "up"}, "rounding")):
        with pytest.raises(ValueError, match=match):
            wkv7_chunked(pool.layer(LAYER)[1], packed, *inputs, **kwargs)
    assert torch.equal(pool.data, before)


def test_default_backend_never_picks_the_chunked_kernel(monkeypatch):
    """With Triton chosen (CUDA), None takes the token-by-token kernel however long the prompt
    (the chunked one is slower, ops/README.md); "triton-chunked" is taken only when asked for."""
    from rwkvstate.ops import wkv7 as mod

    calls = []
    for name in ("triton", "triton-chunked"):
        monkeypatch.setitem(mod._BACKENDS, name, lambda *args, _n=name, **kw: calls.append(_n))
    monkeypatch.setattr(mod, "pick_backend", lambda backend, t, allowed: backend or "triton")
    state = torch.zeros(1, 1, 16, 16)
    for length, backend in ((1, None), (63, None), (64, None), (4096, None), (500, "triton-chunked")):
        packed = pack([0], [[1] * length], 2, "cpu")
        x = torch.zeros(length, 1, 16)
        wkv7(state, packed, x, x, x, x, x, x, backend=backend)
    assert calls == ["triton"] * 4 + ["triton-chunked"]
