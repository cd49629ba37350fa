"""Renders the measured impact table (docs/impact.md), its charts and the one-sentence
explanations from the JSON that benchmarks/bench_impact.py writes; nothing here measures.

Everything is derived from the result dict: `summarize` pairs every baseline with its
improvement (speed-ups are medians of per-repeat paired ratios, with their min-max),
`render` writes the markdown, `write_charts` the PNGs. The sentences are generated from the
numbers: each names the measured figure, says whether it is below, inside or above the seed's
estimate (or within run-to-run noise), and gives the mechanism: a clause computed from measured or
counted quantities where the run has them, otherwise marked as the design's explanation.

A cell is unstable (`pair_flag`) when either side's repeats spread beyond common.MAX_SPREAD or
its paired ratio and its medians disagree on which side is faster; unstable cells are marked in
the tables and left out of every range, verdict and sentence.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from common import MAX_SPREAD, spread_of

DESIGN = "(the design's explanation, not measured here)"

CPU_NOTE = "CPU figures from tiny smoke shapes: they are not GPU figures"

# the seed's table: row number, key, idea, memory savings, speed improvement (its estimates)
SEED = [
    (1, "contiguous", "Contiguous State", "0%", "5-10%", (5, 10)),
    (2, "f16", "F16 State", "50%", "0-5%", (0, 5)),
    (3, "lazy", "Lazy Materialization", "0%", "10-20%", (10, 20)),
    (4, "compression", "State Compression", "75%+", "-5% (overhead)", (-5, -5)),
    (5, "fused_shift", "Batched Updates (fused token shift)", "0%", "10-15%", (10, 15)),
    (6, "ring", "Ring Buffer", "0%", "5%", (5, 5)),
]


# ---- summary: the numbers the table and the sentences use -----------------------------------------
def pair_flag(base: dict, ours: dict, max_spread: float = MAX_SPREAD) -> str | None:
    """Why a (baseline, ours) comparison is not a finding, or None: a side whose repeats spread
    beyond max_spread, or a paired ratio that says the opposite of the two medians."""
    for side, r in (("baseline", base), ("ours", ours)):
        if len(r["repeats_s"]) > 1 and spread_of(r["repeats_s"]) > max_spread:
            return f"{side}'s repeats spread {spread_of(r['repeats_s']):.0%}"
    ratio = statistics.median(b / o for b, o in zip(base["repeats_s"], ours["repeats_s"]))
    by_medians = base["median_s"] / ours["median_s"]
    if (ratio - 1) * (by_medians - 1) < 0:
        return "the paired ratio and the medians disagree on which side is faster"
    return None


def paired(base: dict, ours: dict) -> dict:
    """Speed-up of ours over base: median and min-max of the per-repeat ratios (base / ours),
    and the reason it is unstable (None when it is a finding)."""
    ratios = [b / o for b, o in zip(base["repeats_s"], ours["repeats_s"])]
    return {"speedup": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "base_s": base["median_s"], "ours_s": ours["median_s"], "flag": pair_flag(base, ours)}  # fmt: skip


def stable(cells: list[dict]) -> list[dict]:
    return [c for c in cells if not c.get("flag")]


def summarize(result: dict) -> dict:
    s = {"pairs": [], "lazy": [], "compression": [], "rollback": []}
    speed = {(r["shape"], r["batch"], r["workload"], r["variant"]): r for r in result["speed"]}
    cells = dict.fromkeys((r["shape"], r["batch"], r["workload"]) for r in result["speed"])
    for key, label, base, ours in result["meta"]["pairs"]:
        for shape, batch, work in cells:
            b, o = speed[shape, batch, work, base], speed[shape, batch, work, ours]
            s["pairs"].append({"row": key, "label": label, "shape": shape, "batch": batch, "workload": work,
                               "memory_saving": 1 - o["pool_bytes"] / b["pool_bytes"], **paired(b, o)})  # fmt: skip
    lazy = {(r["shape"], r["batch"], r["policy"]): r for r in result["lazy"]}
    for shape, batch, _ in [k for k in lazy if k[2] == "eager"]:
        e, l = lazy[shape, batch, "eager"], lazy[shape, batch, "lazy"]
        s["lazy"].append({"shape": shape, "batch": batch, "speakers": e["speakers"], **paired(e["turn"], l["turn"]),
                          "save": paired(e["save"], l["save"]), "eager_bytes": e["bytes_to_host_per_turn"],
                          "lazy_bytes": l["bytes_to_host_per_turn"], "eager_save_s": e["save"]["median_s"],
                          "lazy_save_s": l["save"]["median_s"], "forward_s": l["forward"]["median_s"]})  # fmt: skip
    s["compression"] = compression_summary(result, speed, result["meta"]["ours"])
    s["rollback"] = rollback_summary(result)
    return s


def compression_summary(result: dict, speed: dict, ours: str) -> list[dict]:
    """Per shape and format: saving against fp32, and the encode + decode overhead against the
    fp32 copy, as a fraction of one decode step (ours, smallest batch) per swapped session."""
    out = []
    rows = {(r["shape"], r["format"]): r for r in result["compression"]}
    for (shape, fmt), r in rows.items():
        base = rows[shape, "fp32"]
        steps = [v for (sh, b, w, name), v in speed.items() if sh == shape and w == "decode" and name == ours]
        step = min(steps, key=lambda v: v["batch"]) if steps else None
        item = {"shape": shape, "format": fmt, "saving": 1 - r["state_bytes"] / base["state_bytes"],
                "state_bytes": r["state_bytes"], "sessions_per_gb": r["sessions_per_gb"]}  # fmt: skip
        if "encode_decode" in r and "encode_decode" in base:
            item["flag"] = pair_flag(base["encode_decode"], r["encode_decode"])
            extra = [a - b for a, b in zip(r["encode_decode"]["repeats_s"], base["encode_decode"]["repeats_s"])]
            item.update(encode_decode_s=r["encode_decode"]["median_s"], fp32_copy_s=base["encode_decode"]["median_s"],
                        overhead_s=statistics.median(extra), overhead_min_s=min(extra),
                        overhead_max_s=max(extra))  # fmt: skip
            if step is not None:
                item.update(step_s=step["median_s"], step_batch=step["batch"],
                            overhead_of_step=item["overhead_s"] / step["median_s"])  # fmt: skip
        out.append(item)
    return out


REFEED, SLOT_COPY = "reset and re-feed the kept context", "copy the slot before the draft"


def rollback_summary(result: dict) -> list[dict]:
    """Each rollback method against re-feeding; the ring's speculative rollback also against the
    strongest baseline in the code, a copy of the slot before each draft (`vs_copy`)."""
    rows = {(r["shape"], r["case"], r["tokens"], r["method"]): r for r in result["rollback"]}
    out = []
    for (shape, case, n, method), r in rows.items():
        if method == REFEED:
            continue
        base = rows[shape, case, n, REFEED]
        item = {"shape": shape, "batch": 1, "case": case, "tokens": n, "method": method, "context": r["context"],
                "draft": r.get("draft"), **paired(base, r)}  # fmt: skip
        copy = rows.get((shape, case, n, SLOT_COPY))
        if copy is not None and method != SLOT_COPY:
            item["vs_copy"] = {"shape": shape, "case": case, "tokens": n, "draft": r.get("draft"), **paired(copy, r)}
        out.append(item)
    return out


# ---- markdown ------------------------------------------------------------------------------------
def size(nbytes: float) -> str:
    """Bytes in MB, or kB for the tiny smoke shapes."""
    return f"{nbytes / 1e6:,.2f} MB" if nbytes >= 1e5 or nbytes == 0 else f"{nbytes / 1e3:.1f} kB"


def pct(x: float) -> str:
    return f"{x * 100:+.1f}%".replace("-", "−")


def change(p: dict) -> str:
    """A speed-up as a percentage (or a factor when large, either way) with its min-max, marked
    when the cell is unstable."""
    mark = f" (unstable: {p['flag']}; not a finding)" if p.get("flag") else ""
    if p["speedup"] >= 2:
        return f"{p['speedup']:.1f}x faster [{p['min']:.1f}-{p['max']:.1f}x]{mark}"
    if p["speedup"] <= 0.5:
        return f"{1 / p['speedup']:.1f}x slower [{1 / p['max']:.1f}-{1 / p['min']:.1f}x]{mark}"
    return f"{pct(p['speedup'] - 1)} [{pct(p['min'] - 1)} … {pct(p['max'] - 1)}]{mark}"


def _where(c: dict) -> str:
    """Where a cell was measured: shape and batch, or for a rollback the tokens taken back."""
    if "case" in c and c.get("draft"):
        return f"{c['shape']}, {c['tokens']} of {c['draft']} rejected"
    if "case" in c:
        return f"{c['shape']}, {c['tokens']} back"
    return f"{c['shape']}, B={c['batch']}"


def extremes(cells: list[dict]) -> str:
    """The lowest and the highest stable cell, each with its spread and where it was measured,
    and how many unstable cells were left out."""
    if not cells:
        return "not measured"
    ok = stable(cells)
    left_out = len(cells) - len(ok)
    note = f" ({left_out} of {len(cells)} cells unstable, left out)" if left_out else ""
    if not ok:
        return f"no stable cell{note}"
    lo, hi = min(ok, key=lambda c: c["speedup"]), max(ok, key=lambda c: c["speedup"])
    if lo is hi:
        return f"{change(lo)} ({_where(lo)}){note}"
    return f"{change(lo)} ({_where(lo)}) to {change(hi)} ({_where(hi)}){note}"


def classify(cells: list[dict], estimate: tuple[float, float]) -> str:
    """Where the measured cells fall against the seed's estimated range (percent): a cell counts
    only when its whole min-max range lies on one side of zero and it is 2% or more away."""
    if not cells:
        return "unmeasured"
    cells = stable(cells)
    if not cells:
        return "unstable"
    faster = [c for c in cells if c["min"] > 1 and c["speedup"] >= 1.02]
    slower = [c for c in cells if c["max"] < 1 and c["speedup"] <= 0.98]
    if not faster:
        return "slower" if slower else "noise"
    if slower:
        return "mixed"
    best = max(c["speedup"] for c in faster) - 1
    worst = min(c["speedup"] for c in cells) - 1
    lo, hi = estimate[0] / 100, estimate[1] / 100
    if best < lo:
        return "below"
    if best > hi:
        return "above"
    return "within" if worst >= lo else "reaching"


def render(result: dict, doc_path: Path | None = None, charts: dict | None = None) -> str:
    s = summarize(result)
    meta = result["meta"]
    lines = header(meta, result)
    lines += main_table(result, s)
    lines += ["", "## Why each number differs from the estimate", ""]
    lines += [f"{n}. **{name}.** {sentence(key, result, s)}" for n, key, name, *_ in SEED]
    lines += chart_links(charts, doc_path)
    lines += detail_tables(result, s)
    return "\n".join(lines) + "\n"


def header(meta: dict, result: dict) -> list[str]:
    lines = ["# The seed's Estimated Impact table, measured", ""]
    if meta["cpu"]:
        lines += [f"**{CPU_NOTE}** (torch reference ops, fp32 weights, no CUDA graphs, shape L2 C64). Run "
                  "`rwkvstate bench impact` on a GPU for the real table.", ""]  # fmt: skip
    runs = "; ".join(f"{r['date']}: {', '.join(r['shapes'])}" + (f" on {r['card']}" if len(meta["runs"]) > 1 else "")
                     for r in meta["runs"])  # fmt: skip
    lines += [f"`benchmarks/bench_impact.py` (`rwkvstate bench impact`). Card: **{meta['card']}** ({runs}); "
              f"torch {meta['torch']}. Shapes {', '.join(meta['shapes'])} with random {meta['weights']} weights, batch sizes "
              f"{', '.join(map(str, meta['batches']))}. Each speed figure is the median of {meta['repeats']} repeats "
              f"(each the median of {meta['steps']} decode steps or {meta['prefill_steps']} prefill steps, the "
              "variants of a row interleaved) with the min-max of the per-repeat ratios in brackets; positive = "
              "faster than the baseline. Memory saving = 1 - ours / baseline bytes of the structure the idea "
              f"changes. Timer: {meta.get('timer', 'CUDA events for decode and prefill steps, wall clock with the device synchronised for the rest')}. "
              f"A cell is **unstable** when either side's repeats spread more than {MAX_SPREAD:.0%} ((max - min) / "
              "median) or its paired ratio and its medians disagree on which side is faster; unstable cells are "
              "marked, were re-run (runs that record `attempts`), and are left out of every range, verdict and "
              "sentence.", ""]  # fmt: skip
    for skip in result["skipped"]:
        lines += [f"Skipped {skip['shape']}: {skip['reason']}; run it on its own with `--shapes {skip['shape']}` "
                  "and combine the JSON files with `--merge`.", ""]  # fmt: skip
    for run in meta.get("incomplete_runs", []):  # later runs that ended early: recorded, not published
        lines += [f"A later run ({run['date']}, {run['card']}, {', '.join(run['shapes'])}) did not complete: "
                  f"{run['reason']}. Its partial results are not published; every figure here is from the run "
                  "named above.", ""]  # fmt: skip
    return lines


def pair_cells(s: dict, row: str, workload: str | None = None) -> list[dict]:
    return [p for p in s["pairs"] if p["row"] == row and (workload is None or p["workload"] == workload)]


def main_table(result: dict, s: dict) -> list[str]:
    card = result["meta"]["card"]
    lines = ["| # | Idea | Seed: memory | Seed: speed | Measured memory saving | Measured speed change "
             "[min … max over repeats] | Workload | Card | Quality |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    cells = {key: row_cells(key, result, s) for _, key, *_ in SEED}
    for n, key, name, mem, speed, _ in SEED:
        memory, measured, workload, quality = cells[key]
        lines.append(f"| {n} | {name} | {mem} | {speed} | {memory} | {measured} | {workload} | {card} | {quality} |")
    for key, label in (("rows_1_2_5", "Rows 1, 2, 5 together"), ("vs_seed", "This runtime vs the seed design")):
        memory = pair_cells(s, key)[0]["memory_saving"] if pair_cells(s, key) else 0
        speed = f"decode {extremes(pair_cells(s, key, 'decode'))}; prefill {extremes(pair_cells(s, key, 'prefill'))}"
        what = ("fragmented fp32 per-mix vs contiguous fp16 fused shift" if key == "rows_1_2_5" else
                "the seed design (also the unfused time mix) vs this runtime's default")  # fmt: skip
        lines.append(f"| - | {label} | - | - | {memory:.0%} (pool) | {speed} | {what} | {card} | "
                     "fp16 storage, see row 2 |")
    return lines


def row_cells(key: str, result: dict, s: dict) -> tuple[str, str, str, str]:
    """(memory saving, measured speed, workload, quality) of one of the seed's rows."""
    if key in ("contiguous", "f16", "fused_shift"):
        cells = pair_cells(s, key)
        memory = f"{cells[0]['memory_saving']:.0%} (pool bytes)" if cells else "-"
        speed = f"decode {extremes(pair_cells(s, key, 'decode'))}; prefill {extremes(pair_cells(s, key, 'prefill'))}"
        workload = {
            "contiguous": "decode step (CUDA graphs) and prefill step; fragmented fp32 vs contiguous fp32, "
                          "per-mix token shift in both",
            "f16": "decode and prefill steps; contiguous fp32 vs contiguous fp16 pool (fp32 arithmetic)",
            "fused_shift": "decode and prefill steps; per-mix (one launch per mix) vs fused token shift, "
                           "contiguous fp16 pool",
        }[key]  # fmt: skip
        quality = storage_quality(result) if key == "f16" else "lossless (same arithmetic, same bytes)"
        return memory, speed, workload, quality
    return {"lazy": lazy_cells, "compression": compression_cells, "ring": ring_cells}[key](result, s)


