"""A stateful test plugin: it reweights the loss by a factor that evolves with its own state, so a
resume that loses plugin state cannot reproduce the straight run."""
from dataclasses import dataclass

import torch

from dsvit.engine.plugin import Plugin
from dsvit.plugins import REGISTRY, register


@dataclass
class ProbeConfig:
    enabled: bool = True
    order: int = 0
    factor: float = 0.9


class ProbePlugin(Plugin):
    name = "probe"
    config_class = ProbeConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.scale = 1.0
        self.events = 0

    def on_after_loss(self, state):
        state.loss_per_sample.mul_(self.scale)

    def on_after_step(self, state):
        self.events += 1
        self.scale = 0.5 + self.cfg.factor * self.scale * (1.0 if self.events % 3 else 0.5)
        state.logger.scalar("probe/scale", torch.tensor(self.scale))

    def state_dict(self):
        return {"scale": self.scale, "events": self.events}

    def load_state_dict(self, state):
        self.scale, self.events = state["scale"], state["events"]


if "probe" not in REGISTRY:
    register(ProbePlugin)
