"""AutoProg's search state and measurements: sub-network sampling, candidate losses and times with
the scoring momentum copy, and a rank-agreed decision.

Every measurement runs on every rank in the same order (candidates, then batches), under a forked
RNG seeded by the step (dropout and drop-path in train mode, as the original scores, without
moving the training RNG), so the losses of a resumed run equal the uninterrupted run's.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsvit.model import surgery
from dsvit.plugins.growth import schedule as S


@dataclass
class Search:
    stage: int
    base: int                  # depth before the search: the base of sampling and extraction
    max_depth: int             # the supernet's depth
    cands: list                # [(resolution, depth)], r-major, l-minor
    start: int                 # first step of the search
    end: int                   # first step after it (the decision is made there)
    points: list               # steps after which every candidate's loss is taken
    losses: list = field(default_factory=list)      # per point: per-candidate losses
    times: Optional[list] = None                     # per-candidate seconds (cost=time)
    batches: list = field(default_factory=list)     # this rank's scoring set: (images, targets)

    def sample(self, step: int, seed: int) -> tuple:
        """The step's candidate: uniform, from an RNG seeded by (run seed, step), so identical on
        every rank and after a resume."""
        rng = random.Random(seed * 1_000_003 + step)
        r, d = self.cands[rng.randrange(len(self.cands))]
        return int(r), int(d)

    def active(self, depth: int, smallest_base: bool = False) -> list[int]:
        base = min(d for _, d in self.cands) if smallest_base else self.base
        return surgery.supernet_active(min(base, depth), self.max_depth, depth)

    def mean_losses(self) -> list[float]:
        if not self.losses:
            raise RuntimeError(f"AutoProg search of stage {self.stage} (steps {self.start}-{self.end}) "
                               f"ended without a loss measurement")
        return [sum(p[i] for p in self.losses) / len(self.losses) for i in range(len(self.cands))]

    def decide(self, costs: list[float]) -> tuple:
        return S.decide(costs, self.mean_losses())

    def state_dict(self) -> dict:
        out = asdict(self)
        out.pop("batches")
        out["cands"] = [list(c) for c in self.cands]
        return out

    @classmethod
    def from_state(cls, state: dict) -> "Search":
        state = dict(state, cands=[tuple(c) for c in state["cands"]])
        return cls(**state)


def _resized(images: torch.Tensor, res: int) -> torch.Tensor:
    if images.shape[-1] == res:
        return images
    return F.interpolate(images, size=(res, res), mode="bilinear", align_corners=False)


class _Scoring:
    """The scoring copy in train mode at the supernet's drop-path, the token stage's skip set and
    the RNG restored afterwards."""

    def __init__(self, model, stage, drop_path: float, max_depth: int, seed: int):
        self.model, self.stage, self.seed = model, stage, seed
        self.drop_path, self.max_depth = drop_path, max_depth

    def __enter__(self):
        dev = next(self.model.parameters()).device
        self._rng = torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [])
        self._rng.__enter__()
        torch.manual_seed(self.seed)
        self._active = self.stage.active_blocks
        surgery.set_drop_path(self.model, self.drop_path, self.max_depth)
        self.model.train()
        return dev

    def __exit__(self, *exc):
        self.model.eval()
        self.stage.set_active_blocks(self._active)
        self._rng.__exit__(*exc)


def measure_losses(model, stage, srch: Search, smallest_base: bool, drop_path: float, seed: int) -> list:
    """Every candidate's mean training loss (soft targets) on the scoring set, summed over ranks."""
    sums = []
    with _Scoring(model, stage, drop_path, srch.max_depth, seed) as dev, torch.no_grad():
        count = 0
        for r, d in srch.cands:
            stage.set_active_blocks(srch.active(d, smallest_base))
            total, count = torch.zeros((), dtype=torch.float64, device=dev), 0
            for images, targets in srch.batches:
                logits = model(_resized(images.to(dev), r)).float()
                total += -(targets.to(dev) * logits.log_softmax(-1)).sum().double()
                count += len(images)
            sums.append(total)
    reduced = torch.stack(sums + [torch.tensor(float(count), dtype=torch.float64, device=dev)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(reduced)
    return [float(v) for v in (reduced[:-1] / reduced[-1]).cpu()]


def measure_times(model, stage, srch: Search, iters: int, warmup: int, smallest_base: bool,
                  drop_path: float) -> list:
    """Median seconds of a forward + backward of every candidate on one scoring batch; rank 0's
    values on every rank (times differ per rank; the decision must not)."""
    images, targets = srch.batches[0]
    times = []
    with _Scoring(model, stage, drop_path, srch.max_depth, srch.start) as dev:
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
        try:
            for r, d in srch.cands:
                stage.set_active_blocks(srch.active(d, smallest_base))
                x, y, laps = _resized(images.to(dev), r), targets.to(dev), []
                for i in range(warmup + iters):
                    _sync(dev)
                    t0 = time.perf_counter()
                    loss = -(y * model(x).float().log_softmax(-1)).sum(-1).mean()
                    loss.backward()
                    _sync(dev)
                    if i >= warmup:
                        laps.append(time.perf_counter() - t0)
                times.append(statistics.median(laps))
        finally:
            for p in params:
                p.grad = None
                p.requires_grad_(False)
    if dist.is_available() and dist.is_initialized():
        box = [times]
        dist.broadcast_object_list(box, src=0)
        times = box[0]
    return times


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def agree(value):
    """Rank 0's ``value`` on every rank, after checking every rank computed the same one (the
    inputs are all-reduced or broadcast, so a difference is a bug worth stopping for)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    if any(v != every[0] for v in every):
        raise RuntimeError(f"AutoProg's decision differs across ranks: {every}")
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
