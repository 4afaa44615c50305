"""Patch Sampling Schedule (PSS; McDanel & Huynh 2022) as a token-stage plugin.

Paper: McDanel & Huynh, "Accelerating Vision Transformer Training via a Patch Sampling Schedule",
arXiv:2208.09520, 2022 (reference code: github.com/BradMcDanel/pss).

Each training step a schedule sets a drop ratio r (quantised to multiples of 1/levels); right after
the position embedding (hook ``after_embed``) every image keeps ``K = round_half_even((1 - r) * N)``
tokens, N and K counting the prefix tokens, which are always kept. The sampler picks which patches:
``magnitude`` (top-(K - prefix) by the L1 norm of the embedded token, fp32, no_grad) or ``random`` (a
uniform subset per image). Batches stay [B, K, C]. The kept global positions go through
``stage.gather``, so ToE and visualisations see where tokens came from.

Where our setting deviates from the original, and why:
- r is a pure function of the global optimizer step (``state.step``), the same for every micro-batch
  and rank. (DeiT advances per iteration and forgets the position on resume; SimMIM lags by one step.)
- Cooldown (``cooldown_epochs``) means all tokens for every schedule. The original's fixed schedule
  keeps its constant drop ratio through the cooldown; its cyclic returns 0 and its linear clamps to 0.
- The cyclic period is configured in steps (``period_steps``); 0 takes ``steps_per_epoch``, the
  original's "one epoch of iterations".
- Cosine works (the original's crashes in ``set_epoch``): r_start at t=0, r_end from t >= T-1.
- The random sampler uses its own torch.Generator seeded from (run.seed, step, rank), not the global
  RNG with seed+rank: deterministic under the seed and on resume, different across steps and ranks;
  micro-batches of one step continue the same stream.
- Kept tokens are put back in raster order (``raster_order=True``, clean). The original leaves them in
  descending-score (magnitude) or random order; blocks and pooling are order-invariant, so logits
  match up to float summation order, but downstream plugins (ToE's seed stride) see a spatial order.
  ``raster_order=False`` keeps the original order (faithful).
- Which patches the random sampler keeps of its uniform draws: faithful (``raster_order=False``) keeps
  the original's ``argsort()[:, :K-1]``, the K-1 smallest, in that order; clean keeps the K-1 largest
  (``topk``), then sorts them. Both are uniform subsets; only faithful reproduces the original's draw.
- Evaluation: training-time validation uses all tokens unless ``eval_keep_rate < 1`` (dynamic
  inference; not quantised, like the original's sweep). ``inference_hook``/``keep_rate`` are the
  helpers for ``dsvit eval --keep-rate`` and the sweep.
Relative-position-bias models (the original's BEiT-style architecture) are not supported: dsvit runs
timm ViTs with an absolute position embedding, which needs no gathering.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from dsvit.errors import ConfigError, RunStateError
from dsvit.engine.compose import Footprint, TokenSite
from dsvit.engine.plugin import ORDER_TOKENS, Plugin
from dsvit.plugins import register

SCHEDULES = ("fixed", "linear", "cyclic", "cosine")
SAMPLERS = ("magnitude", "random")


# ---------------------------------------------------------------- schedule (pure python)
def quantize(v: float, levels: int = 5) -> float:
    """Clamp to [0, 1] and snap to the nearest multiple of 1/levels (half to even); levels=0: clamp."""
    v = min(max(v, 0.0), 1.0)
    return round(levels * v) / levels if levels > 0 else v


def drop_ratio(step: int, schedule: str, start: float, end: float, total_steps: int,
               period_steps: int = 1, cooldown_steps: int = 0, levels: int = 5) -> float:
    """Drop ratio r at global optimizer ``step``. T = total_steps - cooldown_steps steps run under the
    schedule; from T on, a cooldown (cooldown_steps > 0) gives r = 0 (all tokens) for every schedule."""
    t, T = step, max(1, total_steps - cooldown_steps)
    if cooldown_steps > 0 and t >= T:
        return 0.0
    if schedule == "fixed":
        v = start
    elif schedule == "linear":
        u = t / T                                        # past T the value keeps moving (clamped by Q)
        v = (1 - u) * start + u * end
    elif schedule == "cyclic":
        if t >= T:
            return 0.0
        c, half = t % period_steps, period_steps / 2
        u = c / half if c <= period_steps // 2 else (period_steps - c) / half
        v = (1 - u) * start + u * end
    elif schedule == "cosine":
        if t == 0:
            v = start
        elif t >= T - 1:
            v = end
        else:
            v = end + (start - end) * (1 + math.cos(math.pi * t / T)) / 2
    else:
        raise ValueError(f"unknown PSS schedule '{schedule}'; use one of {SCHEDULES}")
    return quantize(v, levels)


def num_keep(num_tokens: int, drop: float, num_prefix: int = 1) -> int:
    """Tokens entering the blocks, prefix included: round_half_even((1 - r) * N), at least prefix + 1."""
    return min(num_tokens, max(num_prefix + 1, round((1 - drop) * num_tokens)))


# ---------------------------------------------------------------- samplers (tensor core)
@torch.no_grad()
def select_patches(x: torch.Tensor, k: int, num_prefix: int = 1, method: str = "magnitude",
                   generator: Optional[torch.Generator] = None, raster_order: bool = True) -> torch.Tensor:
    """Indices [B, k] into x's token axis of all prefix tokens followed by k - num_prefix patches."""
    b, n, _ = x.shape
    m = k - num_prefix
    if method == "magnitude":
        score = x[:, num_prefix:].detach().float().abs().sum(-1)                      # [B, P], L1 norm
    elif method == "random":
        score = torch.rand(b, n - num_prefix, generator=generator, device=x.device)   # random ranks
    else:
        raise ValueError(f"unknown PSS sampler '{method}'; use one of {SAMPLERS}")
    if method == "random" and not raster_order:   # faithful: the original's first K-1 of the argsort
        idx = score.argsort(dim=-1)[:, :m]
    else:
        idx = score.topk(m, dim=-1, sorted=True).indices
        if raster_order:
            idx = idx.sort(dim=-1).values
    prefix = torch.arange(num_prefix, device=x.device).expand(b, -1)
    return torch.cat([prefix, idx + num_prefix], 1)


