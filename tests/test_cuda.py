"""The reference forward on CUDA against the CPU reference (skipped without a GPU)."""

from __future__ import annotations

import gc

import pytest
import torch

from conftest import SHAPES, rel_err, random_tokens
from rwkvstate import Engine, Model, SamplingParams
from rwkvstate.model.synthetic import random_checkpoint
from rwkvstate.runtime.graphs import DecodeGraphs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("name", ["L3-C192-N64-V300", "L4-C96-N32-V1000"])
@pytest.mark.parametrize("layout", ["contiguous", "fragmented"])
def test_cuda_fp32_matches_cpu(name, layout):
    cfg = SHAPES[name]
    tensors = random_checkpoint(cfg, seed=3)
    cpu = Model.from_tensors(tensors, cfg)
    gpu = Model.from_tensors(tensors, cfg, device="cuda")
    seqs = [random_tokens(n, cfg.vocab_size, seed=n) for n in (13, 0, 1, 63)]
    want = cpu.forward(cpu.new_pool(4, layout=layout), [2, 0, 3, 1], seqs)
    pool = gpu.new_pool(4, layout=layout)
    got = gpu.forward(pool, [2, 0, 3, 1], seqs)
    assert got.device.type == "cuda"
    live = [0, 2, 3]
    assert rel_err(got[live].cpu(), want[live]) <= 1e-5
    assert torch.isnan(got[1]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_compute_and_state(dtype):
    cfg = SHAPES["L3-C192-N64-V300"]
    tensors = random_checkpoint(cfg, seed=4)
    ref = Model.from_tensors(tensors, cfg)
    gpu = Model.from_tensors(tensors, cfg, device="cuda", dtype=dtype)
    tokens = random_tokens(40, cfg.vocab_size, seed=5)
    want = ref.forward(ref.new_pool(1), [0], [tokens])[0]
    got = gpu.forward(gpu.new_pool(1, state_dtype=dtype), [0], [tokens])[0].cpu()
    assert rel_err(got, want) <= (5e-3 if dtype == torch.float16 else 3e-2)


def test_cuda_engine_generation_matches_cpu():
    cfg = SHAPES["L2-C128-N64"]
    tensors = random_checkpoint(cfg, seed=5)
    outs = []
    for device in ("cpu", "cuda"):
        engine = Engine(Model.from_tensors(tensors, cfg, device=device), slots=3)
        sessions = [engine.session() for _ in range(3)]
        for i, s in enumerate(sessions):
            s.feed(random_tokens(5 + 7 * i, cfg.vocab_size, seed=i))
        streams = [s.generate(16, SamplingParams(temperature=0)) for s in sessions]
        engine.run(streams)
        outs.append([st.token_ids for st in streams])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float16])
def test_cuda_graph_decode_equals_eager(state_dtype):
    cfg = SHAPES["L3-C192-N64-V300"]
    tensors = random_checkpoint(cfg, seed=6)
    results = []
    for eager in (True, False):
        model = Model.from_tensors(tensors, cfg, device="cuda", dtype=torch.float16)
        engine = Engine(model, slots=6, state_dtype=state_dtype, enforce_eager=eager)
        sessions = [engine.session() for _ in range(5)]
        for i, s in enumerate(sessions):
            s.feed(random_tokens(3 + 4 * i, cfg.vocab_size, seed=20 + i))
        streams = [s.generate(12 + i, SamplingParams(temperature=0)) for i, s in enumerate(sessions)]
        engine.run(streams)  # batch shrinks 5 -> 1 as streams finish: several graph sizes
        assert (engine.graphs.replays > 0) != eager
        results.append(([st.token_ids for st in streams], [engine.pool.export(s.slot) for s in sessions]))
    (ids_eager, states_eager), (ids_graph, states_graph) = results
    assert ids_eager == ids_graph
    for a, b in zip(states_eager, states_graph):  # padded GEMMs may round differently
        assert all(rel_err(b[k], a[k]) <= 2e-3 for k in a)


def dropped_graphs_check(rounds: int = 3) -> tuple[float, int]:
    """Captures two DecodeGraphs, drops the first (torch frees the cuBLAS workspace of its capture
    stream), hands the freed memory out again (1 GiB of 7.0s), then decodes through the second's
    graphs beside eager forwards. Returns (the largest relative difference of the logits, how many
    filler elements changed): a graph that still writes the freed workspace shows in either."""
    cfg = SHAPES["L3-C192-N64-V300"]
    model = Model.from_tensors(random_checkpoint(cfg, seed=7), cfg, device="cuda", dtype=torch.float16)
    first = DecodeGraphs(model, model.new_pool(5), max_batch=4)
    first.capture()
    second = DecodeGraphs(model, model.new_pool(5), max_batch=4)
    second.capture()
    del first
    gc.collect()
    torch.cuda.empty_cache()
    fillers = [torch.full((2**24,), 7.0, device="cuda") for _ in range(16)]
    reference = model.new_pool(5)
    worst = 0.0
    for step in range(rounds * 4):
        rows = step % 4 + 1  # every graph size
        slots, tokens = [4, 0, 2, 1][:rows], random_tokens(rows, cfg.vocab_size, seed=step)
        got = second.decode(slots, tokens).clone()
        want = model.forward(reference, slots, [[t] for t in tokens])
        worst = max(worst, rel_err(got, want))
    torch.cuda.synchronize()
    return worst, sum(int((f != 7.0).sum()) for f in fillers)


