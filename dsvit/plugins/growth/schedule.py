"""Progressive learning's pure core: the stage table, AutoProg's candidates and decision rule.

Everything here is a pure function of its arguments (no torch, no model), so the controller's
choices can be tested against the paper's tables: Li et al., "Automated Progressive Learning for
Efficient Training of Vision Transformers", CVPR 2022 (AutoProg).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsvit.model.token_stage import vit_block_macs
from dsvit.plugins.stages import stage_of  # noqa: F401  (S.stage_of for the plugin and bench)


def make_div(value: float, divisor: int) -> int:
    """Round to a multiple of ``divisor`` (at least ``divisor``), one step up if that lost >10 %."""
    out = max(divisor, int((value + divisor / 2) // divisor) * divisor)
    return out + divisor if out < 0.9 * value else out


def linspace(start: float, stop: float, n: int) -> list[float]:
    return [float(v) for v in np.linspace(start, stop, n)]


@dataclass(frozen=True)
class Stage:
    start: int          # first optimizer step of the stage
    depth: int
    resolution: int
    magnitude: int      # RandAugment magnitude (0: RandAugment off)
    drop_path: float
    reprob: float       # random-erasing probability


def stage_table(starts: list[int], depths: list[int], resolutions: list[int], max_magnitude: int,
                max_drop_path: float, max_reprob: float, aa_scale: float, dp_scale: float,
                re_scale: float) -> list[Stage]:
    """One row per stage; regularisation grows linearly from ``scale * max`` to ``max`` (AutoProg's
    "progressive AugReg"; Python's round, as the original: 0.8333 * 9 = 7.4999 -> 7)."""
    n = len(starts)
    m = [round(v * max_magnitude) for v in linspace(aa_scale, 1, n)]
    dp = [max(0.0, v * max_drop_path) for v in linspace(dp_scale, 1, n)]
    re = [max(0.0, v * max_reprob) for v in linspace(re_scale, 1, n)]
    return [Stage(s, d, r, mm, p, e) for s, d, r, mm, p, e in zip(starts, depths, resolutions, m, dp, re)]


def default_depths(max_depth: int, scale: float, stages: int) -> list[int]:
    return [make_div(v * max_depth, 1) for v in linspace(scale, 1, stages)]


def default_resolutions(img_size: int, scale: float, stages: int, divisor: int) -> list[int]:
    return [min(img_size, make_div(v * img_size, divisor)) for v in linspace(scale, 1, stages)]


# ---------------------------------------------------------------- AutoProg's search
def candidates(stage: int, res: int, depth: int, resolutions: list[int], depths: list[int]) -> list:
    """(resolution, depth) pairs to score at a search, r-major then l-minor, duplicates removed.
    Stage 0: resolutions {R[0], R[n/2], R[-1]} x depths {L[0], L[n/2], L[-1]}. Later stages: the
    current and the next resolution x the next (up to 3) deeper depths (the current one only if it
    is already the largest). A list of one candidate means there is nothing to search."""
    rs, ls = sorted(set(resolutions)), sorted(set(depths))
    if stage == 0:
        cand_r = [rs[0], rs[len(rs) // 2], rs[-1]]
        cand_l = [ls[0], ls[len(ls) // 2], ls[-1]]
    else:
        cand_r = [res] + [r for r in rs if r > res][:1]
        deeper = [d for d in ls if d > depth][:3]
        cand_l = deeper or [depth]
    cand_r, cand_l = sorted(set(cand_r)), sorted(set(cand_l))
    return [(r, d) for r in cand_r for d in cand_l]


def fit_power_law(cost: list[float], loss: list[float], iters: int = 200) -> tuple[float, float]:
    """Least-squares fit of ``loss ~ a * cost ** b`` on the losses themselves (not a log-log line:
    the two differ by up to 1e-2 in ``b``, enough to flip close decisions), Levenberg-Marquardt
    from (a, b) = (1, 1) as SciPy's ``curve_fit`` in the original. Costs are divided by their
    largest value first: the optimum's ``b`` does not change (a absorbs the scale), and a cost in
    FLOPs would otherwise overflow the start point."""
    t = np.asarray(cost, dtype=np.float64)
    t = t / t.max()
    y = np.asarray(loss, dtype=np.float64)
    lt = np.log(t)
    p, lam = np.array([1.0, 1.0]), 1e-3

    def sse(q):
        return float(((q[0] * t ** q[1] - y) ** 2).sum())
    err = sse(p)
    for _ in range(iters):
        f = t ** p[1]
        r = p[0] * f - y
        jac = np.stack([f, p[0] * f * lt], 1)
        g, h = jac.T @ r, jac.T @ jac
        while True:
            step = np.linalg.solve(h + lam * np.diag(np.diag(h) + 1e-12), -g)
            q = p + step
            e = sse(q)
            if e <= err:
                p, err, lam = q, e, max(lam / 10, 1e-12)
                break
            lam *= 10
            if lam > 1e12:
                return float(p[0]), float(p[1])
        if np.abs(step).max() < 1e-12:
            break
    return float(p[0]), float(p[1])


def decide(cost: list[float], loss: list[float]) -> tuple[int, list[float], float]:
    """AutoProg's rule: fit loss ~ a * cost^b, weight w = max(0, -b), score = loss * cost^w, pick the
    smallest (ties: the first). Returns (index, scores, w). The winner lies furthest below the
    fitted loss-vs-cost curve; if loss does not fall with cost (b >= 0) the lowest loss wins."""
    if len(cost) == 1:
        return 0, [float(loss[0])], 0.0
    _, b = fit_power_law(cost, loss)
    w = max(0.0, -b)
    t = np.asarray(cost, dtype=np.float64) / max(cost)
    scores = [float(v) for v in np.asarray(loss, dtype=np.float64) * t ** w]
    return int(np.argmin(scores)), scores, w


def loss_points(window: int, epochs: int = 2) -> list[int]:
    """Steps into a search window of ``window`` steps after which the candidates' losses are taken:
    the original takes one at the end of every search epoch but the last, and four in the last one
    (1/4, 1/2, 3/4, end); only the last epoch's points score. A window is ``epochs`` equal parts."""
    part = window / epochs
    last = [round(window - part + part * f) for f in (0.25, 0.5, 0.75, 1.0)]
    return sorted(set([round(window - part)] + last) - {0})


def candidate_macs(res: int, depth: int, patch: int, prefix: int, dim: int, mlp_ratio: float) -> float:
    tokens = (res // patch) ** 2 + prefix
    return depth * vit_block_macs(tokens, dim, mlp_ratio)


def fraction_steps(fractions: list[float], total: int) -> list[int]:
    return [int(round(f * total)) for f in fractions]

