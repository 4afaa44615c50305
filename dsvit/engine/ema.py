"""Exponential moving average of the weights, kept as a plain fp32 timm model on every rank.

Every rank computes the same average (the weights it reads are identical after each step), so the
EMA model can be evaluated without collectives and exported as plain timm weights. Under ZeRO-3 the
partitioned parameters are gathered for the update.
"""
from __future__ import annotations

import contextlib

import torch


class WeightEMA:
    def __init__(self, source: torch.nn.Module, shadow: torch.nn.Module, decay: float, zero3: bool):
        self.decay = decay
        self.zero3 = zero3
        self.model = shadow.float().eval().requires_grad_(False)
        self._names = [n for n, _ in source.named_parameters()]
        self.copy_from(source)

    def _gathered(self, source):
        if not self.zero3:
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(source.parameters()))

    @torch.no_grad()
    def copy_from(self, source: torch.nn.Module) -> None:
        with self._gathered(source):
            shadow = dict(self.model.named_parameters())
            for n, p in source.named_parameters():
                shadow[n].copy_(p.float())

    @torch.no_grad()
    def update(self, source: torch.nn.Module) -> None:
        with self._gathered(source):
            dst = [p for _, p in self.model.named_parameters()]
            src = [p.detach().float() for p in source.parameters()]
            torch._foreach_lerp_(dst, src, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
