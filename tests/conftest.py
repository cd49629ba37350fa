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


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
