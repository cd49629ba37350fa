"""The GEMV kernel (single and grouped projections of at most 16 rows) against an fp32 reference of
the same inputs (interpreted on CPU, tiny odd shapes; compiled on a GPU, where the 1.5B and 7.2B
shapes run too), its split-K path, the channel mix through it, and the model's decode with it."""

import pytest
import torch

pytest.importorskip("triton")

# tests/conftest.py sets TRITON_INTERPRET=1 before rwkvstate is imported when there is no GPU
from conftest import poison_empty, random_tokens, rel_err  # noqa: E402
from rwkvstate import Engine, Model, SamplingParams  # noqa: E402
from rwkvstate.model.synthetic import random_checkpoint, tiny_config  # noqa: E402
from rwkvstate.ops import channel_mix as cm  # noqa: E402
from rwkvstate.ops import gemv as gm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # 16-bit: one rounding of the output
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def inputs(G: int | None, T: int, K: int, N: int, dtype, seed: int, transposed: bool = False):
    """x [G, T, K] and weight [G, N, K] (G None: x [T, K], weight [N, K]) in dtype, weights scaled
    so outputs are O(1); transposed: weight is the [N, K] view of a contiguous [K, N] tensor."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if G is None else (G,)
    x = torch.randn(*lead, T, K, generator=gen)
    w = torch.randn(*lead, K, N, generator=gen).transpose(-1, -2) if transposed else torch.randn(*lead, N, K, generator=gen)
    return x.to(DEVICE, dtype), (w * K**-0.5).to(DEVICE, dtype)


def exact(x, w, residual=None, activation="none"):
    """The fp32 reference of the same (rounded) inputs."""
    return gm.gemv_reference(x.float(), w.float(), None if residual is None else residual.float(), activation)


@pytest.fixture
def poisoned_empty(monkeypatch):
    poison_empty(monkeypatch, gm)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("G,T,K,N", [(None, 1, 40, 72), (3, 3, 72, 40), (3, 8, 136, 40), (None, 8, 72, 136), (2, 16, 40, 24)])
def test_matches_fp32_reference(G, T, K, N, dtype, poisoned_empty):
    x, w = inputs(G, T, K, N, dtype, seed=T * K + N)
    got = gm.gemv(x, w, backend="triton")
    want = exact(x, w)
    assert got.dtype == dtype and got.shape == want.shape and not got.isnan().any()
    assert rel_err(got, want) <= TOL[dtype]
    assert rel_err(got, gm.gemv(x, w)) <= TOL[dtype]  # backend None: the torch reference


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("splits", [1, 2, 3])
def test_split_k_epilogues_and_transposed_weight(splits, dtype, poisoned_empty):
    """K in 16-wide steps over 1-3 splits (the reduce launch), relu^2 and a residual, a weight
    stored as the transposed view of a [K, N] tensor (the channel mix's value)."""
    x, w = inputs(2, 3, 72, 40, dtype, seed=splits, transposed=True)
    residual = torch.randn(2, 3, 40, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    for activation, res in (("none", residual), ("relu2", None)):
        got = gm.gemv_triton(x, w, res, activation, block_n=16, block_k=16, num_splits=splits)
        assert not got.isnan().any() and rel_err(got, exact(x, w, res, activation)) <= TOL[dtype]
        again = gm.gemv_triton(x, w, res, activation, block_n=16, block_k=16, num_splits=splits)
        assert torch.equal(got, again)  # deterministic: the splits are added in a fixed order


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("T,splits,block_t", [(17, 1, 16), (37, 3, 16), (70, None, 32), (40, 2, None)])
def test_many_rows_in_token_tiles(T, splits, block_t, dtype, poisoned_empty):
    """More than 16 rows: tiles of block_t token rows (the last partial), grouped and single,
    K split or not (added in the kernel), relu^2 and a residual, a transposed weight."""
    x, w = inputs(3, T, 136, 40, dtype, seed=T + 1, transposed=True)
    residual = torch.randn(3, T, 40, generator=torch.Generator().manual_seed(T)).to(DEVICE, dtype)
    kw = dict(block_n=16, block_k=16, num_splits=splits, block_t=block_t, num_warps=4)
    for activation, res in (("none", residual), ("relu2", None)):
        got = gm.gemv_triton(x, w, res, activation, **kw)
        assert got.shape == (3, T, 40) and not got.isnan().any()
        assert rel_err(got, exact(x, w, res, activation)) <= TOL[dtype]
    one = gm.gemv_triton(x[1], w[1], residual[1], **kw)
    assert one.shape == (T, 40) and rel_err(one, exact(x[1], w[1], residual[1])) <= TOL[dtype]
    assert torch.equal(gm.gemv(x, w, backend="triton"), gm.gemv_triton(x, w))  # the backend, default tiles


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("T,splits", [(1, 2), (3, 3), (8, 5)])
def test_split_sums_added_in_the_kernel_or_by_a_launch_alike(T, splits, dtype, poisoned_empty):
    """split_reduce "kernel" (the split that completes a tile adds every split's sums, in split
    order) agrees with the reduce launch (float32 sums in another order) and with the fp32
    reference, for the grouped GEMV (relu^2, a residual) and the sparse-input GEMV; it is
    deterministic and leaves its counts zeroed for the next launch; a bad name is refused."""
    x, w = inputs(3, T, 136, 40, dtype, seed=T + splits, transposed=True)
    residual = torch.randn(3, T, 40, generator=torch.Generator().manual_seed(T)).to(DEVICE, dtype)
    for activation, res in (("none", residual), ("relu2", None)):
        args = (x, w, res, activation)
        kw = dict(block_n=16, block_k=16, num_splits=splits)
        got = gm.gemv_triton(*args, split_reduce="kernel", **kw)
        assert rel_err(got, gm.gemv_triton(*args, split_reduce="launch", **kw)) <= TOL[dtype]
        assert rel_err(got, exact(*args)) <= TOL[dtype]
        assert torch.equal(got, gm.gemv_triton(*args, split_reduce="kernel", **kw))  # the counts were reset
    act = torch.relu(x[0]).to(dtype)  # about half the rows of W^T skipped
    v = w[0]  # [N, K] view of a contiguous [K, N] tensor
    for block_n in (16, 32):
        kw = dict(block_n=block_n, block_k=16, num_splits=splits)
        got = gm.gemv_sparse_input(act, v, residual[0], split_reduce="kernel", **kw)
        assert rel_err(got, gm.gemv_sparse_input(act, v, residual[0], split_reduce="launch", **kw)) <= TOL[dtype]
        assert torch.equal(got, gm.gemv_sparse_input(act, v, residual[0], split_reduce="kernel", **kw))
    assert all(not c.any() for c in gm._COUNTERS.values())
    # the default: in the kernel up to IN_KERNEL_MAX_N outputs, a second launch beyond; one split: neither
    dev = torch.device(DEVICE)
    assert gm._reduce_plan(3, 10, gm.IN_KERNEL_MAX_N, dev, None) is not None
    assert gm._reduce_plan(3, 10, gm.IN_KERNEL_MAX_N + 1, dev, None) is None
    assert gm._reduce_plan(3, 10, gm.IN_KERNEL_MAX_N + 1, dev, "kernel") is not None
    assert gm._reduce_plan(1, 10, 16, dev, "kernel") is None
    with pytest.raises(ValueError, match="split_reduce must be one of"):
        gm.gemv_triton(x, w, num_splits=2, split_reduce="atomics")


def test_launch_configuration():
    cfg = gm.tiles(1, 2048, 2048, "cpu", num_splits=3)
    assert cfg["k_split"] % cfg["block_k"] == 0 and cfg["num_splits"] * cfg["k_split"] >= 2048
    assert (cfg["num_splits"] - 1) * cfg["k_split"] < 2048  # no empty split
    assert gm.tiles(1, 40, 72, "cpu", block_k=16, num_splits=100)["num_splits"] == 5  # at most one per K step
    assert gm.tiles(3, 40, 72, "cpu")["block_n"] == 32 and gm.tiles(1, 8, 8, "cpu")["block_k"] == 16
    # the interpreter counts 4 SMs: 4 tiles of columns give each a program, K stays whole; 3 tiles
    # split K into as many ranges as give PROGRAMS_PER_SM programs per SM (3 x 3 >= 8)
    assert gm.tiles(1, 128, 2048, "cpu")["num_splits"] == 1
    assert gm.tiles(1, 96, 2048, "cpu")["num_splits"] == 3


def test_bad_input():
    x, w = inputs(3, 2, 40, 24, torch.float32, seed=1)
    with pytest.raises(ValueError, match="at most 16 rows"):  # the sparse-input GEMV pads to one tile
        gm.gemv_sparse_input(torch.zeros(17, 40, device=DEVICE), w[0].t().contiguous().t())
    with pytest.raises(ValueError, match="expected x"):
        gm.gemv_triton(x, w[:2])
    with pytest.raises(ValueError, match="share a dtype"):
        gm.gemv_triton(x, w.half())
    with pytest.raises(ValueError, match="activation"):
        gm.gemv_triton(x, w, activation="gelu")
    with pytest.raises(ValueError, match="residual"):
        gm.gemv_triton(x, w, torch.zeros(3, 2, 23, device=DEVICE))
    with pytest.raises(ValueError, match="unit stride"):
        gm.gemv_triton(x.transpose(1, 2).contiguous().transpose(1, 2), w)
    with pytest.raises(ValueError, match="unknown backend"):
        gm.gemv(x, w, backend="cublas")
    assert gm.gemv_triton(x[:, :0], w).shape == (3, 0, 24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_channel_mix_through_gemv(dtype):
    x, key = inputs(None, 3, 40, 72, dtype, seed=3)
    _, value_t = inputs(None, 1, 72, 40, dtype, seed=4)
    value = value_t.t().contiguous().t()  # [C, F] view of a contiguous [F, C] tensor, as the model stores it
    residual = torch.randn(3, 40, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    got = cm.channel_mix(x, key, value, residual, backend="triton-gemv")
    want = cm.channel_mix_reference(x.float(), key.float(), value.float(), residual.float())
    assert got.dtype == dtype and rel_err(got, want) <= 3 * TOL[dtype]


# ---- the model ---------------------------------------------------------------------------------
CFG = tiny_config(n_layer=2, n_embd=48, head_size=16, vocab_size=61, ffn_dim=96, decay_rank=4, aaa_rank=4,
                  mv_rank=4, gate_rank=8)  # fmt: skip


def decode_both(cfg, tensors, dtype, backends: dict, batch: int):
    """Logits and states of one prompt per sequence then two decode steps (decode_step), with
    cuBLAS projections and with `backends`."""
    outs = []
    for extra in ({"gemv": "torch", "channel_mix": "torch", "lora": "torch"}, backends):
        model = Model.from_tensors(tensors, cfg, device=DEVICE, dtype=dtype)
        model.backends.update(extra)
        pool = model.new_pool(batch + 1, state_dtype=torch.float32)
        model.forward(pool, list(range(batch)), [random_tokens(3 + i, cfg.vocab_size, seed=i) for i in range(batch)])
        slots = torch.tensor(list(range(batch)), device=DEVICE)
        steps = [model.decode_step(pool, slots, torch.tensor([(5 * i + s) % cfg.vocab_size for i in range(batch)],
                                                             device=DEVICE)) for s in range(2)]  # fmt: skip
        outs.append((torch.stack(steps), [pool.export(s) for s in range(batch)]))
    return outs


def test_model_rkv_views_and_mix_order():
    model = Model.from_tensors(random_checkpoint(CFG, seed=2), CFG)
    lw = model.weights.layers[1]
    assert lw.rkv.shape == (3, 48, 48) and lw.key.data_ptr() == lw.rkv[1].data_ptr()
    tensors = random_checkpoint(CFG, seed=2)
    assert torch.equal(lw.mix[1], tensors["blocks.1.att.x_k"].squeeze()) and torch.equal(lw.lora.down_weight(1), lw.w1)
    assert lw.lora.mixes == (2, 3, 4, 5)  # v, w, a, g read the mixes of x_v, x_w, x_a, x_g
    assert all(g is None for g in lw.lora.gathers)  # every group reads its mixes as a view


@pytest.mark.parametrize("batch", [1, 3])
def test_model_decode_with_gemv_matches_default(batch, monkeypatch):
    calls = []
    kernel = gm.gemv_triton

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return kernel(*args, **kwargs)

    monkeypatch.setitem(gm._BACKENDS, "triton", counted)
    monkeypatch.setattr(cm, "gemv_triton", counted)  # the channel mix's import
    tensors = random_checkpoint(CFG, seed=21)
    (want, want_states), (got, got_states) = decode_both(
        CFG, tensors, torch.float32, {"gemv": "triton", "channel_mix": "triton-gemv", "lora": "triton"}, batch
    )  # lora "triton": on CUDA the default would take r/k/v of one row into the launch of the LoRA downs
    assert rel_err(got, want) <= 1e-5
    for a, b in zip(want_states, got_states):
        assert all(rel_err(b[k], a[k]) <= 1e-5 for k in a)
    # decode steps only (the prompts take F.linear): per layer and step r/k/v, output, FFN key, FFN value
    assert sorted(map(tuple, calls)) == sorted([(3, 48, 48), (48, 48), (96, 48), (48, 96)] * 2 * 2)


def test_model_gemv_backend_is_checked():
    model = Model.from_tensors(random_checkpoint(CFG, seed=3), CFG, device=DEVICE)
    assert model.backends["gemv"] is None
    model.backends["gemv"] = "bogus"
    with pytest.raises(ValueError, match="unknown backend"):
        model.forward(model.new_pool(1), [0], [[1, 2]])


def test_model_batched_gemms_match_reference():
    """r/k/v and the LoRA chains as batched GEMMs (the CUDA default beyond small decode batches)
    against F.linear each, on a packed pass of prompts and on a decode step."""
    (want, want_states), (got, got_states) = decode_both(CFG, random_checkpoint(CFG, seed=9), torch.float32,
                                                         {"gemv": "bmm", "lora": "bmm"}, batch=5)  # fmt: skip
    assert rel_err(got, want) <= 1e-5
    for a, b in zip(want_states, got_states):
        assert all(rel_err(b[k], a[k]) <= 1e-5 for k in a)


def test_model_lora_triton_for_prompts(monkeypatch):
    """lora "triton" for every pass: the packed prompts (33 rows) take the many-rows kernels, the
    decode steps (6 rows) the small ones; both against the torch chains."""
    from rwkvstate.ops import lora as lo

    rows: list[int] = []
    many = lo.lora_rows_triton
    monkeypatch.setattr(lo, "lora_rows_triton", lambda x, p, **kw: rows.append(x.shape[1]) or many(x, p, **kw))
    (want, want_states), (got, got_states) = decode_both(CFG, random_checkpoint(CFG, seed=10), torch.float32,
                                                         {"lora": "triton"}, batch=6)  # fmt: skip
    assert rows == [3 + 4 + 5 + 6 + 7 + 8] * CFG.n_layer
    assert rel_err(got, want) <= 1e-5
    for a, b in zip(want_states, got_states):
        assert all(rel_err(b[k], a[k]) <= 1e-5 for k in a)


def test_model_gemv_triton_all(monkeypatch):
    """gemv "triton-all": r/k/v and the output projection of every pass on the kernel, the packed
    prompts (33 rows) in its token tiles, the decode steps (6 rows) in one tile; against cuBLAS."""
    rows: list[int] = []
    kernel = gm.gemv_triton
    monkeypatch.setitem(gm._BACKENDS, "triton", lambda x, w, *a, **k: rows.append(x.shape[-2]) or kernel(x, w, *a, **k))
    (want, want_states), (got, got_states) = decode_both(CFG, random_checkpoint(CFG, seed=11), torch.float32,
                                                         {"gemv": "triton-all"}, batch=6)  # fmt: skip
    assert rows == [33] * 2 * CFG.n_layer + [6] * 2 * 2 * CFG.n_layer  # r/k/v and the output, per layer
    assert rel_err(got, want) <= 1e-5
    for a, b in zip(want_states, got_states):
        assert all(rel_err(b[k], a[k]) <= 1e-5 for k in a)


# ---- on a GPU: the shapes of the released models, and graph decode --------------------------------
@cuda_only
def test_cuda_defaults_choose_by_batch(monkeypatch):
    """With every backend None: the kernel for r/k/v and the feed-forward of decode batches of at
    most GEMV_ROWS (cuBLAS for the output projection), batched GEMMs and the folded cuBLAS
    feed-forward beyond; the one-launch time mix for every decode batch; the LoRA downs in the
    r/k/v launch (lora "fused") for one row, the LoRA kernels for every other decode batch (the
    many-rows ones beyond 16 rows)."""
    from rwkvstate.model import rwkv7
    from rwkvstate.ops import channel_mix as cm
    from rwkvstate.ops import lora as lo

    calls: dict[str, list] = {"gemv": [], "ffn": [], "lora_bmm": [], "lora_triton": [], "cublas": [], "fused": [],
                              "downs": []}  # fmt: skip
    kernel, ffn, bmm, ltri = gm.gemv_triton, cm.channel_mix_gemv, lo.lora_bmm, lo.lora_triton
    downs = rwkv7.lora_down_with_projection
    monkeypatch.setattr(rwkv7, "lora_down_with_projection", lambda x, *a: calls["downs"].append(x.shape[1]) or downs(x, *a))
    folded, fused = cm.channel_mix_cublas, rwkv7.time_mix_decode_triton
    monkeypatch.setitem(gm._BACKENDS, "triton", lambda x, w, *a, **k: calls["gemv"].append(x.shape) or kernel(x, w, *a, **k))
    monkeypatch.setitem(cm._BACKENDS, "triton-gemv", lambda *a: calls["ffn"].append(a[0].shape[0]) or ffn(*a))
    monkeypatch.setitem(cm._BACKENDS, "cublas", lambda *a, **kw: calls["cublas"].append(a[0].shape[0]) or folded(*a, **kw))
    monkeypatch.setattr(rwkv7, "time_mix_decode_triton", lambda *a, **k: calls["fused"].append(a[2].shape[0]) or fused(*a, **k))
    monkeypatch.setitem(lo._BACKENDS, "bmm", lambda x, p: calls["lora_bmm"].append(x.shape[1]) or bmm(x, p))
    monkeypatch.setitem(lo._BACKENDS, "triton", lambda x, p: calls["lora_triton"].append(x.shape[1]) or ltri(x, p))
    model = Model.from_tensors(random_checkpoint(CFG, seed=4), CFG, device="cuda", dtype=torch.float16)
    pool = model.new_pool(20, state_dtype=torch.float16)
    for batch in (1, rwkv7.GEMV_ROWS, rwkv7.GEMV_ROWS + 1, 17):
        for v in calls.values():
            v.clear()
        model.decode_step(pool, torch.arange(batch, device="cuda"), torch.ones(batch, dtype=torch.long, device="cuda"))
        L = CFG.n_layer
        small = batch <= rwkv7.GEMV_ROWS  # r/k/v grouped (the output projection stays on cuBLAS), the FFN
        assert calls["gemv"] == ([(3, batch, CFG.n_embd)] * L if small and batch > 1 else [])
        assert calls["downs"] == ([batch] * L if batch == 1 else [])  # r/k/v of one row with the LoRA downs
        assert calls["ffn"] == ([batch] * L if small else [])
        assert calls["cublas"] == ([] if small else [batch] * L)
        assert calls["fused"] == [batch] * L  # the one-launch time mix for every decode batch
        assert calls["lora_triton"] == ([batch] * L if batch > 1 else [])
        assert calls["lora_bmm"] == []


@cuda_only
@pytest.mark.parametrize("C", [2048, 4096])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_cuda_release_shapes(C, T):
    """r/k/v grouped and one C x C projection at the 1.5B and 7.2B widths, default launch
    configuration (on an H200 K is split for the single projection, not for the grouped ones),
    fp16 and bf16, against fp32 and cuBLAS."""
    for dtype in (torch.float16, torch.bfloat16):
        x, w = inputs(3, T, C, C, dtype, seed=C + T)
        for xs, ws in ((x, w), (x[0], w[0])):
            got = gm.gemv(xs, ws, backend="triton")
            assert rel_err(got, exact(xs, ws)) <= TOL[dtype]
            assert rel_err(got, gm.gemv(xs, ws, backend="torch")) <= 2 * TOL[dtype]
            assert torch.equal(got, gm.gemv(xs, ws, backend="triton"))  # run to run


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_model_decode_and_graphs_with_gemv(dtype):
    """A 2-layer C = 512 model: decode with the GEMV backends against cuBLAS, and CUDA-graph decode
    against eager with them (greedy ids equal, states within rounding)."""
    cfg = tiny_config(n_layer=2, n_embd=512, head_size=64, vocab_size=300, ffn_dim=2048, decay_rank=32,
                      aaa_rank=32, mv_rank=16, gate_rank=64)  # fmt: skip
    tensors = random_checkpoint(cfg, seed=8)
    backends = {"gemv": "triton", "channel_mix": "triton-gemv"}
    (want, _), (got, _) = decode_both(cfg, tensors, dtype, backends, batch=3)
    assert rel_err(got, want) <= (1e-2 if dtype == torch.float16 else 5e-2)
    results = []
    for eager in (True, False):
        model = Model.from_tensors(tensors, cfg, device="cuda", dtype=dtype)
        model.backends.update(backends)
        engine = Engine(model, slots=6, enforce_eager=eager)
        sessions = [engine.session() for _ in range(5)]
        for i, s in enumerate(sessions):
            s.feed(random_tokens(3 + 4 * i, cfg.vocab_size, seed=20 + i))
        streams = [s.generate(12 + i, SamplingParams(temperature=0)) for i, s in enumerate(sessions)]
        engine.run(streams)
        assert (engine.graphs.replays > 0) != eager
        results.append(([st.token_ids for st in streams], [engine.pool.export(s.slot) for s in sessions]))
    (ids_eager, states_eager), (ids_graph, states_graph) = results
    assert ids_eager == ids_graph
    for a, b in zip(states_eager, states_graph):
        assert all(rel_err(b[k], a[k]) <= 2e-3 for k in a)


@cuda_only
def test_cuda_model_reserves_the_side_streams_counts():
    """The LoRA side stream runs only inside graph captures, where no counts can be made: the model
    makes them when it is built, so a split down kernel captured there adds its splits in-kernel."""
    model = Model.from_tensors(random_checkpoint(CFG, seed=5), CFG, device="cuda", dtype=torch.float16)
    side = model._side_stream
    buf = gm._COUNTERS.get((torch.device("cuda", torch.cuda.current_device()), side.cuda_stream))
    assert buf is not None and buf.numel() >= gm.MIN_COUNTERS and not buf.any()
    with torch.cuda.stream(side):
        torch.cuda.current_stream().synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            assert gm._split_counters(model.device, 16) is buf  # found during a capture, not None


@cuda_only
@pytest.mark.parametrize("batch", [1, 3, 20])
@pytest.mark.parametrize("option", ["lora_stream", "dependent_launches"])
def test_cuda_launch_options_change_no_bit(option, batch):
    """Model.lora_stream (the LoRA chains on a second stream beside r/k/v) and
    Model.dependent_launches (programmatic dependent launches) give the same logits and states,
    bit for bit, as without them (the same kernels in the same order on each stream), eagerly and
    in CUDA-graph decode (which captures the fork and join, and the launch dependencies); the ids of
    greedy generation match too."""
    cfg = tiny_config(n_layer=3, n_embd=256, head_size=64, vocab_size=300, ffn_dim=1024, decay_rank=32,
                      aaa_rank=32, mv_rank=16, gate_rank=64)  # fmt: skip
    tensors = random_checkpoint(cfg, seed=9)
    runs = []
    for on in (False, True):
        model = Model.from_tensors(tensors, cfg, device="cuda", dtype=torch.float16)
        setattr(model, option, on)
        pool = model.new_pool(batch + 1, state_dtype=torch.float16)
        model.forward(pool, list(range(batch)), [random_tokens(5 + i, cfg.vocab_size, seed=i) for i in range(batch)])
        slots = torch.arange(batch, device="cuda")
        logits = torch.stack([model.decode_step(pool, slots, (slots * 7 + s) % cfg.vocab_size) for s in range(3)])
        engine = Engine(model, slots=batch + 2)
        sessions = [engine.session() for _ in range(batch)]
        for i, s in enumerate(sessions):
            s.feed(random_tokens(4 + i, cfg.vocab_size, seed=40 + i))
        streams = [s.generate(10, SamplingParams(temperature=0)) for s in sessions]
        engine.run(streams)
        assert engine.graphs.replays > 0
        runs.append((logits, [pool.export(s) for s in range(batch)], [st.token_ids for st in streams]))
    (want, want_states, want_ids), (got, got_states, got_ids) = runs
    assert torch.equal(got, want) and got_ids == want_ids
    for a, b in zip(want_states, got_states):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_dependent_launch_arguments():
    """pdl_args asks for a dependent launch only inside dependent_launches() and only for CUDA
    tensors off the interpreter; the trigger names the kernels' PDL mode; a bad one is refused."""
    from rwkvstate.ops import _triton as tr

    x = torch.zeros(2, device=DEVICE)
    assert tr.pdl_args(x) == {"PDL": 0}
    for trigger in tr.TRIGGERS:
        with tr.dependent_launches(trigger):
            args = tr.pdl_args(x)
            if trigger is not None and x.is_cuda and tr.HAS_GDC and torch.cuda.get_device_capability() >= (9, 0):
                assert args == {"PDL": tr.TRIGGERS.index(trigger), "launch_pdl": True}
            else:
                assert args == {"PDL": 0}
    assert tr.pdl_args(x) == {"PDL": 0}  # the context is left as it was
    with pytest.raises(ValueError, match="trigger must be one of"):
        with tr.dependent_launches("middle"):
            pass
    model = Model.from_tensors(random_checkpoint(CFG, seed=5), CFG, device=DEVICE)
    assert model.dependent_launches is False and model._launch_trigger() is None
    model.dependent_launches = True
    assert model._launch_trigger() == ("end" if DEVICE == "cuda" else None)


def test_lora_stream_default_only_while_capturing(monkeypatch):
    """lora_stream None (the default) takes the second stream only while a CUDA graph is being
    captured (the decode graphs); True always, False never; without a CUDA device there is none."""
    model = Model.from_tensors(random_checkpoint(CFG, seed=6), CFG)
    assert model.lora_stream is None and model._lora_side_stream() is None  # CPU: no second stream
    side = object()
    monkeypatch.setattr(model, "_side_stream", side)
    for capturing in (False, True):
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
        for wanted, expected in ((None, side if capturing else None), (True, side), (False, None)):
            model.lora_stream = wanted
            assert model._lora_side_stream() is expected
