"""Sampling: filters, penalties, seeding, and independence from batch composition."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rwkvstate import SamplingParams
from rwkvstate.runtime.sampling import apply_penalties, sample

V = 50


def logits_row(seed: int, v: int = V) -> torch.Tensor:
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * 3


def draw(logits, params, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = logits.expand(n, -1).contiguous()
    return sample(rows, [params] * n, torch.rand(n, generator=gen).tolist())


def test_greedy_is_argmax():
    rows = torch.stack([logits_row(i) for i in range(7)])
    got = sample(rows, [SamplingParams(temperature=0)] * 7, [0.99] * 7)
    assert got == rows.argmax(-1).tolist()


def test_top_k_one_is_greedy():
    row = logits_row(1)
    assert set(draw(row, SamplingParams(top_k=1), 200)) == {int(row.argmax())}


def test_top_k_keeps_only_k_best():
    row = logits_row(2)
    allowed = set(row.topk(5).indices.tolist())
    assert set(draw(row, SamplingParams(top_k=5, temperature=5.0), 2000)) <= allowed


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    got = Counter(draw(probs.log(), SamplingParams(top_p=0.7), 4000))
    assert set(got) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the third token is cut
    assert abs(got[0] / 4000 - 0.5 / 0.8) < 0.04
    got = Counter(draw(probs.log(), SamplingParams(top_p=0.1), 300))
    assert set(got) == {0}  # the best token always survives


def test_temperature_sampling_follows_softmax():
    row = logits_row(3, 6)
    n = 20000
    freq = torch.bincount(torch.tensor(draw(row, SamplingParams(temperature=1.0), n)), minlength=6) / n
    assert torch.allclose(freq, row.softmax(-1), atol=0.015)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10**6), st.floats(0.05, 3.0), st.integers(0, 8), st.floats(0.05, 1.0), st.floats(0, 0.9999))
def test_pick_is_always_an_allowed_token(seed, temperature, top_k, top_p, u):
    row = logits_row(seed)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    tok = sample(row.unsqueeze(0), [params], [u])[0]
    order = row.argsort(descending=True).tolist()
    k = top_k or V
    assert order.index(tok) < k
    probs = (row / temperature)[order[:k]].softmax(-1)
    rank = order.index(tok)
    assert rank == 0 or probs[:rank].sum() < top_p + 1e-6


def test_seeded_generation_is_reproducible_and_batch_independent():
    rows = torch.stack([logits_row(i) for i in range(4)])
    params = [SamplingParams(seed=s, temperature=1.3) for s in range(4)]
    gens = [p.make_generator() for p in params]
    together = [sample(rows, params, [g.random() for g in gens]) for _ in range(5)]
    gens = [p.make_generator() for p in params]
    for i in range(4):
        alone = [sample(rows[i : i + 1], params[i : i + 1], [gens[i].random()])[0] for _ in range(5)]
        assert alone == [step[i] for step in together]


def test_penalties():
    row = torch.tensor([2.0, -2.0, 1.0, 0.5])
    counts = Counter({0: 3, 1: 1})
    out = row.clone()
    apply_penalties(out, SamplingParams(repetition_penalty=2.0), counts)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    out = row.clone()
    apply_penalties(out, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), counts)
    assert out.tolist() == [2.0 - 0.5 - 0.75, -2.0 - 0.5 - 0.25, 1.0, 0.5]
    out = row.clone()
    apply_penalties(out, SamplingParams(), counts)
    assert torch.equal(out, row)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": float("inf")}, "presence_penalty"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