def storage_quality(result: dict) -> str:
    q = result.get("quality", {}).get("storage", {})
    parts = [f"{f} storage: KL {v['kl_mean']:.1e}, greedy agreement {v['greedy_agreement']:.0%}" for f, v in q.items()]
    return "; ".join(parts) or "no stored precision results"


def lazy_cells(result: dict, s: dict):
    cells = s["lazy"]
    big = max(cells, key=lambda c: (c["batch"], c["eager_bytes"])) if cells else None
    memory = "0% (same buffers)"
    if big:
        memory += f"; bytes to host per turn {pct(big['lazy_bytes'] / big['eager_bytes'] - 1)} ({_where(big)})"
    speed = f"turn (forward + save) {extremes(cells)}"
    workload = (f"chat loop: B sessions, B/8 of them feed {result['meta']['turn_tokens']} tokens per turn, then every "
                "session is saved to the host; eager (one bulk copy of every state) vs lazy (slots written since "
                "their last copy); contiguous fp16 pool")  # fmt: skip
    return memory, speed, workload, "lossless"


def compression_cells(result: dict, s: dict):
    comp = s["compression"]
    by_fmt = {}
    for c in comp:
        by_fmt.setdefault(c["format"], []).append(c)
    memory = ", ".join(f"{f} {cs[0]['saving']:.1%}" for f, cs in by_fmt.items() if f != "fp32")
    speed = int8_cost(s) or "not timed"
    workload = ("cached sessions: bytes per session by snapshot format vs fp32 (the seed's storage); "
                "snapshot + restore of one slot on the device")
    q = result.get("quality", {}).get("snapshots", {})
    parts = []
    for f in ("int8", "fp8", "fp16", "bf16"):
        e = (q.get(f) or {}).get("every_64")
        if e:
            parts.append(f"{f}: KL {e['kl_mean']:.1e}, greedy {e['greedy_agreement']:.0%}")
    quality = ("snapshot/restore every 64 tokens: " + "; ".join(parts)) if parts else "no stored precision results"
    return memory, speed, workload, quality


