"""The plugin contract: events, the State plugins see, the Plugin base class, ordering.

A plugin reacts to named engine events (``on_<event>(state)``) and changes only what it may change:
the batch, ``state.loss_per_sample``, the token-stage hooks it registered, the data keep set, or a
rebuild request. The engine knows no plugin by name. Events, in the order they fire::

    fit_start, epoch_start,
      step_start       once per optimizer step, before its first micro-batch
        batch_start    (state.batch is mutable: images, targets, labels, uids)
        before_forward, after_forward (state.logits),
        after_loss     (state.loss_per_sample: the trainer uses it as it stands afterwards; a
                        plugin may replace or re-weight it)
      after_step       after the optimizer update; state.step already advanced
      after_rebuild    after the engine was rebuilt around a new model (state.last_rebuild)
    epoch_end, eval_start, eval_end, checkpoint_save, checkpoint_load, fit_end

Rules the engine enforces:
- ``state.model`` and ``state.token_stage`` are live: always the current objects (a rebuild replaces
  the model; the token stage is kept and its block-keyed hooks follow the request's block map).
- A rebuild is requested with ``state.request_rebuild(request)`` between optimizer steps only
  (``epoch_start``, ``step_start``, ``after_step``, ``epoch_end``); the trainer performs it right after
  that event. Two requests before it could act are an error naming both plugins.
- ``checkpoint_save`` fires before plugin state is captured. A plugin's state is ``replicated``
  (identical on every rank: saved once; the trainer checks equality across ranks when saving) or
  ``per_rank`` (saved per rank; a resume on another world size asks ``reshard_rank_state`` to map
  every old rank's state to a new rank's, and refuses a plugin that has none). ``state_dict()`` holds
  tensors, numbers, strings and containers only, so checkpoints load with ``weights_only=True``.
- ``configure(cfg)`` is called once, before anything else, with the whole (read-only) config: a
  plugin reads there what it needs beyond its own section (e.g. the model's depth).
- A replicated plugin may also keep per-rank state (``rank_state_dict``/``load_rank_state_dict``,
  e.g. a rank's own batches): saved per rank next to the RNG state.
- ``architecture()`` returns the model-config overrides the plugin's current state implies (e.g. a
  grown depth); the model is built from them at start and at resume, before the engine exists.
- ``plan_epochs(num_samples, epochs)``: a data plugin declares the active sample count of every
  epoch up front, so the run length (hence LR and plugin schedules) is known at start.
- ``footprint(cfg)`` declares, from the config alone, what the plugin does to the token set and
  the depth and what it needs (a ``Footprint``); ``dsvit.engine.compose`` checks the plugins'
  footprints together once at start and refuses combinations that cannot work.
- Only events that exist may be handled: an ``on_*`` method with another name is refused.

Order: by ``Plugin.order`` (role: data 100 -> tokens 200 -> attention 300 -> depth 400 -> other
500), ties by name; a recipe can override ``order``. A disabled plugin is never built: zero cost.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

EVENTS = (
    "fit_start", "epoch_start", "step_start", "batch_start", "before_forward", "after_forward",
    "after_loss", "after_step", "after_rebuild", "epoch_end", "eval_start", "eval_end",
    "checkpoint_save", "checkpoint_load", "fit_end",
)
REBUILD_EVENTS = ("epoch_start", "step_start", "after_step", "epoch_end")

ORDER_DATA, ORDER_TOKENS, ORDER_ATTENTION, ORDER_DEPTH, ORDER_OTHER = 100, 200, 300, 400, 500


@dataclass(frozen=True)
class Blocks:
    """Blocks a plugin acts at: absolute ``indices`` (the same at every depth, or, with ``moves``,
    indices at the initial depth that each rebuild's block map moves: a hook registered once), or
    blocks derived from the current depth by ``of_depth`` (e.g. fractions of it)."""
    key: str                                       # the config key that sets them (messages)
    indices: tuple = ()
    of_depth: Optional[Callable[[int], list]] = None
    moves: bool = False


@dataclass(frozen=True)
class TokenSite:
    """One token-stage hook point of a plugin, in training (the worst case over its schedule).
    ``where``: after_embed | before_block | after_attention (``TokenStage``'s hook points). Counts
    are of patch tokens (the class token aside)."""
    where: str
    blocks: Optional[Blocks] = None                # None for after_embed
    kept: Optional[Callable[[int], int]] = None    # n patch tokens in -> fewest left (None: unchanged)
    kept_keys: tuple = ()                          # config keys that set ``kept``
    needs: int = 0                                 # patch tokens it needs arriving here
    needs_keys: tuple = ()
    why: str = ""                                  # what the need is for, e.g. "one ToE seed"


@dataclass(frozen=True)
class Footprint:
    """What a plugin declares about itself for the start-time composition check."""
    sites: tuple = ()                              # TokenSite, one per hook point
    # attention masks built after the attention of each of these blocks (after earlier-ordered hooks
    # there) and used by every later block up to the next of them: the token set must not change
    # in between
    mask_blocks: Optional[Blocks] = None
    mask_keys: tuple = ()
    # a depth / input-size plugin: every depth the model may take (ascending, the initial first),
    # the block map a rebuild from one to another applies, the smallest input side it feeds
    depths: tuple = ()
    depth_keys: tuple = ()
    block_map: Optional[Callable[[int, int], list]] = None
    min_resolution: int = 0
    resolution_keys: tuple = ()


@dataclass
class Batch:
    images: torch.Tensor
    targets: torch.Tensor          # soft targets [B, classes] after mixup / label smoothing
    labels: torch.Tensor           # hard labels [B] before mixup
    uids: Optional[torch.Tensor] = None


@dataclass
class State:
    cfg: Any                       # the whole Config (read-only)
    rank: int
    world_size: int
    model: Optional[torch.nn.Module] = None        # the live timm model (engine.module)
    token_stage: Any = None                          # dsvit.model.token_stage.TokenStage
    logger: Any = None                               # dsvit.engine.logging.RunLogger
    data: Any = None                                 # data handle (keep set etc.)
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
    """Base class. Subclasses set ``name``, ``config_class`` and override ``on_<event>`` methods."""

    name: str = "plugin"
    config_class: type = object
    order: int = ORDER_OTHER
    state_scope: str = "replicated"      # replicated | per_rank
    # ``dsvit eval`` options this plugin offers: (flag, config key, help), e.g. a keep-rate sweep
    eval_options: tuple = ()

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.order = getattr(cfg, "order", None) or type(self).order

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def configure(self, cfg: Any) -> None:
        pass

    def rank_state_dict(self) -> dict:
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        pass

    def reshard_rank_state(self, states: list, rank: int, world_size: int) -> dict:
        """This rank's per-rank state on ``world_size`` ranks from every old rank's (a resume on
        another world size). Default: only nothing to carry is carried."""
        if any(states):
            raise RuntimeError(
                f"plugin '{self.name}' keeps per-rank state and cannot resume on another number of ranks "
                f"(the checkpoint has {len(states)}, this run {world_size}); resume on {len(states)} "
                f"rank(s), or give the plugin a reshard_rank_state()")
        return {}

    def architecture(self) -> dict:
        return {}

    def plan_epochs(self, num_samples: int, epochs: int) -> Optional[list]:
        return None

    def footprint(self, cfg: Any) -> Footprint:
        """What this plugin does to the tokens and the depth, from the config alone (compose)."""
        return Footprint()


def reslice_batch(parts: list, rank: int, world_size: int, dim: int = 0):
    """Rank ``rank``'s share (of ``world_size``) of the global batch that ``parts`` (every old rank's
    share, in rank order) make along ``dim``: rank r's micro-batch is the r-th slice of the global one
    (``dsvit.data.pipeline``), so per-batch state reshards by concatenating and slicing again."""
    whole = torch.cat(list(parts), dim)
    if whole.shape[dim] % world_size:
        raise ValueError(f"a global batch of {whole.shape[dim]} does not split over {world_size} ranks")
    k = whole.shape[dim] // world_size
    return whole.narrow(dim, rank * k, k).clone()


def handles(plugin: Plugin, event: str) -> bool:
    method = getattr(type(plugin), f"on_{event}", None)
    return method is not None and method is not getattr(Plugin, f"on_{event}", None)


def _check_handlers(plugin: Plugin) -> None:
    for attr in dir(type(plugin)):
        if attr.startswith("on_") and callable(getattr(type(plugin), attr)) and attr[3:] not in EVENTS:
            close = difflib.get_close_matches(attr[3:], EVENTS, n=1)
            hint = f" (did you mean on_{close[0]}?)" if close else ""
            raise TypeError(f"plugin '{plugin.name}' has a handler {attr} for an event that does not "
                            f"exist{hint}; events: {', '.join(EVENTS)}")
    if plugin.state_scope not in ("replicated", "per_rank"):
        raise TypeError(f"plugin '{plugin.name}': state_scope must be replicated or per_rank")


class PluginSet:
    """Plugins in their documented order, with a per-event dispatch list built once."""

    def __init__(self, plugins: list[Plugin]):
        self.plugins = sorted(plugins, key=lambda p: (p.order, p.name))
        names = [p.name for p in self.plugins]
        if len(set(names)) != len(names):
            raise ValueError(f"two plugins share a name: {names}")
        for p in self.plugins:
            _check_handlers(p)
        self._dispatch = {ev: [(p.name, getattr(p, f"on_{ev}")) for p in self.plugins if handles(p, ev)]
                          for ev in EVENTS}

    def fire(self, event: str, state: State) -> None:
        state.event = event
        for name, fn in self._dispatch[event]:
            state.plugin = name
            fn(state)
        state.event = state.plugin = ""

    def configure(self, cfg) -> None:
        for p in self.plugins:
            p.configure(cfg)

    # ---- state: replicated once, per-rank per rank
    def state_dict(self, scope: str) -> dict:
        out = {p.name: p.state_dict() for p in self.plugins if p.state_scope == scope}
        if scope == "per_rank":   # the per-rank part of replicated plugins
            out.update({p.name: st for p in self.plugins if p.state_scope == "replicated"
                        for st in [p.rank_state_dict()] if st})
        return out

    def load_state_dict(self, replicated: dict, per_rank: dict) -> None:
        for p in self.plugins:
            states = replicated if p.state_scope == "replicated" else per_rank
            if p.name not in states:
                raise RuntimeError(
                    f"checkpoint has no state for plugin '{p.name}': it was written by a run with other "
                    f"plugins; resume with the same plugins, or start fresh (checkpoint.resume='')")
            p.load_state_dict(states[p.name])
            if p.state_scope == "replicated":
                p.load_rank_state_dict(per_rank.get(p.name, {}))

    def reshard_rank_states(self, every: list, rank: int, world_size: int) -> dict:
        """Per-rank states for this rank from every old rank's {plugin: state} (another world size)."""
        return {p.name: p.reshard_rank_state([e.get(p.name, {}) for e in every], rank, world_size)
                for p in self.plugins if any(p.name in e for e in every)}

    # ---- what the plugins declare about the model and the data
    def architecture(self) -> dict:
        arch, owner = {}, {}
        for p in self.plugins:
            for k, v in p.architecture().items():
                if k in arch:
                    raise ValueError(f"plugins '{owner[k]}' and '{p.name}' both set the model's '{k}'; "
                                     f"disable one of them")
                arch[k], owner[k] = v, p.name
        return arch

    def epoch_plan(self, num_samples: int, epochs: int) -> Optional[list]:
        plans = [(p.name, p.plan_epochs(num_samples, epochs)) for p in self.plugins]
        plans = [(n, plan) for n, plan in plans if plan is not None]
        if len(plans) > 1:
            raise ValueError(f"plugins {[n for n, _ in plans]} all change the epoch length; only one "
                             f"data plugin may: disable the others")
        return list(plans[0][1]) if plans else None

    def __iter__(self):
        return iter(self.plugins)

    def __len__(self):
        return len(self.plugins)
