"""``plugins.growth``: the progressive-learning schedule, MoGrow and the AutoProg search."""
from __future__ import annotations

from dataclasses import dataclass, field

from dsvit.data.randaugment import randaugment_magnitude, with_magnitude
from dsvit.errors import ConfigError
from dsvit.plugins.growth import schedule as S



@dataclass(frozen=True)
class GrowthConfig:
    enabled: bool = True
    order: int = 0                       # 0: the depth role (after data and token plugins)
    mode: str = "manual"                 # manual ("Prog": the stage table) | auto (AutoProg search)
    stages: int = 4
    stage_unit: str = "fraction"         # fraction (of the run's steps) | epoch | step
    stage_starts: list = field(default_factory=list)     # []: equal parts
    depths: list = field(default_factory=list)           # []: linspace(depth_scale, 1) x model.depth
    depth_scale: float = 0.5
    resolutions: list = field(default_factory=list)      # []: linspace(resolution_scale, 1) x img_size
    resolution_scale: float = 0.5        # 1: keep the full resolution (depth-only growth)
    resolution_divisor: int = 0          # 0: the patch size
    augreg: bool = True                  # progressive RandAugment magnitude, drop-path, random erasing
    aa_scale: float = 0.5                # first stage's share of data.auto_augment's magnitude
    dp_scale: float = 0.0                # ... of model.drop_path_rate
    re_scale: float = 0.0                # ... of data.reprob
    decays: list = field(default_factory=lambda: [0.998, 0.9996])   # momentum copies, at decay_batch
    decay_batch: int = 1024
    decay_rescale: str = "run"           # run (time constant as a share of the run) | batch | none
    reference_steps: int = 125000        # "run": the run the decays were tuned for (100 ep x 1250)
    grow_from: int = -1                  # momentum copy the grown weights come from (-1: slowest)
    score_with: int = 0                  # momentum copy that scores candidates (0: fastest)
    optimizer_state: str = "carry"       # carry (moments by source, step kept) | reset (fresh Adam)
    new_param_state: str = "copy"        # duplicates' moments: copy their source's | zero
    search_length: float = 0.02          # per search, in stage_unit (the original: 2 of 100 epochs)
    search_batches: int = 8              # micro-batches per rank kept to score candidates
    cost: str = "time"                   # time (measured fwd+bwd, median) | flops (analytic)
    time_iters: int = 5
    time_warmup: int = 2
    quirk_smallest_base: bool = False    # faithful: sample sub-networks based on the smallest candidate
    quirk_remogrow_at_max: bool = False  # faithful: choosing the supernet's depth re-grows from a copy

    def validate(self, cfg) -> None:
        choices = {"mode": ("manual", "auto"), "stage_unit": ("fraction", "epoch", "step"),
                   "decay_rescale": ("run", "batch", "none"), "optimizer_state": ("carry", "reset"),
                   "new_param_state": ("copy", "zero"), "cost": ("time", "flops")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {allowed}, got '{getattr(self, key)}'")
        if self.enabled and cfg.model.init:
            # growth starts from a shallow, small-input model and grows it; a pretrained full-depth
            # model has nothing to grow into (and every stage change would rebuild it around it)
            raise ConfigError(f"cannot start from model.init='{cfg.model.init}': growth trains a shallow "
                              f"model and grows it to model.depth, pretrained weights are already full "
                              f"depth; fine-tune without growth (plugins.growth.enabled=false)")
        if self.enabled and cfg.train.layer_decay:
            # layer decay's per-layer LR scales are a function of the depth, which growth changes
            raise ConfigError(f"train.layer_decay={cfg.train.layer_decay} cannot be used with growth: its "
                              f"per-layer LR scales depend on the depth, which growth changes; set "
                              f"train.layer_decay=0 or plugins.growth.enabled=false")
        if cfg.model.depth is None:
            raise ConfigError("needs model.depth (the full depth to grow to); set it in the recipe")
        if self.stages < 1:
            raise ConfigError(f"stages must be >= 1, got {self.stages}")
        depths, res = self.depth_list(cfg.model), self.resolution_list(cfg.model)
        for key, values in (("depths", depths), ("resolutions", res)):
            if len(values) != self.stages or list(values) != sorted(values):
                raise ConfigError(f"{key} {values} must be non-decreasing, one per stage ({self.stages})")
        for a, b in zip(depths, depths[1:]):
            if b > 2 * a:
                raise ConfigError(f"depths {depths}: MoGrow at most doubles the depth ({a} -> {b}); "
                                  f"add a stage or raise depth_scale")
        if depths[-1] != cfg.model.depth:
            raise ConfigError(f"depths {depths} must end at model.depth={cfg.model.depth}")
        patch = cfg.model.patch_size or 16
        if res[-1] != cfg.model.img_size or any(r % patch for r in res):
            raise ConfigError(f"resolutions {res} must be multiples of the patch size {patch} ending at "
                              f"model.img_size={cfg.model.img_size}")
        starts = list(self.stage_starts) or S.linspace(0, 1, self.stages + 1)[:-1]
        if len(starts) != self.stages or starts != sorted(starts) or starts[0] != 0:
            raise ConfigError(f"stage_starts {starts} must be ascending from 0, one per stage")
        limit = {"fraction": 1, "epoch": cfg.train.epochs}.get(self.stage_unit)
        if limit is not None and starts[-1] >= limit:
            raise ConfigError(f"stage_starts {starts} reach the end of training ({self.stage_unit} "
                              f"{limit}); use smaller starts")
        if self.mode == "auto":
            gaps = [b - a for a, b in zip(starts, starts[1:])]
            if not 0 < self.search_length < min(gaps, default=float("inf")):
                raise ConfigError(f"search_length {self.search_length} ({self.stage_unit}) must be > 0 "
                                  f"and shorter than every stage ({gaps})")
            if self.search_batches < 1 or self.time_iters < 1 or self.time_warmup < 0:
                raise ConfigError("search_batches and time_iters must be >= 1, time_warmup >= 0")
        n = len(self.decays)
        if n < 1 or any(not 0 < d < 1 for d in self.decays):
            raise ConfigError(f"decays must be one or more values in (0, 1), got {self.decays}")
        if not (-n <= self.grow_from < n and -n <= self.score_with < n):
            raise ConfigError(f"grow_from={self.grow_from} / score_with={self.score_with} must index "
                              f"decays (there are {n})")
        if self.augreg and cfg.data.auto_augment and randaugment_magnitude(cfg.data.auto_augment) is None:
            raise ConfigError(f"augreg scales the RandAugment magnitude, but data.auto_augment="
                              f"'{cfg.data.auto_augment}' has no -m<N>; use e.g. rand-m9-mstd0.5-inc1")

    def start_steps(self, total_steps: int, epoch_steps) -> list[int]:
        """Each stage's first optimizer step in a run of ``total_steps`` (``epoch_steps``: per epoch)."""
        starts = list(self.stage_starts) or S.linspace(0, 1, self.stages + 1)[:-1]
        if self.stage_unit == "fraction":
            return S.fraction_steps(starts, total_steps)
        if self.stage_unit == "epoch":
            return [sum(epoch_steps[:int(e)]) for e in starts]
        return [int(s) for s in starts]

    def search_steps(self, total_steps: int, epoch_steps) -> int:
        """The length of an AutoProg search window, in optimizer steps (at least one)."""
        if self.stage_unit == "fraction":
            return max(1, round(self.search_length * total_steps))
        if self.stage_unit == "epoch":
            return max(1, round(self.search_length * epoch_steps[0]))
        return max(1, int(self.search_length))

    def depth_list(self, model_cfg) -> list[int]:
        return list(self.depths) or S.default_depths(model_cfg.depth, self.depth_scale, self.stages)

    def resolution_list(self, model_cfg) -> list[int]:
        divisor = self.resolution_divisor or model_cfg.patch_size or 16
        return list(self.resolutions) or S.default_resolutions(
            model_cfg.img_size, self.resolution_scale, self.stages, divisor)


def stage_augment(policy: str, magnitude: int) -> str:
    """``policy`` (e.g. rand-m9-mstd0.5-inc1) at another magnitude; magnitude 0 switches it off."""
    return with_magnitude(policy, magnitude) if policy and magnitude > 0 else ""


def max_magnitude(policy: str) -> int:
    return randaugment_magnitude(policy) or 0