def ring_cells(result: dict, s: dict):
    mem = [m for m in result["ring_memory"] if m["measured"]]
    memory = "-"
    if mem:
        big = max(mem, key=lambda m: m["slot_bytes"])
        memory = (f"{pct(-big['ring_bytes_per_slot'] / big['slot_bytes'])}: it costs memory (a {big['capacity']}-entry "
                  f"{big['format']} ring with logits, per slot, {big['shape']})")  # fmt: skip
    undo = [c for c in s["rollback"] if c["case"] == "undo"]
    spec = [c for c in s["rollback"] if c["case"] == "speculative" and c["method"] == "ring rollback"]
    vs_copy = [c["vs_copy"] for c in spec if "vs_copy" in c]
    speed = f"undo vs re-feed: {extremes(undo)}; speculative vs re-feed: {extremes(spec)}"
    if vs_copy:
        speed += f"; speculative vs copying the slot before the draft (one spare slot): {extremes(vs_copy)}"
    ctx = result["rollback"][0]["context"] if result["rollback"] else 0
    backs = sorted({c["tokens"] for c in undo}) or [0]
    rejects = sorted({c["tokens"] for c in spec}) or [0]
    draft = spec[0]["draft"] if spec else 0
    workload = (f"batch 1: take back {backs[0]}-{backs[-1]} tokens of a {ctx}-token context (undo/regenerate), or "
                f"{rejects[0]}-{rejects[-1]} of k = {draft} draft tokens verified in one forward; vs reset + re-feed "
                "the kept context (the seed has no rollback) and, for drafts, vs a copy of the slot before each draft "
                "(the strongest baseline in the code)")  # fmt: skip
    return memory, speed, workload, "lossless (ring in the pool's dtype)"


