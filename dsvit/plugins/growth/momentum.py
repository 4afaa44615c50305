"""MoGrow's momentum copies: fp32 moving averages of the online model at several decays, updated
after every optimizer step, grown and extracted through the same block maps as the model.

Each copy is a plain timm model outside the engine (``WeightEMA``: identical on every rank, ZeRO-3
parameters gathered for the update). Growth takes the online model's new weights from the slowest
copy; the search scores candidates with the fastest one; each copy grows from itself, never from
the online model (Li et al., CVPR 2022, MoGrow).
"""
from __future__ import annotations

import torch

from dsvit.engine.ema import WeightEMA
from dsvit.model import surgery


def rescaled_decay(decay: float, mode: str, batch: int, reference_batch: int, total_steps: int,
                   reference_steps: int) -> float:
    """A per-step decay for this run from one given at ``reference_batch``.

    ``batch``: same time constant in samples, ``d ** (B / B_ref)`` (the paper's rule when the global
    batch differs). ``run``: same time constant as a fraction of the run, relative to a reference run
    of ``reference_steps`` steps (AutoProg's 0.9996 is 2500 of 125k steps, 2 % of a 100-epoch
    ImageNet run): short runs would otherwise grow from a copy that still remembers the start."""
    if mode == "batch":
        return decay ** (batch / reference_batch)
    tau = 1.0 / (1.0 - decay) * total_steps / reference_steps
    return 1.0 - 1.0 / max(1.0, tau)


class MomentumCopies:
    def __init__(self, decays: list[float]):
        self.decays = list(decays)
        self.copies: list[WeightEMA] = []

    def start(self, online: torch.nn.Module, shadows: list, zero3: bool, states=None) -> None:
        """Bind one shadow model per decay to ``online``; copy its weights, or load ``states``."""
        self.copies = [WeightEMA(online, m, d, zero3, copy=states is None)
                       for m, d in zip(shadows, self.decays)]
        if states is not None:
            for c, st in zip(self.copies, states):
                c.load_state_dict(st)

    def update(self) -> None:
        """After every optimizer step; under ZeRO-3 one all-gather of the online model serves all."""
        if not self.copies:
            return
        with self.copies[0].gathered():
            for c in self.copies:
                c.update(gathered=True)

    def state_dicts(self) -> list:
        return [c.state_dict() for c in self.copies]

    def remapped(self, src: list) -> list:
        """Every copy's state dict through block map ``src`` (each from itself)."""
        return [surgery.remap_blocks(c.state_dict(), src) for c in self.copies]

    def model(self, index: int) -> torch.nn.Module:
        return self.copies[index].model
