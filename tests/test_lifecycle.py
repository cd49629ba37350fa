"""State lifecycle: lazy host copies, ring-buffer history and rollback, tiered slots, prefix cache."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import assert_same_run, fresh_run, rel_err
from rwkvstate import Engine, Model, SamplingParams
from rwkvstate.errors import RwkvStateError, SlotError
from rwkvstate.model.synthetic import random_checkpoint, tiny_config
from rwkvstate.state.cache import NODE_BYTES

GREEDY = SamplingParams(temperature=0)
TOL = 1e-5  # fp32 results of different chunkings of the same tokens agree to rounding


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(n_layer=2, n_embd=48, head_size=16, ffn_dim=96, vocab_size=97)
    return Model.from_tensors(random_checkpoint(cfg, seed=11), cfg)


def assert_equals_fresh_run(model, s, tol=TOL):
    """The session's logits and whole state (every part) equal a cold run of its token log."""
    assert_same_run(s.logits, s.snapshot().state, *fresh_run(model, s.tokens), tol)


def random_ids(rng, n, vocab=97):
    return [rng.randrange(vocab) for _ in range(n)]


# ---- lazy host copies ---------------------------------------------------------------------
def test_export_copies_only_slots_that_changed(model):
    engine = Engine(model, slots=2)
    a, b = engine.session(), engine.session()
    a.feed([1, 2, 3])
    b.feed([4])
    pool, slot_bytes = engine.pool, engine.pool.slot_nbytes
    moved = []
    for turn in range(6):
        before = pool.bytes_to_host
        if turn % 3 == 0:  # only some turns touch a
            a.feed([turn + 5])
        else:
            b.feed([turn + 5])
        a.snapshot()  # export after every turn
        moved.append(pool.bytes_to_host - before)
    assert moved == [slot_bytes if t % 3 == 0 else 0 for t in range(6)]


def test_host_copy_is_refreshed_after_every_kind_of_write(model):
    engine = Engine(model, slots=2)
    s = engine.session()
    s.feed([5, 6])
    first = s.snapshot().state
    s.feed([7])
    assert not torch.equal(s.snapshot().state["wkv"], first["wkv"])  # forward bumped the generation
    s.reset()
    assert s.snapshot().state["wkv"].abs().max() == 0
    s.restore(type(s.snapshot())(first, [5, 6], None))
    assert torch.equal(s.snapshot().state["wkv"], first["wkv"])


# ---- ring-buffer history and rollback -----------------------------------------------------
@pytest.mark.parametrize("n_back", [1, 5, 8, 13, 29, 60])
def test_rollback_equals_a_fresh_run(model, n_back):
    rng = random.Random(n_back)
    engine = Engine(model, slots=2, history_every=8, history_capacity=3)
    s = engine.session()
    ids = random_ids(rng, 61)
    for piece in (ids[:20], ids[20:21], ids[21:50], ids[50:]):
        s.feed(piece)
    s.rollback(n_back)
    assert s.tokens == ids[: 61 - n_back]
    assert_equals_fresh_run(model, s)
    s.feed([3, 1, 4])  # and the session goes on from there
    assert_equals_fresh_run(model, s)


def test_rollback_uses_the_ring_and_refeeds_little(model):
    engine = Engine(model, slots=1, history_every=16, history_capacity=4)
    s = engine.session()
    ids = random_ids(random.Random(0), 100)
    for t in ids:  # decode-like: one token per forward
        s.feed([t])
    fed = engine.tokens_fed
    s.rollback(10)
    assert engine.tokens_fed - fed <= 16 and engine.history.restores == 1
    recent = engine.history.get_recent(s.slot)
    assert [e.position for e in recent] == sorted({e.position for e in recent}, reverse=True)
    assert all(e.position <= 90 for e in recent)  # entries after the target were forgotten
    assert s.tokens == ids[:90]
    assert_equals_fresh_run(model, s)


