"""Sampling: exact greedy, filtered distributions (chi-square), Philox streams, batch independence,
failing rows, parameter ranges and device-side counts. The Triton kernel runs interpreted on CPU
(small shapes) and must pick the same tokens as the torch reference."""

from __future__ import annotations

import pytest
import torch

from rwkvstate import SamplingParams
from rwkvstate.ops import sampling as ops
from rwkvstate.runtime.sampling import TokenCounts, sample, sampling_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = ops.HAS_TRITON
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
P_MIN = 1e-6  # chi-square p-values below this fail: with fixed seeds the tests are deterministic anyway


def logits_rows(seed: int, n: int, v: int, scale: float = 3.0) -> torch.Tensor:
    return (torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE)


def run(logits, params, seeds=None, positions=None, counts=None, count_rows=None, backend="torch"):
    """Samples with the given backend through the public op; returns a list of ids."""
    n = len(params)
    seeds = list(range(n)) if seeds is None else seeds
    positions = [0] * n if positions is None else positions
    count_rows = [-1] * n if count_rows is None else [c if p.has_penalties() else -1 for p, c in zip(params, count_rows)]
    rows = sampling_rows(params, seeds, positions, count_rows, logits.device)
    data = None if counts is None else counts.data
    return ops.sample(logits.clone(), rows, data, backend=backend).tolist()


# ---- Philox --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "counter,key,expected",
    [  # the known answers published with Random123 for Philox-4x32-10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)  # fmt: skip
def test_philox_known_answers(counter, key, expected):
    words = ops.philox4x32([torch.tensor(c) for c in counter], [torch.tensor(k) for k in key])
    assert tuple(int(w) for w in words) == expected


def test_philox_uniforms_are_uniform_and_keyed_by_seed_and_position():
    n = 20000
    u = ops.philox_uniform(torch.full((n,), 12345), torch.arange(n), 0)
    assert 0 <= float(u.min()) and float(u.max()) < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    assert _chi2_pvalue(counts, torch.full((20,), n / 20)) > P_MIN
    other_seed = ops.philox_uniform(torch.full((n,), 12346), torch.arange(n), 0)
    other_round = ops.philox_uniform(torch.full((n,), 12345), torch.arange(n), 1)
    assert (u == other_seed).float().mean() < 0.01 and (u == other_round).float().mean() < 0.01

    seeds = torch.tensor([-1, 2**63 - 1, -(2**63), 0, 12345] * 20)  # any 64-bit seed, two's complement
    positions = torch.tensor([7, 2**40 + 3, 0, 2**33, 99] * 20)
    few = ops.philox_uniform(seeds[:5], positions[:5], 3)  # Python integers
    many = ops.philox_uniform(seeds, positions, 3)  # tensor ops
    assert torch.equal(few, many[:5])


# ---- greedy -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("greedy", [dict(temperature=0), dict(top_k=1, temperature=2.0)])
def test_greedy_is_exact_argmax_first_index_on_ties(backend, greedy):
    x = logits_rows(1, 5, 257)
    x[1, 100] = x[1, 200] = x[1, 30] = x[1].max() + 1  # a three-way tie: the first index wins
    x[2, 256] = x[2].max() + 1e-3  # the last index
    got = run(x, [SamplingParams(**greedy)] * 5, backend=backend)
    assert got == x.argmax(-1).tolist() and got[1] == 30 and got[2] == 256


# ---- kernel against reference ------------------------------------------------------------------------
MIXED = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.3, top_k=20),
    SamplingParams(min_p=0.1),
    SamplingParams(temperature=0),
    SamplingParams(temperature=2.0, top_k=50, top_p=0.5, min_p=0.02),
    SamplingParams(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25, top_p=0.95),
    SamplingParams(logit_bias={3: 5.0, 250: -100.0, 17: 2.5}, top_p=0.8),
    SamplingParams(temperature=0.05, top_k=3),
]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("V", [1000, 257])
def test_kernel_picks_the_reference_tokens(V):
    n = len(MIXED)
    x = logits_rows(V, n, V)
    counts = [TokenCounts(n, V, DEVICE) for _ in range(2)]
    history = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    for c in counts:
        for row in range(n):
            c.rebuild(row, history[: 5 * row])
    for step in range(4):
        positions = [step * 3 + i for i in range(n)]
        seeds = [11 * i + 2**63 + step for i in range(n)]  # seeds past 2^63 exercise the sign bit
        want = run(x, MIXED, seeds, positions, counts[0], list(range(n)), backend="torch")
        got = run(x, MIXED, seeds, positions, counts[1], list(range(n)), backend="triton")
        assert got == want
        assert torch.equal(counts[0].data, counts[1].data)


