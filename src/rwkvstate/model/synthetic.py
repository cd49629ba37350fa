"""Random RWKV-7 checkpoints with official key names and shapes, for tests and benchmarks.

Values are scaled so that activations and the state stay in a realistic range over
hundreds of tokens (decays spread over (0.55, 1), unit-variance projections), which
makes them a meaningful check of numerics, unlike all-small weights that wash out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from .checkpoint import weight_shapes

OFFICIAL_VECTOR_SHAPE = (1, 1)  # official files store C-vectors as [1, 1, C]
_PLAIN_VECTORS = ("ln0", "ln1", "ln2", "ln_x", "ln_out")  # LayerNorm params are stored [C]


def tiny_config(**overrides) -> ModelConfig:
    base: dict[str, Any] = dict(
        n_layer=2, n_embd=128, head_size=64, vocab_size=256, ffn_dim=512,
        decay_rank=16, aaa_rank=16, mv_rank=8, gate_rank=32, tokenizer="bytes",
    )  # fmt: skip
    base.update(overrides)
    return ModelConfig(**base)


def random_checkpoint(cfg: ModelConfig, seed: int = 0, dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor]:
    """Official key names and shapes; device="cuda" draws the numbers on the GPU (fast for 7B shapes)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for key, shape in weight_shapes(cfg).items():
        value = _init(key, shape, gen, dtype)
        if len(shape) == 1 and not any(f".{n}." in key or key.startswith(f"{n}.") for n in _PLAIN_VECTORS):
            value = value.view(*OFFICIAL_VECTOR_SHAPE, -1)
        out[key] = value.to(dtype)
    return out


def _init(key: str, shape, gen, dtype) -> torch.Tensor:
    device = gen.device

    def uniform(lo, hi):
        return torch.rand(shape, generator=gen, device=device) * (hi - lo) + lo

    def normal(scale):
        # drawn in the target dtype so that 7B-sized matrices never exist in float32
        return torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(scale)

    name = key.rsplit(".", 1)[-1]
    if key.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_x.weight", "ln_out.weight")):
        return uniform(0.7, 1.3)
    if key.endswith("bias"):
        return uniform(-0.1, 0.1)
    if name.startswith("x_"):
        return uniform(0.0, 1.0)
    if name == "w0":
        return uniform(-3.0, 2.0)
    if name in ("a0", "v0"):
        return uniform(-1.0, 1.0)
    if name == "k_k":
        return uniform(0.5, 1.5)
    if name == "k_a":
        return uniform(0.0, 1.0)
    if name == "r_k":
        return normal(0.3)
    fan_in = shape[-1] if key.endswith("weight") else shape[0]
    return normal(1.0 if key == "emb.weight" else fan_in**-0.5)


def save_checkpoint(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Writes .safetensors or .pth (zip format), chosen by the suffix."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, path)
    return path
