"""End to end: the model with its Triton kernels equals the model on the torch reference
(interpreted on CPU in CI, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from conftest import rel_err, random_tokens  # noqa: E402
from rwkvstate import Model  # noqa: E402
from rwkvstate.model.synthetic import random_checkpoint, tiny_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CFG = tiny_config(n_layer=2, n_embd=48, head_size=16, vocab_size=61, ffn_dim=96, decay_rank=4, aaa_rank=4,
                  mv_rank=4, gate_rank=8)  # fmt: skip


@pytest.fixture(scope="module")
def models():
    tensors = random_checkpoint(CFG, seed=21)
    ref = Model.from_tensors(tensors, CFG, device=DEVICE)
    ref.backends.update(token_shift="torch", wkv="torch", time_mix="torch", wkv_prefill="torch", channel_mix="torch",
                        lora="torch", norm_shift="torch", gemv="torch")  # fmt: skip
    fast = Model.from_tensors(tensors, CFG, device=DEVICE)
    fast.backends.update(token_shift="triton", wkv="triton", time_mix="triton", wkv_prefill="triton",
                         channel_mix="triton", lora="triton", norm_shift="triton", gemv="triton")  # fmt: skip  (<= 16 rows per call)
    for model in (ref, fast):  # every backend chosen here, none left to the device's default
        assert None not in model.backends.values(), model.backends
    return ref, fast


@pytest.mark.parametrize("layout,state_dtype", [("contiguous", torch.float32), ("fragmented", torch.float32),
                                                ("contiguous", torch.float16)])  # fmt: skip
def test_kernels_match_reference_end_to_end(models, layout, state_dtype):
    ref, fast = models
    seqs = [random_tokens(n, CFG.vocab_size, seed=n) for n in (5, 0, 1, 9)]
    slots = [3, 0, 4, 1]
    outs = []
    for model in (ref, fast):
        pool = model.new_pool(5, state_dtype=state_dtype, layout=layout)
        first = model.forward(pool, slots, seqs)
        second = model.forward(pool, [4, 1], [[7], [8]])  # a decode step after the prefill
        outs.append((first, second, [pool.export(s) for s in range(5)]))
    (a1, a2, sa), (b1, b2, sb) = outs
    live = [0, 2, 3]
    tol = 1e-5 if state_dtype == torch.float32 else 2e-3
    assert rel_err(b1[live], a1[live]) <= tol and rel_err(b2, a2) <= tol
    for x, y in zip(sa, sb):
        for key in x:
            assert rel_err(y[key], x[key]) <= tol or not x[key].any(), key


def test_decode_step_matches_forward(models):
    ref, fast = models
    pool_a, pool_b = ref.new_pool(4), fast.new_pool(4)
    for pool, model in ((pool_a, ref), (pool_b, fast)):
        model.forward(pool, [0, 2], [random_tokens(4, CFG.vocab_size, 1), random_tokens(6, CFG.vocab_size, 2)])
    want = ref.forward(pool_a, [2, 0], [[5], [6]])
    slots = torch.tensor([2, 0, pool_b.scratch_slot], device=DEVICE)  # a padding row on the scratch slot
    got = fast.decode_step(pool_b, slots, torch.tensor([5, 6, 0], device=DEVICE))[:2]
    assert rel_err(got, want) <= 1e-5


def test_chunked_prefill_matches_reference(models):
    """wkv_prefill="triton-chunked": a 37-token prompt (two chunks and a tail) next to a short one."""
    ref, fast = models
    seqs = [random_tokens(37, CFG.vocab_size, seed=5), random_tokens(3, CFG.vocab_size, seed=6)]
    outs = []
    saved = dict(fast.backends)
    fast.backends.update(wkv_prefill="triton-chunked", channel_mix="torch", lora="torch")  # 40 rows: past 16
    try:
        for model in (ref, fast):
            pool = model.new_pool(3)
            logits = model.forward(pool, [2, 0], seqs)
            outs.append((logits, pool.export(2), pool.export(0)))
    finally:
        fast.backends = saved
    for got, want in zip(outs[1], outs[0]):
        if isinstance(got, dict):
            assert all(rel_err(got[key], want[key]) <= 1e-5 for key in got)
        else:
            assert rel_err(got, want) <= 1e-5
