"""Where the shard pipeline's speed comes from, one process, 1 torch thread (as in a loader worker).

1. Processing order for decode + train augmentation of the same undecoded samples (us/image):
   per image (decode, seed, whole transform), decode batch-first, stage-wise with per-sample seeds,
   stage-wise with per-batch seeds (what the pipeline does); each with timm's original ops
   (posterize fix only) and with dsvit.data.fast_ops.
2. Each lookup-table RandAugment op alone, timm's vs fast_ops', over the decoded images (us/image).
3. Tar reading: our reader (dsvit.data.tar_reader.iter_shard) vs webdataset's tar_file_iterator + group_by_keys.

    python benchmarks/bench_loader_ablation.py SHARD_DIR [--batches 30] [--rounds 3]

SHARD_DIR: any `dsvit shards` folder of JPEGs, e.g. data/cifar10-shards from benchmarks/cifar10_bench.sh.
"""
from __future__ import annotations

import argparse
import io
import itertools
import time

import torch
from PIL import Image

from dsvit.config import DataConfig
from dsvit.data import pipeline as P
from dsvit.data.stream import SampleDecoder, stream_samples
from dsvit.data.tar_reader import iter_shard
from dsvit.data.transforms import build_train_transform, fix_posterize, image_stages, seed_rngs


def _decode(sample):
    with Image.open(io.BytesIO(sample["jpg"])) as im:
        return im.convert("RGB")


def _transform_one(img, uid, stages):
    seed_rngs(0, uid)
    for t in stages:
        img = t(img)
    return img


def per_image(batch, stages):
    return [_transform_one(_decode(s), uid, stages) for uid, s in batch]


def decode_first(batch, stages):
    imgs = [_decode(s) for _, s in batch]
    return [_transform_one(img, uid, stages) for (uid, _), img in zip(batch, imgs)]


def stagewise_sample_seeds(batch, stages):
    xs = [_decode(s) for _, s in batch]
    for k, t in enumerate(stages):
        ys = []
        for (uid, _), x in zip(batch, xs):
            seed_rngs(0, uid, k)
            ys.append(t(x))
        xs = ys
    return xs


def stagewise_batch_seeds(batch, stages):
    xs = [_decode(s) for _, s in batch]
    for k, t in enumerate(stages):
        seed_rngs(0, batch[0][0], k)
        xs = [t(x) for x in xs]
    return xs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shards")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = DataConfig(root=args.shards, workers=0, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25,
                     shuffle_buffer=1000)
    info = P.read_info(cfg.root)
    td = P.TrainData(cfg, info, img_size=32, rank=0, world_size=1, local_batch=128, seed=0)
    plan = td._plan(0, 0)
    stream = SampleDecoder(plan, build_train_transform(cfg, td.img_size))   # one stream's samples: enough to time
    raw = [(uid, s) for uid, _, _, s in itertools.islice(stream_samples(plan, *plan.streams[0]), 128 * args.batches)]
    batches = [raw[i:i + 128] for i in range(0, len(raw), 128)]
    from timm.data import create_transform
    timm_ops = image_stages(fix_posterize(create_transform(
        32, is_training=True, use_prefetcher=True, scale=(cfg.scale_min, 1.0), hflip=cfg.hflip,
        auto_augment=cfg.auto_augment, interpolation=cfg.interpolation, re_prob=0.0)))
    variants = [per_image, decode_first, stagewise_sample_seeds, stagewise_batch_seeds]
    print(f"decode + augment, us/image over {len(raw)} samples, {args.rounds} rounds (min):")
    for ops_name, stages in [("timm ops", timm_ops), ("fast_ops", stream.stages)]:
        for v in variants:
            best = float("inf")
            for _ in range(args.rounds):
                t = time.perf_counter()
                for b in batches:
                    v(b, stages)
                best = min(best, (time.perf_counter() - t) / len(raw) * 1e6)
            print(f"  {ops_name:8s} {v.__name__:24s} {best:6.1f}")

    from timm.data import auto_augment as aa

    from dsvit.data import fast_ops
    imgs = [_decode(s) for _, s in raw[:2000]]
    args_of = {aa.solarize: (128,), aa.solarize_add: (50,), aa.posterize: (3,)}
    print(f"lookup-table ops alone, us/image over {len(imgs)} images (min of {args.rounds}):")
    for orig, fast in fast_ops.FAST.items():
        a = args_of.get(orig, ())
        row = []
        for fn in (orig, fast):
            best = float("inf")
            for _ in range(args.rounds):
                t = time.perf_counter()
                for img in imgs:
                    fn(img, *a)
                best = min(best, (time.perf_counter() - t) / len(imgs) * 1e6)
            row.append(best)
        print(f"  {orig.__name__:14s} timm {row[0]:6.1f}  fast_ops {row[1]:6.1f}")

    import webdataset as wds
    from webdataset import tariterators as ti
    urls = td.urls[:10]

    def ours():
        return sum(1 for u in urls for _ in iter_shard(u))

    def webdataset_iter():
        n = 0
        for u in urls:
            with wds.gopen(u) as f:
                n += sum(1 for _ in ti.group_by_keys(dict(r, __url__=u) for r in ti.tar_file_iterator(f)))
        return n
    print("tar reading, us/sample:")
    for f in (ours, webdataset_iter):
        t = time.perf_counter()
        n = f()
        print(f"  {f.__name__:16s} {(time.perf_counter() - t) / n * 1e6:6.1f}  ({n} samples)")


if __name__ == "__main__":
    main()
