"""Checkpoint tensors turned into the compute layout: dtype, device, squeezed vectors,
LoRA matrices transposed to [out, in] so every projection is one F.linear."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..ops.lora import LoraPack, pack_lora


@dataclass
class LayerWeights:
    ln1: tuple[torch.Tensor, torch.Tensor]
    ln2: tuple[torch.Tensor, torch.Tensor]
    mix: torch.Tensor  # [6, C]: x_r, x_k, x_v, x_w, x_a, x_g (r, k, v first: their mixes are one [3, T, C] view)
    w0: torch.Tensor
    # the LoRA matrices w1 .. g2, v1, v2 are views into `lora`'s stacks (ops/lora.py)
    w1: torch.Tensor  # [D, C] (transposed from the file's [C, D])
    w2: torch.Tensor  # [C, D]
    a0: torch.Tensor
    a1: torch.Tensor
    a2: torch.Tensor
    v0: torch.Tensor | None  # None in layer 0, which takes v as the value residual
    v1: torch.Tensor | None
    v2: torch.Tensor | None
    g1: torch.Tensor
    g2: torch.Tensor
    k_k: torch.Tensor
    k_a: torch.Tensor
    r_k: torch.Tensor  # [H, N]
    rkv: torch.Tensor  # [3, C, C]: receptance, key, value stacked, for one grouped projection (ops/gemv.py)
    receptance: torch.Tensor  # [C, C] as F.linear weights; receptance, key and value are views into rkv
    key: torch.Tensor
    value: torch.Tensor
    output: torch.Tensor
    ln_x: tuple[torch.Tensor, torch.Tensor]
    ffn_x_k: torch.Tensor
    ffn_key: torch.Tensor  # [F, C]
    ffn_value: torch.Tensor  # [C, F]: the transposed view of a contiguous [F, C] tensor, so that a
    #                          row of value^T (one activation's contribution) is contiguous for
    #                          the sparse channel mix (ops/channel_mix.py); F.linear takes the view
    lora: LoraPack  # chains v (mix 2, layers >= 1), w (mix 3, tanh), a (mix 4), g (mix 5, sigmoid)


_STACKS = ("rkv",)  # seen through their views (receptance, key, value): counted once


@dataclass
class Weights:
    emb: torch.Tensor  # [V, C], already passed through blocks.0.ln0
    layers: list[LayerWeights]
    ln_out: tuple[torch.Tensor, torch.Tensor]
    head: torch.Tensor  # [V, C]

    def tensors(self) -> list[torch.Tensor]:
        def walk(obj):
            if torch.is_tensor(obj):
                return [obj]
            if isinstance(obj, (tuple, list)):
                return [t for o in obj for t in walk(o)]
            if obj is None or isinstance(obj, LoraPack):  # its stacks are seen through the w1 .. g2 views
                return []
            return [t for k, v in vars(obj).items() if k not in _STACKS for t in walk(v)]

        return walk(self)

    def num_params(self) -> int:
        # ln0 was folded into emb; count its two vectors as the checkpoint does
        return sum(t.numel() for t in self.tensors()) + 2 * self.emb.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def build_weights(tensors: dict[str, torch.Tensor], cfg: ModelConfig, dtype, device, progress=None) -> Weights:
    """Converts checkpoint tensors (validated) to `dtype` on `device`."""

    def get(key: str, transpose: bool = False, squeeze: bool = False) -> torch.Tensor:
        t = tensors[key]
        t = t.squeeze() if squeeze else t
        t = t.t() if transpose else t
        if progress is not None:
            progress.update(t.numel() * t.element_size())
        return t.to(device=device, dtype=dtype).contiguous()

    emb = F.layer_norm(
        tensors["emb.weight"].float(), (cfg.n_embd,),
        tensors["blocks.0.ln0.weight"].float().squeeze(), tensors["blocks.0.ln0.bias"].float().squeeze(),
    ).to(device=device, dtype=dtype)  # fmt: skip
    if progress is not None:
        progress.update(tensors["emb.weight"].numel() * tensors["emb.weight"].element_size())
    layers = [_layer(get, l) for l in range(cfg.n_layer)]
    ln_out = (get("ln_out.weight", squeeze=True), get("ln_out.bias", squeeze=True))
    return Weights(emb=emb, layers=layers, ln_out=ln_out, head=get("head.weight"))


def _layer(get, l: int) -> LayerWeights:
    p = f"blocks.{l}."

    def vec(name):
        return get(p + name, squeeze=True)

    def lora(name):
        return get(p + name, transpose=True)

    mix = torch.stack([vec(f"att.x_{c}") for c in "rkvwag"])
    # v (layers >= 1), w, a read consecutive mixes (2, 3, 4) and have close ranks: one group of the
    # pack (ops/lora.py), whose batched GEMM reads them as a view
    chains = ([(2, "none", "v")] if l else []) + [(3, "tanh", "w"), (4, "none", "a"), (5, "sigmoid", "g")]
    pack = pack_lora((m, act, lora(f"att.{c}1"), lora(f"att.{c}2")) for m, act, c in chains)
    down = {c: pack.down_weight(i) for i, (_, _, c) in enumerate(chains)}
    up = {c: pack.up_weight(i) for i, (_, _, c) in enumerate(chains)}
    rkv = torch.stack([get(p + f"att.{c}.weight") for c in ("receptance", "key", "value")])
    return LayerWeights(
        ln1=(vec("ln1.weight"), vec("ln1.bias")), ln2=(vec("ln2.weight"), vec("ln2.bias")), mix=mix,
        w0=vec("att.w0"), w1=down["w"], w2=up["w"], a0=vec("att.a0"), a1=down["a"], a2=up["a"],
        v0=vec("att.v0") if l else None, v1=down.get("v"), v2=up.get("v"), g1=down["g"], g2=up["g"],
        k_k=vec("att.k_k"), k_a=vec("att.k_a"), r_k=get(p + "att.r_k"),
        rkv=rkv, receptance=rkv[0], key=rkv[1], value=rkv[2], output=get(p + "att.output.weight"),
        ln_x=(vec("att.ln_x.weight"), vec("att.ln_x.bias")),
        ffn_x_k=vec("ffn.x_k"), ffn_key=get(p + "ffn.key.weight"), ffn_value=get(p + "ffn.value.weight", transpose=True).t(),
        lora=pack,
    )  # fmt: skip