def test_rollback_past_the_ring_refeeds_from_the_start(model):
    engine = Engine(model, slots=1, history_every=4, history_capacity=2)
    s = engine.session()
    ids = random_ids(random.Random(1), 40)
    s.feed(ids)
    s.rollback(39)
    assert s.tokens == ids[:1]
    assert_equals_fresh_run(model, s)
    s.rollback(1)
    assert s.tokens == []
    with pytest.raises(RwkvStateError, match="no logits"):
        s.logits


@pytest.mark.parametrize("fmt, tol", [("fp16", 2e-3), ("bf16", 2e-2), ("int8", 5e-2), ("fp8", 2e-1)])
def test_rollback_through_compressed_history(model, fmt, tol):
    engine = Engine(model, slots=1, history_every=8, history_capacity=4, history_format=fmt)
    s = engine.session()
    ids = random_ids(random.Random(2), 48)
    for i in range(0, 48, 4):
        s.feed(ids[i : i + 4])
    s.rollback(6)
    assert engine.history.restores == 1 and s.tokens == ids[:42]
    assert_equals_fresh_run(model, s, tol)


def test_rollback_rejects_bad_counts_and_changes_nothing(model):
    engine = Engine(model, slots=1)
    s = engine.session()
    s.feed([1, 2, 3])
    before = s.logits
    for bad in (-1, 4, 1.5, True):
        with pytest.raises(ValueError, match="roll back 0 to 3 tokens"):
            s.rollback(bad)
    assert s.tokens == [1, 2, 3] and torch.equal(s.logits, before)


def test_undo_and_regenerate(model):
    engine = Engine(model, slots=2)
    s = engine.session()
    s.feed([1, 2, 3])
    s.feed([4, 5])
    first = s.generate(6, GREEDY)
    list(first)
    assert len(first.token_ids) == 6
    again = s.regenerate()
    list(again)
    assert again.token_ids == first.token_ids  # greedy: the same reply from the same state
    sampled = s.regenerate(sampling=SamplingParams(temperature=1.0, seed=3))
    list(sampled)
    assert s.tokens == [1, 2, 3, 4, 5] + sampled.token_ids
    assert s.undo() == 6  # the generation
    assert s.undo() == 2  # the second feed
    assert s.tokens == [1, 2, 3]
    assert_equals_fresh_run(model, s)
    with pytest.raises(ValueError, match="undo 1 to 1 steps"):
        s.undo(2)


def test_generate_with_a_prompt_matches_feed_then_generate(model):
    engine = Engine(model, slots=4, max_prefill_chunk=7)
    a, b, c = engine.session(), engine.session(), engine.session()
    b.feed([9, 8, 7])
    c.feed([1])
    streams = [a.generate(5, GREEDY, prompt=[3] * 20), b.generate(5, GREEDY, prompt=[6, 6]), c.generate(9, GREEDY)]
    engine.run(streams)  # prompts read in 7-token budgets, packed with c's decode tokens
    for (prompt, n), stream in zip((([3] * 20, 5), ([9, 8, 7, 6, 6], 5), ([1], 9)), streams):
        alone = Engine(model, slots=1).session()
        alone.feed(prompt)
        expected = alone.generate(n, GREEDY)
        list(expected)
        assert stream.token_ids == expected.token_ids


# ---- tiered slots -------------------------------------------------------------------------
@pytest.mark.parametrize("host_format", [None, "fp32"])
def test_ten_times_more_sessions_than_slots(model, host_format):
    rng = random.Random(5)
    num_sessions, slots = 30, 3
    tiered = Engine(model, slots=slots, host_format=host_format)
    unlimited = Engine(model, slots=num_sessions)
    pairs = [(tiered.session(), unlimited.session()) for _ in range(num_sessions)]
    for _ in range(150):
        a, b = rng.choice(pairs)
        ids = random_ids(rng, rng.randint(1, 4))
        a.feed(ids)
        b.feed(ids)
    assert tiered.tier.evictions > 50 and len(tiered.tier) == num_sessions - slots
    for a, b in pairs:
        assert a.tokens == b.tokens
        if b.tokens:  # docs/state-lifecycle.md: logits and state bit-identical
            assert_same_run(a.logits, a.snapshot().state, b.logits, b.snapshot().state)


