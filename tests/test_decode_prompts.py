"""Short prompts read inside the decode batch: a stream that arrives while others decode feeds
its prompt one token per step through the decode step (on the device), never stalling them
with a packed forward, and ends up exactly where a packed read of its prompt would.

On the CPU the decode graph cannot be captured; these tests let the stepper take its on-device
path anyway (`can_replay` patched), where `DecodeGraphs.replay` runs the same decode step
eagerly, so the device-side code (prompt table, counts of tokens left, feed mask) runs here."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_same_run, fresh_run
from rwkvstate import Engine, Model, SamplingParams
from rwkvstate.model.synthetic import random_checkpoint, tiny_config

GREEDY = SamplingParams(temperature=0, stop_token_ids=[])


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(n_layer=2, n_embd=64, head_size=16, ffn_dim=128)
    return Model.from_tensors(random_checkpoint(cfg, seed=11), cfg)


def on_device_engine(model, **kwargs) -> Engine:
    engine = Engine(model, **kwargs)
    engine.stepper.graphs.can_replay = lambda batch: batch <= engine.stepper.graphs.max_batch
    return engine


def packed_steps(engine, monkeypatch) -> list[int]:
    """Counts the stepper's packed (eager Model.forward) steps."""
    calls = []
    original = engine.stepper._packed_step

    def counted(chunks):
        calls.append(len(chunks))
        return original(chunks)

    monkeypatch.setattr(engine.stepper, "_packed_step", counted)
    return calls


def alone(model, prompt: str, n: int, params: SamplingParams) -> list[int]:
    """The same request in an engine of its own: its prompt read in one packed chunk."""
    stream = Engine(model, slots=1).session().generate(n, params, prompt=prompt)
    list(stream)
    return stream.token_ids


def start_running(engine, n: int = 60):
    running = engine.session().generate(n, GREEDY, prompt="go")
    engine.step()  # nothing decodes yet: the first prompt is read packed, then it decodes
    assert len(engine.stepper.batch) == 1 and not engine.stepper.batch.prompting
    return running


def test_a_short_prompt_is_read_in_the_decode_batch_and_matches_a_packed_read(model, monkeypatch):
    engine = on_device_engine(model, slots=4)
    running = start_running(engine)
    packed = packed_steps(engine, monkeypatch)
    prompt = "hello there, world"
    late = engine.session().generate(20, GREEDY, prompt=prompt)
    assert late in engine.stepper.batch.prompting and not engine.scheduler.prefilling
    for _ in range(len(prompt)):  # byte tokenizer: one token per character
        before, fed = len(running.token_ids), engine.tokens_fed
        engine.step()
        assert len(running.token_ids) == before + 1 and engine.tokens_fed == fed + 1
    assert not engine.stepper.batch.prompting and late.token_ids == []
    engine.run([late, running])
    assert packed == []  # every step replayed the decode step
    assert late.token_ids == alone(model, prompt, 20, GREEDY)
    assert late.session.tokens == list(prompt.encode()) + late.token_ids
    assert running.token_ids == alone(model, "go", 60, GREEDY)  # the running stream never noticed


def test_seeded_penalised_sampling_is_the_same_whichever_way_the_prompt_is_read(model):
    params = SamplingParams(temperature=1.0, top_p=0.9, frequency_penalty=0.7, seed=321, stop_token_ids=[])
    engine = on_device_engine(model, slots=3)
    start_running(engine)
    late = engine.session().generate(24, params, prompt="a seeded prompt")
    assert late in engine.stepper.batch.prompting
    list(late)
    assert late.token_ids == alone(model, "a seeded prompt", 24, params)
    # the prompting row's thrown-away draws counted for nothing
    counts = engine.stepper.counts.row(late.session._slot)
    assert torch.equal(counts, torch.bincount(torch.tensor(late.token_ids), minlength=counts.numel()).to(counts.dtype))


def test_long_prompts_and_prompts_into_an_idle_engine_are_read_packed(model, monkeypatch):
    engine = on_device_engine(model, slots=4, decode_prompt_tokens=8)
    first = engine.session().generate(5, GREEDY, prompt="idle")
    assert first in engine.scheduler.prefilling  # nothing decodes: packed is fastest
    engine.step()
    long = engine.session().generate(5, GREEDY, prompt="nine toks")
    assert long in engine.scheduler.prefilling and not engine.stepper.batch.prompting
    short = engine.session().generate(5, GREEDY, prompt="eight to")
    assert short in engine.stepper.batch.prompting
    engine.run([first, long, short])
    assert short.token_ids == alone(model, "eight to", 5, GREEDY)
    off = on_device_engine(model, slots=2, decode_prompt_tokens=0)
    start_running(off)
    assert off.session().generate(3, GREEDY, prompt="x") in off.scheduler.prefilling


