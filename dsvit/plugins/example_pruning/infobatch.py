"""InfoBatch's per-epoch prune sets with a run length fixed at start (pure numpy).

Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data Pruning", ICLR 2024
(arXiv:2303.04947). Each epoch, among the examples whose last recorded loss is below the mean
(over the examples with a recorded loss), prune at random with probability r and weight the loss of
the kept ones by 1/(1-r), so the expected gradient of the epoch is the full data's; the final
(1 - delta) of the epochs train on full data (annealing). Epoch 0 is full: no losses exist yet.

Why the pruned count is fixed by the plan. dsvit fixes every epoch's length at start
(``plan_epochs``), since the LR schedule and every plugin schedule are functions of the step and
the run length. InfoBatch's pruned count r * |B| depends on the losses, unknown at start. So the
plan fixes a count per pruned epoch,

    m = floor(ratio * expected_below_mean * N)     (planned active samples: N - m),

from a config knob, the expected share of examples below the mean loss (default 0.6: right-skewed
loss distributions put more than half below the mean; a guess on the low side costs speed, not
correctness). At the epoch start, with B the actual below-mean set, exactly

    k = min(m, floor(ratio * |B|))

examples of B are pruned, drawn uniformly without replacement with a seeded generator, and the
kept examples of B are weighted 1/(1-p) with p = k / |B|. Each example of B is kept with
probability exactly 1 - p, so E[sum over kept of w_i * grad_i] = sum over all of grad_i: exactly
unbiased for the p actually used (p <= ratio; p < ratio when B is larger than expected, i.e. less
pruning than InfoBatch would do, never more).

If fewer than m can be pruned (|B| smaller than expected), the keep set holds more than the plan's
N - m samples and the trainer cuts the epoch at its planned length. The stream is shuffled, so the
samples cut are a uniform random subset of the keep set (in-memory data: exactly; shard streams:
through the shard draw and the shuffle buffer), and every example's chance to be seen is scaled by
the same factor planned / kept: the epoch's expected gradient is the full data's up to that
constant, i.e. the epoch just has its planned number of steps.
The shortfall m - k is logged (``below_mean`` too): lower ``expected_below_mean`` if it is large.

Pruned examples are not decoded: the keep set filters the stream before decoding.
"""
from __future__ import annotations

import math

import numpy as np


def anneal_start(epochs: int, anneal_fraction: float) -> int:
    """First epoch of the full-data tail: ceil(delta * epochs), delta = 1 - anneal_fraction
    (InfoBatch prunes while epoch <= delta * epochs; 300 epochs: full from epoch 263)."""
    return int(math.ceil((1.0 - anneal_fraction) * epochs - 1e-9))


def pruned_epochs(epochs: int, anneal_fraction: float) -> list:
    """Whether each epoch prunes: not epoch 0 (no losses), not the anneal tail."""
    stop = anneal_start(epochs, anneal_fraction)
    return [1 <= e < stop for e in range(epochs)]


def planned_pruned(n: int, ratio: float, expected_below_mean: float) -> int:
    return int(math.floor(ratio * expected_below_mean * n))


def plan(n: int, epochs: int, ratio: float, anneal_fraction: float, expected_below_mean: float) -> list:
    """Active samples of every epoch."""
    m = planned_pruned(n, ratio, expected_below_mean)
    return [n - m if p else n for p in pruned_epochs(epochs, anneal_fraction)]


class InfoBatchState:
    """Last recorded loss of every example (``seen``: one was recorded) and the current epoch's
    prune set. No NaN sentinel, so checkpoints compare bit-exactly."""

    def __init__(self, n: int):
        self.n = int(n)
        self.scores = np.zeros(self.n, np.float32)
        self.seen = np.zeros(self.n, bool)
        self.keep = np.ones(self.n, bool)
        self.below = np.zeros(self.n, bool)
        self.p = 0.0

    def update(self, uid, loss) -> None:
        """Each example's last loss among events given in time order."""
        uid = np.asarray(uid, np.int64)
        if uid.size == 0:
            return
        if uid.min() < 0 or uid.max() >= self.n:
            raise ValueError(f"event uids outside [0, {self.n}): {uid.min()}..{uid.max()}")
        order = np.argsort(uid, kind="stable")
        u = uid[order]
        last = np.empty(u.size, bool)
        last[-1], last[:-1] = True, u[1:] != u[:-1]
        self.scores[u[last]] = np.asarray(loss, np.float32)[order][last]
        self.seen[u[last]] = True

    def decide(self, m: int, ratio: float, rng: np.random.Generator) -> dict:
        """This epoch's keep set: k = min(m, floor(ratio |B|)) of the below-mean set B pruned."""
        seen = self.seen
        below = np.zeros(self.n, bool)
        if seen.any():
            mean = self.scores[seen].astype(np.float64).mean()
            below[seen] = self.scores[seen] < mean
        cand = np.flatnonzero(below)
        k = min(int(m), int(math.floor(ratio * cand.size)))
        pruned = rng.permutation(cand)[:k]
        keep = np.ones(self.n, bool)
        keep[pruned] = False
        self.keep, self.below = keep, below
        self.p = k / cand.size if cand.size else 0.0
        return {"pruned": k, "below": int(cand.size), "p": self.p, "shortfall": int(m) - k}

    def weights(self) -> np.ndarray:
        """Per-uid loss weight of the current epoch: 1/(1-p) for the kept below-mean examples."""
        w = np.ones(self.n, np.float32)
        w[self.keep & self.below] = 1.0 / (1.0 - self.p)
        return w

    def full(self) -> None:
        self.keep, self.below, self.p = np.ones(self.n, bool), np.zeros(self.n, bool), 0.0

    def state_dict(self) -> dict:
        return {"scores": self.scores.copy(), "seen": self.seen.copy(), "keep": self.keep.copy(),
                "below": self.below.copy(), "p": float(self.p)}

    def load_state_dict(self, state: dict) -> None:
        scores = np.asarray(state["scores"], np.float32)
        if scores.shape != (self.n,):
            raise ValueError(f"InfoBatch scores have shape {scores.shape}, this dataset needs "
                             f"({self.n},): resume on the same training set")
        self.scores = scores.copy()
        self.seen = np.asarray(state["seen"], bool).copy()
        self.keep = np.asarray(state["keep"], bool).copy()
        self.below = np.asarray(state["below"], bool).copy()
        self.p = float(state["p"])