# ---- the one-sentence explanations, generated from the numbers --------------------------------------
def sentence(key: str, result: dict, s: dict) -> str:
    if result["meta"]["cpu"]:
        return cpu_sentence(key, result, s)
    return {"contiguous": why_contiguous, "f16": why_f16, "lazy": why_lazy, "compression": why_compression,
            "fused_shift": why_fused, "ring": why_ring}[key](result, s)  # fmt: skip


def cpu_sentence(key: str, result: dict, s: dict) -> str:
    if key in ("contiguous", "f16", "fused_shift"):
        measured = f"decode {extremes(pair_cells(s, key, 'decode'))}"
    elif key == "lazy":
        measured = f"turn {extremes(s['lazy'])}"
    elif key == "compression":
        int8 = [c for c in s["compression"] if c["format"] == "int8"]
        measured = f"int8 saves {int8[0]['saving']:.1%} of the fp32 bytes" if int8 else "no formats"
    else:
        measured = f"undo {extremes([c for c in s['rollback'] if c['case'] == 'undo'])}"
    extra = " (both token-shift variants run the same torch reference on a CPU)" if key == "fused_shift" else ""
    return (f"These are CPU figures from the tiny smoke shape (torch reference ops, no CUDA graphs): {measured}{extra}; "
            "they are not GPU figures and do not test the seed's estimate.")  # fmt: skip


