"""Engine and sessions: feed, generate (streamed, batched), fork, reset, snapshot/restore."""

from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from rwkvstate import Engine, Model, SamplingParams
from rwkvstate.errors import RwkvStateError, SlotError
from rwkvstate.model.synthetic import random_checkpoint, tiny_config

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(n_layer=2, n_embd=64, head_size=16, ffn_dim=128)
    return Model.from_tensors(random_checkpoint(cfg, seed=7), cfg)


@pytest.fixture
def engine(model):
    return Engine(model, slots=6)


def test_feed_matches_model_forward(engine, model):
    s = engine.session()
    ids = s.feed("hello, world")
    assert ids == list(b"hello, world") and s.tokens == ids
    expected = model.forward(model.new_pool(1), [0], [ids])[0]
    assert torch.equal(s.logits, expected)
    s.feed([1, 2, 3])
    assert s.tokens == ids + [1, 2, 3]


def test_long_prompt_is_chunked_without_changing_results(model):
    ids = list(range(200))
    chunked = Engine(model, slots=1, max_prefill_chunk=17).session()
    chunked.feed(ids)
    whole = Engine(model, slots=1).session()
    whole.feed(ids)
    assert rel_err(chunked.logits, whole.logits) < 1e-6


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with the bare model, one sequence at a time."""
    pool = model.new_pool(1)
    logits = model.forward(pool, [0], [prompt])[0]
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = model.forward(pool, [0], [[out[-1]]])[0]
    return out


def test_greedy_generation_streams_and_matches_reference(engine, model):
    s = engine.session()
    s.feed("abc")
    stream = s.generate(max_tokens=25, sampling=GREEDY)
    pieces = list(stream)
    assert stream.finish_reason == "length" and len(stream.token_ids) == 25
    assert stream.token_ids == greedy_reference(model, list(b"abc"), 25)
    assert "".join(pieces) == stream.text == model.tokenizer.decode(stream.token_ids)
    assert s.tokens == list(b"abc") + stream.token_ids  # every generated token is in the state


def test_concurrent_streams_are_batched_and_equal_each_alone(engine, model):
    prompts = [b"first", b"a much longer second prompt", b"3"]
    sessions = [engine.session() for _ in prompts]
    for s, p in zip(sessions, prompts):
        s.feed(list(p))
    streams = [s.generate(max_tokens=n, sampling=GREEDY) for s, n in zip(sessions, (12, 20, 5))]
    steps_before = engine.steps
    engine.run(streams)
    assert engine.steps - steps_before == 20  # one packed forward per step for all three
    for stream, p in zip(streams, prompts):
        assert stream.token_ids == greedy_reference(model, list(p), len(stream.token_ids))


def test_seeded_sampling_is_reproducible_across_batching(model):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone = Engine(model, slots=2).session()
    alone.feed("xyz")
    expected = alone.generate(30, params)
    expected_text = "".join(expected)
    engine = Engine(model, slots=3)
    noise = engine.session()
    noise.feed("other")
    s = engine.session()
    s.feed("xyz")
    streams = [noise.generate(10, SamplingParams(seed=9)), s.generate(30, params)]
    texts = engine.run(streams)
    assert texts[1] == expected_text and streams[1].token_ids == expected.token_ids


def test_stop_strings_end_generation_and_are_not_emitted(engine, model):
    s = engine.session()
    s.feed("abc")
    full = greedy_reference(model, list(b"abc"), 40)
    text = model.tokenizer.decode(full)
    stop = text[10:13]
    stream = s.generate(max_tokens=40, sampling=SamplingParams(temperature=0, stop=[stop]))
    out = "".join(stream)
    assert stream.finish_reason == "stop"
    assert out == text[: text.find(stop)]


def test_a_stop_string_found_late_takes_the_extra_tokens_back(model):
    """The engine runs ahead of a stream's reader; the stream still ends at its stop string, with
    the tokens after it taken back from its session, as if it had been read step by step."""
    text = model.tokenizer.decode(greedy_reference(model, list(b"abc"), 40))
    stop = text[10:13]
    params = SamplingParams(temperature=0, stop=[stop], stop_token_ids=[])
    alone = Engine(model, slots=1).session()
    alone.feed("abc")
    expected = alone.generate(40, params)
    expected_text = "".join(expected)

    engine = Engine(model, slots=4)
    other, s = engine.session(), engine.session()
    other.feed("xyz")
    s.feed("abc")
    ahead = other.generate(40, SamplingParams(temperature=0, stop_token_ids=[]))
    late = s.generate(40, params)
    list(ahead)  # steps both: late runs 40 tokens before anyone reads it
    assert late.finish_reason == "stop" and len(late.token_ids) == len(expected.token_ids) < 40
    assert "".join(late) == expected_text == text[: text.find(stop)]
    assert s.tokens == alone.tokens and rel_err(s.logits, alone.logits) < 1e-5  # re-fed from the ring
    assert s.undo() == len(late.token_ids)  # the reply is one undo point, as usual


def test_stop_text_holds_back_what_may_start_a_stop_string(model):
    from rwkvstate.runtime.text import StopText

    tok = model.tokenizer
    text = StopText(tok, ["END", "xy"])
    assert text.push_many(list(b"abcE")) == "abc" and text.push_many(list(b"N")) == ""
    assert text.push_many(list(b"Dzz")) == "" and text.stopped_at == 6 and text.flush() == ""
    whole, partial = StopText(tok, ["END"]), StopText(tok, ["END"])
    assert whole.push_many(list(b"aENDb")) == "a" and whole.stopped_at == 4
    assert partial.push_many(list(b"aEN")) == "a" and partial.stopped_at is None and partial.flush() == "EN"
    plain = StopText(tok, ["Q"])
    assert plain.push_many(list("é".encode())[:1]) == "" and plain.push_many(list("é".encode())[1:]) == "é"


def test_decode_goes_first_and_prompts_share_a_token_budget(model):
    engine = Engine(model, slots=3, max_prefill_tokens=8)
    a = engine.session()
    running = a.generate(40, SamplingParams(temperature=0, stop_token_ids=[]), prompt="go")
    engine.step()
    long_prompts = [engine.session().generate(2, GREEDY, prompt=bytes(range(65, 85)).decode()) for _ in range(2)]
    reads = []
    while any(s.pending for s in long_prompts):
        before = len(running.token_ids)
        fed = engine.tokens_fed
        engine.step()
        assert len(running.token_ids) == before + 1  # the decoding stream moves every step
        reads.append(engine.tokens_fed - fed)
    assert all(r <= 8 for r in reads) and sum(reads) == 40 and len(reads) == 5
    ref = Engine(model, slots=1).session().generate(2, GREEDY, prompt=bytes(range(65, 85)).decode())
    assert engine.run(long_prompts) == ["".join(ref)] * 2


def test_stop_token_is_not_fed(engine, model):
    s = engine.session()
    s.feed("abc")
    first = greedy_reference(model, list(b"abc"), 1)[0]
    stream = s.generate(max_tokens=5, sampling=SamplingParams(temperature=0, stop_token_ids=[first]))
    assert list(stream) == [] and stream.finish_reason == "stop" and stream.token_ids == []
    assert s.tokens == list(b"abc")


def test_fork_continues_identically_and_independently(engine):
    parent = engine.session()
    parent.feed("shared prefix ")
    child = parent.fork()
    assert child.slot != parent.slot and child.tokens == parent.tokens
    assert torch.equal(child.logits, parent.logits)
    a, b = parent.generate(15, GREEDY), child.generate(15, GREEDY)
    engine.run([a, b])
    assert a.token_ids == b.token_ids
    child.feed("diverge")
    assert not torch.equal(child.logits, parent.logits)


def test_snapshot_restore_and_reset(engine, model):
    s = engine.session()
    s.feed("state to keep")
    snap = s.snapshot()
    first = list(s.generate(10, GREEDY))
    s.restore(snap)
    assert s.tokens == list(b"state to keep")
    assert list(s.generate(10, GREEDY)) == first
    s.reset()
    assert s.tokens == []
    with pytest.raises(RwkvStateError, match="feed at least one token"):
        _ = s.logits
    with pytest.raises(RwkvStateError, match="feed a prompt"):
        s.generate(5)
    other = Engine(model, slots=1).session()
    other.restore(snap)
    assert torch.equal(other.logits, snap.logits)


def test_restore_rejects_bad_snapshot_and_keeps_state(engine):
    s = engine.session()
    s.feed("keep me")
    snap = s.snapshot()
    before = s.logits
    bad = type(snap)({**snap.state, "wkv": snap.state["wkv"][:1]}, [1], snap.logits)
    with pytest.raises(ValueError, match="wkv"):
        s.restore(bad)
    assert torch.equal(s.logits, before) and s.tokens == list(b"keep me")


def test_more_sessions_than_slots_wait_for_a_slot(model):
    engine = Engine(model, slots=2)
    a, b, c = engine.session(), engine.session(), engine.session()
    for s, text in ((a, "first"), (b, "second"), (c, "third")):
        s.feed(text)
    assert not a.is_resident and b.is_resident and c.is_resident  # a was least recently used
    alone = Engine(model, slots=1).session()
    alone.feed("first")
    assert torch.equal(a.logits, alone.logits)  # read from the host tier
    streams = [b.generate(50, GREEDY), c.generate(20, GREEDY)]
    next(streams[0])
    a.feed(" more")  # every slot holds a generating session: the engine steps them until one ends
    assert streams[1].done and not streams[0].done and len(streams[1].token_ids) == 20
    alone.feed(" more")
    assert torch.equal(a.logits, alone.logits)

    late = a.generate(30, GREEDY)  # a holds c's slot: it starts at once
    d = engine.session()
    queued = d.generate(5, GREEDY, prompt="fourth")  # b and a generate: d waits for a slot
    assert engine.num_waiting == 1 and d.is_generating and not d.is_resident
    ref = Engine(model, slots=1).session()
    assert "".join(queued) == "".join(ref.generate(5, GREEDY, prompt="fourth"))
    engine.run([late, streams[0]])
    ref_b = Engine(model, slots=1).session().generate(50, GREEDY, prompt="second")
    list(ref_b)
    assert streams[0].token_ids == ref_b.token_ids  # waiting and stepping changed nobody's tokens
    for s in (a, b, c, d):
        s.close()
    with pytest.raises(RwkvStateError, match="closed"):
        a.feed("x")
    assert engine.pool.free_slots == 2 and len(engine.sessions) == 0


def test_a_slot_is_refused_only_when_waiting_cannot_help(model):
    engine = Engine(model, slots=1)
    a, b = engine.session(), engine.session()
    a.feed("x")
    with engine.residency.pinned_slots(a):  # an operation holds a's slot; nothing runs that could end
        with pytest.raises(SlotError, match="all 1 slots"):
            b.feed("y")
    assert b.tokens == [] and b.location == "none"


def test_session_is_busy_while_generating(engine):
    s = engine.session()
    s.feed("go")
    stream = s.generate(5, GREEDY)
    next(stream)
    with pytest.raises(RwkvStateError, match="is generating"):
        s.feed("more")
    stream.close()
    assert stream.finish_reason == "cancelled"
    s.feed("more")  # usable again
    with pytest.raises(ValueError, match="max_tokens"):
        s.generate(0)


def test_ids_beyond_the_tokenizer_are_never_sampled():
    cfg = tiny_config(n_layer=1, n_embd=32, head_size=16, ffn_dim=64, vocab_size=400)  # 256-byte tokenizer
    tensors = random_checkpoint(cfg, seed=8)
    tensors["head.weight"][256:] = 0
    tensors["head.weight"][256:, :] += 50.0  # make the undecodable ids by far the most likely
    engine = Engine(Model.from_tensors(tensors, cfg), slots=1)
    s = engine.session()
    s.feed("abc")
    assert int(s.logits.argmax()) >= 256
    stream = s.generate(20, SamplingParams(temperature=1.0, seed=0))
    list(stream)
    assert len(stream.token_ids) == 20 and max(stream.token_ids) < 256


def _streams(engine, n, params_of):
    sessions = [engine.session() for _ in range(n)]
    for i, s in enumerate(sessions):
        s.feed(f"prompt {i}")
    return sessions, [s.generate(8, params_of(i)) for i, s in enumerate(sessions)]


def test_a_stream_with_non_finite_logits_fails_alone_among_32(model):
    params_of = lambda i: SamplingParams(temperature=0.9, top_p=0.95, seed=i, stop_token_ids=[])  # noqa: E731
    clean_engine = Engine(model, slots=32)
    _, clean = _streams(clean_engine, 32, params_of)
    clean_engine.run(clean)
    engine = Engine(model, slots=32)
    sessions, streams = _streams(engine, 32, params_of)
    engine.residency.logits[sessions[13]._slot, 5] = float("nan")  # as a poisoned state would give
    engine.run(streams)
    assert streams[13].finish_reason == "error" and streams[13].token_ids == []
    others = [i for i in range(32) if i != 13]
    assert all(streams[i].finish_reason == "length" for i in others)
    assert all(streams[i].token_ids == clean[i].token_ids for i in others)
    sessions[13].feed("x")  # the session itself stays usable: new logits, a normal stream
    retry = sessions[13].generate(3, SamplingParams(temperature=0, stop_token_ids=[]))
    list(retry)
    assert retry.finish_reason == "length" and len(retry.token_ids) == 3


def test_logit_bias_steers_and_is_checked_against_the_vocabulary(engine):
    s = engine.session()
    s.feed("abc")
    stream = s.generate(6, SamplingParams(temperature=0, logit_bias={ord("q"): 100.0}, stop_token_ids=[]))
    assert "".join(stream) == "q" * 6
    with pytest.raises(ValueError, match="logit_bias"):
        s.generate(3, SamplingParams(logit_bias={10**6: 1.0}))
    assert not s.is_generating


def test_penalty_counts_follow_each_stream(engine):
    """A slot's counts row is rebuilt when a penalised stream starts, whatever the slot held."""
    s = engine.session()
    s.feed("abc")
    first = s.generate(12, SamplingParams(temperature=0, frequency_penalty=0.5, stop_token_ids=[]))
    list(first)
    slot = s._slot
    expected = torch.bincount(torch.tensor(first.token_ids), minlength=engine.stepper.counts.shape[1])
    assert torch.equal(engine.stepper.counts.row(slot), expected.to(torch.int32))
    s.reset()
    s.feed("abc")
    again = s.generate(12, SamplingParams(temperature=0, frequency_penalty=0.5, stop_token_ids=[]))
    list(again)
    assert again.token_ids == first.token_ids  # counts started from zero again
    plain = s.fork().generate(12, SamplingParams(temperature=0, stop_token_ids=[]))
    list(plain)
    assert plain.token_ids != first.token_ids  # the penalties did act


def test_decode_graphs_cover_every_batch_up_to_the_slot_count(model):
    """The captured sizes reach the pool's slot count exactly, so no decode batch that fits the
    pool runs eagerly for want of a graph (6 slots used to capture only 1, 2, 4)."""
    for slots, sizes in ((6, [1, 2, 4, 6]), (8, [1, 2, 4, 8]), (100, [1, 2, 4, 8, 16, 32, 64, 100]), (1, [1])):
        graphs = Engine(model, slots=slots).stepper.graphs
        assert graphs.batch_sizes == sizes and graphs.max_batch == slots
    assert Engine(model, slots=300).stepper.graphs.max_batch == 256  # max_decode_batch caps it


def test_warm_up_does_nothing_off_the_gpu():
    engine = Engine(Model.from_tensors(random_checkpoint(tiny_config(), seed=1), tiny_config()), slots=3)
    assert engine.warm_up() == 0.0 and engine.pool.free_slots == 3 and engine.steps == 0
