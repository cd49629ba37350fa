"""State-precision harness: what storing or snapshotting the state costs in quality.

Every variant runs the same documents in lock-step with an fp32 reference, one token
per forward call, so the state passes through its storage format after every token
(the decode regime, the worst case for rounding). Per variant:

- mean NLL difference to the reference (nats/token) over all teacher-forced positions;
- KL(reference || variant) of the next-token distributions, mean and max;
- greedy continuation after a prompt: position-wise agreement with the reference's
  greedy tokens, and the mean position of the first disagreement;
- the largest absolute state element seen (overflow headroom: fp16 tops out at 65504).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch

from .state.layout import dtype_name


@dataclass(frozen=True)
class Variant:
    """How the state is kept between tokens: a storage dtype, optionally a snapshot round trip."""

    name: str
    state_dtype: torch.dtype = torch.float32
    snapshot_every: int = 0  # export + load through the canonical snapshot every k tokens; 0 = never
    rounding: str = "nearest"  # how fp16/bf16 storage rounds the WKV state: "nearest" or "stochastic"
    snapshot_format: str | None = None  # None: the canonical float32 snapshot; else an encoded format
    snapshot_once: bool = False  # one snapshot round trip, where the prompt ends (a rollback or a restore)


def snapshot_variants() -> list[Variant]:
    """The quality cost of each snapshot format: once (a session restored from the host tier or
    rolled back once) and every 64 tokens (a session evicted and restored over and over)."""
    out = [Variant("fp32 (reference)")]
    for fmt in ("fp16", "bf16", "int8", "fp8"):
        out.append(Variant(f"{fmt} snapshot once, at the prompt's end", snapshot_format=fmt, snapshot_once=True))
        out.append(Variant(f"{fmt} snapshot every 64 tokens", snapshot_every=64, snapshot_format=fmt))
    return out


def default_variants() -> list[Variant]:
    return [
        Variant("fp32 (reference)"),
        Variant("fp16 storage", torch.float16),
        Variant("bf16 storage", torch.bfloat16),
        Variant("fp16 storage, stochastic rounding", torch.float16, rounding="stochastic"),
        Variant("bf16 storage, stochastic rounding", torch.bfloat16, rounding="stochastic"),
        Variant("fp32 snapshot/restore every 64 tokens", torch.float32, snapshot_every=64),
    ]


@dataclass
class VariantResult:
    name: str
    state_dtype: str
    nll_diff_nats: float = 0.0
    kl_mean: float = 0.0
    kl_max: float = 0.0
    greedy_agreement: float = 1.0
    first_divergence_mean: float = 0.0
    max_abs_state: float = 0.0


class _VariantRun:
    """One variant's pool and running statistics."""

    def __init__(self, model, variant: Variant, num_docs: int, prompt_len: int):
        self.variant = variant
        self.prompt_len = prompt_len
        self.model = model
        self.pool = model.new_pool(num_docs, state_dtype=variant.state_dtype)
        self.slots = list(range(num_docs))
        self.result = VariantResult(variant.name, dtype_name(variant.state_dtype))
        self.nll_sum = 0.0  # of (variant NLL - reference NLL)
        self.ref_nll_sum = 0.0
        self.kl_sum = 0.0
        self.count = 0

    def step(self, tokens: list[int], position: int) -> torch.Tensor:
        self.model.state_rounding = self.variant.rounding
        try:
            logits = self.model.forward(self.pool, self.slots, [[t] for t in tokens])
        finally:
            self.model.state_rounding = "nearest"
        self._track_state()
        v = self.variant
        if (v.snapshot_every and (position + 1) % v.snapshot_every == 0) or (
            v.snapshot_once and position + 1 == self.prompt_len - 1
        ):
            self._round_trip()
        return logits.log_softmax(-1)

    def _round_trip(self) -> None:
        fmt = self.variant.snapshot_format
        for slot in self.slots:
            if fmt is None:
                self.pool.load(slot, self.pool.export(slot))
            else:
                self.pool.load_encoded(slot, self.pool.encode_slot(slot, fmt))

    def _track_state(self) -> None:
        for layer in range(self.pool.layout.n_layer):
            for part in self.pool.layer(layer):
                peak = part[: len(self.slots)].abs().max().item()
                self.result.max_abs_state = max(self.result.max_abs_state, peak)


def _teacher_forced(runs, docs: torch.Tensor, prompt_len: int, bar) -> list[list[dict[str, torch.Tensor]]]:
    """Feeds every document through every variant; returns each variant's states after the
    first prompt_len - 1 tokens."""
    num_docs, num_tokens = docs.shape
    saved = []
    for t in bar(range(num_tokens - 1), "teacher-forced"):
        tokens = docs[:, t].tolist()
        logps = [r.step(tokens, t) for r in runs]
        target = docs[:, t + 1].to(logps[0].device)
        ref = logps[0]
        ref_nll = -ref.gather(1, target[:, None]).squeeze(1)
        for r, lp in zip(runs, logps):
            nll = -lp.gather(1, target[:, None]).squeeze(1)
            kl = (ref.exp() * (ref - lp)).sum(-1).clamp_min(0)
            r.nll_sum += (nll - ref_nll).sum().item()
            r.kl_sum += kl.sum().item()
            r.result.kl_max = max(r.result.kl_max, kl.max().item())
            r.count += num_docs
        runs[0].ref_nll_sum += ref_nll.sum().item()
        if t == prompt_len - 2:  # all but the prompt's last token: greedy starts by feeding it
            saved = [_pool_copy(r.pool) for r in runs]
    return saved


