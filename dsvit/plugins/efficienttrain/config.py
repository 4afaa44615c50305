"""``plugins.efficienttrain``: the stage resolutions, how a batch is reduced, where the loader crops,
whether RandAugment's magnitude follows the stages."""
from __future__ import annotations

from dataclasses import dataclass, field

from dsvit.data.randaugment import randaugment_magnitude, with_magnitude
from dsvit.errors import ConfigError
from dsvit.plugins.efficienttrain import schedule as S
from dsvit.plugins.efficienttrain.lowpass import METHODS

DECODES = ("stage", "full")
LR_CLOCKS = ("steps", "compute")


@dataclass(frozen=True)
class EfficientTrainConfig:
    enabled: bool = True
    order: int = 0                       # 0: the data role (first: later plugins see the step's size)
    resolutions: list = field(default_factory=lambda: list(S.DEIT_S_FRACTIONS))  # per stage, equal
                                         # compute each: fractions of model.img_size, rounded to
                                         # multiples of the patch (ET++'s DeiT-S list 96..224 of 224)
    lowpass: str = "bicubic"             # bicubic (antialiased resize on the device, as ET++'s resize) |
                                         # fft (ET's low-frequency crop, fp32)
    decode: str = "stage"                # stage: the loader crops at the epoch's largest stage size |
                                         # full: full-size crops and augmentation, reduced on the device
    augment: bool = True                 # RandAugment magnitude per stage, 0 up to data.auto_augment's -mN
    lr_clock: str = "steps"              # steps: dsvit's warm-up + cosine per step | compute: on the
                                         # share of the run's compute done (ET++'s clock)

    def validate(self, cfg) -> None:
        if self.lowpass not in METHODS:
            raise ConfigError(f"lowpass must be one of {METHODS}, got '{self.lowpass}'")
        if self.decode not in DECODES:
            raise ConfigError(f"decode must be one of {DECODES}, got '{self.decode}'")
        if self.lr_clock not in LR_CLOCKS:
            raise ConfigError(f"lr_clock must be one of {LR_CLOCKS}, got '{self.lr_clock}'")
        fractions = list(self.resolutions)
        if not fractions or any(not isinstance(f, (int, float)) or f <= 0 for f in fractions):
            raise ConfigError(f"resolutions must be a non-empty list of fractions of model.img_size in "
                              f"(0, 1], got {self.resolutions}")
        n, patch = cfg.model.img_size, patch_size(cfg.model)
        sides = self.sides(cfg.model)
        bad = [(f, s) for f, s in zip(fractions, sides) if not 0 < s <= n]
        if bad:
            f, s = bad[0]
            raise ConfigError(f"resolutions={fractions}: {f} x model.img_size={n} rounds to {s} px (to a "
                              f"multiple of the patch size {patch}), "
                              f"{'no input' if s <= 0 else 'above the input size'}; use fractions from "
                              f"{patch / n:.4g} to 1")
        if self.lowpass == "fft" and any(s % 2 for s in sides):
            raise ConfigError(f"resolutions={fractions} give odd sizes {sides} (patch {patch}); the "
                              f"low-frequency crop needs even sizes: use lowpass=bicubic or other fractions")
        aa = cfg.data.auto_augment
        if self.augment and aa and randaugment_magnitude(aa) is None:
            raise ConfigError(f"augment schedules the RandAugment magnitude, but data.auto_augment='{aa}' "
                              f"has no -m<N>; use e.g. rand-m9-mstd0.5-inc1, or set "
                              f"plugins.efficienttrain.augment=false")

    def sides(self, model_cfg) -> list[int]:
        """The stage input sides in px."""
        return S.stage_sides(self.resolutions, model_cfg.img_size, patch_size(model_cfg))


def patch_size(model_cfg) -> int:
    if model_cfg.patch_size:
        return int(model_cfg.patch_size)
    from dsvit.config import timm_architecture
    return int(timm_architecture(model_cfg.name).get("patch_size", 16))


def max_magnitude(policy: str) -> int:
    """The ``-mN`` of a RandAugment policy string (-1: none)."""
    m = randaugment_magnitude(policy)
    return -1 if m is None else m


def policy_at(policy: str, magnitude: int) -> str:
    """``policy`` at another magnitude. Magnitude 0 stays RandAugment: timm draws each op's
    magnitude from N(0, mstd) clipped at 0, and Invert, Equalize, AutoContrast ignore it."""
    return with_magnitude(policy, magnitude)
