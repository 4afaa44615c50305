"""The benchmark's table and plot, from each run's metrics.jsonl and the scheduler's pause record.

Per run (``RunTimes``): end to end = active wall-clock from process start to exit (start-up, data
set-up, evaluations, checkpoints and engine rebuilds included); in steps = the sum of the logged
step times (``train/step_time_s`` x steps per logging window; the trainer already leaves evaluation
and checkpoint time out of them) minus the stopped time that fell inside the span each was timed
over (the meter's ``steps`` wall interval; older metrics: from the previous row); training
MACs = sum over windows of steps x ``train/block_gmacs_per_image`` (forward, blocks only; backward
is a fixed multiple of it, so the ratio is the FLOP reduction).

Where the wall time goes (``breakdown``): start-up, evaluation, checkpoint and rebuild seconds from
the run's wall-time intervals (``RunLogger.wall_interval``), each less the time the scheduler had
the run stopped inside it; steps as above; "other" is the rest of end to end (the trainer's work
between steps and outside ``fit``: data set-up per epoch, logging, the exit).

Per variant, over its seeds: top-1 mean and spread (max - min), speed-up = baseline's mean end-to-end
time / the variant's, the same in steps, images/s in steps, FLOP reduction = baseline's training MACs /
the variant's, efficiency = speed-up in steps / FLOP reduction (1.0: the saved FLOPs turn into time
one for one; the end-to-end speed-up also pays for what happens outside the steps).
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path


INTERVAL_KINDS = ("startup", "eval", "checkpoint", "rebuild")   # dsvit.engine.meter's wall intervals


def overlap(a0: float, a1: float, intervals: list) -> float:
    """Seconds of [a0, a1] covered by ``intervals`` ([start, end] pairs, end None = still open)."""
    return sum(max(0.0, min(a1, e if e is not None else a1) - max(a0, s)) for s, e in intervals)


def active_at(t: float, segments: list, pauses: list) -> float:
    """Active seconds of a run up to wall time ``t``: its launches up to t minus its stops."""
    launched = sum(max(0.0, min(t, e if e is not None else t) - s) for s, e in segments)
    return launched - overlap(float("-inf"), t, pauses)


def apart_from_baseline(records: dict, variant_of: dict, baseline: str) -> list:
    """The runs that did not run beside the baseline (a folder grown later): a run is beside it when
    its launches overlap those of a baseline run that overlaps the baseline's first one; the others'
    time columns come from another stretch of the machine's drift. Baseline seeds added later are
    listed too (its time reference is the runs beside its first)."""
    launches = {name: [(s, e if e is not None else s) for s, e in r["segments"]] for name, r in records.items()}
    base = sorted((min(s for s, _ in launches[n]), n) for n in records if variant_of.get(n) == baseline and launches[n])
    if not base:
        return []
    first = launches[base[0][1]]
    reference = [seg for _, n in base for seg in launches[n] if n == base[0][1] or any(overlap(s, e, first) for s, e in launches[n])]
    return [name for name in records if not any(overlap(s, e, reference) for s, e in launches[name])]


def beside_baseline(rs: list, apart) -> list:
    """The runs whose times a variant's time columns use: those beside the baseline, else all."""
    return [r for r in rs if r.name not in apart] or rs


@dataclass
class RunTimes:
    name: str
    top1: float
    evals: list            # (active seconds, top-1) at every evaluation
    end_to_end_s: float
    steps_s: float
    steps: int
    train_macs: float      # sum of steps x forward GMACs per image (relative units)
    restarts: int
    breakdown: dict = field(default_factory=dict)  # seconds: startup, eval, checkpoint, rebuild (active time; see the docstring)


