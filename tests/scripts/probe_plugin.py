"""Stateful test plugins.

- ``probe`` re-weights each sample's loss by a factor that evolves with its own state, so a resume
  that loses plugin state cannot reproduce the straight run; ``replace=true`` assigns a new tensor
  to ``state.loss_per_sample`` instead of editing it in place (the trainer must use either).
  It counts ``step_start`` and ``batch_start`` events and logs the counts.
- ``keep_probe`` is a data plugin: it declares an epoch plan and trains the odd epochs on the first
  ``keep`` uids only (a keep set on the in-memory data).
"""
from dataclasses import dataclass

import torch

from dsvit.engine.plugin import ORDER_DATA, Plugin
from dsvit.registry import REGISTRY, register


@dataclass(frozen=True)
class ProbeConfig:
    enabled: bool = True
    order: int = 0
    factor: float = 0.9
    replace: bool = False
    rank_in_state: bool = False        # a state that differs per rank (declared replicated: refused)


class ProbePlugin(Plugin):
    name = "probe"
    config_class = ProbeConfig

    def __init__(self, cfg, config=None):
        super().__init__(cfg, config)
        self.scale = 1.0
        self.events = 0
        self.step_starts = 0
        self.batch_starts = 0

    def on_step_start(self, state):
        self.step_starts += 1

    def on_batch_start(self, state):
        self.batch_starts += 1

    def on_after_loss(self, state):
        weights = self.scale * (1.0 + (state.batch.uids % 3).float())
        if self.cfg.replace:
            state.loss_per_sample = state.loss_per_sample * weights
        else:
            state.loss_per_sample.mul_(weights)

    def on_after_step(self, state):
        self.events += 1
        self.scale = 0.5 + self.cfg.factor * self.scale * (1.0 if self.events % 3 else 0.5)
        state.logger.scalar("probe/scale", torch.tensor(self.scale))
        state.logger.scalar("probe/step_starts", self.step_starts)
        state.logger.scalar("probe/batch_starts", self.batch_starts)

    def on_fit_start(self, state):
        self.rank = state.rank

    def state_dict(self):
        extra = {"rank": self.rank} if self.cfg.rank_in_state else {}
        return {"scale": self.scale, "events": self.events, "step_starts": self.step_starts,
                "batch_starts": self.batch_starts, **extra}

    def load_state_dict(self, state):
        self.scale, self.events = state["scale"], state["events"]
        self.step_starts, self.batch_starts = state["step_starts"], state["batch_starts"]


@dataclass(frozen=True)
class KeepProbeConfig:
    enabled: bool = True
    order: int = 0
    keep: int = 256


class KeepProbe(Plugin):
    name = "keep_probe"
    config_class = KeepProbeConfig
    order = ORDER_DATA

    def plan_epochs(self, num_samples, epochs):
        return [num_samples if e % 2 == 0 else self.cfg.keep for e in range(epochs)]

    def on_epoch_start(self, state):
        n = state.data.num_samples
        keep = None if state.epoch % 2 == 0 else torch.arange(n) < self.cfg.keep
        state.data.set_keep_set(keep)

    def on_batch_start(self, state):
        if state.epoch % 2 == 1 and int(state.batch.uids.max()) >= self.cfg.keep:
            raise AssertionError(f"epoch {state.epoch} trained on a uid outside the keep set")


for cls in (ProbePlugin, KeepProbe):
    if cls.name not in REGISTRY:
        register(cls)