def test_unchanged_sessions_move_back_to_the_host_without_a_copy(model):
    engine = Engine(model, slots=1)
    a, b = engine.session(), engine.session()
    a.feed([1, 2])
    b.feed([3])  # a goes to the host: one copy
    moved = engine.pool.bytes_to_host
    for _ in range(3):  # only reads: a's host copy stays valid through every round trip
        a.slot
        b.slot
    assert engine.pool.bytes_to_host - moved == engine.pool.slot_nbytes  # b's first eviction only


def test_compressed_host_tier_and_cold_recompression(model):
    now = [0.0]
    engine = Engine(model, slots=1, host_format="fp16", cold_format="int8", cold_after_s=60, clock=lambda: now[0])
    a, b = engine.session(), engine.session()
    a.feed([1, 2, 3])
    b.feed([4])
    assert engine.tier.entries[a.id].fmt == "fp16"
    now[0] = 30.0
    assert engine.maintain() == 0
    now[0] = 61.0
    assert engine.maintain() == 1 and engine.tier.entries[a.id].fmt == "int8"
    a.feed([5])
    assert a.tokens == [1, 2, 3, 5]
    assert_equals_fresh_run(model, a, 5e-2)


def test_fork_of_a_session_on_the_host(model):
    engine = Engine(model, slots=1)
    a, b = engine.session(), engine.session()
    a.feed([1, 2, 3])
    b.feed([4])
    child = a.fork()
    assert not child.is_resident and child.tokens == [1, 2, 3]
    child.feed([7])
    a.feed([8])
    assert child.tokens == [1, 2, 3, 7] and a.tokens == [1, 2, 3, 8]
    assert_equals_fresh_run(model, child)
    assert_equals_fresh_run(model, a)


# ---- prefix cache -------------------------------------------------------------------------
def test_prefix_cache_hits_equal_a_cold_run(model):
    engine = Engine(model, slots=2, prefix_cache_bytes=1 << 20, prefix_cache_every=16)
    rng = random.Random(7)
    system = random_ids(rng, 40)
    first = engine.session()
    first.feed(system + random_ids(rng, 5))
    fed = engine.tokens_fed
    for _ in range(3):
        s = engine.session()
        s.feed(system + random_ids(rng, 6))
        assert engine.tokens_fed - fed <= 8 + 6  # at most the tail after the last cut at 32, plus the question
        fed = engine.tokens_fed
        assert_equals_fresh_run(model, s)
        s.close()
    stats = engine.stats()
    assert stats["prefix_cache_hits"] == 3 and stats["prefix_cache_hit_tokens"] == 3 * 32


def test_prefix_cache_exact_prompt_repeat_and_budget(model):
    slot_bytes = model.new_pool(1).slot_nbytes
    budget = 3 * (slot_bytes + 97 * 4 + 3 * NODE_BYTES)  # room for three entries of 3-token prompts
    engine = Engine(model, slots=1, prefix_cache_bytes=budget, prefix_cache_every=1000)
    prompts = [[i, i + 1, i + 2] for i in range(5)]
    for p in prompts:
        s = engine.session()
        s.feed(p)
        s.close()
    cache = engine.prefix_cache
    assert cache.num_entries == 3 and cache.nbytes <= budget and cache.stats.evictions == 2
    assert not cache.contains(prompts[0]) and cache.contains(prompts[4])
    fed = engine.tokens_fed
    s = engine.session()
    s.feed(prompts[4])  # an exact repeat: state and logits come from the cache
    assert engine.tokens_fed == fed and cache.stats.hits == 1
    assert_equals_fresh_run(model, s)


def test_prefix_cache_ignores_sessions_from_loaded_states(model):
    engine = Engine(model, slots=2, prefix_cache_bytes=1 << 20, prefix_cache_every=4)
    donor = engine.session()
    donor.feed([1, 2, 3, 4, 5])
    s = engine.session()
    s.load_state(donor.snapshot().state)
    s.feed([1, 2, 3, 4, 5, 6])
    assert engine.prefix_cache.stats.hits == 0