def run_times(record: dict, metrics: Path) -> RunTimes:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    segments, pauses = record["segments"], record["pauses"]
    full = [r["eval/top1"] for r in rows if "eval/top1" in r]
    if not full:
        raise ValueError(f"{metrics}: no evaluation logged; did the run finish?")
    evals = [(active_at(r["time"], segments, pauses), r.get("eval/top1", r.get("eval_part/top1")))
             for r in rows if "eval/top1" in r or "eval_part/top1" in r]   # the curve: parts too
    intervals = [(r["interval"], r["began"], r["time"]) for r in rows if r.get("interval") in INTERVAL_KINDS]
    breakdown = dict.fromkeys(INTERVAL_KINDS, 0.0)
    for kind, a, b in intervals:
        breakdown[kind] += (b - a) - overlap(a, b, pauses)
    steps_s, macs, steps, prev_t, prev_step, span = 0.0, 0.0, 0, None, 0, None
    for r in rows:
        if r.get("interval") == "steps":   # the timed span of the step row that follows it
            span = (r["step"], r["began"], r["time"])
        if "train/step_time_s" not in r:
            continue
        if r["step"] <= prev_step:   # a resumed run logs its redone steps again: count them once
            prev_step = r["step"] - 1
        n = r["step"] - prev_step
        logged = n * r["train/step_time_s"]
        # the span the step time was measured over (metrics before 2026-12-05: from the previous row)
        start, end = (span[1], span[2]) if span and span[0] == r["step"] else (
            prev_t if prev_t is not None else r["time"] - logged, r["time"])
        # the logged step time leaves evaluations, checkpoints and rebuilds out already (the
        # trainer's pauses): the stops to take out are those in the span but outside them. No
        # floor: two 60 s quanta stopped inside 25 steps of 0.2 s leave 5 s, where a floor at a tenth
        # of the window (before 2026-12-05) counted 12.5 s and the "other" column went negative
        stopped = overlap(start, end, pauses) - sum(
            overlap(max(a, start), min(b, end), pauses) for _, a, b in intervals if a < end and b > start)
        steps_s += max(0.0, logged - stopped)
        macs += n * r.get("train/block_gmacs_per_image", float("nan"))
        steps += n
        prev_step, prev_t = r["step"], r["time"]
    return RunTimes(record["name"], full[-1], evals, record["active_s"], steps_s, steps, macs,
                    record.get("restarts", 0), breakdown)


@dataclass
class Row:
    variant: str
    seeds: int
    top1: float
    spread: float
    delta: float
    end_to_end_s: float
    speedup: float
    steps_speedup: float
    images_per_s: float
    flop_reduction: float
    efficiency: float
    restarts: int
    note: str = ""


def _by_variant(runs: dict, variant_of: dict) -> dict:
    """variant -> its finished runs' RunTimes, in the spec's order."""
    out: dict[str, list[RunTimes]] = {}
    for name, variant in variant_of.items():
        if name in runs:
            out.setdefault(variant, []).append(runs[name])
    return out


def table(runs: dict, variant_of: dict, baseline: str, global_batch: int, notes: dict = None,
          apart: tuple = ()) -> list[Row]:
    """``runs``: name -> RunTimes; ``variant_of``: name -> variant label (the spec's order). The time
    columns of a variant come from its runs beside the baseline where it has any (``apart``: the
    others, see ``apart_from_baseline``); top-1 from all its runs."""
    by_variant = _by_variant(runs, variant_of)
    if baseline not in by_variant:
        raise ValueError(f"the baseline '{baseline}' has no finished run yet")
    mean = lambda xs: statistics.fmean(xs)   # noqa: E731
    base = by_variant[baseline]
    base_timed = beside_baseline(base, apart)
    b_e2e, b_steps = mean([r.end_to_end_s for r in base_timed]), mean([r.steps_s for r in base_timed])
    b_top1, b_macs = mean([r.top1 for r in base]), mean([r.train_macs for r in base])
    rows = []
    for variant, rs in by_variant.items():
        top1 = [r.top1 for r in rs]
        timed = beside_baseline(rs, apart)
        e2e, steps_s, macs = mean([r.end_to_end_s for r in timed]), mean([r.steps_s for r in timed]), mean(
            [r.train_macs for r in timed])
        flop_red = b_macs / macs
        note = (notes or {}).get(variant, "")
        if all(r.name in apart for r in rs):
            note = (note + "; " if note else "") + "times not beside the baseline's: not comparable"
        elif len(timed) < len(rs):
            note = (note + "; " if note else "") + f"times of {', '.join(r.name for r in timed)} only (beside the baseline)"
        if len(rs) < 2 and variant != baseline and abs(mean(top1) - b_top1) < 1.0:
            note = (note + "; " if note else "") + "one seed, difference < 1 pt: needs a second seed"
        rows.append(Row(variant, len(rs), mean(top1), max(top1) - min(top1), mean(top1) - b_top1, e2e,
                        b_e2e / e2e, b_steps / steps_s,
                        global_batch * mean([r.steps for r in timed]) / steps_s, flop_red,
                        (b_steps / steps_s) / flop_red, sum(r.restarts for r in rs), note))
    return rows


