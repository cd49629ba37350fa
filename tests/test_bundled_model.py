"""The bundled byte-level model: it loads, predicts held-out text well, and generates stably."""

from __future__ import annotations

import math

import pytest
import torch

import rwkvstate.cli
from rwkvstate import Engine, Model, SamplingParams
from rwkvstate.evaluation import evaluate_state_precision, held_out_token_docs

# docs/model.md: 1.024 bits/byte on these 8 x 1024 bytes (first 1 KiB of held-out files,
# starting from the zero state). Random weights give ~8; a swapped or mis-loaded tensor
# lands far above 1.15.
HELD_OUT_BPB_BOUND = 1.15


@pytest.fixture(scope="module")
def model():
    assert rwkvstate.cli.BUNDLED_MODEL.exists(), "the bundled model is missing from models/"
    return Model.load(rwkvstate.cli.BUNDLED_MODEL)


def test_bundled_model_facts(model):
    c = model.config
    assert (c.n_layer, c.n_embd, c.head_size, c.vocab_size, c.tokenizer) == (8, 256, 64, 256, "bytes")
    assert rwkvstate.cli.BUNDLED_MODEL.stat().st_size <= 16 * 2**20


def test_held_out_bits_per_byte(model):
    docs = held_out_token_docs(model.tokenizer, 1024, 8)
    assert len(docs) == 8
    outs = model.forward(model.new_pool(8), list(range(8)), docs, output="all")
    nll = sum(
        -out[:-1].log_softmax(-1).gather(1, torch.tensor(doc[1:])[:, None]).sum().item() for doc, out in zip(docs, outs)
    )
    bpb = nll / sum(len(d) - 1 for d in docs) / math.log(2)
    assert bpb < HELD_OUT_BPB_BOUND


def test_greedy_generation_is_stable(model):
    session = Engine(model, slots=1).session()
    session.feed("class Stack:\n    def __init__(self):\n")
    text = "".join(session.generate(64, SamplingParams(temperature=0)))
    assert text == "        self.stack = []\n        self.stack = []\n        self.sta"


@pytest.mark.timeout(120)
def test_cli_generates_with_no_model_argument(capsys):
    assert rwkvstate.cli.main(["generate", "--prompt", "import os\n", "--max-tokens", "200", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("import os\n") and len(out.encode()) >= 200


def test_state_precision_harness_on_a_short_run(model):
    docs = held_out_token_docs(model.tokenizer, 40, 2)
    results, info = evaluate_state_precision(model, docs, prompt_len=30, gen_len=8, log=lambda _: None)
    by_name = {r.name: r for r in results}
    ref, fp16, bf16 = by_name["fp32 (reference)"], by_name["fp16 storage"], by_name["bf16 storage"]
    snap = by_name["fp32 snapshot/restore every 64 tokens"]
    assert by_name["fp16 storage, stochastic rounding"].kl_max > 0
    assert ref.nll_diff_nats == ref.kl_max == 0 and ref.greedy_agreement == 1
    assert snap.kl_max == 0 and snap.greedy_agreement == 1  # the canonical snapshot is lossless
    assert 0 < fp16.kl_mean < bf16.kl_mean < 1e-3  # bf16 keeps 3 fewer mantissa bits than fp16
    assert 1 < ref.max_abs_state < 65504 and info["reference_nll_nats"] < 1.5


def test_snapshot_formats_in_the_harness(model):
    from rwkvstate.evaluation import snapshot_variants

    docs = held_out_token_docs(model.tokenizer, 40, 1)
    variants = [v for v in snapshot_variants() if v.snapshot_format is None or v.snapshot_once]
    results, _ = evaluate_state_precision(model, docs, variants, prompt_len=30, gen_len=4, log=lambda _: None)
    kl = {r.name.split()[0]: r.kl_mean for r in results}
    assert kl["fp32"] == 0
    for fmt in ("fp16", "bf16", "int8", "fp8"):
        assert 0 < kl[fmt] < 0.05, fmt  # one round trip costs something, and little
    assert kl["fp16"] < kl["bf16"] < kl["fp8"] and kl["fp16"] < kl["int8"]