def seed_estimate(key: str) -> tuple[float, float]:
    return next(e for _, k, *_, e in SEED if k == key)


def _verdict(cls: str, estimate: str) -> str:
    return {"noise": f"within run-to-run noise, not the estimated {estimate}",
            "slower": f"slower, not the estimated {estimate} faster",
            "mixed": f"faster in some cells and slower in others, not a uniform {estimate}",
            "below": f"below the estimated {estimate}", "within": f"inside the estimated {estimate}",
            "reaching": f"reaching the estimated {estimate} only in the best cells",
            "above": f"above the estimated {estimate}", "unmeasured": "not measured",
            "unstable": "every cell unstable, so no verdict"}[cls]  # fmt: skip


def why_contiguous(result: dict, s: dict) -> str:
    cells = pair_cells(s, "contiguous")
    verdict = _verdict(classify(cells, seed_estimate("contiguous")), "5-10%")
    return (f"Measured decode {extremes(pair_cells(s, 'contiguous', 'decode'))} and prefill "
            f"{extremes(pair_cells(s, 'contiguous', 'prefill'))}, {verdict}. Why {DESIGN}: in both layouts the "
            "kernels reach each layer's state through a base pointer, a slot stride and the slot indices, so a step "
            "reads and writes the same bytes with the same launches; what the contiguous layout changes is "
            "whole-slot work, one copy per session instead of one per layer for snapshots, forks and host copies "
            "(rows 3, 4 and 6).")  # fmt: skip


def why_f16(result: dict, s: dict) -> str:
    cells = pair_cells(s, "f16", "decode")
    if not stable(cells) or not result["traffic"]:
        return f"Measured decode {extremes(cells)}." if cells else "Not measured."
    verdict = _verdict(classify(cells, seed_estimate("f16")), "0-5%")
    share = {(t["shape"], t["batch"]): t["state_bytes_fp32"] / (t["weight_bytes"] + t["state_bytes_fp32"])
             for t in result["traffic"]}  # fmt: skip
    by_share = sorted(stable(cells), key=lambda c: share[c["shape"], c["batch"]])
    low, high = by_share[0], by_share[-1]
    return (f"Measured decode {extremes(cells)}, {verdict}. Counted bytes: reading and writing the fp32 state is "
            f"{share[high['shape'], high['batch']]:.0%} of the bytes a decode step moves at {_where(high)} "
            f"(measured {change(high)}) but {share[low['shape'], low['batch']]:.1%} at {_where(low)} "
            f"(measured {change(low)}); halving it can save at most about half that share of a step that is "
            "memory-bound, and nothing where weights and launches set the time; the memory saving is exactly 50% "
            "at every size.")  # fmt: skip


def why_lazy(result: dict, s: dict) -> str:
    cells = s["lazy"]
    if not stable(cells):
        return f"Measured {extremes(cells)} per turn." if cells else "Not measured."
    small = min(stable(cells), key=lambda c: (c["batch"], -c["eager_bytes"]))
    big = max(stable(cells), key=lambda c: (c["batch"], c["eager_bytes"]))
    verdict = _verdict(classify(cells, seed_estimate("lazy")), "10-20%")
    idle = " (nothing to skip: every session spoke)" if small["speakers"] == small["batch"] else ""
    weight = ("the eager copy outweighs the turn's forward" if big["eager_save_s"] > big["forward_s"]
              else "the turn's forward still outweighs the eager copy")  # fmt: skip
    return (f"Measured {extremes(cells)} per turn, {verdict}. Measured bytes and times: eager saving copies every session's state each turn "
            f"({size(big['eager_bytes'])} at {_where(big)}, {big['eager_save_s'] * 1e3:.2f} ms) while lazy copies "
            f"only the {big['speakers']} sessions that spoke ({size(big['lazy_bytes'])}, "
            f"{big['lazy_save_s'] * 1e3:.2f} ms), so the gain follows the share of idle sessions and the state "
            f"size: {change(small)} at {_where(small)}{idle}, {change(big)} at {_where(big)}, where {weight} "
            f"({big['forward_s'] * 1e3:.2f} ms).")  # fmt: skip


def int8_cost(s: dict) -> str | None:
    """int8 encode + decode against an fp32 copy, per swapped session, over the stable shapes: the
    one phrase the table cell and the sentence share."""
    timed = [c for c in s["compression"] if c["format"] == "int8" and "overhead_of_step" in c]
    if not stable(timed):
        return "unstable in every shape, not a finding" if timed else None
    ok = stable(timed)
    big = max(ok, key=lambda c: c["state_bytes"])
    lo, hi = min(ok, key=lambda c: c["overhead_of_step"]), max(ok, key=lambda c: c["overhead_of_step"])
    left = len(timed) - len(ok)
    note = f"; {left} of {len(timed)} shapes unstable, left out" if left else ""
    cost = (f"{lo['overhead_of_step']:.1%} ({lo['shape']}) to {hi['overhead_of_step']:.1%} ({hi['shape']})"
            if lo is not hi else f"{lo['overhead_of_step']:.1%} ({lo['shape']})")  # fmt: skip
    return (f"int8 encode + decode {big['encode_decode_s'] * 1e6:.0f} µs vs fp32 copy {big['fp32_copy_s'] * 1e6:.0f} µs "
            f"per session ({big['shape']}); the difference costs {cost} of a batch-{big['step_batch']} decode step "
            f"per swapped session{note}")  # fmt: skip


