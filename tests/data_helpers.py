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


def cut_samples(path, keep: int):
    """Rewrite the tar ``path`` with only its first ``keep`` samples: cut at a member boundary, the
    end-of-archive blocks included, as a copy interrupted between samples would look."""
    import io
    import tarfile
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m, _ in members))[:keep]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for m, data in members:
            if m.name.split(".", 1)[0] in keys:
                out.addfile(m, io.BytesIO(data))
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def member_offsets(path) -> list:
    """Byte offsets of the headers of a tar's members, in order."""
    import tarfile
    with tarfile.open(path) as tf:
        return [m.offset for m in tf.getmembers()]