def test_cuda_dropping_one_engines_graphs_leaves_anothers_intact():
    """Live DecodeGraphs capture on different streams: dropping one leaves the other's graphs and
    the memory handed out since as they were (pytorch/pytorch#193402, runtime/graphs.py)."""
    worst, changed = dropped_graphs_check()
    assert changed == 0 and worst <= 2e-3


def test_cuda_live_decode_graphs_never_share_a_capture_stream():
    cfg = SHAPES["L2-C128-N64"]
    model = Model.from_tensors(random_checkpoint(cfg, seed=1), cfg, device="cuda")
    live: list[DecodeGraphs | None] = [DecodeGraphs(model, model.new_pool(3), max_batch=2) for _ in range(40)]
    for i, graphs in enumerate(live):  # 40: more than the 32 streams torch's pool hands out in turn
        assert graphs is not None
        graphs.capture()
        if i >= 20:  # half of them dropped on the way: their streams are handed out again
            live[i - 20] = None
    held = [g.stream.cuda_stream for g in live if g is not None and g.stream is not None]
    assert len(held) == len(set(held)) == 20
    default = torch.cuda.graph.default_capture_stream
    assert default is None or default.cuda_stream not in held


def test_cuda_graph_steps_mask_stop_ids_and_failed_rows_on_the_device():
    """Graph steps feed the sampled ids without a host round trip: a row that hits a stop id must
    leave its slot untouched there, as the eager path does on the host."""
    cfg = SHAPES["L3-C192-N64-V300"]
    tensors = random_checkpoint(cfg, seed=9)

    def run(eager: bool, stop: list[int]):
        engine = Engine(Model.from_tensors(tensors, cfg, device="cuda"), slots=4, enforce_eager=eager)
        sessions = [engine.session() for _ in range(3)]
        for i, s in enumerate(sessions):
            s.feed(random_tokens(4 + 3 * i, cfg.vocab_size, seed=40 + i))
        streams = [s.generate(10, SamplingParams(temperature=0.8, seed=i, stop_token_ids=stop))
                   for i, s in enumerate(sessions)]  # fmt: skip
        engine.run(streams)
        return engine, streams, [s.tokens for s in sessions], [engine.pool.export(s.slot) for s in sessions]

    _, free_run, _, _ = run(True, [])
    stop = [free_run[0].token_ids[4]]
    results = [run(eager, stop) for eager in (True, False)]
    (_, s_eager, tokens_eager, states_eager), (engine, s_graph, tokens_graph, states_graph) = results
    assert engine.graphs.replays > 0 and s_graph[0].finish_reason == "stop"
    assert tokens_eager == tokens_graph and stop[0] not in s_graph[0].token_ids
    for a, b in zip(states_eager, states_graph):
        assert all(rel_err(b[k], a[k]) <= 1e-5 for k in a)


def test_cuda_short_prompts_arriving_during_decode_are_read_in_the_graph():
    """Prompts that arrive while streams decode are read one token per graph step (no packed
    step runs), and end where the eager engine, which reads them packed, ends."""
    cfg = SHAPES["L3-C192-N64-V300"]
    tensors = random_checkpoint(cfg, seed=12)

    def run(eager: bool):
        # 8 slots: graphs of up to 8 rows, so all five streams fit one (6 slots would capture up to 4)
        engine = Engine(Model.from_tensors(tensors, cfg, device="cuda"), slots=8, enforce_eager=eager,
                        history_every=4, prefix_cache_bytes=1 << 24, prefix_cache_every=8)  # fmt: skip
        first = engine.session().generate(30, SamplingParams(temperature=0, stop_token_ids=[]),
                                          prompt=random_tokens(5, cfg.vocab_size, seed=1))  # fmt: skip
        engine.step()
        late = [engine.session().generate(12, SamplingParams(temperature=0.8, seed=i, stop_token_ids=[]),
                                          prompt=random_tokens(3 + 5 * i, cfg.vocab_size, seed=2 + i))
                for i in range(4)]  # fmt: skip
        prompting = len(engine.stepper.batch.prompting)
        packed = engine.steps - engine.graphs.replays
        engine.run([first] + late)
        states = [engine.pool.export(s.session.slot) for s in [first] + late]
        return prompting, engine.steps - engine.graphs.replays - packed, [s.token_ids for s in [first] + late], states

    (p_eager, _, ids_eager, states_eager), (p_graph, packed_graph, ids_graph, states_graph) = map(run, (True, False))
    assert p_eager == 0 and p_graph == 4 and packed_graph == 0
    assert ids_eager == ids_graph
    for a, b in zip(states_eager, states_graph):
        assert all(rel_err(b[k], a[k]) <= 1e-4 for k in a)


