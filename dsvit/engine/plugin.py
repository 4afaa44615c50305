"""The plugin contract: events, the Plugin base class, ordering.

A plugin is a small object that reacts to named engine events. It receives a :class:`State`
(step, epoch, progress, the model and its token stage, the logger, the data handle, world info,
the current batch/outputs) and changes only what it is allowed to change: the batch, the token-stage
hooks it registered, or a rebuild request. The engine knows no plugin by name.

Events (``on_<event>(state)``), in the order they fire:

    fit_start, epoch_start,
      batch_start      (state.batch is mutable: images, targets, labels, uids)
      before_forward, after_forward (state.logits),
      after_loss       (state.loss_per_sample, state.logits, state.batch.labels: before backward)
      after_step       (after the optimizer update; state.step already advanced)
    epoch_end, eval_start, eval_end, checkpoint_save, checkpoint_load, fit_end

Only methods a plugin overrides are dispatched, so a plugin that is switched off (never registered)
or an event it ignores costs nothing. Order: by ``Plugin.order`` (role: data 100 -> tokens 200 ->
attention 300 -> depth 400 -> other 500), ties broken by name; a recipe can override ``order``.
Everything a plugin needs to resume lives in ``state_dict()`` or is a pure function of the step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

EVENTS = (
    "fit_start", "epoch_start", "batch_start", "before_forward", "after_forward", "after_loss",
    "after_step", "epoch_end", "eval_start", "eval_end", "checkpoint_save", "checkpoint_load",
    "fit_end",
)

ORDER_DATA, ORDER_TOKENS, ORDER_ATTENTION, ORDER_DEPTH, ORDER_OTHER = 100, 200, 300, 400, 500


@dataclass
class Batch:
    images: torch.Tensor
    targets: torch.Tensor          # soft targets [B, classes] after mixup / label smoothing
    labels: torch.Tensor           # hard labels [B] before mixup
    uids: Optional[torch.Tensor] = None


@dataclass
class RebuildRequest:
    """Ask the trainer to rebuild the DeepSpeed engine around ``model`` between steps."""
    model: torch.nn.Module
    param_map: dict = field(default_factory=dict)   # new param name -> old param name (state source)
    policy: str = "carry"                            # carry | reset (optimizer state)


@dataclass
class State:
    cfg: Any                       # the whole Config (read-only by convention)
    rank: int
    world_size: int
    model: Optional[torch.nn.Module] = None        # the timm model (engine.module)
    token_stage: Any = None                          # dsvit.model.token_stage.TokenStage
    logger: Any = None                               # dsvit.engine.logging.RunLogger
    data: Any = None                                 # data handle (example filter etc.)
    step: int = 0                  # optimizer steps done
    micro_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    steps_per_epoch: int = 1
    total_steps: int = 1
    batch: Optional[Batch] = None
    logits: Optional[torch.Tensor] = None
    loss_per_sample: Optional[torch.Tensor] = None
    training: bool = True
    rebuild_request: Optional[RebuildRequest] = None

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return min(1.0, self.step / max(1, self.total_steps))

    def request_rebuild(self, request: RebuildRequest) -> None:
        self.rebuild_request = request


class Plugin:
    """Base class. Subclasses set ``name``, ``config_class`` and override ``on_<event>`` methods."""

    name: str = "plugin"
    config_class: type = object
    order: int = ORDER_OTHER

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.order = getattr(cfg, "order", None) or type(self).order

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def handles(plugin: Plugin, event: str) -> bool:
    method = getattr(type(plugin), f"on_{event}", None)
    return method is not None and method is not getattr(Plugin, f"on_{event}", None)


class PluginSet:
    """Plugins in their documented order, with a per-event dispatch list built once."""

    def __init__(self, plugins: list[Plugin]):
        self.plugins = sorted(plugins, key=lambda p: (p.order, p.name))
        names = [p.name for p in self.plugins]
        if len(set(names)) != len(names):
            raise ValueError(f"two plugins share a name: {names}")
        self._dispatch: dict[str, list[Callable]] = {
            ev: [getattr(p, f"on_{ev}") for p in self.plugins if handles(p, ev)] for ev in EVENTS}

    def fire(self, event: str, state: State) -> None:
        for fn in self._dispatch[event]:
            fn(state)

    def state_dict(self) -> dict:
        return {p.name: p.state_dict() for p in self.plugins}

    def load_state_dict(self, states: dict) -> None:
        missing = [p.name for p in self.plugins if p.name not in states]
        if missing:
            raise RuntimeError(
                f"checkpoint has no state for plugin(s) {missing}: it was written by a run with other "
                f"plugins; resume with the same plugins, or start fresh (checkpoint.resume='')")
        for p in self.plugins:
            p.load_state_dict(states[p.name])

    def __iter__(self):
        return iter(self.plugins)

    def __len__(self):
        return len(self.plugins)