def why_compression(result: dict, s: dict) -> str:
    int8 = [c for c in s["compression"] if c["format"] == "int8"]
    if not int8:
        return "Not measured."
    big = max(int8, key=lambda c: c["state_bytes"])
    timed = stable([c for c in int8 if "overhead_of_step" in c])
    q = ((result.get("quality", {}).get("snapshots", {}).get("int8") or {}).get("every_64")) or {}
    quality = (f"; and it is not free in quality (greedy agreement {q['greedy_agreement']:.0%}, KL "
               f"{q['kl_mean']:.1e} with a snapshot every 64 tokens)") if q else ""  # fmt: skip
    mark = "just under" if big["saving"] < 0.75 else "at or above"
    worst = max((c["overhead_of_step"] for c in timed), default=None)
    cost = ("" if worst is None else
            f" ({'more' if worst > 0.05 else 'less'} than the estimated 5%, and paid per swap, not per step)")  # fmt: skip
    return (f"Counted bytes: int8 stores one byte per element plus an fp16 scale per "
            f"{result['compression'][0]['group']} elements, {big['saving']:.1%} less than fp32, {mark} the "
            f"estimated 75% because of the scales. Measured: {int8_cost(s) or 'not timed'}{cost}{quality}.")  # fmt: skip


def why_fused(result: dict, s: dict) -> str:
    cells = pair_cells(s, "fused_shift", "decode")
    if not stable(cells):
        return f"Measured decode {extremes(cells)}." if cells else "Not measured."
    verdict = _verdict(classify(cells, seed_estimate("fused_shift")), "10-15%")
    layers = {t["shape"]: t.get("n_layer") for t in result["traffic"]}
    best = max(stable(cells), key=lambda c: c["base_s"] - c["ours_s"])
    per_launch = ""
    if layers.get(best["shape"]):
        saved = (best["base_s"] - best["ours_s"]) / (7 * layers[best["shape"]])
        per_launch = (f" Derived: at {_where(best)} the step is {(best['base_s'] - best['ours_s']) * 1e6:.0f} µs "
                      f"shorter, {saved * 1e6:.1f} µs per extra launch if the launches account for all of it.")  # fmt: skip
    return (f"Measured decode {extremes(cells)}, {verdict}. Why {DESIGN}: the shift rows are 2 of the N + 2 rows "
            "of a layer's state, so reading them once instead of once per mix saves few bytes; with CUDA graphs the "
            "per-mix variant's cost is its extra launches, 7 more per layer in a decode step (one per mix plus a "
            f"separate store, in the time mix and the channel mix).{per_launch}")  # fmt: skip


def ring_memory_of(result: dict, shape: str) -> tuple[dict | None, dict | None]:
    """The timed (fp16) and the int8 ring memory rows of one shape."""
    rows = {m["format"]: m for m in result["ring_memory"] if m["shape"] == shape}
    return rows.get("fp16"), rows.get("int8")


def why_ring(result: dict, s: dict) -> str:
    undo = stable([c for c in s["rollback"] if c["case"] == "undo"])
    if not undo or not result["ring_memory"]:
        return "Not measured, or every undo cell unstable."
    big = max(undo, key=lambda c: c["base_s"])
    lo, hi = min(undo, key=lambda c: c["speedup"]), max(undo, key=lambda c: c["speedup"])
    m, int8 = ring_memory_of(result, big["shape"])
    alt = f" ({int8['ring_bytes_per_slot'] / int8['slot_bytes']:.0%} with an int8 ring)" if int8 else ""
    return (f"Measured: undo restores the ring entry kept where the undone turn began instead of re-feeding the "
            f"whole kept context (at {big['shape']}, taking back {big['tokens']} token(s): {big['ours_s'] * 1e3:.2f} ms "
            f"against {big['base_s'] * 1e3:.1f} ms to re-feed {big['context'] - big['tokens']} tokens), "
            f"{lo['speedup']:.0f}-{hi['speedup']:.0f}x over the stable cells; far above 5% because the seed design "
            f"has no rollback at all, and at a price in memory the estimate left out: a {m['capacity']}-entry "
            f"{m['format']} ring with its logits adds {m['ring_bytes_per_slot'] / m['slot_bytes']:.0%} of an fp16 "
            f"slot{alt}. {speculative_sentence(result, s)}")  # fmt: skip


def speculative_sentence(result: dict, s: dict) -> str:
    """Speculative rollback against the strongest baseline in the code, a copy of the slot before
    each draft, with both memory costs in the same sentence."""
    spec = [c for c in s["rollback"] if c["case"] == "speculative" and c["method"] == "ring rollback"]
    vs_copy = [c["vs_copy"] for c in spec if "vs_copy" in c]
    if not vs_copy:
        return ""
    ok = stable(vs_copy)
    faster = sum(c["speedup"] > 1 for c in ok)
    mems = [ring_memory_of(result, c["shape"])[0] for c in ok]
    ring = sorted(m["ring_bytes_per_slot"] / m["slot_bytes"] for m in mems if m)
    ring_text = f"{ring[0]:.0%}" if ring and ring[0] == ring[-1] else (f"{ring[0]:.0%}-{ring[-1]:.0%}" if ring else "?")
    return (f"A rollback inside a k = {vs_copy[0]['draft']}-token draft against the strongest baseline in the code, "
            f"copying the slot before each draft and copying it back on a rejection (one spare slot per session, "
            f"100% of a slot, and no ring): measured {extremes(vs_copy)}, the ring faster in {faster} of the "
            f"{len(ok)} stable cells, while its ring costs {ring_text} of a slot.")  # fmt: skip