def _pool_copy(pool) -> list[dict]:
    return [pool.export(slot) for slot in range(pool.num_slots)]


def _greedy(runs, docs: torch.Tensor, prompt_len: int, saved, gen_len: int, bar) -> None:
    """Greedy continuation of each document's prompt; compares tokens with the reference's."""
    outputs = []
    for r, states in zip(runs, saved):
        for slot, state in enumerate(states):
            r.pool.load(slot, state)
        tokens = docs[:, prompt_len - 1].tolist()
        generated = []
        for i in bar(range(gen_len), f"greedy {r.result.name}"):
            logits = r.step(tokens, prompt_len - 1 + i)
            tokens = logits.argmax(-1).tolist()
            generated.append(tokens)
        outputs.append(torch.tensor(generated).T)  # [docs, gen_len]
    ref = outputs[0]
    for r, out in zip(runs, outputs):
        same = out == ref
        r.result.greedy_agreement = same.float().mean().item()
        first = torch.where(same.all(1), gen_len, (~same).int().argmax(1))
        r.result.first_divergence_mean = first.float().mean().item()


def evaluate_state_precision(model, docs: list[list[int]], variants=None, prompt_len=2048, gen_len=256, log=print,
                             progress: bool = False):  # fmt: skip
    """Runs the harness; returns (results, info). docs must all have the same length > prompt_len.
    `progress` shows progress bars on stderr."""
    variants = variants or default_variants()
    lengths = {len(d) for d in docs}
    if prompt_len < 2 or len(lengths) != 1 or min(lengths) <= prompt_len:
        raise ValueError(f"documents must share one length greater than prompt_len {prompt_len}, got {sorted(lengths)}")
    data = torch.tensor(docs, dtype=torch.int64)
    runs = [_VariantRun(model, v, len(docs), prompt_len) for v in variants]
    start = time.time()
    bar = partial(_bar, enabled=progress)
    saved = _teacher_forced(runs, data, prompt_len, bar)
    log(f"teacher-forced {data.shape[1]} tokens x {len(docs)} docs x {len(variants)} variants: {time.time() - start:.0f} s")
    _greedy(runs, data, prompt_len, saved, gen_len, bar)
    log(f"greedy {gen_len} tokens: {time.time() - start:.0f} s")
    for r in runs:
        r.result.nll_diff_nats = r.nll_sum / r.count
        r.result.kl_mean = r.kl_sum / r.count
    info = {
        "docs": len(docs), "tokens_per_doc": data.shape[1], "prompt_len": prompt_len, "gen_len": gen_len,
        "reference_nll_nats": runs[0].ref_nll_sum / runs[0].count, "seconds": time.time() - start,
    }  # fmt: skip
    return [r.result for r in runs], info


def _bar(steps, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(steps, desc=desc, unit="tok", file=sys.stderr, disable=not enabled, leave=False, dynamic_ncols=True)


def held_out_token_docs(tokenizer, num_tokens: int, max_docs: int, stdlib_root=None) -> list[list[int]]:
    """The first num_tokens tokens of up to max_docs held-out stdlib files that are long enough
    (from the running interpreter's stdlib, or a copy of one at stdlib_root)."""
    from .stdlib_corpus import held_out_files

    docs = []
    for path in held_out_files(stdlib_root):
        ids = tokenizer.encode(path.read_bytes().decode("utf-8", errors="replace"))
        if len(ids) >= num_tokens:
            docs.append(ids[:num_tokens])
        if len(docs) == max_docs:
            return docs
    if not docs:
        raise ValueError(f"no held-out stdlib file has {num_tokens} tokens")
    return docs


def results_markdown(results, info, header: str) -> str:
    lines = [
        header,
        "",
        f"{info['docs']} held-out documents x {info['tokens_per_doc']} tokens, one token per forward call "
        f"(the state is stored after every token); greedy continuation of {info['gen_len']} tokens after a "
        f"{info['prompt_len']}-token prompt. Reference NLL {info['reference_nll_nats']:.4f} nats/token.",
        "",
        "| variant | storage | mean NLL diff (nats/token) | KL mean | KL max | greedy agreement | "
        "first divergence (mean position) | max abs state element |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.state_dtype} | {r.nll_diff_nats:+.2e} | {r.kl_mean:.2e} | {r.kl_max:.2e} | "
            f"{r.greedy_agreement:.4f} | {r.first_divergence_mean:.1f} | {r.max_abs_state:.3g} |"
        )
    return "\n".join(lines) + "\n"


def precision_markdown(data: dict) -> str:
    """The markdown of a stored result (results_json's content): what `eval-state` printed."""
    from types import SimpleNamespace

    meta = data["meta"]
    header = (f"State precision of {Path(meta['model']).name}, {meta['device']}, {meta['date']}, "
              f"compute {meta['compute_dtype']}")  # fmt: skip
    return results_markdown([SimpleNamespace(**r) for r in data["results"]], data["info"], header)


def results_json(results, info, meta: dict) -> str:
    return json.dumps({"meta": meta, "info": info, "results": [asdict(r) for r in results]}, indent=2)
