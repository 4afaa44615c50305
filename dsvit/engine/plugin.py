"""The plugin contract: the events, the ``State`` a plugin sees, the ``Plugin`` base class.

A plugin is built once from its config section and the whole run config (``Plugin(cfg, config)``:
the one way configuration reaches it) and reacts to engine events (``on_<event>(state)``), changing
only what it may: the batch, ``state.loss_per_sample``, the token-stage hooks it registered, the
data's keep set / augmentation, or a rebuild request. The engine names no plugin. Events in order::

    fit_start, epoch_start,
      step_start        once per optimizer step, before its first micro-batch
        batch_start     (state.batch is mutable), before_forward, after_forward (state.logits),
        after_loss      (state.loss_per_sample as the plugins leave it is the loss)
      after_step        after the optimizer update; state.step already advanced
      after_rebuild     after the engine was rebuilt (state.last_rebuild)
    epoch_end, eval_start, eval_end, fit_end

Rules the engine enforces (``dsvit.engine.plugin_set``): handlers only for these events; a rebuild
is requested with ``state.request_rebuild`` between optimizer steps only, one at a time; ``state_dict``
is identical on every rank (checked when saving) and holds tensors, numbers, strings and containers
(checkpoints load with ``weights_only=True``); per-rank state goes in ``rank_state_dict``, mapped to
another world size by ``reshard_rank_state``. Order: ``Plugin.order`` by role (data 100, tokens 200,
attention 300, depth 400, other 500), ties by name. A disabled plugin is never built.
What a plugin may call on the data, the token stage and the logger: ``dsvit.engine.interfaces``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from dsvit.config import Config
from dsvit.engine.interfaces import RunLog, TokenStageOps, TrainData

EVENTS = ("fit_start", "epoch_start", "step_start", "batch_start", "before_forward", "after_forward",
          "after_loss", "after_step", "after_rebuild", "epoch_end", "eval_start", "eval_end", "fit_end")
REBUILD_EVENTS = ("epoch_start", "step_start", "after_step", "epoch_end")
STEP_EVENTS = ("step_start", "batch_start", "before_forward", "after_forward", "after_loss", "after_step")
ORDER_DATA, ORDER_TOKENS, ORDER_ATTENTION, ORDER_DEPTH, ORDER_OTHER = 100, 200, 300, 400, 500


@dataclass
class Batch:
    images: torch.Tensor
    targets: torch.Tensor          # soft targets [B, classes] after mixup / label smoothing
    labels: torch.Tensor           # hard labels [B] before mixup
    uids: Optional[torch.Tensor] = None


@dataclass
class State:
    rank: int
    world_size: int
    model: Optional[torch.nn.Module] = None        # the live timm model (engine.module)
    token_stage: Optional[TokenStageOps] = None
    logger: Optional[RunLog] = None
    data: Optional[TrainData] = None
    num_classes: int = 0
    step: int = 0                  # optimizer steps done
    micro_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    steps_per_epoch: int = 1       # of the current epoch (a data plugin may change it per epoch)
    total_steps: int = 1
    epoch_steps: tuple = ()        # planned optimizer steps of every epoch
    batch: Optional[Batch] = None
    logits: Optional[torch.Tensor] = None
    loss_per_sample: Optional[torch.Tensor] = None
    training: bool = True
    event: str = ""                # the event being dispatched, and to which plugin
    plugin: str = ""
    rebuild_request: Any = None    # pending dsvit.engine.rebuild.RebuildRequest
    last_rebuild: Any = None       # the request the last rebuild carried out (after_rebuild)
    lr_clock: Optional[Callable[[int], float]] = None   # step s -> the step the LR schedule reads

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return min(1.0, self.step / max(1, self.total_steps))

    def request_rebuild(self, request) -> None:
        if self.event not in REBUILD_EVENTS:
            raise RuntimeError(
                f"plugin '{self.plugin}' requested an engine rebuild in '{self.event}'; rebuilds run "
                f"between optimizer steps only: request it in one of {REBUILD_EVENTS}")
        if self.rebuild_request is not None:
            raise RuntimeError(
                f"two engine rebuilds requested for the same point (step {self.step}): by plugin "
                f"'{self.rebuild_request.requested_by}' and by plugin '{self.plugin}'; only one plugin "
                f"may change the model at a time: disable one or move its schedule")
        request.requested_by = self.plugin
        self.rebuild_request = request


class Plugin:
    """Base class: set ``name`` and ``config_class``, override ``on_<event>`` methods.

    ``self.cfg`` is the plugin's own section, ``self.config`` the whole (frozen) run config."""

    name: str = "plugin"
    config_class: type = object
    order: int = ORDER_OTHER
    # ``dsvit eval`` options: (flag, config key, help), e.g. a keep-rate sweep
    eval_options: tuple = ()

    def __init__(self, cfg: Any, config: Any = None):
        self.cfg = cfg
        self.config = config if config is not None else Config()
        self.order = getattr(cfg, "order", None) or type(self).order

    @classmethod
    def requested_by(cls, config) -> bool:
        """True: ``config`` asks for the plugin without a section (built with its defaults)."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def rank_state_dict(self) -> dict:
        """This rank's own state (e.g. its batches), saved per rank."""
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        pass

    def reshard_rank_state(self, states: list, rank: int, world_size: int) -> dict:
        """This rank's ``rank_state_dict`` on ``world_size`` ranks from every old rank's (a resume on
        another world size). Default: only nothing to carry is carried."""
        if any(states):
            raise RuntimeError(
                f"plugin '{self.name}' keeps per-rank state and cannot resume on another number of ranks "
                f"(the checkpoint has {len(states)}, this run {world_size}); resume on {len(states)} "
                f"rank(s), or give the plugin a reshard_rank_state()")
        return {}

    def architecture(self) -> dict:
        """Model-config overrides the plugin's state implies (e.g. a grown depth): the model is built
        from them at start and at resume, before the engine exists."""
        return {}

    def plan_epochs(self, num_samples: int, epochs: int) -> Optional[list]:
        """A data plugin's active sample count of every epoch, so the run length is known at start."""
        return None

    def footprint(self):
        """What the plugin does to the tokens and the depth, a ``dsvit.engine.compose.Footprint``
        (None: nothing)."""
        return None