# ---- filtered distributions ----------------------------------------------------------------------------
def expected_probs(x: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The exact filtered distribution of one row [V], straight from the definitions (O(V^2))."""
    x = x.double().clone()
    for token, value in (p.logit_bias or {}).items():
        x[token] += value
    if seen is not None:
        c = seen.double()
        pen = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty)
        x = torch.where(c > 0, pen - p.presence_penalty - p.frequency_penalty * c, x)
    probs = torch.softmax(x / p.temperature, -1)
    above = x.unsqueeze(0) > x.unsqueeze(1)  # [i, l]: token l is more likely than token i
    keep = probs >= p.min_p * probs.max()
    if p.top_k:
        keep &= above.sum(1) < p.top_k
    if p.top_p < 1:
        keep &= (above.double() * probs.unsqueeze(0)).sum(1) < p.top_p
    probs = probs * keep
    return probs / probs.sum()


def _chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's test; bins expecting fewer than 5 draws are pooled into one."""
    observed, expected = observed.double(), expected.double()
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum().view(1)])
        expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    stat = ((observed - expected) ** 2 / expected.clamp(min=1e-12)).sum()
    dof = max(len(expected) - 1, 1)
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), stat / 2))


FILTERS = {
    "temperature": SamplingParams(temperature=0.6),
    "top_k": SamplingParams(top_k=7, temperature=1.5),
    "top_p": SamplingParams(top_p=0.6),
    "min_p": SamplingParams(min_p=0.2, temperature=1.2),
    "penalties": SamplingParams(repetition_penalty=1.8, presence_penalty=0.4, frequency_penalty=0.3),
    "logit_bias": SamplingParams(logit_bias={0: 4.0, 5: -100.0, 40: 1.5}, top_p=0.9),
    "joint": SamplingParams(top_k=12, top_p=0.8, min_p=0.05, temperature=0.9),
}


@pytest.mark.parametrize("name", list(FILTERS))
def test_sampled_frequencies_match_the_filtered_distribution(name):
    params, V, n = FILTERS[name], 61, 30000
    x = logits_rows(7, 1, V, scale=1.5)[0]
    counts = TokenCounts(n, V, DEVICE)
    seen = None
    if params.has_penalties():
        seen = torch.zeros(V, dtype=torch.int32)
        history = [0, 0, 0, 1, 2, 2, 9, 30, 30, 30, 30]
        for t in history:
            seen[t] += 1
        counts.data = seen.to(DEVICE).expand(n, V).contiguous()
    rows = x.expand(n, V).contiguous()
    got = run(rows, [params] * n, seeds=[99] * n, positions=list(range(n)), counts=counts, count_rows=list(range(n)))
    probs = expected_probs(x.cpu(), params, seen)
    observed = torch.bincount(torch.tensor(got), minlength=V)
    assert int(observed[probs == 0].sum()) == 0, "a filtered-out token was sampled"
    assert _chi2_pvalue(observed[probs > 0], probs[probs > 0] * n) > P_MIN


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernel_frequencies_match_the_filtered_distribution():
    params, V, n = SamplingParams(top_k=6, top_p=0.85, temperature=1.2), 40, 32 if DEVICE == "cpu" else 20000
    x = logits_rows(8, 1, V, scale=1.0)[0]
    got = run(x.expand(n, V).contiguous(), [params] * n, seeds=[5] * n, positions=list(range(n)), backend="triton")
    probs = expected_probs(x.cpu(), params)
    observed = torch.bincount(torch.tensor(got), minlength=V)
    assert int(observed[probs == 0].sum()) == 0
    assert _chi2_pvalue(observed[probs > 0], probs[probs > 0] * n) > P_MIN