def test_prompt_end_and_periodic_cuts_are_kept_for_undo_and_the_prefix_cache(model):
    kwargs = dict(slots=3, history_every=4, prefix_cache_bytes=1 << 22, prefix_cache_every=8)
    engine = on_device_engine(model, **kwargs)
    start_running(engine)
    prompt = "thirteen toks"  # 13 tokens: history cuts at 4, 8, 12, cache cuts at 8 and the end
    late = engine.session().generate(10, GREEDY, prompt=prompt)
    assert late in engine.stepper.batch.prompting
    list(late)
    session = late.session
    cache = engine.timeline.prefix_cache
    ids = list(prompt.encode())
    assert cache.contains(ids) and cache.contains(ids[:8])
    # periodic entries at 8 and 12 (4 was evicted by later ones) and the undo point at 13
    assert {8, 12, 13} <= set(engine.timeline.history.positions[session._slot])
    assert late.token_ids == alone(model, prompt, 10, GREEDY)
    again = session.regenerate()  # back to where the reply started (the end of the prompt), again
    list(again)
    assert again.token_ids == late.token_ids
    session.rollback(len(again.token_ids))
    assert session.tokens == ids  # every part of the state as a cold run of the prompt gives it
    assert_same_run(session.logits, session.snapshot().state, *fresh_run(model, ids), tol=1e-5)


def test_a_failed_step_with_a_prompting_row_loses_no_prompt_token(model, monkeypatch):
    engine = on_device_engine(model, slots=3)
    running = start_running(engine, 30)
    late = engine.session().generate(12, GREEDY, prompt="abcdef")
    engine.step()
    engine.step()  # two prompt tokens read on the device
    graphs, failed = engine.stepper.graphs, []
    original = graphs.replay

    def fails_once(*args):
        if not failed:
            failed.append(True)
            raise RuntimeError("injected: a decode step that raised")
        return original(*args)

    monkeypatch.setattr(graphs, "replay", fails_once)
    engine.run([late, running])
    assert failed and late.finish_reason == running.finish_reason == "length"
    assert late.session.tokens == list(b"abcdef") + late.token_ids
    assert late.token_ids == alone(model, "abcdef", 12, GREEDY)
    assert running.token_ids == alone(model, "go", 30, GREEDY)


def test_a_prompting_stream_cancelled_halfway_leaves_the_batch_clean(model):
    engine = on_device_engine(model, slots=3)
    running = start_running(engine, 20)
    late = engine.session().generate(8, GREEDY, prompt="cancel me soon")
    engine.step()
    late.close()
    assert late not in engine.stepper.batch.prompting and late not in engine.stepper.batch
    list(running)
    assert running.token_ids == alone(model, "go", 20, GREEDY)
    follow = engine.session().generate(6, GREEDY, prompt="next")
    list(follow)
    assert follow.token_ids == alone(model, "next", 6, GREEDY)


def test_queued_short_prompts_join_the_decode_batch_once_streams_decode(model, monkeypatch):
    """A burst into an idle engine: the first step reads its budget packed; the short prompts
    still queued then join the decode batch instead of more packed steps, which would hold up
    the streams that just started. A prompt whose packed read has begun stays packed."""
    engine = on_device_engine(model, slots=6, max_prefill_tokens=8, decode_prompt_tokens=8)
    packed = packed_steps(engine, monkeypatch)
    prompts = ["abcd", "efgh", "mnop", "qrst"]  # the first two fill the first step's budget of 8
    streams = [engine.session().generate(6, GREEDY, prompt=p) for p in prompts]
    assert engine.scheduler.prefilling == streams  # nothing decodes yet: all queued for packed reads
    engine.step()
    assert packed == [2] and engine.scheduler.prefilling == streams[2:]
    engine.step()  # two streams decode now: the other two are read in the decode batch
    assert packed == [2] and not engine.scheduler.prefilling
    assert set(streams[2:]) <= engine.stepper.batch.prompting
    engine.run(streams)
    assert packed == [2]
    for stream, prompt in zip(streams, prompts):
        assert stream.token_ids == alone(model, prompt, 6, GREEDY)

    begun = on_device_engine(model, slots=3, max_prefill_tokens=8, decode_prompt_tokens=8)
    packed = packed_steps(begun, monkeypatch)
    first = begun.session().generate(6, GREEDY, prompt="abcd")
    long = begun.session().generate(6, GREEDY, prompt="abcdefghijkl")  # 4 of its 12 tokens in step 1
    begun.step()
    assert begun.scheduler.prefilling == [long] and len(long.pending) == 8
    begun.step()  # 8 left (<= decode_prompt_tokens), but its packed read has begun: it stays packed
    assert packed == [2, 1] and not begun.scheduler.prefilling
    begun.run([first, long])
    assert long.token_ids == alone(model, "abcdefghijkl", 6, GREEDY)
