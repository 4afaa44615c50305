"""Tiny shard datasets for the data tests."""
from __future__ import annotations

import numpy as np

from dsvit.config import DataConfig
from dsvit.data import shards as S


def make_arrays(n: int, seed: int = 0, size: int = 16, classes: int = 4):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % classes
    return images, labels


def write_dataset(root, n_train: int, n_val: int, shard_sizes=None, val_shard: int = 25, fmt="png"):
    """Write splits train/val (PNG or JPEG). Train shards hold ``shard_sizes`` samples each, the last
    one fewer when it does not divide n_train (uneven shards)."""
    images, labels = make_arrays(n_train + n_val)
    names = [f"c{i}" for i in range(4)]
    for split, sl, max_count in (("train", slice(0, n_train), shard_sizes or 12),
                                 ("val", slice(n_train, None), val_shard)):
        info = S.prepare_out_dir(root, split, names, overwrite=False, add_split=True)
        recs = [(int(y), f"{split}/{i}", x) for i, (x, y) in enumerate(zip(images[sl], labels[sl]))]
        S.write_split(recs, root, split, names, info, enc=S.Encoding(format=fmt),
                      shard_max_count=max_count, progress=False)
    return str(root)


def cfg(root, **kw) -> DataConfig:
    base = dict(root=str(root), workers=0, shuffle_buffer=20, mode="partitioned")
    base.update(kw)
    return DataConfig(**base)


def collect(batches):
    """Concatenate a generator of (x, y, third) into three tensors."""
    import torch
    xs, ys, ts = zip(*batches)
    return torch.cat(xs), torch.cat(ys), torch.cat(ts)
