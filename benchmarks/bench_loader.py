"""Loader throughput: dsvit shard pipeline vs timm ImageFolder loader on CIFAR-10 JPEGs.

Same transforms (timm train: RandomResizedCrop, hflip, RandAugment, random erasing, normalise), same
batch size and worker count; the two loaders are measured alternately, several rounds each. Also:
conversion speed (images/s) and a single-process read/decode/augment/collate breakdown per image.

    python benchmarks/bench_loader.py [--images 20000] [--workers 2] [--img-size 32] [--rounds 3]
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from dsvit.config import DataConfig
from dsvit.data import pipeline as P
from dsvit.data.device import HostImages, erase_boxes
from dsvit.data.stream import SampleDecoder, stream_samples
from dsvit.data.transforms import build_eraser, build_train_transform, fix_posterize, seed_rngs, stack_images, torch_seed

TARBALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def timm_loader(train_dir, cfg, img_size, batch, workers):
    from timm.data import ImageDataset, create_transform
    t = fix_posterize(create_transform(
        img_size, is_training=True, scale=(cfg.scale_min, 1.0), hflip=cfg.hflip, auto_augment=cfg.auto_augment,
        interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std, re_prob=cfg.reprob))
    ds = ImageDataset(str(train_dir), transform=t)
    return ds, t, torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                              drop_last=True, persistent_workers=False)


def measure(batches, limit):
    """images/s over the first `limit` batches, excluding the first batch (worker start-up)."""
    n, t0 = 0, None
    for i, b in enumerate(batches):
        if i == 0:
            t0 = time.perf_counter()
            continue
        n += len(b[1])
        if i >= limit:
            break
    return n / (time.perf_counter() - t0)


def breakdown_shards(td, n):
    """Per-image microseconds for read (tar + shuffle buffer), decode, seed, each augmentation stage,
    collate (stack uint8, in the workers) and finish (normalise, erase: on the device, here the CPU);
    one process, the pipeline's batch-wise order."""
    import itertools

    plan = td._plan(0, 0)
    ds = SampleDecoder(plan, build_train_transform(td.cfg, td.img_size))   # one stream's samples: enough to time
    eraser = build_eraser(td.cfg)
    stats = {"corrupt_skipped": 0, "filtered": 0}
    t = {"read": 0.0, "decode": 0.0, "seed": 0.0}
    t0 = time.perf_counter()
    raw = list(itertools.islice(stream_samples(plan, *plan.streams[0]), n))
    t["read"] = time.perf_counter() - t0
    for g in range(n // td.batch):
        batch = raw[g * td.batch:(g + 1) * td.batch]
        a = time.perf_counter()
        items = [ds.decode(*r, stats) for r in batch]
        t["decode"] += time.perf_counter() - a
        imgs = [img for img, _ in items]
        for k, stage in enumerate(ds.stages):
            a = time.perf_counter()
            seed_rngs(0, 0, 0, g, k)
            b = time.perf_counter()
            imgs = [stage(x) for x in imgs]
            name = "aug:" + type(stage).__name__.replace("AndInterpolation", "")
            t["seed"] += b - a
            t[name] = t.get(name, 0.0) + time.perf_counter() - b
        a = time.perf_counter()
        images = stack_images(imgs)
        seed_rngs(0, 0, 0, g, len(ds.stages))
        boxes = erase_boxes(eraser, len(imgs), *images.shape[-2:])
        b = time.perf_counter()
        erase = ((torch_seed(0, 0, 0, g, len(ds.stages)), boxes),) if boxes else ()
        HostImages(images, td.cfg.mean, td.cfg.std, erase).to_device("cpu")
        t["collate"] = t.get("collate", 0.0) + b - a
        t["finish"] = t.get("finish", 0.0) + time.perf_counter() - b
    return {k: 1e6 * v / (n // td.batch * td.batch) for k, v in t.items()}


def breakdown_timm(ds, transform, n):
    from torch.utils.data import default_collate
    t = {"read": 0.0, "decode": 0.0, "augment": 0.0, "collate": 0.0}
    items = []
    for i in range(n):
        path, label = ds.reader.samples[i * 7 % len(ds)]
        a = time.perf_counter()
        with open(path, "rb") as f:
            data = f.read()
        b = time.perf_counter()
        img = Image.open(io.BytesIO(data)).convert("RGB")
        c = time.perf_counter()
        items.append((transform(img), label))
        d = time.perf_counter()
        t["read"] += b - a
        t["decode"] += c - b
        t["augment"] += d - c
    a = time.perf_counter()
    for i in range(0, n - 127, 128):
        default_collate(items[i:i + 128])
    t["collate"] = time.perf_counter() - a
    return {k: 1e6 * v / n for k, v in t.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20000, help="train images used (per-class subset)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=40, help="batches timed per round and loader")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--auto-augment", default="rand-m9-mstd0.5-inc1")
    args = ap.parse_args()
    if not TARBALL.exists():
        sys.exit(f"{TARBALL} not found (see shared/data/README.md)")
    tmp = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    subprocess.run(["tar", "xzf", str(TARBALL), "-C", str(tmp), "cifar10/train"], check=True)
    per_class = args.images // 10
    train = tmp / "cifar10" / "train"
    for c in train.iterdir():  # keep a per-class subset: same files for both loaders
        for f in sorted(c.iterdir())[per_class:]:
            f.unlink()
    out = tmp / "shards"
    t0 = time.perf_counter()
    _convert(tmp / "cifar10", out, args.workers)
    conv = args.images / (time.perf_counter() - t0)
    print(f"conversion: {args.images} images in {args.images / conv:.1f} s = {conv:.0f} images/s "
          f"({args.workers} writer processes, incl. the unreadable-file check)")

    cfg = DataConfig(root=str(out), workers=args.workers, auto_augment=args.auto_augment, reprob=0.25,
                     mode="partitioned", shuffle_buffer=1000)
    info = P.read_info(str(out))
    td = P.TrainData(cfg, info, img_size=args.img_size, rank=0, world_size=1, local_batch=args.batch, seed=0)
    ds, t_timm, _ = timm_loader(train, cfg, args.img_size, args.batch, args.workers)
    res = {"shards": [], "timm": []}
    for r in range(args.rounds):
        res["shards"].append(measure(td.epoch_batches(r), args.batches))
        res["timm"].append(measure(timm_loader(train, cfg, args.img_size, args.batch, args.workers)[2], args.batches))
        print(f"round {r}: shards {res['shards'][-1]:.0f} img/s, timm ImageFolder {res['timm'][-1]:.0f} img/s",
              flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in res.items()}
    print(f"median: shards {med['shards']:.0f} img/s, timm {med['timm']:.0f} img/s, "
          f"ratio {med['shards'] / med['timm']:.2f}x")
    n = 2048
    torch.set_num_threads(1)  # as inside loader workers
    print("breakdown (1 process, 1 torch thread, us/image):")
    print("  shards:", {k: round(v, 1) for k, v in breakdown_shards(td, n).items()})
    print("  timm  :", {k: round(v, 1) for k, v in breakdown_timm(ds, t_timm, n).items()})
    subprocess.run(["rm", "-rf", str(tmp)])


def _convert(src, out, workers):
    import argparse as ap
    from dsvit.data.cli import add_shards_parser
    p = ap.ArgumentParser()
    add_shards_parser(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["shards", "imagefolder", str(src), str(out), "--workers", str(workers),
                      "--shard-size", "1000", "--no-progress"])
    with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            a.func(a)
        finally:
            sys.stdout = stdout


if __name__ == "__main__":
    main()