def test_cuda_graph_padding_touches_only_the_scratch_slot():
    cfg = SHAPES["L2-C128-N64"]
    model = Model.from_tensors(random_checkpoint(cfg, seed=7), cfg, device="cuda")
    engine = Engine(model, slots=8)
    pool = engine.pool
    pool.data[: pool.num_slots].normal_()
    before = pool.data[: pool.num_slots].clone()
    engine.graphs.decode([5, 2, 7], [1, 2, 3])  # padded to a graph of 4 rows
    changed = (pool.data[: pool.num_slots] != before).flatten(1).any(1).nonzero().flatten().tolist()
    assert changed == [2, 5, 7]


def test_cuda_fla_prefill_backend_agrees():
    pytest.importorskip("fla.ops.rwkv7")
    cfg = SHAPES["L3-C192-N64-V300"]
    tensors = random_checkpoint(cfg, seed=9)
    seqs = [random_tokens(n, cfg.vocab_size, seed=n) for n in (200, 0, 1, 77)]
    outs = []
    for prefill in (None, "fla"):
        model = Model.from_tensors(tensors, cfg, device="cuda", dtype=torch.float16)
        model.backends["wkv_prefill"] = prefill
        pool = model.new_pool(4)
        logits = model.forward(pool, [0, 1, 2, 3], seqs)[[0, 2, 3]]
        outs.append((logits, pool.export(3)["wkv"]))
    assert rel_err(outs[1][0], outs[0][0]) <= 1e-2
    assert rel_err(outs[1][1], outs[0][1]) <= 1e-2


def test_cuda_chunked_prefill_agrees_with_the_recurrent_kernel():
    """The chunked WKV kernel (explicit, compiled) against the default token-by-token kernel."""
    cfg = SHAPES["L3-C192-N64-V300"]
    tensors = random_checkpoint(cfg, seed=9)
    seqs = [random_tokens(n, cfg.vocab_size, seed=n) for n in (200, 0, 1, 77)]
    outs = []
    for prefill in ("triton-chunked", None):
        model = Model.from_tensors(tensors, cfg, device="cuda")
        model.backends["wkv_prefill"] = prefill
        pool = model.new_pool(4, state_dtype=torch.float16)
        logits = model.forward(pool, [0, 1, 2, 3], seqs)[[0, 2, 3]]
        outs.append((logits, pool.export(0)["wkv"], pool.export(3)["wkv"]))
    for got, want in zip(*outs):
        assert rel_err(got, want) <= 1e-3  # float32 math, the state stored in fp16


@pytest.mark.parametrize("fmt", ["fp16", "int8", "fp8"])
def test_cuda_lifecycle_matches_cpu(fmt):
    """On the GPU: compressed ring history, host tier, prefix cache and CUDA-graph decode together,
    against a CPU fp32 run of the same tokens."""
    cfg = SHAPES["L3-C192-N64-V300"]
    tensors = random_checkpoint(cfg, seed=6)
    cpu = Model.from_tensors(tensors, cfg)
    gpu = Model.from_tensors(tensors, cfg, device="cuda")
    engine = Engine(gpu, slots=2, history_every=8, history_capacity=3, history_format=fmt, host_format=fmt,
                    prefix_cache_bytes=1 << 24, prefix_cache_every=16)  # fmt: skip
    tol = {"fp16": 1e-3, "int8": 3e-2, "fp8": 1e-1}[fmt]
    shared = random_tokens(40, cfg.vocab_size, seed=7)
    sessions = [engine.session() for _ in range(5)]
    for i, s in enumerate(sessions):  # 5 sessions over 2 slots, all sharing a 32-token cached prefix
        s.feed(shared + [i])
    streams = [s.generate(12, SamplingParams(temperature=0)) for s in sessions[:2]]
    engine.run(streams)
    for s in sessions:
        s.rollback(5)
        s.feed([7, 8])
        want = cpu.forward(cpu.new_pool(1), [0], [s.tokens])[0]
        assert rel_err(s.logits.cpu(), want) < tol, (fmt, s)
    assert engine.prefix_cache.stats.hits >= 4 and engine.tier.evictions > 0 and engine.graphs.replays > 0


def test_cuda_warm_up_compiles_and_leaves_the_pool_as_it_was():
    cfg = SHAPES["L3-C192-N64-V300"]
    tensors = random_checkpoint(cfg, seed=9)
    ids = []
    for warm in (False, True):
        engine = Engine(Model.from_tensors(tensors, cfg, device="cuda", dtype=torch.float16), slots=5)
        if warm:
            assert engine.warm_up() > 0 and engine.graphs.replays == 0
            pool = engine.pool  # every slot reset (the scratch slot after them is the graphs' to write)
            assert pool.free_slots == 5 and not pool.data[: pool.num_slots].any()
        session = engine.session()
        session.feed(random_tokens(9, cfg.vocab_size, seed=3))
        stream = session.generate(6, SamplingParams(temperature=0))
        engine.run([stream])
        ids.append(stream.token_ids)
    assert ids[0] == ids[1]
