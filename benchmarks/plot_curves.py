"""Plot eval top-1 against training wall-clock for several runs, from their metrics.jsonl.

    python benchmarks/plot_curves.py OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]

The clock of a run starts at its first training step: the first logged row's timestamp minus the
steps it covers times their step time (start-up and dataset preparation are excluded). Prints a
table of final top-1, wall-clock and speedup against the first run, and the same split into time
in training steps (sum of the logged step times; eval and checkpoints are not in them) and the rest.
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
    steps_s, prev = 0.0, 0
    for r in rows:
        if "train/step_time_s" in r:
            steps_s += (r["step"] - prev) * r["train/step_time_s"]
            prev = r["step"]
    return evals, end, steps_s


def main():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out, runs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
    fig, ax = plt.subplots(figsize=(6, 4))
    table, base = [], None
    for label, run in runs:
        evals, end, steps_s = curve(Path(run))
        ax.plot([t / 60 for t, _ in evals], [a for _, a in evals], marker="o", label=label)
        base = base or (end, steps_s)
        table.append((label, evals[-1][1], end, base[0] / end, steps_s, base[1] / steps_s))
    ax.set_xlabel("training wall-clock (min)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"{'run':>10} {'top1':>7} {'wall_s':>8} {'speedup':>8} {'steps_s':>8} {'speedup':>8} {'other_s':>8}")
    for label, top1, end, speedup, steps_s, step_speedup in table:
        print(f"{label:>10} {top1:7.2f} {end:8.1f} {speedup:7.2f}x {steps_s:8.1f} {step_speedup:7.2f}x "
              f"{end - steps_s:8.1f}")


if __name__ == "__main__":
    main()