def test_fork_with_one_slot_goes_through_the_host(model):
    engine = Engine(model, slots=1)
    a = engine.session()
    a.feed([1, 2, 3])
    child = a.fork()  # the only slot holds a: a moves to the host and both share its state there
    assert child.location == "host" and a.location == "host"
    child.feed([4])
    a.feed([5])
    assert_equals_fresh_run(model, child)
    assert_equals_fresh_run(model, a)
    stream = a.generate(3, GREEDY)
    next(stream)
    with pytest.raises(SlotError, match="cannot fork"):
        engine.fork(a)  # (Session.fork refuses earlier: a is generating)
    assert len(engine.sessions) == 2  # the failed fork left nothing behind


def test_undo_survives_a_state_file(model, tmp_path):
    engine = Engine(model, slots=2)
    s = engine.session()
    s.feed([1, 2])
    s.feed([3, 4, 5])
    s.save(tmp_path / "s.safetensors")
    t = engine.session()
    t.load(tmp_path / "s.safetensors")
    assert t.undo() == 3 and t.tokens == [1, 2]
    assert_equals_fresh_run(model, t)


def test_repeated_undo_and_refeed_keeps_the_ring(model):
    """A rollback frees the entries after its target; later records reuse those first, so
    undo/retry cycles never wear the older entries away."""
    engine = Engine(model, slots=1, history_every=8, history_capacity=4)
    s = engine.session()
    ids = random_ids(random.Random(9), 32)
    for i in range(0, 32, 8):
        s.feed(ids[i : i + 8])
    for i in range(6):
        fed = engine.tokens_fed
        s.rollback(4)  # 32 -> 28: first from the entry at 24 (4 tokens re-fed), then from the undo
        assert engine.tokens_fed - fed == (4 if i == 0 else 0)  # point the re-feed of 28: recorded
        s.feed(ids[28:])
    assert sorted(engine.history.positions[s.slot][:4]) == [8, 16, 24, 32]  # the periodic entries


@pytest.mark.parametrize("with_prompt", [False, True])
def test_regenerate_and_undo_restore_without_refeeding(model, with_prompt):
    """Undo points have ring entries of their own: regenerate and undo of a turn re-feed nothing,
    even after a token-by-token feed that recorded many undo points."""
    engine = Engine(model, slots=1, history_every=64, history_capacity=2)
    s = engine.session()
    for t in range(30):
        s.feed([t % 97])  # 30 undo points: they churn the 2 undo-point entries only
    if with_prompt:
        first = s.generate(5, GREEDY, prompt=[1, 2, 3])
    else:
        s.feed([1, 2, 3])
        first = s.generate(5, GREEDY)
    list(first)
    fed = engine.tokens_fed
    again = s.regenerate()
    list(again)
    assert engine.tokens_fed == fed and again.token_ids == first.token_ids
    s.undo()  # the reply
    assert engine.tokens_fed == fed and s.tokens == list(range(30)) + [1, 2, 3]
    assert_equals_fresh_run(model, s)


def test_undo_skips_steps_that_added_nothing(model):
    engine = Engine(model, slots=1)
    s = engine.session()
    s.feed([1, 2, 3])
    s.feed([4, 5])
    s.feed([])  # an empty feed, and a reply stopped before its first token: nothing to undo
    stream = s.generate(5, SamplingParams(temperature=0, stop_token_ids=list(range(97))))
    list(stream)
    assert stream.token_ids == [] and s.tokens == [1, 2, 3, 4, 5]
    assert s.undo() == 2 and s.tokens == [1, 2, 3]


def test_a_never_used_session_takes_no_slot_to_be_read(model):
    engine = Engine(model, slots=1)
    busy = engine.session()
    busy.feed([1])
    stream = busy.generate(50, GREEDY)
    next(stream)
    fresh = engine.session()
    snap = fresh.snapshot()  # the zero state, although the only slot is generating
    assert snap.logits is None and snap.state["wkv"].abs().max() == 0 and fresh.location == "none"
    with pytest.raises(RwkvStateError, match="no logits"):
        fresh.logits
    stream.close()