# ---- detail tables ----------------------------------------------------------------------------------
def detail_tables(result: dict, s: dict) -> list[str]:
    card = result["meta"]["card"]
    lines = ["", f"## Rows 1, 2, 5: decode and prefill steps ({card})", "",
             "Decode: one token per sequence, CUDA graphs on (on a CPU: eager). Prefill: one packed forward of "
             "B prompts of the length shown. Times are medians over repeats, ms.", "",
             "| row | shape | batch | workload | tokens/seq | baseline ms | ours ms | speed change [min … max] |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lengths = {(r["shape"], r["batch"], r["workload"]): r["tokens_per_seq"] for r in result["speed"]}
    for p in s["pairs"]:
        lines.append(f"| {p['label']} | {p['shape']} | {p['batch']} | {p['workload']} | "
                     f"{lengths[p['shape'], p['batch'], p['workload']]} | {p['base_s'] * 1e3:.3f} | "
                     f"{p['ours_s'] * 1e3:.3f} | {change(p)} |")  # fmt: skip
    lines += ["", f"## Row 3: saving every session to the host after every turn ({card})", "",
              "| shape | sessions | speaking per turn | policy | forward ms | save ms | turn ms [min … max] | to host per turn |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["lazy"]:
        t = r["turn"]
        lines.append(f"| {r['shape']} | {r['sessions']} | {r['speakers']} | {r['policy']} | "
                     f"{r['forward']['median_s'] * 1e3:.2f} | {r['save']['median_s'] * 1e3:.2f} | "
                     f"{t['median_s'] * 1e3:.2f} [{t['min_s'] * 1e3:.2f} … {t['max_s'] * 1e3:.2f}] | "
                     f"{size(r['bytes_to_host_per_turn'])} |")  # fmt: skip
    lines += compression_table(result, s, card) + rollback_table(result, s, card)
    return lines


def compression_table(result: dict, s: dict, card: str) -> list[str]:
    lines = ["", f"## Row 4: cached sessions by snapshot format ({card})", "",
             "Bytes of one session's state (fp32 logits, if kept, add "
             f"{size(result['compression'][0]['logits_bytes'])}); encode and decode one slot on the device, "
             "µs, median [min … max] over repeats.", "",
             "| shape | format | bytes per session | saving vs fp32 | sessions per GB | encode µs | decode µs |",
             "|---|---|---|---|---|---|---|"] if result["compression"] else []  # fmt: skip
    summary = {(c["shape"], c["format"]): c for c in s["compression"]}
    for r in result["compression"]:
        c = summary[r["shape"], r["format"]]
        enc = _us(r.get("encode")), _us(r.get("decode"))
        lines.append(f"| {r['shape']} | {r['format']} | {size(r['state_bytes'])} | {c['saving']:.1%} | "
                     f"{r['sessions_per_gb']:,.0f} | {enc[0]} | {enc[1]} |")  # fmt: skip
    q = result.get("quality", {})
    if q.get("sources"):
        lines += ["", f"Quality (rows 2 and 4) from {', '.join(q['sources'])}"
                  f"{' (' + q['device'] + ')' if q.get('device') else ''}: the bundled model, KL divergence of "
                  "the next-token distribution from the fp32 reference and greedy agreement over 256 tokens.", ""]  # fmt: skip
    return lines


def _us(t: dict | None) -> str:
    if not t:
        return "-"
    return f"{t['median_s'] * 1e6:.0f} [{t['min_s'] * 1e6:.0f} … {t['max_s'] * 1e6:.0f}]"


def rollback_table(result: dict, s: dict, card: str) -> list[str]:
    lines = ["", f"## Row 6: rollback through the ring history, batch 1 ({card})", "",
             "undo: take back the last n tokens. speculative: k = 8 draft tokens verified in one forward, the "
             "last r rejected. ms, median [min … max] over repeats.", "",
             "| shape | case | tokens back | method | ms | vs reset + re-feed | vs copy the slot before the draft |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    ratio = {(c["shape"], c["case"], c["tokens"], c["method"]): c for c in s["rollback"]}
    for r in result["rollback"]:
        c = ratio.get((r["shape"], r["case"], r["tokens"], r["method"]))
        vs_copy = change(c["vs_copy"]) if c and "vs_copy" in c else "-"
        lines.append(f"| {r['shape']} | {r['case']} | {r['tokens']} | {r['method']} | {r['median_s'] * 1e3:.2f} "
                     f"[{r['min_s'] * 1e3:.2f} … {r['max_s'] * 1e3:.2f}] | {change(c) if c else 'baseline'} | "
                     f"{vs_copy} |")  # fmt: skip
    lines += ["", "| shape | ring format | entries | ring per slot (states + logits) | fp16 slot | ring / slot |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for m in result["ring_memory"]:
        lines.append(f"| {m['shape']} | {m['format']}{'' if m['measured'] else ' (not timed)'} | {m['capacity']} | "
                     f"{size(m['ring_bytes_per_slot'])} | {size(m['slot_bytes'])} | "
                     f"{m['ring_bytes_per_slot'] / m['slot_bytes']:.0%} |")  # fmt: skip
    return lines


# ---- charts -------------------------------------------------------------------------------------
def chart_links(charts: dict | None, doc_path: Path | None) -> list[str]:
    if not charts:
        return []
    base = doc_path.parent if doc_path else Path(".")
    lines = ["", "## Charts", ""]
    for title, path in charts.items():
        lines += [f"![{title}]({os.path.relpath(path, base)})", ""]
    return lines


def write_charts(result: dict, prefix: Path) -> dict:
    """PNG charts next to the JSON; {} when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no charts (pip install -e '.[bench]')", flush=True)
        return {}
    s = summarize(result)
    charts = {}
    for title, name, draw in (("speed-up by batch size", "speedup", _speedup_chart),
                              ("bytes per cached session by format", "bytes", _bytes_chart),
                              ("rollback against re-feeding", "rollback", _rollback_chart)):  # fmt: skip
        fig = draw(plt, result, s)
        if fig is None:
            continue
        path = prefix.parent / f"{prefix.name}-{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        charts[title] = path
    return charts


def _speedup_chart(plt, result, s):
    """Rows: decode step, prefill step, chat turn (row 3); columns: shapes. Bars: min-max."""
    shapes = list(dict.fromkeys(p["shape"] for p in s["pairs"]))
    if not shapes:
        return None
    fig, axes = plt.subplots(3, len(shapes), figsize=(4.2 * len(shapes), 10), squeeze=False, sharey="row")
    series = [("contiguous", "1 contiguous"), ("f16", "2 f16 state"), ("fused_shift", "5 fused shift"),
              ("vs_seed", "all vs seed design")]  # fmt: skip
    batches = sorted({p["batch"] for p in s["pairs"]})
    for col, shape in enumerate(shapes):
        for row, work in enumerate(("decode", "prefill")):
            for key, label in series:
                cells = [p for p in s["pairs"] if p["row"] == key and p["shape"] == shape and p["workload"] == work]
                _errorline(axes[row][col], sorted(cells, key=lambda p: p["batch"]), label)
            axes[row][col].set_title(f"{shape}: {work} step")
        lazy = sorted((c for c in s["lazy"] if c["shape"] == shape), key=lambda c: c["batch"])
        _errorline(axes[2][col], lazy, "3 lazy vs eager save", color="tab:purple")
        axes[2][col].set_title(f"{shape}: chat turn, all sessions saved")
        for ax in axes[:, col]:
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xscale("log")
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.minorticks_off()
    for row in range(3):
        axes[row][0].set_ylabel("speed change vs baseline, %")
        axes[row][-1].legend(fontsize=8)
    axes[2][0].set_xlabel("batch size (sessions)")
    fig.suptitle(f"Measured speed change per idea ({result['meta']['card']}); bars: min-max over repeats")
    fig.tight_layout()
    return fig


def _errorline(ax, cells, label, **style):
    if not cells:
        return
    x = [c["batch"] for c in cells]
    y = [(c["speedup"] - 1) * 100 for c in cells]
    err = [[y_ - (c["min"] - 1) * 100 for y_, c in zip(y, cells)],
           [(c["max"] - 1) * 100 - y_ for y_, c in zip(y, cells)]]
    ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label, **style)


def _bytes_chart(plt, result, s):
    shapes = list(dict.fromkeys(r["shape"] for r in result["compression"]))
    if not shapes:
        return None
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.6), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in result["compression"] if r["shape"] == shape]
        unit, scale = ("MB", 1e6) if rows[0]["state_bytes"] >= 1e5 else ("kB", 1e3)
        ax.bar([r["format"] for r in rows], [r["state_bytes"] / scale for r in rows], color="tab:blue")
        for i, r in enumerate(rows):
            n = r["sessions_per_gb"]
            label = f"{n / 1e3:,.0f}k" if n >= 1e4 else f"{n:,.0f}"
            ax.text(i, r["state_bytes"] / scale, label, ha="center", va="bottom", fontsize=8)
        ax.set_title(shape)
        ax.set_ylabel(f"{unit} per cached session (state)")
    fig.suptitle("Bytes per cached session by format (labels: sessions per GB)")
    fig.tight_layout()
    return fig


def _rollback_chart(plt, result, s):
    rows = result["rollback"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    if not shapes:
        return None
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.6 * len(shapes), 4), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, shape in zip(axes[0], shapes):
        cases = list(dict.fromkeys((r["case"], r["tokens"]) for r in rows if r["shape"] == shape))
        width = 0.8 / len(methods)
        for m_i, method in enumerate(methods):
            xs, ys = [], []
            for c_i, (case, n) in enumerate(cases):
                hit = [r for r in rows if (r["shape"], r["case"], r["tokens"], r["method"]) == (shape, case, n, method)]
                if hit:
                    xs.append(c_i + m_i * width)
                    ys.append(hit[0]["median_s"] * 1e3)
            ax.bar(xs, ys, width, label=method)
        ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(cases))])
        ax.set_xticklabels([f"{'undo' if c == 'undo' else 'spec'} {n}" for c, n in cases], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(shape)
        ax.set_ylabel("ms (log)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("Rollback through the ring history vs re-feeding the kept context (batch 1)")
    fig.tight_layout()
    return fig


