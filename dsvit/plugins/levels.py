"""What the token and attention levels of Tri-Level E-ViT share: the keep-rate schedule (a pure
function of the step), the blocks they act at (derived from the current depth), config checks, and
a plugin base that re-registers its hooks after every engine rebuild."""
from __future__ import annotations

import math

from dsvit.engine.compose import Blocks
from dsvit.engine.plugin import Plugin
from dsvit.errors import ConfigError


def keep_rate(step: int, total_steps: int, target: float, warmup: float, decay: float) -> float:
    """The keep ratio at ``step``: 1, then cosine to ``target``, then ``target`` (fractions of the run)."""
    t0, t1 = warmup * total_steps, (warmup + decay) * total_steps
    if step < t0:
        return 1.0
    if step >= t1:
        return target
    return target + (1.0 - target) * 0.5 * (1.0 + math.cos(math.pi * (step - t0) / (t1 - t0)))


def pruning_blocks(depth: int, fractions, blocks=(), strict: bool = True) -> list[int]:
    """Explicit block indices, or round(f * depth) for each fraction (at most depth - 1: a shallow
    model early in progressive growth); ascending, distinct. ``strict=False`` (a model still
    growing) skips explicit blocks it does not have yet instead of refusing them; in training the
    start check (``dsvit.engine.compose``) has refused those already."""
    if not blocks:
        return sorted({min(depth - 1, int(round(f * depth))) for f in fractions})
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad and strict:
        raise ConfigError(f"pruning blocks {bad} are outside a depth-{depth} model (0..{depth - 1})")
    return sorted(set(blocks) - set(bad))


def validate_level(c, cfg) -> None:
    """Checks shared by the token and attention levels' configs."""
    if not 0.0 < c.keep_rate <= 1.0:
        raise ConfigError(f"keep_rate must be in (0, 1], got {c.keep_rate}")
    if c.warmup < 0 or c.decay < 0 or c.warmup + c.decay > 1:
        raise ConfigError(f"warmup ({c.warmup}) and decay ({c.decay}) are shares of the run: "
                          f"each >= 0, together <= 1")
    if c.eval_keep not in ("target", "full"):
        raise ConfigError(f"eval_keep must be 'target' or 'full', got '{c.eval_keep}'")
    if cfg.model.depth is not None:
        pruning_blocks(cfg.model.depth, c.block_fractions, c.blocks)


class ScheduledLevel(Plugin):
    """A level acting at blocks derived from the depth, with a keep rate scheduled by the step:
    subclasses register their hooks in ``_register(state)`` (again after every engine rebuild)."""
    metric = "level/keep_rate"

    def __init__(self, cfg, config=None):
        super().__init__(cfg, config)
        self.rate = 1.0
        self.blocks: list[int] = []
        self._stage = None

    def _register(self, state) -> None:
        raise NotImplementedError   # add the hooks at self.blocks, derived from the current depth

    def _unregister(self) -> None:
        raise NotImplementedError

    def declared_blocks(self) -> Blocks:
        """The blocks for the start check: explicit (absolute at every depth) or from the depth."""
        c = self.cfg
        if c.blocks:
            return Blocks("blocks", indices=tuple(c.blocks))
        fractions = tuple(c.block_fractions)
        return Blocks("block_fractions", of_depth=lambda depth: pruning_blocks(depth, fractions))

    def on_fit_start(self, state) -> None:
        self._register(state)
        self.rate = self._rate(state)

    def on_after_rebuild(self, state) -> None:
        self._register(state)   # the remapped hooks are replaced by the new depth's blocks

    def on_fit_end(self, state) -> None:
        self._unregister()       # ``dsvit eval`` sweeps rebuild the plugin on the same stage
        self._stage = None

    def _rate(self, state) -> float:
        c = self.cfg
        return keep_rate(state.step, state.total_steps, c.keep_rate, c.warmup, c.decay)

    def on_step_start(self, state) -> None:
        self.rate = self._rate(state)
        if state.logger is not None:
            state.logger.scalar(self.metric, self.rate)

    def current_rate(self, stage) -> float:
        if stage.training:
            return self.rate
        return self.cfg.keep_rate if self.cfg.eval_keep == "target" else 1.0
