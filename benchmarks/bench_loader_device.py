"""Loader images/s per core and bytes per image crossing to the device, for whichever dsvit is importable.

Each measurement runs in its own process (``--one``): ``TrainData.epoch_batches`` with W workers,
the first ``--warmup`` batches (worker start-up, the prefetch queues filling) dropped, then ``--batches``
timed (CIFAR-10 settings of the cifar10-bench recipe, RandAugment and random erasing). Per core: images
per CPU-second of the rank's process and its workers together (user + system time from psutil over
the timed batches), which the other loads of a shared machine disturb far less than images per
wall-second (also printed). Bytes to the device: what the trainer's ``_batch`` copies per image
(images + labels + uids). Two "after" figures: the loader's output as a GPU run gets it (uint8,
finished on the device), and finished on the CPU in the rank's process, as a CPU run does it.

The driver alternates the checkouts round by round, so drift on the machine hits both alike:

    .venv/bin/python benchmarks/bench_loader_device.py SHARDS --before /tmp/loader_before --after . \\
        --workers 1 2 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def cpu_seconds(proc) -> float:
    """User + system CPU time of ``proc`` and its live children (the loader workers)."""
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except Exception:   # a worker that just ended
            pass
    return total


def measure(args) -> dict:
    import psutil
    import torch
    from dsvit.config import DataConfig
    from dsvit.data import pipeline as P
    try:
        from dsvit.data.device import finish_on_device
    except ImportError:     # before: the workers' float32 is what crosses
        finish_on_device = None
    torch.set_num_threads(1)
    cfg = DataConfig(root=args.shards, workers=args.workers[0], streams=args.streams, mode="resampled",
                     steps_per_epoch=args.warmup + args.batches, auto_augment=args.auto_augment,
                     reprob=args.reprob, scale_min=0.35, shuffle_buffer=2000)
    td = P.TrainData(cfg, P.read_info(args.shards), img_size=args.img_size, rank=0, world_size=1,
                     local_batch=args.batch, seed=0)
    me, n, nbytes = psutil.Process(), 0, 0
    batches = td.epoch_batches(0)
    for _ in range(args.warmup):
        next(batches)
    c0, t0 = cpu_seconds(me), time.perf_counter()
    for _ in range(args.batches):
        images, labels, uids = next(batches)
        pixels = images if torch.is_tensor(images) else images.pixels
        if args.finish_on_cpu and finish_on_device is not None:
            images = finish_on_device(images, "cpu")
        n += len(labels)
        nbytes += pixels.nbytes + labels.nbytes + uids.nbytes
    wall, cpu = time.perf_counter() - t0, cpu_seconds(me) - c0
    return {"images_per_s": n / wall, "images_per_cpu_s": n / cpu, "bytes_per_image": nbytes / n,
            "image_bytes_per_image": pixels.nbytes / len(labels), "dtype": str(pixels.dtype)}


def run_one(checkout: str, argv: list, workers: int, finish: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout), DS_ACCELERATOR="cpu")
    cmd = [sys.executable, __file__, *argv, "--one", "--workers", str(workers)] + (["--finish-on-cpu"] if finish else [])
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shards")
    ap.add_argument("--before", default="/tmp/loader_before")
    ap.add_argument("--after", default=".")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=10, help="batches dropped: worker start-up, the prefetch filling")
    ap.add_argument("--batches", type=int, default=120)
    ap.add_argument("--auto-augment", default="rand-m9-mstd0.5-inc1")
    ap.add_argument("--reprob", type=float, default=0.25)
    ap.add_argument("--one", action="store_true", help="one measurement in this process (JSON line)")
    ap.add_argument("--finish-on-cpu", action="store_true")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args)))
        return
    common = [args.shards, "--streams", str(args.streams), "--batch", str(args.batch), "--img-size",
              str(args.img_size), "--warmup", str(args.warmup), "--batches", str(args.batches),
              "--auto-augment", args.auto_augment, "--reprob", str(args.reprob)]
    variants = [("before", args.before, False), ("after", args.after, False), ("after+cpu", args.after, True)]
    res = {}
    for r in range(args.rounds):
        for w in args.workers:
            for name, checkout, finish in variants:
                m = run_one(checkout, common, w, finish)
                res.setdefault((name, w), []).append(m)
                print(f"round {r} workers {w} {name:9s}: {m['images_per_s']:7.0f} img/s, "
                      f"{m['images_per_cpu_s']:7.0f} img/CPU-s, {m['bytes_per_image']:.0f} B/image to the device "
                      f"({m['dtype']})", flush=True)
    print("medians over rounds (images per CPU-second = per core):")
    for w in args.workers:
        base = statistics.median(m["images_per_cpu_s"] for m in res[("before", w)])
        for name, _, _ in variants:
            ms = res[(name, w)]
            cpu = statistics.median(m["images_per_cpu_s"] for m in ms)
            print(f"  workers {w} {name:9s}: {statistics.median(m['images_per_s'] for m in ms):7.0f} img/s, "
                  f"{cpu:7.0f} img/CPU-s ({cpu / base:.2f}x before), "
                  f"{ms[0]['bytes_per_image']:.0f} B/image to the device ({ms[0]['image_bytes_per_image']:.0f} of them pixels)")


if __name__ == "__main__":
    main()