def sample_tokens(x: torch.Tensor, stage, drop: float, method: str = "magnitude",
                  generator: Optional[torch.Generator] = None, raster_order: bool = True) -> torch.Tensor:
    """Keep ``num_keep`` tokens of ``x`` through ``stage.gather`` (positions stay in step)."""
    npt = stage.num_prefix_tokens
    k = num_keep(x.shape[1], drop, npt)
    if k >= x.shape[1]:
        return x
    return stage.gather(x, select_patches(x, k, npt, method, generator, raster_order))


def generator_seed(seed: int, step: int, rank: int) -> int:
    """A distinct 63-bit seed per (seed, step, rank)."""
    return ((seed * 1_000_003 + rank) * 2_147_483_647 + step) % (2 ** 63)


# ---------------------------------------------------------------- dynamic inference helpers
def inference_hook(keep_rate: float, method: str = "magnitude", seed: int = 0):
    """An ``after_embed`` hook keeping ``keep_rate`` of the tokens in train and eval alike."""
    gen: dict = {}

    def hook(x, stage):
        g = None
        if method == "random":
            if x.device not in gen:
                gen[x.device] = torch.Generator(device=x.device).manual_seed(seed)
            g = gen[x.device]
        return sample_tokens(x, stage, 1.0 - keep_rate, method, g)
    return hook


@contextmanager
def keep_rate(stage, rate: float, method: str = "magnitude", seed: int = 0):
    """``with keep_rate(stage, 0.5): evaluate(...)``: the model runs on that keep rate inside."""
    hook = inference_hook(rate, method, seed)
    stage.add_after_embed(hook)
    try:
        yield
    finally:
        stage.remove(hook)


def sweep_keep_rates(low: float = 0.2, step: float = 0.1) -> list[float]:
    """Keep rates of the original dynamic-inference sweep: 1.0, 0.9, ..., 0.2."""
    return [round(1.0 - i * step, 6) for i in range(int(round((1.0 - low) / step)) + 1)]


# ---------------------------------------------------------------- config + plugin
@dataclass(frozen=True)
class PSSConfig:
    enabled: bool = True
    order: int = 0                     # 0: ORDER_TOKENS (before ToE)
    sampler: str = "magnitude"         # magnitude | random
    schedule: str = "cyclic"           # fixed | linear | cyclic | cosine
    drop_start: float = 0.8            # drop ratios (keep = 1 - drop); fixed uses drop_start
    drop_end: float = -0.1             # -0.1, not 0: more time at all tokens after quantisation
    levels: int = 5                    # quantise r to multiples of 1/levels; 0 = off
    period_steps: int = 0              # cyclic period in optimizer steps; 0 = steps_per_epoch
    cooldown_epochs: float = 0.0       # last epochs with all tokens (every schedule)
    eval_keep_rate: float = 1.0        # keep rate in eval (dynamic inference); 1.0 = all tokens
    raster_order: bool = True          # clean: raster order; False (faithful): original order and draw

    def validate(self, cfg) -> None:
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler must be one of {SAMPLERS}, got '{self.sampler}'")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got '{self.schedule}'")
        if self.levels < 0 or self.period_steps < 0:
            raise ConfigError(f"levels and period_steps must be >= 0, got {self.levels}, {self.period_steps}")
        if not 0 <= self.cooldown_epochs < cfg.train.epochs:
            raise ConfigError(f"cooldown_epochs must be in [0, train.epochs={cfg.train.epochs}), "
                              f"got {self.cooldown_epochs}")
        if not 0 < self.eval_keep_rate <= 1:
            raise ConfigError(f"eval_keep_rate must be in (0, 1], got {self.eval_keep_rate}")


