"""timm transforms for the shard pipeline, per-sample RNG seeding, and the Pillow posterize fix.

Transforms are timm's (``create_transform`` with ``use_prefetcher=True``); the pipeline runs their
PIL stages (:func:`image_stages`) batch-wise and stacks uint8 arrays; normalisation and random erasing
run on the device (``dsvit.data.device``); :class:`BatchNormalize` is the same normalisation on the
host, for the occasional looks of ``TrainData.images_by_uid``.
Training transforms get :func:`dsvit.data.fast_ops.speed_up`: bit-exact, faster lookup-table ops.

Pillow >= 11 raises "bits must be between or equal to 1 and 8" for ``ImageOps.posterize(img, 0)``;
timm 1.0.31's ``PosterizeIncreasing`` (RandAugment ``inc1``, the DeiT recipe) maps high magnitudes
to 0 bits, which kills a loader worker. Both ``fast_ops.posterize`` and :func:`safe_posterize` clamp
bits to >= 1 (1 bit is the closest image Pillow allows to the old 0-bit result); :func:`fix_posterize`
applies only that fix, for plain timm loaders (the benchmark baseline).
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import ImageOps
from timm.data import auto_augment, create_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybePILToTensor

from dsvit.data.fast_ops import speed_up, swap_aug_ops

MASK64 = (1 << 64) - 1


def safe_posterize(img, bits_to_keep, **__):
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    return ImageOps.posterize(img, max(1, bits))


def fix_posterize(transform):
    """Replace timm's posterize in every AugmentOp reachable from ``transform``; returns it."""
    return swap_aug_ops(transform, {auto_augment.posterize: safe_posterize})


def build_train_transform(cfg, img_size: int):
    t = create_transform(
        img_size, is_training=True, use_prefetcher=True, scale=(cfg.scale_min, 1.0), hflip=cfg.hflip,
        auto_augment=cfg.auto_augment or None, color_jitter=cfg.color_jitter or None,
        interpolation=cfg.interpolation, mean=tuple(cfg.mean), std=tuple(cfg.std), re_prob=0.0)
    return speed_up(t)


def build_eval_transform(cfg, img_size: int):
    return create_transform(img_size, is_training=False, use_prefetcher=True, crop_pct=cfg.crop_pct,
                            interpolation=cfg.interpolation, mean=tuple(cfg.mean), std=tuple(cfg.std))


def image_stages(transform) -> list:
    """The PIL-image stages of a timm prefetcher transform: its Compose list minus the final
    MaybePILToTensor (the pipeline stacks uint8 arrays per batch instead)."""
    stages = list(transform.transforms)
    if not stages or type(stages[-1]) is not MaybePILToTensor:
        raise ValueError(f"expected a timm prefetcher transform ending in MaybePILToTensor, got {transform}")
    return stages[:-1]


def stack_images(imgs) -> torch.Tensor:
    """Same-size RGB PIL images -> uint8 [B, 3, H, W] in one copy."""
    return torch.from_numpy(np.stack([np.asarray(x) for x in imgs])).permute(0, 3, 1, 2).contiguous()


def build_eraser(cfg):
    return RandomErasing(cfg.reprob, mode="pixel", device="cpu") if cfg.reprob > 0 else None


def mix64(*values: int) -> int:
    """Stable 64-bit hash of integers (splitmix64 chain); never Python's salted hash()."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & MASK64)) * 0xBF58476D1CE4E5B9 & MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & MASK64
        h ^= h >> 29
    return h


def seed_rngs(*values: int) -> None:
    """Seed python `random`, numpy's global RNG and torch's CPU RNG (all used by timm/torchvision
    transforms) from ``values``, e.g. (seed, epoch, rank, batch, stage), so augmentation is reproducible."""
    s = mix64(*values)
    random.seed(s)
    np.random.seed(s & 0xFFFFFFFF)
    torch.default_generator.manual_seed(s >> 1)  # CPU only: torch.manual_seed also queues CUDA seeding, with a stack capture per call


def torch_seed(*values: int) -> int:
    """The seed ``seed_rngs(*values)`` gives torch's RNG (random erasing's noise, drawn on the device)."""
    return mix64(*values) >> 1


class BatchNormalize:
    """uint8 [B, 3, H, W] -> float normalised, in one vectorised op."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean).mul_(self.inv_std)
