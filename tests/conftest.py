"""Shared fixtures: small random RWKV-7 checkpoints and the official package as an oracle."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. The variable is read when a
# kernel is decorated, i.e. when rwkvstate is imported, so it must be set before that.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rwkvstate.model.synthetic import random_checkpoint, save_checkpoint, tiny_config

# Shapes that differ in every inferred size: layers, width, head size/count, vocab, all four LoRA ranks.
SHAPES = {
    "L2-C128-N64": tiny_config(),
    "L3-C192-N64-V300": tiny_config(
        n_layer=3, n_embd=192, vocab_size=300, ffn_dim=500, decay_rank=24, aaa_rank=20, mv_rank=12, gate_rank=40
    ),
    "L4-C96-N32-V1000": tiny_config(
        n_layer=4, n_embd=96, head_size=32, vocab_size=1000, ffn_dim=300, decay_rank=8, aaa_rank=12, mv_rank=4,
        gate_rank=16,
    ),
    "L1-C48-N16-V97": tiny_config(
        n_layer=1, n_embd=48, head_size=16, vocab_size=97, ffn_dim=160, decay_rank=6, aaa_rank=5, mv_rank=3,
        gate_rank=7,
    ),
}


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def checkpoint_paths(checkpoint_dir):
    """name -> .pth path of a random checkpoint of each shape in SHAPES."""
    paths = {}
    for i, (name, cfg) in enumerate(SHAPES.items()):
        paths[name] = save_checkpoint(random_checkpoint(cfg, seed=100 + i), checkpoint_dir / f"{name}.pth")
    return paths


@pytest.fixture(scope="session")
def official():
    """Loader for the official rwkv package's RWKV-7 model (fp32, CPU), cached per path."""
    os.environ["RWKV_V7_ON"] = "1"
    from rwkv.model import RWKV

    cache = {}

    def load(path):
        key = str(path)
        if key not in cache:
            cache[key] = RWKV(model=key.removesuffix(".pth"), strategy="cpu fp32")
        return cache[key]

    return load


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error of a against reference b."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


STATE_PARTS = ("att_shift", "wkv", "ffn_shift")


def fresh_run(model, tokens) -> tuple[torch.Tensor, dict]:
    """Next-token logits and canonical state of a cold run of tokens fed in one piece."""
    pool = model.new_pool(1)
    logits = model.forward(pool, [0], [list(tokens)])[0]
    return logits, pool.export(0)


def assert_same_run(logits, state: dict, ref_logits, ref_state: dict, tol: float = 0.0) -> None:
    """Logits and every part of the state equal the reference: bit for bit with tol=0, else to a
    relative RMS error under tol (each part on its own, so a small part cannot hide in a big one)."""
    assert set(state) == set(ref_state) == set(STATE_PARTS)
    pairs = [("logits", logits, ref_logits)] + [(k, state[k], ref_state[k]) for k in STATE_PARTS]
    for name, a, b in pairs:
        if tol == 0:
            assert torch.equal(a, b), f"{name} differs"
        else:
            assert rel_err(a, b) < tol, f"{name}: relative error {rel_err(a, b):.2e}"


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def poison_empty(monkeypatch, module, int_fill: int | None = None) -> None:
    """Every torch.empty called from `module` returns NaN-filled memory, so unwritten outputs show;
    integer tensors are filled with int_fill when given (e.g. an index far out of bounds)."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t if int_fill is None else t.fill_(int_fill)

    monkeypatch.setattr(module.torch, "empty", empty)
