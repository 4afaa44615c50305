"""EfficientTrain++'s curriculum: low-resolution, weakly augmented early training, in stages of equal
compute.

Papers: Wang et al., "EfficientTrain: Exploring Generalized Curriculum Learning for Training Visual
Backbones", ICCV 2023 (arXiv:2211.09703, ET); Wang et al., "EfficientTrain++: Generalized Curriculum
Learning for Efficient Visual Backbone Training", TPAMI 2024 (arXiv:2405.08768, ET++); reference code:
github.com/LeapLabTHU/EfficientTrain.

Every epoch sees every image, but early on only its easy part: the low spatial frequencies (a smaller
image, so a ViT runs on fewer tokens) under weak augmentation. The run is split into K stages of
equal compute (``schedule``): stage i trains at side B_i (``resolutions``, fractions of the input
side; default ET++'s DeiT-S list 96, 96, 160 x4, 192, 192, 224, 224 of 224) for a share of the steps
proportional to (N/B_i)^2, with RandAugment magnitude m_i rising from 0 to ``data.auto_augment``'s
-mN (ET++: m = 0..9; the original ET used five stages at 160, 160, 160, 192, 224 with m = 1, 3, .., 9).
The stage is a pure function of the optimizer step, the same on every rank, and the plugin keeps
no other state, so a resume continues exactly.

How a step trains at B without rebuilding anything: the model is built with timm's
``dynamic_img_size`` (one full-size position table, resampled per forward; the original rebuilds
the model per stage and resizes the table in the weights and Adam's moments). Per epoch the loader
crops at the largest B any step of the epoch trains at (``decode=stage``: the random resized crop
draws its box from the source image whatever the output size, so the workers augment and copy
fewer pixels); a batch larger than its step's B (across a stage start inside an epoch, or always
with ``decode=full``) is reduced on the device in ``batch_start``: an antialiased bicubic resize
(``lowpass=bicubic``, ET++'s resize moved to the device) or ET's spectral low-frequency crop
(``lowpass=fft``, fp32, no gradient). RandAugment's magnitude is set per epoch (the loader's
transform is per epoch): the magnitude of the stage holding the epoch's first step.

Where dsvit departs from the released code, and why:
- Stages are cut in the run's own optimizer steps (the run length is train.epochs / run.max_steps),
  not in data epochs of an equivalent-epoch budget rescaled at every relaunch: no rounding gaps
  between stages; ``schedule.budget_steps`` gives the length of a published budget.
- The LR stays dsvit's warm-up + cosine in steps by default. ET++ runs it on compute progress (the
  96 px stages, 46 % of the steps of the DeiT-S list, hold 20 % of the compute and the whole
  warm-up): ``lr_clock=compute`` does (``State.lr_clock``: at step s the schedule reads
  total x progress(s), the warm-up and cosine keep dsvit's lengths); ``efficienttrain/progress``
  logs that clock either way. The default stays ``steps`` until a benchmark says the clock pays at
  dsvit's budgets (benchmarks/RESULTS.md, issue 28).
- With ``decode=stage`` the crop, RandAugment and random erasing run at the epoch's size, not at
  the full size before the reduction (ET: augment at 224, then FFT crop; ET++: augment at 224, then
  Lanczos): RandAugment's ops are not linear and do not commute with a low-pass.
  ``decode=full`` keeps ET's order (and with ``lowpass=fft`` its operator) at the full loader cost.
- The reduction runs after mixup/cutmix (dsvit mixes right after the batch reaches the device); the
  original reduces first. Resize and crop are linear, so mixup commutes; cutmix's box edges are
  smoothed by the filter.
- The magnitude changes at epoch starts; the resolution at the stage's own step.
- Evaluation during training runs at the full input size: the curve then measures the model that
  ships and is comparable across stages (ET++ evaluates intermediate epochs at B with a B-sized
  centre crop, ET at the FFT-cropped 224 crop: neither compares with the final accuracy).
- Micro-batch and global batch stay the recipe's in every stage (the original enlarges only the
  per-GPU micro-batch at low resolution, the global batch and LR are the same).
"""
from __future__ import annotations

