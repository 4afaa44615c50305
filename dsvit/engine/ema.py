"""Exponential moving average of the weights, kept as a plain fp32 timm model on every rank.

Every rank computes the same average (the weights it reads are identical after each step), so the
EMA model can be evaluated without collectives and exported as plain timm weights. Under ZeRO-3 the
partitioned parameters are gathered for the update. Shadow and source parameters are paired by
name, once per source model (a rebuilt engine brings a new source: ``bind``).

Under a bf16 engine the source parameters are the bf16 copies of the fp32 masters, so every step's
value is rounded to 8 mantissa bits before it enters the average. Measured against an EMA of the
fp32 masters (``benchmarks/bench_ema_precision.py``, zero1-bf16, 300 steps; RESULTS.md "EMA under
bf16"): relative L2 distance 9.1e-4 at decay 0.99 and 1.6e-4 at 0.999, evaluation loss equal to
2e-4 / 1e-5, the same top-1: the rounding is noise the average shrinks, far below what separates
two seeds. Averaging the masters instead would need each rank's master fragments (ZeRO shards them)
and a gather before every evaluation: not done while the difference is this small. What does cost
on a GPU is ZeRO-3, where the update gathers the whole model every step (``gathered``).
"""
from __future__ import annotations

import contextlib

import torch


class WeightEMA:
    def __init__(self, source: torch.nn.Module, shadow: torch.nn.Module, decay: float, zero3: bool,
                 copy: bool = True):
        self.decay = decay
        self.zero3 = zero3
        self.model = shadow.float().eval().requires_grad_(False)
        self.bind(source)
        if copy:
            self.copy_from(source)

    def bind(self, source: torch.nn.Module) -> None:
        """Pair every shadow parameter with the source parameter of the same name."""
        shadow = dict(self.model.named_parameters())
        src = dict(source.named_parameters())
        if shadow.keys() != src.keys():
            raise ValueError(f"EMA model and trained model differ in parameters: "
                             f"{sorted(shadow.keys() ^ src.keys())[:4]}")
        self.source = source
        self._dst = [shadow[n] for n in src]
        self._src = list(src.values())

    def gathered(self):
        """The ZeRO-3 source parameters gathered inside (nothing to do otherwise)."""
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(self._src)

    @torch.no_grad()
    def copy_from(self, source: torch.nn.Module) -> None:
        self.bind(source)
        with self.gathered():
            for d, s in zip(self._dst, self._src):
                d.copy_(s.float())

    @torch.no_grad()
    def update(self, gathered: bool = False) -> None:
        """``gathered``: the caller already gathers the ZeRO-3 source parameters (several averages of
        one model share one all-gather)."""
        with contextlib.nullcontext() if gathered else self.gathered():
            torch._foreach_lerp_(self._dst, [p.detach().float() for p in self._src], 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
