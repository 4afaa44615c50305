"""EfficientTrain++'s curriculum in optimizer steps: stages of equal compute, the RandAugment
magnitude per stage, compute progress, and the cost model behind the speed-up.

Wang et al., "EfficientTrain++: Generalized Curriculum Learning for Efficient Visual Backbone
Training", TPAMI 2024 (arXiv:2405.08768). The released code measures a budget in *equivalent
epochs* E_eq (an epoch at input side B costs (B/N)^2 of one at the full side N) and splits it into
K stages of equal compute, E_eq/K each: stage i runs (E_eq/K) (N/B_i)^2 data epochs at B_i with
RandAugment magnitude m_i = i. Every stage is a relaunch whose epoch counter is rescaled, so the
stage boundaries carry integer rounding (stages overlap or leave gaps in progress by a few tenths
of a percent). Here the same split is made in the run's own optimizer steps: a run of T steps gives
stage i the share (N/B_i)^2 / sum_j (N/B_j)^2 of T, boundaries rounded once from the cumulative
share (so the stages tile [0, T) exactly and all ranks agree: a pure function of the step). T is
the run's length (train.epochs or run.max_steps), not derived from an E_eq: ``budget_steps`` gives
the T that reproduces a published budget. Costs count pixels (the papers' bookkeeping, (B/N)^2) or
a ViT's multiply-accumulates (blocks on the token count plus the patch embedding; the papers'
reported compute speed-ups follow this one).

Everything here is a pure function of its arguments (no tensors), tested against the papers' numbers.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate

from dsvit.model.token_stage import vit_block_macs
from dsvit.plugins.stages import stage_of

# ET++'s DeiT-S list (96, 96, 160 x4, 192, 192, 224, 224 of 224), as fractions of the input side
DEIT_S_FRACTIONS = (0.4286, 0.4286, 0.7143, 0.7143, 0.7143, 0.7143, 0.8571, 0.8571, 1.0, 1.0)


def stage_sides(fractions, img_size: int, patch: int) -> list[int]:
    """Each fraction of ``img_size`` rounded (half up) to a multiple of ``patch`` (0 possible)."""
    return [int(f * img_size / patch + 0.5) * patch for f in fractions]


def stage_weights(sides, full: int) -> list[float]:
    """Steps per unit of compute at each side: (full / side)^2."""
    return [(full / s) ** 2 for s in sides]


def stage_starts(total_steps: int, sides, full: int) -> list[int]:
    """First optimizer step of each stage of a ``total_steps`` run, every stage the same compute.
    A stage shorter than half a step is empty (its start equals the next one's)."""
    w = stage_weights(sides, full)
    before = [0.0, *accumulate(w)][:-1]
    return [int(total_steps * c / sum(w) + 0.5) for c in before]


def stage_lengths(starts, total_steps: int) -> list[int]:
    return [b - a for a, b in zip(starts, [*starts[1:], total_steps])]


def magnitude(stage: int, stages: int, max_magnitude: int) -> int:
    """RandAugment magnitude of ``stage``: ET++'s m_i = i for 10 stages and -m9, scaled linearly
    from 0 to ``max_magnitude`` for other counts (Python's round)."""
    return round(stage * max_magnitude / (stages - 1)) if stages > 1 else max_magnitude


def compute_progress(step: int, starts, sides, full: int, total_steps: int) -> float:
    """Share of the run's compute (pixels) done before ``step``: ET++'s clock, p = i/K at the start
    of stage i (up to the rounding of the boundaries)."""
    cost = [(s / full) ** 2 for s in sides]
    lengths = stage_lengths(starts, total_steps)
    done = sum(c * min(max(step - a, 0), n) for c, a, n in zip(cost, starts, lengths))
    return done / sum(c * n for c, n in zip(cost, lengths))


def budget_steps(equivalent_epochs: float, steps_per_epoch: int, sides, full: int) -> int:
    """Optimizer steps of ET++'s run of ``equivalent_epochs`` full-size epochs: each stage's share
    of the budget is E_eq / K full-size epochs, (full / side)^2 times as many at its side."""
    w = stage_weights(sides, full)
    return int(equivalent_epochs * steps_per_epoch * sum(w) / len(w) + 0.5)


# ---------------------------------------------------------------- cost model
def pixel_cost(side: int) -> float:
    """Cost of one image at ``side`` px counted as pixels (the papers' (B/N)^2 bookkeeping)."""
    return float(side * side)


def vit_cost(side: int, patch: int, dim: int, depth: int, mlp_ratio: float = 4.0, prefix: int = 1) -> float:
    """Multiply-accumulates of a ViT's forward on one ``side`` px image: ``depth`` blocks on the
    patch tokens plus ``prefix`` tokens, and the patch embedding (head and norms left out)."""
    tokens = (side // patch) ** 2
    return depth * vit_block_macs(tokens + prefix, dim, mlp_ratio) + tokens * 3 * patch * patch * dim


def run_cost(steps_per_stage, sides, cost) -> float:
    """Cost of a run of ``steps_per_stage[i]`` steps at ``sides[i]`` (``cost``: side -> cost)."""
    return sum(n * cost(s) for n, s in zip(steps_per_stage, sides))


@dataclass(frozen=True)
class Stage:
    start: int          # first optimizer step
    end: int            # one past its last step (start == end: empty)
    side: int           # input side in px
    magnitude: int      # RandAugment magnitude (-1: data.auto_augment is not scheduled)


def stage_table(total_steps: int, sides, full: int, max_magnitude: int = -1) -> list[Stage]:
    starts = stage_starts(total_steps, sides, full)
    ends = [*starts[1:], total_steps]
    mags = [magnitude(i, len(sides), max_magnitude) if max_magnitude >= 0 else -1 for i in range(len(sides))]
    return [Stage(a, b, s, m) for a, b, s, m in zip(starts, ends, sides, mags)]


def epoch_setting(table: list[Stage], first: int, length: int, total_steps: int) -> tuple[int, int]:
    """(the largest side any step of the epoch of ``length`` steps from ``first`` trains at, the
    magnitude of the stage holding its first step)."""
    starts = [r.start for r in table]
    last = max(first, min(first + length, total_steps) - 1)
    stages = range(stage_of(first, starts), stage_of(last, starts) + 1)
    return max(table[i].side for i in stages), table[stages[0]].magnitude


def describe(table: list[Stage], patch: int, epoch_steps, total_steps: int, crop_full: int = 0) -> list[str]:
    """One line per stage (steps, epochs, side, patches, magnitude), then the loader's settings per
    run of epochs (crop size: the epoch's largest side, or ``crop_full``; the magnitude)."""
    bounds = list(accumulate(epoch_steps))
    out = []
    for i, r in enumerate(table):
        if r.end <= r.start:
            out.append(f"  stage {i}: empty (the run is too short for it)")
            continue
        e0, e1 = bisect_right(bounds, r.start), bisect_right(bounds, r.end - 1)
        m = f", RandAugment m{r.magnitude}" if r.magnitude >= 0 else ""
        out.append(f"  stage {i}: steps {r.start:,}-{r.end - 1:,} (epochs {e0}-{e1}): {r.side} px "
                   f"({(r.side // patch) ** 2} patches){m}")
    runs = []   # [first epoch, last epoch, crop, magnitude]
    for e, first in enumerate([0, *bounds[:-1]]):
        if first >= total_steps:
            break
        size, m = epoch_setting(table, first, epoch_steps[e], total_steps)
        if runs and runs[-1][2:] == [crop_full or size, m]:
            runs[-1][1] = e
        else:
            runs.append([e, e, crop_full or size, m])
    out.append("  loader per epoch: " + "; ".join(
        f"epoch{f's {a}-{b}' if b > a else f' {a}'}: crop {size} px" + (f", m{m}" if m >= 0 else "")
        for a, b, size, m in runs))
    return out
