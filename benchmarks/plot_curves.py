"""Plot eval top-1 against training wall-clock for several runs, from their metrics.jsonl.

    python benchmarks/plot_curves.py OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]

The clock of a run starts at its first training step: the first logged row's timestamp minus the
steps it covers times their step time (start-up and dataset preparation are excluded). Prints a
table of final top-1, wall-clock and speedup against the first run, and the same split into time
in training steps (sum of the logged step times; eval and checkpoints are not in them) and the rest,
and the mean logged step time in each third of the steps (a ToE run's three stages).
"""
import json
import sys
from pathlib import Path


def curve(run_dir: Path):
    rows = [json.loads(l) for l in (run_dir / "tb" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "train/step_time_s" in r)
    t0 = first["time"] - first["step"] * first["train/step_time_s"]
    evals = [(r["time"] - t0, r["eval/top1"]) for r in rows if "eval/top1" in r]
    end = rows[-1]["time"] - t0
    steps_s, prev, thirds = 0.0, 0, [[], [], []]
    last = max(r["step"] for r in rows)
    for r in rows:
        if "train/step_time_s" in r:
            steps_s += (r["step"] - prev) * r["train/step_time_s"]
            prev = r["step"]
            thirds[min(2, 3 * (r["step"] - 1) // last)].append(r["train/step_time_s"])
    return evals, end, steps_s, [sum(t) / len(t) if t else float("nan") for t in thirds]


def main():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out, runs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
    fig, ax = plt.subplots(figsize=(6, 4))
    table, base = [], None
    for label, run in runs:
        evals, end, steps_s, thirds = curve(Path(run))
        ax.plot([t / 60 for t, _ in evals], [a for _, a in evals], marker="o", label=label)
        base = base or (end, steps_s)
        table.append((label, evals[-1][1], end, base[0] / end, steps_s, base[1] / steps_s, thirds))
    ax.set_xlabel("training wall-clock (min)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"{'run':>10} {'top1':>7} {'wall_s':>8} {'speedup':>8} {'steps_s':>8} {'speedup':>8} {'other_s':>8}"
          f"  s/step by third")
    for label, top1, end, speedup, steps_s, step_speedup, thirds in table:
        print(f"{label:>10} {top1:7.2f} {end:8.1f} {speedup:7.2f}x {steps_s:8.1f} {step_speedup:7.2f}x "
              f"{end - steps_s:8.1f}  " + " / ".join(f"{t:.3f}" for t in thirds))


if __name__ == "__main__":
    main()
