"""Every shard byte is read once per epoch per rank, whatever the worker count; the global batches do
not depend on the worker count or the world size (the streams are fixed)."""
import re

import pytest
import torch

from dsvit.data import pipeline as P
from host_images import finished
from data_helpers import cfg, collect, write_dataset


@pytest.fixture(scope="module")
def root(tmp_path_factory):  # 192 train in 16 shards of 12, 20 val in 4 shards of 5
    return write_dataset(tmp_path_factory.mktemp("once"), 192, 20, val_shard=5)


def counted(root, split, n, log) -> dict:
    """The dataset index with ``split``'s shards as pipe: URLs: dd copies each shard and appends the
    bytes it copied to ``log`` (what object storage would have sent)."""
    info = P.read_info(root)
    info["splits"][split]["filenames"] = [f"pipe:dd if={root}/{split}-{i:06d}.tar bs=4096 2>>{log}"
                                          for i in range(n)]
    info["root"] = ""
    return info


def bytes_read(log) -> int:
    return sum(int(x) for x in re.findall(r"(\d+) bytes", log.read_text())) if log.exists() else 0


def shard_bytes(root, split, n) -> int:
    from pathlib import Path
    return sum(Path(root, f"{split}-{i:06d}.tar").stat().st_size for i in range(n))


@pytest.mark.parametrize("mode", ["partitioned", "resampled"])
def test_four_workers_read_each_shard_byte_once_and_batches_equal_one_and_two(root, tmp_path, mode):
    batches, total = {}, shard_bytes(root, "train", 16)
    for workers in (4, 2, 1):
        log = tmp_path / f"{mode}-{workers}.log"
        c = cfg(root, workers=workers, mode=mode, streams=8, shuffle_buffer=10)
        td = P.TrainData(c, counted(root, "train", 16, log), img_size=16, rank=0, world_size=1, local_batch=16, seed=0)
        assert td.workers == workers
        batches[workers] = list(finished(td.epoch_batches(0)))
        assert len(batches[workers]) == 12
        if mode == "partitioned":   # every shard once: 4 workers do not read the rank's shards 4 times
            assert bytes_read(log) == total, (workers, bytes_read(log), total)
    if mode == "resampled":   # drawn with replacement: shard opens, not coverage; still one reader each
        assert bytes_read(tmp_path / "resampled-4.log") == bytes_read(tmp_path / "resampled-1.log")
    for a, b, c in zip(batches[4], batches[2], batches[1]):
        assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))


def test_eval_reads_each_val_shard_once_with_four_workers(root, tmp_path):
    log = tmp_path / "val.log"
    ed = P.EvalData(cfg(root, workers=4), counted(root, "val", 4, log), img_size=16, rank=0, world_size=1, local_batch=4)
    got = sorted(y[v].tolist() for _, y, v in ed.batches())
    assert sum(len(g) for g in got) == 20 and ed.counters()["samples_evaluated"] == 20
    assert bytes_read(log) == shard_bytes(root, "val", 4)


@pytest.mark.parametrize("mode", ["partitioned", "resampled"])
def test_global_batch_is_the_same_on_one_two_and_four_ranks(root, mode):
    """Rank r's micro-batch is the r-th slice of the global one: 1 rank with batch 16, 2 with 8 and 4
    with 4 see the same samples, augmented the same way, at every step (resume on another world size
    continues with the batches the run would have had)."""
    kw = dict(mode=mode, streams=8, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    epochs = {}
    for world in (1, 2, 4):
        ranks = [list(finished(P.TrainData(cfg(root, workers=2, **kw), P.read_info(root), img_size=16, rank=r,
                                           world_size=world, local_batch=16 // world, seed=3).epoch_batches(1)))
                 for r in range(world)]
        epochs[world] = [tuple(torch.cat(t) for t in zip(*step)) for step in zip(*ranks)]
    assert len(epochs[1]) == len(epochs[2]) == len(epochs[4]) == 12
    for one, two, four in zip(epochs[1], epochs[2], epochs[4]):
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(one, two, four))
    _, _, uids = collect(epochs[1])
    if mode == "partitioned":
        assert sorted(uids.tolist()) == list(range(192))


@pytest.mark.parametrize("mode", ["partitioned", "resampled"])
def test_more_workers_than_a_ranks_streams_read_each_byte_once(root, tmp_path, mode):
    """4 streams on 2 ranks: 2 streams per rank and 5 decode workers. The rank's process reads, so
    the shards opened (and, partitioned, the bytes: every shard once, whole) do not grow with the
    workers; the batches equal 1 worker's. (Resampled streams end inside a shard, whose pipe may be
    cut before dd reports its bytes: shard opens are what is counted there.)"""
    total, batches, opened, read = shard_bytes(root, "train", 16), {}, {}, {}
    for workers in (5, 1):
        log = tmp_path / f"{mode}-{workers}.log"
        info = counted(root, "train", 16, log)
        info["splits"]["train"]["filenames"] = [f"pipe:echo opened {i} >>{log}; " + u[len("pipe:"):]
                                                for i, u in enumerate(info["splits"]["train"]["filenames"])]
        c = cfg(root, workers=workers, mode=mode, streams=4, shuffle_buffer=10)
        ranks = [P.TrainData(c, info, img_size=16, rank=r, world_size=2, local_batch=8, seed=0) for r in (0, 1)]
        batches[workers] = [list(finished(td.epoch_batches(0))) for td in ranks]
        opened[workers] = sorted(re.findall(r"opened (\d+)", log.read_text()))
        read[workers] = bytes_read(log)
    assert opened[5] == opened[1]
    if mode == "partitioned":   # each rank reads its own shards once: all shards once, whole, in total
        assert opened[5] == sorted(str(i) for i in range(16)) and read[5] == read[1] == total, (read, total)
    for r in (0, 1):
        for a, b in zip(batches[5][r], batches[1][r]):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
