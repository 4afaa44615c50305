"""Bit-exact, faster stand-ins for timm's lookup-table RandAugment ops and the per-image flip.

Why: Pillow 13's ``Image.point`` rounds its lookup table in Python (768 ``round`` calls for an RGB
image), and ``ImageOps`` rebuilds the table in Python on every call. On 32x32 CIFAR-10 images that
is 50-140 us per op vs 22-95 us here (``benchmarks/bench_loader_ablation.py``). Here the tables are numpy arrays (cached where they
depend only on the op's integer argument) applied by fancy indexing. The outputs are pixel-for-
pixel equal to timm/Pillow's (tests/test_data_fast_ops.py checks every op against the original on
random and degenerate images), and each op consumes the same random draws, so a seeded run sees
the same augmentation with or without them.

:func:`speed_up` swaps them into every ``AugmentOp`` of a transform (:func:`swap_aug_ops`) and
replaces torchvision's ``RandomHorizontalFlip`` by one drawing ``torch.rand(1)`` the same way,
without torchvision's per-call logging. Modes other than L/RGB fall back to the original functions.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import auto_augment
from torchvision import transforms as tvt

_IDENTITY = np.arange(256, dtype=np.int64)
_BAND_OFFSET = np.array([0, 256, 512], dtype=np.int64)


def _apply(img, lut: np.ndarray):
    """``lut``: uint8 [256] for all bands or [bands * 256]; the same result as ``img.point``."""
    a = np.asarray(img)
    if lut.size == 256:
        return Image.fromarray(lut[a], img.mode)
    return Image.fromarray(lut[a.astype(np.int64) + _BAND_OFFSET[: a.shape[-1]]], img.mode)


def _supported(img) -> bool:
    return img.mode in ("L", "RGB")


@functools.lru_cache(maxsize=None)
def _lut_posterize(bits: int) -> np.ndarray:
    return (_IDENTITY & ~(2 ** (8 - bits) - 1)).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _lut_solarize(thresh: int) -> np.ndarray:
    return np.where(_IDENTITY < thresh, _IDENTITY, 255 - _IDENTITY).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _lut_solarize_add(add: int, thresh: int) -> np.ndarray:
    return np.where(_IDENTITY < thresh, np.minimum(255, _IDENTITY + add), _IDENTITY).astype(np.uint8)


_LUT_INVERT = (255 - _IDENTITY).astype(np.uint8)


def posterize(img, bits_to_keep, **__):
    """Also the Pillow 13 fix: timm's ``inc1`` maps high magnitudes to 0 bits, which Pillow rejects;
    clamp to 1 bit, the closest image Pillow allows to the old 0-bit result."""
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    if not _supported(img):
        return ImageOps.posterize(img, max(1, bits))
    return _apply(img, _lut_posterize(max(1, bits)))


def invert(img, **__):
    return _apply(img, _LUT_INVERT) if _supported(img) else auto_augment.invert(img)


def solarize(img, thresh, **__):
    return _apply(img, _lut_solarize(int(thresh))) if _supported(img) and thresh == int(thresh) \
        else auto_augment.solarize(img, thresh)


def solarize_add(img, add, thresh=128, **__):
    if not (_supported(img) and add == int(add) and thresh == int(thresh)):
        return auto_augment.solarize_add(img, add, thresh)
    return _apply(img, _lut_solarize_add(int(add), int(thresh)))


def _histograms(img) -> np.ndarray:
    return np.asarray(img.histogram(), dtype=np.int64).reshape(-1, 256)


def auto_contrast(img, **__):
    """ImageOps.autocontrast(img) with cutoff 0: per band, stretch [lo, hi] to [0, 255]."""
    if not _supported(img):
        return auto_augment.auto_contrast(img)
    luts = []
    for h in _histograms(img):
        nz = np.flatnonzero(h)
        lo, hi = int(nz[0]), int(nz[-1])
        if hi <= lo:
            luts.append(_IDENTITY)
            continue
        scale = 255.0 / (hi - lo)
        # Pillow: int(ix * scale + offset), clamped; float64 and truncation toward zero here too
        luts.append(np.clip(np.trunc(_IDENTITY * scale + (-lo * scale)), 0, 255).astype(np.int64))
    return _apply(img, np.concatenate(luts).astype(np.uint8))


def equalize(img, **__):
    """ImageOps.equalize(img): per band, lut[i] = (step // 2 + sum(h[:i])) // step."""
    if not _supported(img):
        return auto_augment.equalize(img)
    luts = []
    for h in _histograms(img):
        nz = h[h > 0]
        step = (int(nz.sum()) - int(nz[-1])) // 255 if nz.size > 1 else 0
        if not step:
            luts.append(_IDENTITY)
            continue
        before = np.concatenate([[0], np.cumsum(h)[:-1]])
        luts.append((step // 2 + before) // step)
    # Pillow's C point() clips table entries to 0..255 for 8-bit output
    return _apply(img, np.clip(np.concatenate(luts), 0, 255).astype(np.uint8))


class HorizontalFlip(torch.nn.Module):
    """torchvision's RandomHorizontalFlip for PIL images: the same ``torch.rand(1) < p`` draw."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, img):
        if torch.rand(1) < self.p:
            return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if isinstance(img, Image.Image) \
                else img.flip(-1)
        return img

    def __repr__(self):
        return f"{type(self).__name__}(p={self.p})"


FAST = {auto_augment.auto_contrast: auto_contrast, auto_augment.equalize: equalize,
        auto_augment.invert: invert, auto_augment.solarize: solarize,
        auto_augment.solarize_add: solarize_add, auto_augment.posterize: posterize}


def swap_aug_ops(transform, mapping: dict):
    """Replace ``aug_fn`` by ``mapping[aug_fn]`` in every AugmentOp reachable from ``transform``
    (Compose, RandAugment, AutoAugment sub-policies); returns ``transform`` (changed in place)."""
    stack = [transform]
    while stack:
        t = stack.pop()
        if isinstance(t, auto_augment.AugmentOp):
            t.aug_fn = mapping.get(t.aug_fn, t.aug_fn)
        elif isinstance(t, (list, tuple)):
            stack.extend(t)
        else:
            for attr in ("transforms", "ops", "policy"):
                children = getattr(t, attr, None)
                if isinstance(children, (list, tuple)):
                    stack.extend(children)
    return transform


def speed_up(transform):
    """The :data:`FAST` ops in every AugmentOp, and :class:`HorizontalFlip` for torchvision's flip
    in the top-level Compose; returns ``transform`` (changed in place)."""
    swap_aug_ops(transform, FAST)
    transform.transforms[:] = [HorizontalFlip(t.p) if type(t) is tvt.RandomHorizontalFlip else t
                               for t in transform.transforms]
    return transform
