"""Per-stage step times and the FLOP reduction of a growth run, against a baseline run of the same
recipe, from their metrics.jsonl.

    python benchmarks/growth_stages.py BASELINE_RUN GROWTH_RUN [--patch 4 --dim 96 --mlp-ratio 4]

A stage is the logged steps with the same (depth, resolution) (``growth/depth``,
``growth/resolution``: the logging step's; in an AutoProg search, the sub-network sampled for the
logging step, so read search rows as samples). Per stage: steps, median logged step time, the baseline's median step time at the same
wall-clock times (the runs go side by side: the machine's speed drifts, so time, not step number,
pairs them), speed-up, the analytic MAC reduction of the stage (``schedule.candidate_macs``: blocks
only) and efficiency = speed-up / MAC reduction. The last row is the whole run: time in steps and
the MAC ratio summed over steps; rebuilds (``engine/rebuild_s``) are listed with their times.
Logged step times are means over a logging interval, so a stage boundary inside an interval is
counted with the next stage.
"""
import argparse
import json
import statistics
from pathlib import Path

from dsvit.plugins.growth.schedule import candidate_macs


def rows(run):
    return [json.loads(x) for x in (Path(run) / "tb" / "metrics.jsonl").read_text().splitlines()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("baseline")
    ap.add_argument("growth")
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--dim", type=int, default=96)
    ap.add_argument("--mlp-ratio", type=float, default=4.0)
    ap.add_argument("--img", type=int, default=32)
    ap.add_argument("--depth", type=int, default=12)
    a = ap.parse_args()
    base = [(r["time"], r["train/step_time_s"]) for r in rows(a.baseline) if "train/step_time_s" in r]

    def base_at(t):   # the baseline's logged step time nearest in wall-clock (side by side)
        return min(base, key=lambda b: abs(b[0] - t))[1]
    grow = rows(a.growth)
    full = candidate_macs(a.img, a.depth, a.patch, 1, a.dim, a.mlp_ratio)
    stages, prev, order = {}, 0, []
    for r in grow:
        if "train/step_time_s" not in r or "growth/depth" not in r:
            continue
        step = r["step"]
        key = (r["growth/depth"], r["growth/resolution"])
        if key not in stages:
            stages[key] = {"steps": 0, "times": [], "base": [], "macs": 0.0}
            order.append(key)
        n = step - prev
        st = stages[key]
        st["steps"] += n
        st["times"].append(r["train/step_time_s"])
        st["base"].append(base_at(r["time"]))
        st["macs"] += n * candidate_macs(r["growth/resolution"], r["growth/depth"], a.patch, 1, a.dim,
                                         a.mlp_ratio)
        prev = step
    print("| stage (depth, px) | steps | median s/step | baseline median s/step, same time | speed-up "
          "| MAC reduction | efficiency |")
    print("|---|---|---|---|---|---|---|")
    tot_t = tot_b = tot_m = tot_n = 0.0
    for key in order:
        st = stages[key]
        med, bmed = statistics.median(st["times"]), statistics.median(st["base"] or [float("nan")])
        red = full * st["steps"] / st["macs"]
        sp = bmed / med
        print(f"| {key[0]}, {key[1]} | {st['steps']} | {med:.3f} | {bmed:.3f} | {sp:.2f}x | {red:.2f}x "
              f"| {sp / red:.2f} |")
        tot_t += sum(st["times"]) / len(st["times"]) * st["steps"]
        tot_b += (sum(st["base"]) / len(st["base"]) if st["base"] else float("nan")) * st["steps"]
        tot_m += st["macs"]
        tot_n += st["steps"]
    red = full * tot_n / tot_m
    print(f"| whole run | {int(tot_n)} | {tot_t:.0f} s in steps | {tot_b:.0f} s | {tot_b / tot_t:.2f}x "
          f"| {red:.2f}x | {tot_b / tot_t / red:.2f} |")
    rebuilds = [(r["step"], r["engine/rebuild_s"]) for r in grow if "engine/rebuild_s" in r]
    print("rebuilds (step, s):", ", ".join(f"{s}: {t:.2f}" for s, t in rebuilds))


if __name__ == "__main__":
    main()
