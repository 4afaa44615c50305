"""The embedded dataset: procedurally drawn 32x32 RGB images in 10 classes, written as shards.

Deterministic in (num, seed); every class gets the same count (+-1). Difficulty comes from random
colours with sometimes low contrast, random sizes and positions, background noise and a distractor
blob, so a small ViT learns it well above chance but not perfectly in a few epochs.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from dsvit.data.shards import load_info, prepare_out_dir, write_split

CLASSES = ["circle", "square", "triangle", "cross", "ring",
           "h_stripes", "v_stripes", "diag_stripes", "checkerboard", "dots"]
SIZE = 32
VERSION = 3


def _masks(cls: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """bool [n, 32, 32] foreground masks of one class, random positions and sizes."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    r = rng.uniform(7, 13, (n, 1, 1)).astype(np.float32)
    cx = rng.uniform(r[:, 0, 0], SIZE - r[:, 0, 0])[:, None, None]
    cy = rng.uniform(r[:, 0, 0], SIZE - r[:, 0, 0])[:, None, None]
    dx, dy = xx - cx, yy - cy
    inside = np.maximum(np.abs(dx), np.abs(dy)) < r          # texture patch region
    period = rng.uniform(3, 6, (n, 1, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    w = 2 * np.pi / period
    if cls == 0:
        return dx ** 2 + dy ** 2 < r ** 2
    if cls == 1:
        return inside & (np.maximum(np.abs(dx), np.abs(dy)) < r * 0.85)
    if cls == 2:
        return (dy < r * 0.8) & (dy > -r) & (np.abs(dx) < (dy + r) * 0.55)
    if cls == 3:
        t = r / 3.5
        return ((np.abs(dx) < t) & (np.abs(dy) < r)) | ((np.abs(dy) < t) & (np.abs(dx) < r))
    if cls == 4:
        d = np.sqrt(dx ** 2 + dy ** 2)
        return (d < r) & (d > r * 0.55)
    if cls == 5:
        return inside & (np.sin(yy * w + phase) > 0)
    if cls == 6:
        return inside & (np.sin(xx * w + phase) > 0)
    if cls == 7:
        sign = rng.choice([-1.0, 1.0], (n, 1, 1)).astype(np.float32)
        return inside & (np.sin((xx + sign * yy) * w * 0.7 + phase) > 0)
    if cls == 8:
        p = np.round(period * 0.8)
        return inside & (((np.floor(dx / p) + np.floor(dy / p)) % 2) == 0)
    if cls == 9:
        p = np.round(period + 1)
        mx, my = (dx % p) - p / 2, (dy % p) - p / 2
        return inside & (mx ** 2 + my ** 2 < (p * 0.28) ** 2)
    raise ValueError(cls)


def make_images(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [num, 32, 32, 3] images and int64 [num] labels, class balanced, shuffled."""
    rng = np.random.default_rng([seed, VERSION])
    labels = rng.permutation(np.arange(num) % len(CLASSES))
    images = np.empty((num, SIZE, SIZE, 3), np.uint8)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)
        n = len(idx)
        fg_mask = _masks(c, n, rng)[..., None]
        bg = rng.uniform(0, 255, (n, 1, 1, 3)).astype(np.float32)
        # foreground colour: a random offset from the background, sometimes weak (hard examples)
        contrast = rng.uniform(80, 220, (n, 1, 1, 1)).astype(np.float32)
        # mostly a brightness change (darker on bright backgrounds), with some hue change
        sign = np.where(bg.mean(-1, keepdims=True) > 127, -1.0, 1.0).astype(np.float32)
        direction = sign + 0.4 * rng.normal(size=(n, 1, 1, 3)).astype(np.float32)
        direction /= np.linalg.norm(direction, axis=-1, keepdims=True) + 1e-6
        fg = np.clip(bg + contrast * direction * np.sqrt(3), 0, 255)
        # background: gradient + noise + a soft distractor blob
        grad = rng.normal(0, 20, (n, 1, 1, 3)).astype(np.float32) * ((xx - 16) / 16)[None, :, :, None]
        bx, by = rng.uniform(0, SIZE, (2, n, 1, 1)).astype(np.float32)
        blob = np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / rng.uniform(4, 30, (n, 1, 1)))[..., None]
        blob_col = rng.uniform(-30, 30, (n, 1, 1, 3)).astype(np.float32)
        img = bg + grad + blob * blob_col
        img = np.where(fg_mask, fg, img)
        img += rng.normal(0, rng.uniform(3, 15, (n, 1, 1, 1)), img.shape).astype(np.float32)
        images[idx] = np.clip(img, 0, 255).astype(np.uint8)
    return images, labels


def _complete(root: Path, num_train: int, num_val: int, seed: int) -> bool:
    try:
        info = load_info(root)
    except Exception:
        return False
    if not info or info.get("synthetic") != {"num_train": num_train, "num_val": num_val,
                                             "seed": seed, "version": VERSION}:
        return False
    for s in info["splits"].values():
        for name, size in zip(s["filenames"], s["shard_bytes"]):
            p = root / name
            if not p.exists() or p.stat().st_size != size:
                return False
    return True


def write_synthetic(out_dir, num_train: int, num_val: int, seed: int = 0, progress: bool = False,
                    shard_max_count: int = 1000) -> None:
    """Write splits train/val of the synthetic dataset into out_dir (which must be new or empty)."""
    for split, num, s in (("train", num_train, seed), ("val", num_val, seed + 1_000_003)):
        images, labels = make_images(num, s)
        info = prepare_out_dir(out_dir, split, CLASSES, overwrite=False, add_split=True)
        info["synthetic"] = {"num_train": num_train, "num_val": num_val, "seed": seed, "version": VERSION}
        records = [(int(lab), f"synthetic/{split}/{i}", img) for i, (img, lab) in enumerate(zip(images, labels))]
        write_split(records, out_dir, split, CLASSES, info, shard_max_count=shard_max_count,
                    workers=1, seed=s, progress=progress, source="dsvit.data.synthetic")


def ensure_synthetic(out_dir, num_train: int, num_val: int, seed: int = 0) -> str:
    """Return a folder holding the complete synthetic dataset; reuse it if already there.

    Safe when several processes call it at once: each writes a private temp folder and renames it
    into place; the first rename wins and the others discard theirs."""
    root = Path(out_dir)
    if _complete(root, num_train, num_val, seed):
        return str(root)
    tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    write_synthetic(tmp, num_train, num_val, seed)
    if root.exists() and not _complete(root, num_train, num_val, seed):
        shutil.rmtree(root, ignore_errors=True)  # incomplete or different sizes: rewrite
    try:
        os.rename(tmp, root)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(root, num_train, num_val, seed):
            raise
    return str(root)
