"""Bytes read from the shards in one training epoch of one rank, over the bytes of the shards the rank
needs, by loader worker count: what a rank pulls from object storage per epoch.

Every shard is opened through ``pipe:dd if=SHARD`` (as a ``pipe:`` URL for a remote store would be),
and dd appends the bytes it copied to a log. Partitioned mode, one rank, world size 1.

    .venv/bin/python benchmarks/bench_bytes_read.py /tmp/dsvit-cifar/shards --workers 1 2 4

Runs against whatever ``dsvit`` is importable (a checkout of an older commit on PYTHONPATH gives
the "before" figure).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import tempfile
import time
from pathlib import Path

from dsvit.config import DataConfig
from dsvit.data import pipeline as P


def counted_info(root: str, log: Path) -> tuple[dict, int]:
    info = P.read_info(root)
    split = info["splits"]["train"]
    split["filenames"] = [f"pipe:dd if={root}/{f} bs=65536 2>>{log}" for f in split["filenames"]]
    info["root"] = ""
    return info, sum(split["shard_bytes"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shards")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    print(f"one epoch, partitioned, 1 rank, batch {args.batch}, shards {args.shards}")
    for w in args.workers:
        log = Path(tempfile.mkstemp(prefix="bytes_read_", suffix=".log")[1])
        info, total = counted_info(args.shards, log)
        kw = dict(root=args.shards, workers=w, mode="partitioned", shuffle_buffer=1000)
        cfg = DataConfig(**{k: v for k, v in kw.items() if k in fields})
        td = P.TrainData(cfg, info, img_size=32, rank=0, world_size=1, local_batch=args.batch, seed=0)
        t0, n = time.perf_counter(), 0
        for _, labels, _ in td.epoch_batches(0):
            n += len(labels)
        dt = time.perf_counter() - t0
        read = sum(int(x) for x in re.findall(r"(\d+) bytes", log.read_text()))
        print(f"workers {w}: {n} samples in {dt:.1f} s ({n / dt:.0f} img/s), read {read / 2**20:.1f} MiB of "
              f"{total / 2**20:.1f} MiB shard bytes = {read / total:.2f}x", flush=True)
        log.unlink()


if __name__ == "__main__":
    main()
