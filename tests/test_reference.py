"""The PyTorch reference forward against the official rwkv package, and against itself:
token-by-token vs whole sequence, packed vs alone, fragmented vs contiguous pools,
and the documented error bounds of fp16/bf16 state storage."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import SHAPES, rel_err, random_tokens
from rwkvstate import Model
from rwkvstate.state.convert import from_rwkv_list, to_rwkv_list
from rwkvstate.state.layout import StateLayout
from rwkvstate.state.pool import new_pool

NUM_TOKENS = 64
OFFICIAL_TOL = 1e-5

# Measured bounds (see docs/numerics.md): relative RMS error of the last-token
# logits after 64 tokens of random-weight models, state stored in fp16 / bf16.
STATE_DTYPE_BOUNDS = {torch.float16: 2e-4, torch.bfloat16: 1e-3}


@pytest.fixture(scope="module")
def models(checkpoint_paths):
    return {name: Model.load(path, tokenizer="bytes") for name, path in checkpoint_paths.items()}


def run_official(official_model, tokens, state=None):
    out, new_state = official_model.forward(list(tokens), copy.deepcopy(state))
    return out, new_state


def assert_state_close(exported: dict, official_state: list, head_size: int, tol: float):
    theirs = from_rwkv_list(official_state, head_size)
    for name in ("att_shift", "wkv", "ffn_shift"):
        assert rel_err(exported[name], theirs[name]) <= tol, name


@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_official_package(name, models, checkpoint_paths, official):
    model, cfg = models[name], SHAPES[name]
    tokens = random_tokens(NUM_TOKENS, cfg.vocab_size, seed=1)
    theirs, their_state = run_official(official(checkpoint_paths[name]), tokens)
    pool = model.new_pool(3)
    ours = model.forward(pool, [1], [tokens])[0]
    assert rel_err(ours, theirs) <= OFFICIAL_TOL
    assert_state_close(pool.export(1), their_state, cfg.head_size, OFFICIAL_TOL)

    # continue both from the state they reached, with the state passed through the converters
    more = random_tokens(13, cfg.vocab_size, seed=2)
    theirs2, _ = run_official(official(checkpoint_paths[name]), more, to_rwkv_list(pool.export(1)))
    pool2 = model.new_pool(1)
    pool2.load(0, from_rwkv_list(their_state, cfg.head_size))
    ours2 = model.forward(pool2, [0], [more])[0]
    assert rel_err(ours2, theirs2) <= OFFICIAL_TOL


@pytest.mark.parametrize("name", ["L3-C192-N64-V300", "L1-C48-N16-V97"])
def test_all_logits_match_official(name, models, checkpoint_paths, official):
    model, cfg = models[name], SHAPES[name]
    tokens = random_tokens(17, cfg.vocab_size, seed=3)
    theirs, _ = official(checkpoint_paths[name]).forward(tokens, None, full_output=True)
    ours = model.forward(model.new_pool(1), [0], [tokens], output="all")[0]
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) <= OFFICIAL_TOL


@pytest.mark.parametrize("name", ["L2-C128-N64", "L4-C96-N32-V1000"])
def test_token_by_token_equals_whole_sequence(name, models):
    model, cfg = models[name], SHAPES[name]
    tokens = random_tokens(NUM_TOKENS, cfg.vocab_size, seed=4)
    whole = model.new_pool(1)
    expected = model.forward(whole, [0], [tokens])[0]
    stepped = model.new_pool(1)
    for tok in tokens:
        got = model.forward(stepped, [0], [[tok]])[0]
    assert rel_err(got, expected) <= 1e-6
    for key, value in stepped.export(0).items():
        assert rel_err(value, whole.export(0)[key]) <= 1e-6, key


@pytest.mark.parametrize("name", ["L3-C192-N64-V300", "L4-C96-N32-V1000"])
def test_packed_uneven_batch_equals_each_alone(name, models):
    model, cfg = models[name], SHAPES[name]
    lengths = [13, 0, 1, 63, 5, 1]
    slots = [4, 0, 6, 1, 2, 5]
    seqs = [random_tokens(n, cfg.vocab_size, seed=10 + i) for i, n in enumerate(lengths)]
    pool = model.new_pool(7)
    warm = random_tokens(9, cfg.vocab_size, seed=99)  # start from non-zero states
    model.forward(pool, slots, [warm] * len(slots), output="none")
    before = {s: pool.export(s) for s in slots}
    packed = model.forward(pool, slots, seqs, output="last")
    for i, (slot, seq) in enumerate(zip(slots, seqs)):
        alone = model.new_pool(1)
        alone.load(0, before[slot])
        if not seq:
            assert torch.isnan(packed[i]).all()
            assert all(torch.equal(pool.export(slot)[k], before[slot][k]) for k in before[slot])
            continue
        expected = model.forward(alone, [0], [seq])[0]
        assert rel_err(packed[i], expected) <= 1e-6
        for key, value in alone.export(0).items():
            assert rel_err(pool.export(slot)[key], value) <= 1e-6, key
    untouched = pool.export(3)
    assert all(not v.any() for v in untouched.values()), "a slot outside the batch was written"


def test_all_output_splits_per_sequence(models):
    model, cfg = models["L2-C128-N64"], SHAPES["L2-C128-N64"]
    seqs = [random_tokens(n, cfg.vocab_size, seed=n) for n in (3, 0, 7)]
    out = model.forward(model.new_pool(3), [0, 1, 2], seqs, output="all")
    assert [o.shape for o in out] == [(3, cfg.vocab_size), (0, cfg.vocab_size), (7, cfg.vocab_size)]
    last = model.forward(model.new_pool(3), [0, 1, 2], seqs, output="last")
    assert torch.allclose(out[2][-1], last[2], rtol=0, atol=1e-5)
    assert model.forward(model.new_pool(3), [0, 1, 2], seqs, output="none") is None


@pytest.mark.parametrize("name", ["L3-C192-N64-V300", "L4-C96-N32-V1000"])
def test_fragmented_and_contiguous_are_bit_identical(name, models):
    model, cfg = models[name], SHAPES[name]
    seqs = [random_tokens(n, cfg.vocab_size, seed=20 + n) for n in (5, 1, 31)]
    results = {}
    for layout in ("contiguous", "fragmented"):
        pool = model.new_pool(4, layout=layout)
        first = model.forward(pool, [3, 0, 1], seqs)
        second = model.forward(pool, [0, 1], [[7], [8, 9]])
        results[layout] = (first, second, [pool.export(s) for s in range(4)])
    (a1, a2, sa), (b1, b2, sb) = results["contiguous"], results["fragmented"]
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    for x, y in zip(sa, sb):
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["L2-C128-N64", "L3-C192-N64-V300"])
def test_half_state_storage_within_bound(name, state_dtype, models):
    model, cfg = models[name], SHAPES[name]
    tokens = random_tokens(NUM_TOKENS, cfg.vocab_size, seed=5)
    ref_pool = model.new_pool(1)
    half_pool = model.new_pool(1, state_dtype=state_dtype)
    assert half_pool.data.dtype == state_dtype
    for chunk in (tokens[:20], tokens[20:21], tokens[21:]):  # several round trips through storage
        ref = model.forward(ref_pool, [0], [chunk])[0]
        got = model.forward(half_pool, [0], [chunk])[0]
    assert rel_err(got, ref) <= STATE_DTYPE_BOUNDS[state_dtype]
    wkv_err = rel_err(half_pool.export(0)["wkv"], ref_pool.export(0)["wkv"])
    assert wkv_err <= torch.finfo(state_dtype).eps / 2  # one rounding costs at most half an ulp


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_compute_close_to_fp32(dtype, tol, checkpoint_paths):
    path = checkpoint_paths["L2-C128-N64"]
    tokens = random_tokens(32, SHAPES["L2-C128-N64"].vocab_size, seed=6)
    ref_model = Model.load(path, tokenizer="bytes")
    half_model = Model.load(path, dtype=dtype, tokenizer="bytes")
    assert half_model.weights.head.dtype == dtype
    ref = ref_model.forward(ref_model.new_pool(1), [0], [tokens])[0]
    got = half_model.forward(half_model.new_pool(1), [0], [tokens])[0]
    assert got.dtype == torch.float32
    assert rel_err(got, ref) <= tol


def test_forward_rejects_bad_input_and_changes_nothing(models):
    model, cfg = models["L2-C128-N64"], SHAPES["L2-C128-N64"]
    pool = model.new_pool(2)
    model.forward(pool, [0], [[1, 2, 3]])
    before = pool.export(0)
    bad_calls = [
        (([0, 0], [[1], [2]]), "distinct"),
        (([0, 2], [[1], [2]]), "out of range"),
        (([0], [[1], [2]]), "got 1 slots but 2"),
        (([0], [[cfg.vocab_size]]), "outside the vocabulary"),
        (([0], [[-1]]), "outside the vocabulary"),
        (([0], [[1.5]]), "non-integer"),
        (([0], ["abc"]), "list of token ids"),
    ]
    for (slots, tokens), message in bad_calls:
        with pytest.raises(ValueError, match=message):
            model.forward(pool, slots, tokens)
    with pytest.raises(ValueError, match="output must be"):
        model.forward(pool, [0], [[1]], output="first")
    wrong = SHAPES["L3-C192-N64-V300"]
    with pytest.raises(ValueError, match="pool holds states"):
        model.forward(new_pool(StateLayout(wrong.n_layer, wrong.n_embd, wrong.head_size), 1), [0], [[1]])
    after = pool.export(0)
    assert all(torch.equal(before[k], after[k]) for k in before)
