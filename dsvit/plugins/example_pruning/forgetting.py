"""Forgetting-event scores and example rounds (pure numpy).

The example level of Tri-Level E-ViT: Kong et al., "Peeling the Onion: Hierarchical Reduction of
Data Redundancy for Efficient Vision Transformer Training", AAAI 2023 (arXiv:2211.10801). The score
is Toneva et al.'s forgetting count ("An Empirical Study of Example Forgetting during Deep Neural
Network Learning", ICLR 2019) over a window of presentations.

Score over the first P presentations of a window (time order): the number of 1->0 transitions of
the correctness sequence, or P if the example was never correct. Examples are ranked ascending by
(score, mean CLS-attention variance, uid): low = "unforgettable" = removed first. The uid key makes
ties deterministic; the original falls back to the order of first presentation on ties, so dsvit
does not match it there. Where a forward recorded no CLS variance (NaN), that presentation is left
out of the mean; an example without any finite value sorts with mean 0.

A round drops the ``remove_n`` lowest-ranked examples among those presented in the window and
restores as many drawn uniformly from the pool as it was *before* the round (so a dropped example
cannot come back in the same round), then clears the window. The active count never changes.

``update`` consumes a batch of events in time order, vectorized: a stable argsort by uid groups the
events of one example in time order; within a run, transitions are counted against the previous
event, and the first event of a run against ``last_c`` (the example's last correctness in the
window, -1 = none). Events past the P-th presentation are ignored (they form a suffix of each run).
A uid repeated within one batch counts as two presentations, as in the original.
"""
from __future__ import annotations

import numpy as np

ARRAYS = ("active", "last_c", "forget", "ever", "npres", "clsvar_sum", "clsvar_n")


def initial_active(n: int, n_active: int, rng: np.random.Generator) -> np.ndarray:
    """A uniform random subset of ``n_active`` of ``n`` examples (bool mask)."""
    active = np.zeros(n, bool)
    active[rng.permutation(n)[:n_active]] = True
    return active


class ForgettingState:
    """Window statistics of every example, indexed by uid; identical on every rank."""

    def __init__(self, n: int, window: int, active: np.ndarray):
        self.n, self.window = int(n), int(window)
        self.active = np.asarray(active, bool).copy()
        self.reset_window()

    def reset_window(self) -> None:
        n = self.n
        self.last_c = np.full(n, -1, np.int8)     # last correctness in the window; -1: none yet
        self.forget = np.zeros(n, np.int32)       # 1->0 transitions among the first P presentations
        self.ever = np.zeros(n, bool)             # correct at least once among them
        self.npres = np.zeros(n, np.int32)        # presentations counted (capped at P)
        self.clsvar_sum = np.zeros(n, np.float64)  # over all presentations (not capped)
        self.clsvar_n = np.zeros(n, np.int32)

    # ------------------------------------------------------------ statistics
    def update(self, uid, correct, clsvar=None) -> None:
        """Apply events (uid, correct 0/1, clsvar or NaN), given in time order."""
        uid = np.asarray(uid, np.int64)
        if uid.size == 0:
            return
        if uid.min() < 0 or uid.max() >= self.n:
            raise ValueError(f"event uids outside [0, {self.n}): {uid.min()}..{uid.max()}")
        order = np.argsort(uid, kind="stable")    # per example, in time order
        u = uid[order]
        c = np.asarray(correct).astype(np.int8)[order]
        first = np.empty(u.size, bool)
        first[0], first[1:] = True, u[1:] != u[:-1]
        starts = np.flatnonzero(first)
        run = np.cumsum(first) - 1
        idx = np.arange(u.size) - starts[run]     # position of the event within its example's run
        kept = self.npres[u] + idx < self.window  # a prefix of each run
        prev = np.empty_like(c)
        prev[0], prev[1:] = -1, c[:-1]
        prev = np.where(first, self.last_c[u], prev)
        forgot = kept & (prev == 1) & (c == 0)
        uniq = u[starts]
        n_kept = np.add.reduceat(kept.astype(np.int32), starts)
        self.forget[uniq] += np.add.reduceat(forgot.astype(np.int32), starts)
        self.npres[uniq] += n_kept
        self.ever[uniq] |= np.add.reduceat((kept & (c == 1)).astype(np.int32), starts) > 0
        has = n_kept > 0
        self.last_c[uniq[has]] = c[(starts + n_kept - 1)[has]]
        if clsvar is not None:
            v = np.asarray(clsvar, np.float64)[order]
            finite = np.isfinite(v)
            self.clsvar_sum[uniq] += np.add.reduceat(np.where(finite, v, 0.0), starts)
            self.clsvar_n[uniq] += np.add.reduceat(finite.astype(np.int32), starts)

    def scores(self) -> np.ndarray:
        return np.where(self.ever, self.forget, self.window).astype(np.int32)

    def clsvar_mean(self) -> np.ndarray:
        return np.where(self.clsvar_n > 0, self.clsvar_sum / np.maximum(self.clsvar_n, 1), 0.0)

    def ranking(self, tie_break: str = "clsvar") -> np.ndarray:
        """Candidates (active, presented in the window) in removal order."""
        cand = np.flatnonzero(self.active & (self.npres > 0))
        score = self.scores()[cand]
        if tie_break == "clsvar":
            order = np.lexsort((cand, self.clsvar_mean()[cand], score))
        else:
            order = np.lexsort((cand, score))
        return cand[order]

    # ------------------------------------------------------------ rounds
    def round(self, remove_n: int, rng: np.random.Generator, tie_break: str = "clsvar") -> dict:
        """Drop the lowest-ranked, restore as many from the pool at random, clear the window.
        Returns drop (in ranked order), restore, and the ranked candidates with their scores."""
        ranked = self.ranking(tie_break)
        scores = self.scores()[ranked]
        pool = np.flatnonzero(~self.active)
        k = min(int(remove_n), ranked.size, pool.size)
        restore = rng.permutation(pool)[:k]        # drawn before the drop joins the pool
        drop = ranked[:k]
        self.active[drop] = False
        self.active[restore] = True
        self.reset_window()
        return {"drop": drop, "restore": restore, "ranked": ranked, "scores": scores}

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        return {k: getattr(self, k).copy() for k in ARRAYS}

    def load_state_dict(self, state: dict) -> None:
        for k in ARRAYS:
            want = getattr(self, k)
            got = np.asarray(state[k]).astype(want.dtype)
            if got.shape != want.shape:
                raise ValueError(f"forgetting state '{k}' has shape {got.shape}, this dataset needs "
                                 f"{want.shape}: resume on the same training set")
            setattr(self, k, got.copy())
