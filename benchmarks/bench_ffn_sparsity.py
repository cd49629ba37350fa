"""How sparse the channel mix's squared-ReLU activations are: the fraction of exact zeros in
relu(k K^T)^2, per layer, for the bundled model on held-out text and for random weights.

    python benchmarks/bench_ffn_sparsity.py --out docs/benchmarks/ffn-sparsity

A sparse feed-forward reads only the value-matrix rows whose activation is non-zero; in a
batch of B sequences a row is needed when any of the B activations is non-zero, so the
fraction of rows read is reported for B = 1, 2, 4, 8 (B tokens drawn from different places
of the text). CPU, float32, a few thousand tokens: seconds.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F

from common import write_results  # noqa: E402  (benchmarks/ is the script's directory)
from rwkvstate import Model
from rwkvstate.model.synthetic import random_checkpoint, tiny_config

BUNDLED = Path(__file__).resolve().parents[1] / "models" / "stdlib-byte-l8-c256.safetensors"
BATCHES = (1, 2, 4, 8)


def record_activations(model: Model) -> list[list[torch.Tensor]]:
    """Patches this model's channel mix to keep every layer's relu(k K^T) (float32, on CPU)."""
    acts: list[list[torch.Tensor]] = [[] for _ in model.weights.layers]
    inner = model._channel_mix

    def channel_mix(lw, x, packed, ffn_shift, residual):
        index = next(i for i, l in enumerate(model.weights.layers) if l is lw)
        out = inner(lw, x, packed, ffn_shift, residual)
        k = x + (torch.cat([x.new_zeros(1, x.shape[1]), x[:-1]]) - x) * lw.ffn_x_k  # recomputed, first row approximate
        acts[index].append(torch.relu(F.linear(k, lw.ffn_key)).float())
        return out

    model._channel_mix = channel_mix
    return acts


def text_tokens(model: Model, length: int) -> list[int]:
    """Real text the bundled model has not trained on: held-out CPython stdlib files (the
    held-out rule of docs/model.md), else any stdlib source."""
    import zlib

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if zlib.crc32(p.name.encode()) % 20 == 0) or sorted(root.glob("*.py"))
    text = "".join(p.read_text(errors="replace") for p in files[:8])
    return model.tokenizer.encode(text)[:length]


def measure(model: Model, tokens: list[int], seed: int = 0) -> list[dict]:
    acts = record_activations(model)
    pool = model.new_pool(1)
    model.forward(pool, [0], [tokens], output="none")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for layer, chunks in enumerate(acts):
        a = torch.cat(chunks)[1:]  # [T, F]; the first row's shift input is approximate
        nz = a != 0
        row = {"layer": layer, "tokens": a.shape[0], "ffn_dim": a.shape[1], "zero_fraction": 1 - nz.float().mean().item()}
        for b in BATCHES:  # random groups of b tokens from anywhere in the text
            idx = torch.randint(0, a.shape[0], (512, b), generator=gen)
            row[f"rows_read_b{b}"] = nz[idx].any(dim=1).float().mean().item()
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    bundled = Model.load(BUNDLED)
    tokens = text_tokens(bundled, args.tokens)
    result = {"models": {}}
    result["models"]["bundled (L8 C256, trained on CPython's stdlib), held-out stdlib text"] = measure(bundled, tokens)
    cfg = bundled.config
    rand = Model.from_tensors(random_checkpoint(cfg, seed=0), cfg)
    result["models"]["random weights, same shape, same text"] = measure(rand, tokens)
    wide = tiny_config(n_layer=4, n_embd=768, ffn_dim=3072, vocab_size=256)  # the 0.1B layer width
    rand_wide = Model.from_tensors(random_checkpoint(wide, seed=1), wide)
    result["models"]["random weights, C768 F3072 (0.1B layer width), same text"] = measure(rand_wide, tokens)
    write_results(args.out, result, markdown(result))


def markdown(result: dict) -> str:
    cols = " | ".join(f"rows read, B={b}" for b in BATCHES)
    out = ["# Feed-forward activation sparsity (CPU, float32)", "",
           "Fraction of exact zeros of relu(k K^T) per layer, and the fraction of value-matrix rows a sparse "
           "feed-forward must read when any of B tokens' activations is non-zero (B tokens drawn at random "
           "from the text).", ""]  # fmt: skip
    for name, rows in result["models"].items():
        out += [f"## {name}", "", f"| layer | zeros | {cols} |", "|---|---|" + "---|" * len(BATCHES)]
        for r in rows:
            reads = " | ".join(f"{r[f'rows_read_b{b}']:.3f}" for b in BATCHES)
            out.append(f"| {r['layer']} | {r['zero_fraction']:.3f} | {reads} |")
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in ["zero_fraction"] + [f"rows_read_b{b}" for b in BATCHES]}
        reads = " | ".join(f"{mean[f'rows_read_b{b}']:.3f}" for b in BATCHES)
        out += [f"| mean | {mean['zero_fraction']:.3f} | {reads} |", ""]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
