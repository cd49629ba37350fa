"""Snapshot formats on real states: element error, bytes per slot, and the effect on the model.

Feeds held-out documents through the bundled model (CPU, float32 pool), takes each slot's
state after the first --split tokens, and passes it through every snapshot format: the casts
fp16/bf16 and int8/fp8 under several groupings of the quantisation scales. Per variant it reports
the relative RMS error and the largest absolute error of the state (overall and per state part),
the bytes per slot, and what the model sees: the restored state continues the documents and its
next-token distributions are compared with the exact state's (mean NLL difference, mean/max KL).

    python benchmarks/bench_snapshot_error.py --out docs/benchmarks/snapshot-error
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402

import rwkvstate as rs  # noqa: E402
from rwkvstate.evaluation import held_out_token_docs  # noqa: E402
from rwkvstate.ops.quantize import dequantize_groups, quantize_groups  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PARTS = ("att_shift", "wkv", "ffn_shift")


@dataclass(frozen=True)
class Grouping:
    """How the scales of a quantised snapshot are grouped. Groups are contiguous runs of the
    slot's memory, except with transpose: each head's N x N WKV matrix is transposed first, so a
    group of N is one column (a key index across all values)."""

    name: str
    shift_group: int  # elements per scale in the two shift vectors
    wkv_group: int  # elements per scale in the WKV matrices
    transpose: bool = False


def groupings(N: int, C: int) -> list[Grouping]:
    rows = [Grouping(f"contiguous {g}" + (" (head size)" if g == N else ""), g, g) for g in (16, 32, N, 256)]
    return rows + [
        Grouping(f"per head matrix (N*N = {N * N}; shifts {N})", N, N * N),
        Grouping(f"per column (key index; shifts {N})", N, N, transpose=True),
    ]


def split_parts(states: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    """states [D, L, (N+2)*C] -> contiguous float32 copies of the parts (wkv [D, L, H, N, N])."""
    att, wkv, ffn = layout.split_layer(states)
    return {"att_shift": att.contiguous(), "wkv": wkv.contiguous(), "ffn_shift": ffn.contiguous()}


def join_parts(parts: dict[str, torch.Tensor], layout) -> torch.Tensor:
    lead = parts["wkv"].shape[:2]
    return torch.cat([parts["att_shift"], parts["wkv"].reshape(*lead, -1), parts["ffn_shift"]], dim=-1)


def quantize_roundtrip(x: torch.Tensor, kind: str, group: int) -> tuple[torch.Tensor, int]:
    """x float32 (contiguous) -> (decoded float32 of the same shape, bytes of data + scales)."""
    q, scales = quantize_groups(x, group, kind, backend="torch")
    out = torch.empty_like(x)
    dequantize_groups(q, scales, group, out, backend="torch")
    return out, q.numel() * q.element_size() + scales.numel() * scales.element_size()


def roundtrip(parts: dict[str, torch.Tensor], fmt: str, grouping: Grouping | None):
    """Decoded parts and the total bytes of all D states."""
    if grouping is None:  # a cast format
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[fmt]
        dec = {k: v.to(dtype).float() for k, v in parts.items()}
        return dec, sum(v.numel() for v in parts.values()) * torch.empty((), dtype=dtype).element_size()
    dec, nbytes = {}, 0
    for name, x in parts.items():
        if name == "wkv":
            src = x.transpose(-1, -2).contiguous() if grouping.transpose else x
            out, size = quantize_roundtrip(src, fmt, grouping.wkv_group)
            dec[name] = out.transpose(-1, -2).contiguous() if grouping.transpose else out
        else:
            dec[name], size = quantize_roundtrip(x, fmt, grouping.shift_group)
        nbytes += size
    return dec, nbytes


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def element_errors(dec: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict:
    out = {"rel_rms": rel_rms(torch.cat([v.flatten() for v in dec.values()]),
                              torch.cat([v.flatten() for v in ref.values()]))}  # fmt: skip
    out["max_abs"] = max((dec[k] - ref[k]).abs().max().item() for k in ref)
    for k in ref:
        out[f"{k}_rel_rms"] = rel_rms(dec[k], ref[k])
        out[f"{k}_max_abs"] = (dec[k] - ref[k]).abs().max().item()
    return out


def continuation_logits(model, states: torch.Tensor, conts: list[list[int]]) -> list[torch.Tensor]:
    """Loads states [D, L, (N+2)*C] into a fresh pool and feeds the continuations: log-probs."""
    pool = model.new_pool(len(conts))
    pool.data[: len(conts)].copy_(states)
    logits = model.forward(pool, list(range(len(conts))), conts, output="all")
    return [F.log_softmax(x.double(), dim=-1) for x in logits]  # float64: KLs of 1e-9 stay positive


def model_effect(var: list[torch.Tensor], ref: list[torch.Tensor], conts: list[list[int]]) -> dict:
    """Mean NLL difference (nats/token) of the continuation tokens, KL(ref || var) mean and max,
    and the KL of the first prediction after the restore."""
    nll_diff, kls, first = [], [], []
    for v, r, toks in zip(var, ref, conts):
        target = torch.tensor(toks[1:])
        rows = torch.arange(len(toks) - 1)
        nll_diff.append((r[rows, target] - v[rows, target]).double())
        kl = (r.exp() * (r - v)).sum(-1).double()
        kls.append(kl)
        first.append(kl[0])
    kls = torch.cat(kls)
    return {"nll_diff": torch.cat(nll_diff).mean().item(), "kl_mean": kls.mean().item(),
            "kl_max": kls.max().item(), "kl_first_token": torch.stack(first).mean().item()}  # fmt: skip


def largest_values(parts: dict[str, torch.Tensor], k: int = 3) -> dict[str, list[float]]:
    return {name: x.abs().flatten().topk(k).values.tolist() for name, x in parts.items()}


def run(args) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model = rs.Model.load(args.model)
    layout = model.state_layout
    docs = held_out_token_docs(model.tokenizer, args.tokens, args.docs, stdlib_root=args.stdlib_root)
    prefixes, conts = [d[: args.split] for d in docs], [d[args.split :] for d in docs]
    pool = model.new_pool(len(docs))
    slots = list(range(len(docs)))
    start = time.perf_counter()
    model.forward(pool, slots, prefixes, output="none")
    states = pool.data[: len(docs)].clone()  # [D, L, (N+2)*C] float32
    ref_parts = split_parts(states, layout)
    ref_logp = continuation_logits(model, states, conts)
    variants = [(fmt, None) for fmt in ("fp16", "bf16")]
    variants += [(fmt, g) for fmt in ("int8", "fp8") for g in groupings(layout.head_size, layout.n_embd)]
    rows = []
    for fmt, grouping in variants:
        dec, nbytes = roundtrip(ref_parts, fmt, grouping)
        row = {"format": fmt, "grouping": grouping.name if grouping else "-", "bytes_per_slot": nbytes // len(docs)}
        row.update(element_errors(dec, ref_parts))
        row.update(model_effect(continuation_logits(model, join_parts(dec, layout), conts), ref_logp, conts))
        rows.append(row)
        print(json.dumps(row), flush=True)
    model_path = Path(args.model).resolve()
    info = {
        "model": str(model_path.relative_to(REPO_ROOT) if model_path.is_relative_to(REPO_ROOT) else model_path),
        "n_layer": layout.n_layer,
        "n_embd": layout.n_embd,
        "head_size": layout.head_size,
        "docs": len(docs),
        "tokens_per_doc": args.tokens,
        "snapshot_after": args.split,
        "continuation_tokens": args.tokens - args.split,
        "stdlib_root": str(args.stdlib_root or "running interpreter"),
        "fp32_bytes_per_slot": layout.slot_nbytes(torch.float32),
        "largest_abs_values": largest_values(ref_parts),
        "seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return {"info": info, "rows": rows}


HEADER = (
    "| format | grouping | bytes/slot | vs fp32 | rel RMS | max abs err | wkv rel RMS | shift rel RMS (att / ffn) "
    "| NLL diff (nats/token) | KL mean | KL max | KL 1st token |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def table_row(r: dict, fp32_bytes: int) -> str:
    cells = [
        r["format"], r["grouping"], f"{r['bytes_per_slot']:,}", f"{r['bytes_per_slot'] / fp32_bytes:.3f}",
        f"{r['rel_rms']:.2e}", f"{r['max_abs']:.2e}", f"{r['wkv_rel_rms']:.2e}",
        f"{r['att_shift_rel_rms']:.1e} / {r['ffn_shift_rel_rms']:.1e}", f"{r['nll_diff']:+.1e}",
        f"{r['kl_mean']:.1e}", f"{r['kl_max']:.1e}", f"{r['kl_first_token']:.1e}",
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def markdown(result: dict) -> str:
    info, rows = result["info"], result["rows"]
    lines = [
        "# Snapshot formats: error on real states",
        "",
        f"Model `{info['model']}` (L={info['n_layer']}, C={info['n_embd']}, N={info['head_size']}), CPU, "
        f"float32 pool. {info['docs']} held-out stdlib documents; the state after {info['snapshot_after']} tokens "
        f"is snapshotted, restored, and continues the next {info['continuation_tokens']} tokens (teacher-forced) "
        f"beside the exact state (NLL and KL against it). fp32 slot: {info['fp32_bytes_per_slot']:,} bytes. "
        f"Produced by `benchmarks/bench_snapshot_error.py` ({info['date']}, {info['seconds']} s).",
        "",
        HEADER,
        *(table_row(r, info["fp32_bytes_per_slot"]) for r in rows),
        "",
        "Largest absolute values of each state part (all documents):",
        "",
        *(f"- {name}: " + ", ".join(f"{v:.4g}" for v in vals) for name, vals in info["largest_abs_values"].items()),
        "",
        summary(result),
    ]
    return "\n".join(lines) + "\n"


def summary(result: dict) -> str:
    """The reading of the table, with its numbers filled in."""
    info, rows = result["info"], result["rows"]
    N = info["head_size"]

    def row(fmt, prefix):
        return next(r for r in rows if r["format"] == fmt and r["grouping"].startswith(prefix))

    fp16, f64 = row("fp16", "-"), row("fp8", f"contiguous {N}")
    i16, i64, i256 = (row("int8", f"contiguous {g}") for g in (16, N, 256))
    imat, icol = row("int8", "per head"), row("int8", "per column")
    ratio = {name: r["rel_rms"] / i64["rel_rms"] for name, r in (("16", i16), ("256", i256), ("mat", imat),
                                                                ("col", icol), ("fp8", f64))}  # fmt: skip
    big = max(v[0] for v in info["largest_abs_values"].values())
    return (
        "## Reading\n\n"
        f"fp16 halves a slot at {fp16['rel_rms']:.1e} relative RMS error with no visible effect on the model "
        f"(KL mean {fp16['kl_mean']:.0e}); int8 with one scale per head-size row stores "
        f"{i64['bytes_per_slot'] / info['fp32_bytes_per_slot']:.3f} of fp32 at {i64['rel_rms']:.1e} "
        f"(KL mean {i64['kl_mean']:.0e}; every NLL difference in the table is at the noise level of a few "
        f"1e-4 nats/token). fp8 e4m3 costs the same bytes as int8 but has {ratio['fp8']:.1f}x its error: the RMS "
        "error comes from the larger values of each group, where int8's uniform step (amax/127) is finer than "
        "e4m3's (3 mantissa bits: amax/14 in the top binade); fp8's error is relative to each value, so grouping "
        f"barely changes it. The default group is the head size ({N}): smaller groups cut the int8 error "
        f"(16: {ratio['16']:.2f}x) but the scales grow from 3% to 12.5% of the data bytes, while larger ones save "
        f"at most 3% and cost error (256: {ratio['256']:.1f}x; one scale per head matrix: {ratio['mat']:.1f}x, as "
        "the rows of a head differ in magnitude). Grouping by column (a key index across values) is not clearly "
        f"better ({ratio['col']:.2f}x the element error, KL mean {icol['kl_mean']:.1e} vs {i64['kl_mean']:.1e}) and "
        "would need strided groups, so groups stay contiguous rows. Range: the largest state element is "
        f"{big:.3g}, far inside fp16 (65504) and even the unscaled e4m3 range (448); the scales are there for "
        "precision, not range."
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "src" / "rwkvstate" / "data" / "stdlib-byte-l8-c256.safetensors"))
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per document")
    parser.add_argument("--split", type=int, default=1792, help="snapshot after this many tokens")
    parser.add_argument("--stdlib-root", type=Path, default=None,
                        help="stdlib copy to take held-out documents from (default: the running interpreter's)")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)
    result = run(args)
    write_results(args.out, result, markdown(result))


if __name__ == "__main__":
    main()
