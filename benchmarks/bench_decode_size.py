"""Loader cost of growth's early stages: training crops at the stage resolution vs the full size.

ImageNet-like JPEGs (500x375, quality 90, smooth content) are written to shards once; one rank's
loader (no workers: everything in this process, so process CPU time is the loader's) reads an epoch
with DeiT's augmentation (RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25) for a 224 px model,
cropping at each size in turn, alternating over rounds. Reported: images per CPU-second per size and
against 224, and the uint8 bytes per image that cross to the device.

    python benchmarks/bench_decode_size.py [--images 512] [--rounds 3] [--sizes 224 112 144 192]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

from dsvit.config import DataConfig
from dsvit.data import pipeline as P
from dsvit.data import shards as S


def write_images(root: str, n: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    recs = []
    for i in range(n):
        a, b, c = rng.uniform(0.005, 0.05, 3)
        base = np.stack([np.sin(a * xx + i), np.cos(b * yy), np.sin(c * (xx + yy))], -1)
        img = ((base + 1) * 110 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        recs.append((i % 10, f"img{i}", img))
    names = [f"c{k}" for k in range(10)]
    info = S.prepare_out_dir(root, "train", names, overwrite=False, add_split=True)
    S.write_split(recs, root, "train", names, info, enc=S.Encoding(format="jpeg", quality=90),
                  shard_max_count=128, progress=False)


def epoch_cpu_s(root: str, size: int) -> tuple[float, int]:
    cfg = DataConfig(root=root, workers=0, streams=1, shuffle_buffer=64, mode="partitioned",
                     auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    td = P.TrainData(cfg, P.read_info(root), img_size=224, rank=0, world_size=1, local_batch=32, seed=0)
    if size != 224:
        td.set_decode_size(size)
    t0, n = time.process_time(), 0
    for images, _, _ in td.epoch_batches(0):
        n += len(images.pixels)
    return time.process_time() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 112, 144, 192])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        write_images(root, args.images)
        rates = {s: [] for s in args.sizes}
        for r in range(args.rounds):
            for s in (args.sizes if r % 2 == 0 else args.sizes[::-1]):
                cpu, n = epoch_cpu_s(root, s)
                rates[s].append(n / cpu)
        base = statistics.median(rates[224])
        print("| crop size | images per CPU-s (median of rounds) | vs 224 | uint8 bytes/image to the device |")
        print("|---|---|---|---|")
        for s in args.sizes:
            m = statistics.median(rates[s])
            print(f"| {s} | {m:.1f} | {m / base:.2f}x | {3 * s * s} |")


if __name__ == "__main__":
    main()