def test_the_best_token_survives_the_tightest_filters():
    x = logits_rows(3, 1, 97)
    params = SamplingParams(top_p=1e-9, min_p=1.0, top_k=2)
    assert set(run(x.expand(50, -1).contiguous(), [params] * 50, positions=list(range(50)))) == {int(x.argmax())}


# ---- streams ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_seeded_row_does_not_depend_on_its_batch(backend):
    V = 257
    x = logits_rows(4, 6, V)
    params = [SamplingParams(temperature=1.3, top_p=0.95), SamplingParams(top_k=30), SamplingParams(min_p=0.05),
              SamplingParams(temperature=0), SamplingParams(temperature=2.0), SamplingParams(top_p=0.5)]  # fmt: skip
    seeds, positions = [3, 3, 8, 1, 2**40, 5], [0, 9, 4, 2, 1, 77]
    together = run(x, params, seeds, positions, backend=backend)
    for i in range(6):
        assert run(x[i : i + 1], params[i : i + 1], seeds[i : i + 1], positions[i : i + 1], backend=backend) == [together[i]]
    order = [5, 2, 0, 4, 1, 3]
    shuffled = run(x[order], [params[i] for i in order], [seeds[i] for i in order], [positions[i] for i in order],
                   backend=backend)  # fmt: skip
    assert shuffled == [together[i] for i in order]


def test_positions_and_seeds_give_different_draws():
    x = logits_rows(5, 1, 257, scale=0.1).expand(64, -1).contiguous()
    by_position = run(x, [SamplingParams()] * 64, seeds=[1] * 64, positions=list(range(64)))
    by_seed = run(x, [SamplingParams()] * 64, seeds=list(range(64)), positions=[0] * 64)
    assert len(set(by_position)) > 30 and len(set(by_seed)) > 30
    assert SamplingParams(seed=-1).stream_seed() == 2**64 - 1 and SamplingParams(seed=5).stream_seed() == 5
    assert SamplingParams().stream_seed() != SamplingParams().stream_seed()  # unseeded: a fresh seed each


# ---- failing rows ------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN and overflow
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_poisoned_row_fails_alone(backend):
    V = 257
    x = logits_rows(6, 7, V)
    params = [SamplingParams(temperature=0.8, top_p=0.9)] * 7
    params[5] = SamplingParams(temperature=1e-3)
    params[6] = SamplingParams(temperature=1e-3)
    seeds, positions = list(range(7)), [4] * 7
    clean = run(x, params, seeds, positions, backend=backend)
    x[1, 10] = float("nan")
    x[2, 0] = float("inf")
    x[3, 256] = float("-inf")
    x[4] *= 1e36  # huge but finite: still samples
    x[5, 7] = 1e36  # overflows float32 at temperature 1e-3
    x[6] *= 1e30  # large at temperature 1e-3: finite, nearly greedy
    got = run(x, params, seeds, positions, backend=backend)
    assert got[1:4] == [ops.FAILED] * 3 and got[5] == ops.FAILED
    assert got[0] == clean[0]
    assert 0 <= got[4] < V and got[6] == int(x[6].argmax())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_penalised_row_leaves_its_counts(backend):
    V = 97
    counts = TokenCounts(2, V, DEVICE)
    counts.rebuild(0, [1, 1, 2])
    counts.rebuild(1, [3])
    x = logits_rows(9, 2, V)
    x[0, 5] = float("nan")
    params = [SamplingParams(frequency_penalty=0.5)] * 2
    got = run(x, params, counts=counts, count_rows=[0, 1], backend=backend)
    assert got[0] == ops.FAILED and 0 <= got[1] < V
    assert counts.row(0).tolist() == torch.bincount(torch.tensor([1, 1, 2]), minlength=V).tolist()
    assert counts.row(1).sum() == 2 and counts.row(1)[got[1]] >= 1