from bisect import bisect_left

from dsvit.engine.compose import Footprint
from dsvit.engine.plugin import ORDER_DATA, Plugin
from dsvit.engine.setup import warmup_steps
from dsvit.errors import RunStateError
from dsvit.plugins import register
from dsvit.plugins.efficienttrain import schedule as S
from dsvit.plugins.efficienttrain.config import EfficientTrainConfig, max_magnitude, patch_size, policy_at
from dsvit.plugins.efficienttrain.lowpass import lowpass_crop, reduce_batch

__all__ = ["EfficientTrain", "EfficientTrainConfig", "lowpass_crop", "reduce_batch"]


@register
class EfficientTrain(Plugin):
    name = "efficienttrain"
    config_class = EfficientTrainConfig
    order = ORDER_DATA
    SCHEDULE_KEYS = ("resolutions", "lowpass", "decode", "augment", "lr_clock")

    def __init__(self, cfg: EfficientTrainConfig, config=None):
        super().__init__(cfg, config)
        m, d = self.config.model, self.config.data
        self.full, self.patch = m.img_size, patch_size(m)
        self.sides = cfg.sides(m)
        self.policy = d.auto_augment if cfg.augment and max_magnitude(d.auto_augment) >= 0 else ""
        self.table, self.starts, self.total = [], [], 0   # the run's stages: on_fit_start
        self.side = self.full          # this step's input side
        self.magnitude = -1            # RandAugment magnitude of the current epoch (-1: not scheduled)

    def architecture(self) -> dict:
        return {"dynamic_img_size": True} if min(self.sides) < self.full else {}

    def footprint(self) -> Footprint:
        """The smallest input (for the token plugins' checks) and every input side it trains at."""
        changes = min(self.sides) < self.full
        return Footprint(min_resolution=min(self.sides), resolution_keys=("resolutions",),
                         input_sizes=tuple(self.sides) if changes else (), lr_clock=self.on_compute_clock,
                         augmentation=bool(self.policy), augmentation_keys=("augment",))

    @property
    def on_compute_clock(self) -> bool:
        return self.cfg.lr_clock == "compute" and min(self.sides) < self.full

    def lr_step(self, step: int) -> float:
        """The step the LR schedule reads at ``step`` on ET++'s clock: the run's length times the
        share of its compute done (a 16 px step moves it a quarter as far as a 32 px one)."""
        return self.total * S.compute_progress(step, self.starts, self.sides, self.full, self.total)

    def stage_table(self, total_steps: int) -> list:
        return S.stage_table(total_steps, self.sides, self.full,
                             max_magnitude(self.policy) if self.policy else -1)

    def describe(self, total_steps: int, epoch_steps) -> list[str]:
        """The schedule of a ``total_steps`` run, one line per stage (``dsvit train --check``)."""
        c = self.cfg
        head = (f"efficienttrain: {len(self.sides)} stages of equal compute over {total_steps:,} steps, "
                f"batches reduced by {c.lowpass}; compute {self.relative_cost(total_steps):.3f} of the same "
                f"steps at {self.full} px in pixels")
        m = self.config.model
        if m.depth and m.embed_dim:   # the ViT's multiply-accumulates (blocks and patch embedding)
            macs = lambda side: S.vit_cost(side, self.patch, m.embed_dim, m.depth, m.mlp_ratio or 4.0)   # noqa: E731
            head += f", {self.relative_cost(total_steps, macs):.3f} in the ViT's multiply-accumulates"
        crop_full = self.full if c.decode == "full" else 0
        table = self.stage_table(total_steps)
        lines = S.describe(table, self.patch, epoch_steps, total_steps, crop_full)
        if self.on_compute_clock:
            starts = [r.start for r in table]
            clock = lambda s: total_steps * S.compute_progress(s, starts, self.sides, self.full, total_steps)   # noqa: E731
            at = [round(100 * clock(round(f * total_steps)) / total_steps) for f in (0.25, 0.5, 0.75)]
            warmup = warmup_steps(self.config.train, total_steps, epoch_steps[0]) if epoch_steps else 0
            ends = bisect_left(range(total_steps), warmup, key=clock)   # the clock never runs back
            lines.append(f"  learning rate on compute progress: the warm-up's {warmup:,} clock steps end at "
                         f"step {ends:,}; after 25 / 50 / 75 % of the steps the warm-up + cosine stands at "
                         f"{at[0]} / {at[1]} / {at[2]} % of its length")
        return [head] + lines

    def relative_cost(self, total_steps: int, cost=S.pixel_cost) -> float:
        """The run's cost against the same steps at the full side (``cost``: side -> cost of an image)."""
        steps = [r.end - r.start for r in self.stage_table(total_steps)]
        return S.run_cost(steps, self.sides, cost) / (total_steps * cost(self.full))

    # ------------------------------------------------------------ events
    def on_fit_start(self, state) -> None:
        if not state.training:          # dsvit eval: the checkpoint's architecture is all that matters
            return
        self.total = int(state.total_steps)
        self.table = self.stage_table(self.total)
        self.starts = [r.start for r in self.table]
        if self.on_compute_clock:
            state.lr_clock = self.lr_step
        if state.logger is not None:
            state.logger.info("\n".join(self.describe(self.total, state.epoch_steps)))

    def on_epoch_start(self, state) -> None:
        """The loader's crop size (the largest side any step of the epoch trains at) and the
        RandAugment magnitude of the stage holding the epoch's first step."""
        e = state.epoch
        length = state.epoch_steps[e] if e < len(state.epoch_steps) else state.steps_per_epoch
        size, m = S.epoch_setting(self.table, sum(state.epoch_steps[:e]), length, self.total)
        if self.cfg.decode == "stage":
            state.data.set_decode_size(size)
        if self.policy:
            self.magnitude = m
            state.data.set_augmentation(policy_at(self.policy, m), self.config.data.reprob)

    def on_step_start(self, state) -> None:
        self.side = self.table[S.stage_of(state.step, self.starts)].side

    def on_batch_start(self, state) -> None:
        b = state.batch
        if tuple(b.images.shape[-2:]) != (self.side, self.side):
            b.images = reduce_batch(b.images, self.side, self.cfg.lowpass)

    def on_after_step(self, state) -> None:
        log = state.logger
        if log is None or (state.step % self.config.log.every_steps and state.step != self.total):
            return   # the logger keeps a logging step's values only
        log.scalar("efficienttrain/resolution", self.side)
        log.scalar("efficienttrain/tokens_per_image", (self.side // self.patch) ** 2 + 1)
        log.scalar("efficienttrain/progress",
                   S.compute_progress(state.step, self.starts, self.sides, self.full, self.total))
        if self.magnitude >= 0:
            log.scalar("efficienttrain/magnitude", self.magnitude)

    # ------------------------------------------------------------ checkpoints
    # The stage is a function of the step and the run length (which a resume must keep: the engine
    # refuses another total_steps), so only the settings are kept, to refuse another schedule.
    def state_dict(self) -> dict:
        return {"schedule": {k: _plain(getattr(self.cfg, k)) for k in self.SCHEDULE_KEYS}}

    def load_state_dict(self, state: dict) -> None:
        now = self.state_dict()["schedule"]
        saved = {"lr_clock": "steps", **state["schedule"]}   # checkpoints from before the clock: steps
        diff = {k: (v, now[k]) for k, v in saved.items() if k in now and v != now[k]}
        if diff:
            raise RunStateError(f"plugins.efficienttrain: the checkpoint was trained with another schedule "
                               f"(checkpoint, now): {diff}; resume with the same values or start fresh")


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v
