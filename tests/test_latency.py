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


def test_gc_pauses_observes_each_collection_until_closed():
    import gc

    from rwkvstate.runtime.latency import GcPauses

    h = Histogram()
    pauses = GcPauses(h)
    try:
        gc.collect()
        gc.collect(0)
        assert sum(h.counts) >= 2 and h.sum > 0  # other threads' collections may add more
    finally:
        pauses.close()
    seen = sum(h.counts)
    gc.collect()
    assert sum(h.counts) == seen and pauses._callback not in gc.callbacks
    pauses.close()  # twice: nothing to remove, no error


def test_startup_objects_frozen_keeps_the_heap_out_of_collections_inside_the_block():
    import gc

    from rwkvstate.runtime.latency import startup_objects_frozen

    kept = [[i] for i in range(1000)]  # tracked containers that survive
    before = gc.get_freeze_count()
    with startup_objects_frozen():
        assert gc.get_freeze_count() >= before + len(kept)
        gen2 = {id(x) for x in gc.get_objects(generation=2)}
        assert not any(id(x) in gen2 for x in kept)
    assert gc.get_freeze_count() == 0  # thawed: the interpreter's exit finds them as usual
