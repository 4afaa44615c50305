"""What the loader hands the trainer: uint8 images, finished on the device.

Loader workers stop at uint8 [B, 3, H, W] (``HostImages``): a quarter of the bytes float32 would
take through shared memory, the pinned buffer and the host-to-device copy. ``to_device`` copies
them (non-blocking; pinned by the DataLoader when an accelerator is present) and then, on the
device, does what the workers used to do after augmentation, in the same order and with the same
float32 operations:

1. normalise: ``(x.float() - mean * 255) * (1 / (std * 255))``, the constants made on the CPU as
   before and copied once per device: bit-identical to the worker's result on the CPU
   (tests/test_data_workers.py), and expected to be on a GPU too (a subtraction and a
   multiplication, each correctly rounded, in separate kernels: nothing to fuse; not yet checked on one);
2. random erasing (timm ``RandomErasing``, mode 'pixel', when ``data.reprob > 0``): the workers
   draw the rectangles with python ``random`` seeded per (seed, epoch, stream, batch) exactly as
   timm's eraser did (``erase_boxes``), and the device fills them with normal noise from a
   generator seeded per chunk with the value the worker gave torch's RNG, drawn rectangle by
   rectangle in timm's order. On the CPU the noise is timm's bit for bit; on a GPU it comes from
   the device's generator (Philox): other values, still a pure function of (seed, epoch, stream,
   batch). The noise never crosses as bytes (up to a third of an erased image in float32);
3. corrupt slots get copies of good samples of the micro-batch, after erasing as before.

Evaluation uses step 1 only. Random erasing stays per rectangle (one normal draw and one copy
each) because that is what reproduces timm's noise exactly on the CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import random

import torch

from dsvit.data.transforms import BatchNormalize


@dataclasses.dataclass(frozen=True, eq=False)
class HostImages:
    """A micro-batch as the loader made it: uint8 pixels and what is left to do on the device.

    erase: per chunk ``(torch seed, ((row, top, left, h, w), ...))``; fill: ``(slot, source)`` row
    pairs, corrupt slots and the good samples they copy."""
    pixels: torch.Tensor                # uint8 [B, 3, H, W]
    mean: tuple
    std: tuple
    erase: tuple = ()
    fill: tuple = ()

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def pin_memory(self) -> "HostImages":
        """Called by the DataLoader's pinning thread (``torch.utils.data._utils.pin_memory``)."""
        return dataclasses.replace(self, pixels=self.pixels.pin_memory())

    def to_device(self, device) -> torch.Tensor:
        """Normalised float32 [B, 3, H, W] on ``device``, erased and filled; no host sync."""
        x = self.pixels.to(device, non_blocking=True)
        mean, inv_std = normalize_constants(self.mean, self.std, torch.device(device))
        x = (x.float() - mean).mul_(inv_std)
        for seed, boxes in self.erase:
            gen = torch.Generator(device=x.device)
            gen.manual_seed(seed)
            for row, top, left, h, w in boxes:
                x[row, :, top:top + h, left:left + w] = torch.empty(
                    (x.shape[1], h, w), device=x.device).normal_(generator=gen)
        for slot, source in self.fill:
            x[slot] = x[source]
        return x


@functools.lru_cache(maxsize=16)
def normalize_constants(mean: tuple, std: tuple, device: torch.device) -> tuple:
    """``BatchNormalize``'s constants (mean * 255, 1 / (std * 255)), made on the CPU as the workers
    made them (so the values are the same bits) and copied to ``device`` once."""
    norm = BatchNormalize(mean, std)
    return norm.mean.to(device), norm.inv_std.to(device)


def erase_boxes(eraser, n: int, img_h: int, img_w: int, row0: int = 0) -> tuple:
    """The rectangles timm's ``RandomErasing._erase`` would erase in ``n`` images of img_h x img_w,
    drawing python ``random`` exactly as it does (seed it first); rows numbered from ``row0``.
    tests/test_data_workers.py checks the result against timm's eraser."""
    if not eraser.per_pixel or eraser.num_splits > 1:
        raise ValueError("only timm RandomErasing(mode='pixel', num_splits=0) is reproduced on the device")
    boxes, area = [], img_h * img_w
    for i in range(n):
        if random.random() > eraser.probability:
            continue
        count = eraser.min_count if eraser.min_count == eraser.max_count else \
            random.randint(eraser.min_count, eraser.max_count)
        for _ in range(count):
            for _attempt in range(10):
                target_area = random.uniform(eraser.min_area, eraser.max_area) * area / count
                aspect_ratio = math.exp(random.uniform(*eraser.log_aspect_ratio))
                h = int(round(math.sqrt(target_area * aspect_ratio)))
                w = int(round(math.sqrt(target_area / aspect_ratio)))
                if w < img_w and h < img_h:
                    top = random.randint(0, img_h - h)
                    left = random.randint(0, img_w - w)
                    boxes.append((row0 + i, top, left, h, w))
                    break
    return tuple(boxes)


def finish_on_device(images, device) -> torch.Tensor:
    """``images`` from any data source as float on ``device``: HostImages are finished there,
    tensors (the in-memory datasets' float images) are copied as they are."""
    if isinstance(images, HostImages):
        return images.to_device(device)
    return images.to(device, non_blocking=True)