def test_a_failed_restore_from_the_host_keeps_the_session(model, monkeypatch):
    engine = Engine(model, slots=1)
    a, b = engine.session(), engine.session()
    a.feed([1, 2])
    b.feed([3])  # a moves to the host
    calls = []

    def broken(slot, buffer, keep=True):
        calls.append(slot)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine.pool, "load_host", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        a.feed([4])
    monkeypatch.undo()
    assert calls and a.location == "host" and engine.pool.free_slots == 1
    a.feed([4])
    assert a.tokens == [1, 2, 4]
    assert_equals_fresh_run(model, a)


def test_the_rollback_base_is_a_copy_of_the_loaded_state(model):
    engine = Engine(model, slots=2)
    donor = engine.session()
    donor.feed([1, 2, 3])
    state = donor.snapshot().state
    s = engine.session()
    s.load_state(state)
    s.feed([5, 6])
    before = s.logits
    for t in state.values():
        t.zero_()  # the caller changes its tensors afterwards
    s.rollback(1)
    s.feed([6])
    assert rel_err(s.logits, before) < TOL


def test_a_marked_prompt_prefix_is_cached_inside_batched_steps(model):
    engine = Engine(model, slots=2, prefix_cache_bytes=1 << 20, prefix_cache_every=1000)
    rng = random.Random(12)
    system = random_ids(rng, 23)
    first = engine.session()
    list(first.generate(3, GREEDY, prompt=system + [5, 6], cache_prefix=len(system)))
    assert engine.prefix_cache.contains(system)  # a chunk ended there, inside step()
    second = engine.session()
    fed = engine.tokens_fed
    stream = second.generate(3, GREEDY, prompt=system + [7, 8, 9], cache_prefix=len(system))
    list(stream)
    assert engine.tokens_fed - fed == 3 and engine.prefix_cache.stats.hits == 1
    alone = Engine(model, slots=1).session()
    alone.feed(system + [7, 8, 9])
    expected = alone.generate(3, GREEDY)
    list(expected)
    assert stream.token_ids == expected.token_ids
    with pytest.raises(ValueError, match="cache_prefix must be 0 to 2"):
        engine.session().generate(3, GREEDY, prompt=[1, 2], cache_prefix=3)


def test_a_failed_step_rebuilds_every_state_it_touched(model, monkeypatch):
    engine = Engine(model, slots=2)
    a, b = engine.session(), engine.session()
    a.feed([1, 2, 3])
    b.feed([4])
    streams = [a.generate(5, GREEDY), b.generate(5, GREEDY, prompt=[5, 6, 7])]
    engine.step()  # b reads its prompt, a decodes
    real_decode = engine.graphs.decode
    failures = []

    def half_written(slots, tokens):
        if failures:  # fails once: the rebuild's forwards go through
            return real_decode(slots, tokens)
        failures.append(slots)
        engine.pool.data[list(slots)] += 1.0  # some layers were written before the failure
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine.graphs, "decode", half_written)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.step()
    monkeypatch.undo()
    assert all(st.finish_reason == "error" for st in streams) and len(failures[0]) == 2
    for s in (a, b):
        assert_equals_fresh_run(model, s)
        s.feed([9])  # and the session goes on
        assert_equals_fresh_run(model, s)


def test_a_session_whose_rebuild_fails_is_marked_lost(model, monkeypatch):
    engine = Engine(model, slots=1, history_marks=0)  # no undo-point entry: the rebuild must re-feed
    s = engine.session()
    s.feed([1, 2, 3])
    stream = s.generate(5, GREEDY)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine.graphs, "decode", broken)
    monkeypatch.setattr(model, "forward", broken)
    with pytest.raises(RuntimeError):
        engine.step()
    monkeypatch.undo()
    assert stream.finish_reason == "error"
    with pytest.raises(RwkvStateError, match="lost in a failed forward"):
        s.feed([4])
    s.reset()  # usable again from a known state
    s.feed([4])
    assert s.tokens == [4]
    assert_equals_fresh_run(model, s)