@register
class PatchSampling(Plugin):
    name = "pss"
    config_class = PSSConfig
    order = ORDER_TOKENS
    eval_options = (("--keep-rate", "eval_keep_rate",
                     "patch keep rate(s) for dynamic inference, e.g. 0.5 or 1.0,0.8,0.6,0.4"),)

    def __init__(self, cfg: PSSConfig, config=None):
        super().__init__(cfg, config)
        self.drop = 0.0                    # drop ratio of the current optimizer step
        self.tokens = 0                    # K in the last training forward
        self.seed, self.rank = 0, 0
        self.period = self.cooldown = 0
        self.total_steps = 1
        self._gen: Optional[torch.Generator] = None
        self._pending_seed: Optional[int] = None

    def drop_at(self, step: int) -> float:
        c = self.cfg
        return drop_ratio(step, c.schedule, c.drop_start, c.drop_end, self.total_steps, self.period,
                          self.cooldown, c.levels)

    def _generator(self, device) -> Optional[torch.Generator]:
        if self.cfg.sampler != "random":
            return None
        if self._gen is None or self._gen.device != torch.device(device):
            self._gen = torch.Generator(device=device)
            self._pending_seed = self._pending_seed if self._pending_seed is not None else self.seed
        if self._pending_seed is not None:
            self._gen.manual_seed(self._pending_seed)
            self._pending_seed = None
        return self._gen

    def footprint(self) -> Footprint:
        """Training's largest drop ratio (every schedule runs between its two ends; fixed: the start)."""
        c = self.cfg
        keys = ("drop_start",) if c.schedule == "fixed" else ("drop_start", "drop_end")
        drop = quantize(max(getattr(c, k) for k in keys), c.levels)
        if drop <= 0:
            return Footprint()
        return Footprint(sites=(TokenSite("after_embed", kept=lambda n: num_keep(n + 1, drop, 1) - 1,
                                          kept_keys=keys),))

    # ---- the hook
    def __call__(self, x: torch.Tensor, stage) -> torch.Tensor:
        drop = self.drop if stage.training else 1.0 - self.cfg.eval_keep_rate
        if drop <= 0:
            return x
        y = sample_tokens(x, stage, drop, self.cfg.sampler, self._generator(x.device), self.cfg.raster_order)
        if stage.training:
            self.tokens = y.shape[1]
        return y

    # ---- events
    def on_fit_start(self, state) -> None:
        self.seed, self.rank = int(self.config.run.seed), int(state.rank)
        self.total_steps = int(state.total_steps)
        self.period = self.cfg.period_steps or max(1, int(state.steps_per_epoch))
        self.cooldown = round(self.cfg.cooldown_epochs * state.steps_per_epoch)
        state.token_stage.add_after_embed(self)

    def on_step_start(self, state) -> None:
        # once per optimizer step: the micro-batches of an accumulation window continue the draw
        self.drop = self.drop_at(state.step)
        self._pending_seed = generator_seed(self.seed, state.step, self.rank)

    def on_before_forward(self, state) -> None:
        self.tokens = 0

    def on_eval_start(self, state) -> None:
        self._pending_seed = generator_seed(self.seed, state.step, self.rank)

    def on_after_step(self, state) -> None:
        if state.logger is not None:
            state.logger.scalar("pss/keep_rate", 1.0 - self.drop)
            if self.tokens:
                state.logger.scalar("pss/tokens_sampled", self.tokens)   # sequence length after sampling

    def on_fit_end(self, state) -> None:
        state.token_stage.remove(self)

    # ---- resume: r is a pure function of the step; refuse a checkpoint made with another schedule.
    # (load_state_dict runs before fit_start, so only configured values: r also depends on
    # total_steps and steps_per_epoch, which the trainer must keep equal across a resume.)
    RESUME_KEYS = ("sampler", "schedule", "drop_start", "drop_end", "levels", "period_steps",
                   "cooldown_epochs")

    def state_dict(self) -> dict:
        return {k: getattr(self.cfg, k) for k in self.RESUME_KEYS}

    def load_state_dict(self, state: dict) -> None:
        now = self.state_dict()
        diff = {k: (v, now[k]) for k, v in state.items() if k in now and v != now[k]}
        if diff:
            raise RunStateError(f"plugins.pss: the checkpoint was trained with another patch-sampling "
                               f"schedule (checkpoint, now): {diff}; resume with the same plugins.pss "
                               f"settings or start fresh")