def markdown(rows: list[Row], baseline: str) -> str:
    out = ["| method | seeds | top-1 mean (spread) | vs baseline | end to end | speed-up | in steps | "
           "images/s | FLOP reduction | efficiency |", "|" + "---|" * 10]
    for r in rows:
        delta = "" if r.variant == baseline else f"{r.delta:+.2f} pt"
        mark = " (restarted)" if r.restarts else ""
        out.append(f"| {r.variant}{mark} | {r.seeds} | {r.top1:.2f} ({r.spread:.2f}) | {delta} | "
                   f"{r.end_to_end_s:.0f} s | **{r.speedup:.2f}x** | {r.steps_speedup:.2f}x | "
                   f"{r.images_per_s:.0f} | {r.flop_reduction:.2f}x | {r.efficiency:.2f} |")
    notes = [f"- {r.variant}: {r.note}" for r in rows if r.note]
    return "\n".join(out + ([""] + notes if notes else [])) + "\n"


def time_table(runs: dict, variant_of: dict, apart: tuple = ()) -> str:
    """Per variant (mean over its seeds): where the end-to-end seconds went, and the share of the
    in-step speed-up that survives end to end is in the main table (speed-up / in steps)."""
    out = ["| method | end to end | start-up | steps | evaluation | checkpoints | rebuilds | other |",
           "|" + "---|" * 8]
    for variant, rs in _by_variant(runs, variant_of).items():
        rs = beside_baseline(rs, apart)   # as table()
        mean = lambda f: statistics.fmean([f(r) for r in rs])   # noqa: E731
        parts = [mean(lambda r, k=k: r.breakdown.get(k, 0.0)) for k in INTERVAL_KINDS]
        e2e, steps = mean(lambda r: r.end_to_end_s), mean(lambda r: r.steps_s)
        other = e2e - steps - sum(parts)
        cells = [f"{v:.0f} s ({100 * v / e2e:.0f} %)" for v in (parts[0], steps, *parts[1:], other)]
        out.append(f"| {variant} | {e2e:.0f} s | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(runs: dict, variant_of: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours, styles = {}, ["-", "--", ":", "-."]
    for name, variant in variant_of.items():
        if name not in runs:
            continue
        c = colours.setdefault(variant, f"C{len(colours) % 10}")
        seen = sum(1 for n, v in variant_of.items() if v == variant and n in runs and n < name)
        t, acc = zip(*runs[name].evals)
        ax.plot([x / 60 for x in t], acc, marker="o", color=c, linestyle=styles[seen % 4],
                label=variant if seen == 0 else None)
    ax.set_xlabel("wall-clock, active (min)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def replace_section(document: str, name: str, body: str) -> str:
    """Put ``body`` between this benchmark's markers in ``document`` (appended if absent)."""
    start, end = f"<!-- dsvit bench {name}: start -->", f"<!-- dsvit bench {name}: end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in document and end in document:
        head, rest = document.split(start, 1)
        return head + block + rest.split(end, 1)[1]
    return document.rstrip() + "\n\n" + block + "\n"
