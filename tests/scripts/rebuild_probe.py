"""A test plugin that rebuilds the engine after given steps: identity (same depth) or growth by
duplication (``grow_by`` blocks per rebuild), with the rebuild policies as options."""
from dataclasses import dataclass, field

import torch

from dsvit.engine.plugin import ORDER_DEPTH, Plugin
from dsvit.engine.rebuild import RebuildRequest
from dsvit.model import surgery
from dsvit.model.vit import build_plain
from dsvit.registry import REGISTRY, register


@dataclass(frozen=True)
class RebuildProbeConfig:
    enabled: bool = True
    order: int = 0
    at_steps: list = field(default_factory=lambda: [2])
    grow_by: int = 0                   # 0: identity rebuild
    weights: str = "masters"           # masters | request (then seeded values, see request_weights)
    optimizer_state: str = "carry"
    new_param_state: str = "copy"
    step: str = "carry"


def request_weights(model: torch.nn.Module, step: int) -> None:
    """Deterministic values for a request model, the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=g))


class RebuildProbe(Plugin):
    name = "rebuild_probe"
    config_class = RebuildProbeConfig
    order = ORDER_DEPTH

    def __init__(self, cfg, config=None):
        super().__init__(cfg, config)
        self.depth = 0          # 0: the recipe's depth (never grown)
        self.rebuilds = 0

    def architecture(self):
        return {"depth": self.depth} if self.depth else {}

    def on_after_step(self, state):
        if state.step not in self.cfg.at_steps:
            return
        old_depth = len(state.model.blocks)
        new_depth = old_depth + self.cfg.grow_by
        src = surgery.duplicate_last(old_depth, new_depth)
        weights = "masters"
        if self.cfg.weights == "request":
            model = build_plain(self.config.model, state.num_classes, depth=new_depth)
            request_weights(model, state.step)
            weights = model.state_dict()
        if self.cfg.grow_by:
            self.depth = new_depth
        self.rebuilds += 1
        state.request_rebuild(RebuildRequest(
            block_map=src, arch=self.architecture(), weights=weights,
            optimizer_state=self.cfg.optimizer_state, new_param_state=self.cfg.new_param_state,
            step=self.cfg.step, reason="test"))

    def state_dict(self):
        return {"depth": self.depth}

    def load_state_dict(self, state):
        self.depth = state["depth"]


if "rebuild_probe" not in REGISTRY:
    register(RebuildProbe)