# ---- counts ---------------------------------------------------------------------------------------------------
def test_counts_rebuild_reset_copy_and_device_update():
    V = 50
    counts = TokenCounts(3, V, DEVICE)
    assert counts.data is None and counts.row(1).sum() == 0  # allocated on first use
    counts.rebuild(1, [4, 4, 9])
    assert counts.row(1)[4] == 2 and counts.row(1)[9] == 1 and counts.row(1).sum() == 3
    counts.copy(1, 2)
    assert torch.equal(counts.row(2), counts.row(1))
    counts.reset(1)
    assert counts.row(1).sum() == 0 and counts.row(2).sum() == 3
    x = logits_rows(2, 2, V)
    params = [SamplingParams(temperature=0, presence_penalty=1.0), SamplingParams(temperature=0)]
    before = counts.row(2)
    tokens = sample(x.clone(), params, [0, 0], [0, 0], counts, [2, 1])
    before[tokens[0]] += 1
    assert torch.equal(counts.row(2), before)
    assert counts.row(1).sum() == 0  # no penalties: the row is neither read nor written


def test_penalties_change_greedy_choices():
    x = torch.tensor([[2.0, -2.0, 1.9, 0.5]]).to(DEVICE)
    counts = TokenCounts(1, 4, DEVICE)
    counts.rebuild(0, [0, 0, 0, 1])
    greedy = dict(temperature=0)
    assert sample(x.clone(), [SamplingParams(**greedy)], [0], [0], counts, [0]) == [0]
    counts.rebuild(0, [0, 0, 0, 1])
    assert sample(x.clone(), [SamplingParams(repetition_penalty=1.1, **greedy)], [0], [0], counts, [0]) == [2]
    counts.rebuild(0, [2])
    assert sample(x.clone(), [SamplingParams(presence_penalty=1.6, **greedy)], [0], [0], counts, [0]) == [0]
    counts.rebuild(0, [0])
    assert sample(x.clone(), [SamplingParams(logit_bias={3: 1.45}, frequency_penalty=0.1, **greedy)], [0], [0],
                  counts, [0]) == [3]  # fmt: skip


def test_penalised_rows_need_counts():
    with pytest.raises(ValueError, match="counts"):
        sample(logits_rows(0, 1, 10), [SamplingParams(presence_penalty=1.0)], [0], [0], None, [0])


# ---- parameters --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 1e-40}, "temperature"),
        ({"temperature": 1e3}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.01}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty"),
        ({"repetition_penalty": 1e3}, "repetition_penalty"),
        ({"presence_penalty": float("inf")}, "presence_penalty"),
        ({"frequency_penalty": -1e9}, "frequency_penalty"),
        ({"logit_bias": {"a": 1.0}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {3: 101.0}}, "logit_bias"),
        ({"logit_bias": {3: float("nan")}}, "logit_bias"),
        ({"logit_bias": {i: 1.0 for i in range(2000)}}, "logit_bias"),
        ({"seed": 1.5}, "seed"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_param_edges_are_accepted():
    SamplingParams(temperature=1e-3, repetition_penalty=0.01, presence_penalty=-100, frequency_penalty=100, min_p=1,
                   logit_bias={0: -100, 5: 100.0}, seed=-(2**70))  # fmt: skip
    SamplingParams(temperature=100, repetition_penalty=100, top_k=2**31 - 1)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        SamplingParams(logit_bias={10: 1.0}).check_vocab(10)
