"""runtime/latency.py: the engine core's latency histograms and their quantiles."""

from __future__ import annotations

import math
from bisect import bisect_left

from hypothesis import given, settings
from hypothesis import strategies as st

from rwkvstate.runtime.latency import BUCKETS, Histogram, quantile


def test_observe_counts_by_upper_bound():
    h = Histogram()
    for seconds in (0.0, 0.0005, 0.00051, 0.004, 61.0, -1.0):  # a negative duration (clock skew) counts as 0
        h.observe(seconds)
    assert sum(h.counts) == 6 and h.counts[0] == 3 and h.counts[1] == 1  # le=0.0005 holds 0, 0.0005 and -1 -> 0
    assert h.counts[BUCKETS.index(0.004)] == 1 and h.counts[-1] == 1
    assert math.isclose(h.sum, 0.0005 + 0.00051 + 0.004 + 61.0)
    assert h.wire() == {"counts": h.counts, "sum": h.sum}


def test_quantile_of_nothing_is_none():
    assert quantile([0] * (len(BUCKETS) + 1), 0.5) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 70.0, allow_nan=False), min_size=1, max_size=300), st.sampled_from([0.5, 0.9, 0.99]))
def test_quantile_lies_in_the_bucket_of_the_exact_one(values, q):
    h = Histogram()
    for v in values:
        h.observe(v)
    got = quantile(h.counts, q)
    exact = sorted(values)[max(0, math.ceil(q * len(values)) - 1)]  # the nearest-rank quantile
    i = bisect_left(BUCKETS, exact)
    low = BUCKETS[i - 1] if i else 0.0
    high = BUCKETS[i] if i < len(BUCKETS) else BUCKETS[-1]
    assert got is not None and low - 1e-12 <= got <= high + 1e-12


def test_observe_with_a_count_equals_that_many_observations():
    one, many = Histogram(), Histogram()
    for _ in range(3):
        one.observe(0.004)
    many.observe(0.004, 3)
    assert one.counts == many.counts and math.isclose(one.sum, many.sum)
