"""Shard pipeline: coverage, equal steps, determinism, mid-epoch resume, planned short epochs, example
filter, eval."""
import numpy as np
import pytest
import torch

from dsvit.data import pipeline as P
from host_images import finished
from data_helpers import cfg, collect, write_dataset


@pytest.fixture(scope="module")
def even(shards_96_50):  # 96 train in 8 shards of 12, 50 val in 2 shards (shared, read-only)
    return shards_96_50


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):  # 100 train: 8 shards of 12 + one of 4
    return write_dataset(tmp_path_factory.mktemp("uneven"), 100, 7)


def train(root, rank=0, world=1, batch=8, seed=0, **kw):
    return P.TrainData(cfg(root, **kw), P.read_info(root), img_size=16, rank=rank, world_size=world,
                       local_batch=batch, seed=seed)


def test_partitioned_coverage_2_ranks_2_workers(even):
    uids = []
    for rank in (0, 1):
        td = train(even, rank=rank, world=2, workers=2)
        assert td.batches_per_epoch == 6
        x, y, u = collect(finished(td.epoch_batches(0)))
        assert x.shape == (48, 3, 16, 16) and x.dtype == torch.float32
        assert len(set(u.tolist())) == 48
        uids += u.tolist()
    assert sorted(uids) == list(range(96))


def test_eval_counts_every_sample_once(even):
    seen, nbatches = [], []
    for rank in (0, 1):
        ed = P.EvalData(cfg(even, workers=2), P.read_info(even), img_size=16, rank=rank, world_size=2,
                        local_batch=8)
        bs = list(ed.batches())
        nbatches.append(len(bs))
        for x, y, valid in bs:
            assert x.pixels.shape == (8, 3, 16, 16) and x.pixels.dtype == torch.uint8 and valid.dtype == torch.bool
            seen += y[valid].tolist()
    assert nbatches[0] == nbatches[1]
    assert len(seen) == 50 and np.bincount(seen).tolist() == [13, 13, 12, 12]


def test_eval_more_ranks_than_shards(uneven):  # val: 7 samples in 1 shard, 3 ranks
    counts = []
    for rank in range(3):
        ed = P.EvalData(cfg(uneven, workers=1), P.read_info(uneven), img_size=16, rank=rank,
                        world_size=3, local_batch=4)
        bs = list(ed.batches())
        counts.append((len(bs), sum(int(v.sum()) for _, _, v in bs)))
    assert [c[0] for c in counts] == [2, 2, 2] and sum(c[1] for c in counts) == 7


@pytest.mark.parametrize("mode", ["partitioned", "resampled"])
def test_equal_steps_uneven_shards(uneven, mode):
    lens = []
    for rank in (0, 1):
        td = train(uneven, rank=rank, world=2, mode=mode, workers=1)
        n = sum(1 for _ in td.epoch_batches(0))
        lens.append((td.batches_per_epoch, n))
    assert lens[0] == lens[1] == (6, 6)


@pytest.mark.parametrize("mode", ["partitioned", "resampled"])
def test_determinism_and_worker_independence(even, mode):
    a = collect(finished(train(even, mode=mode, workers=0).epoch_batches(1)))
    b = collect(finished(train(even, mode=mode, workers=2).epoch_batches(1)))
    c = collect(finished(train(even, mode=mode, workers=3).epoch_batches(1)))
    for t1, t2, t3 in zip(a, b, c):
        assert torch.equal(t1, t2) and torch.equal(t1, t3)
    d = collect(finished(train(even, mode=mode, workers=0).epoch_batches(2)))
    assert not torch.equal(a[2], d[2])  # another epoch: another order
    e = collect(finished(train(even, mode=mode, workers=0, seed=1).epoch_batches(1)))
    assert not torch.equal(a[2], e[2])


@pytest.mark.parametrize("mode", ["partitioned", "resampled"])
def test_mid_epoch_skip_equals_fresh_tail(even, mode):
    kw = dict(mode=mode, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    full = list(finished(train(even, workers=0, **kw).epoch_batches(3)))
    for k, workers in ((0, 2), (5, 0), (7, 2), (len(full), 1)):
        tail = list(finished(train(even, workers=workers, **kw).epoch_batches(3, skip_batches=k)))
        assert len(tail) == len(full) - k
        for (x1, y1, u1), (x2, y2, u2) in zip(full[k:], tail):
            assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(u1, u2)


@pytest.mark.parametrize("mode", ["partitioned", "resampled"])
def test_planned_short_epoch_is_head_of_full_epoch(even, mode):
    kw = dict(mode=mode, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    full = list(finished(train(even, workers=0, **kw).epoch_batches(3)))
    assert len(full) == 12
    for n, k, workers in ((5, 0, 0), (5, 2, 2), (7, 7, 1), (1, 0, 2)):
        part = list(finished(train(even, workers=workers, **kw).epoch_batches(3, skip_batches=k, num_batches=n)))
        assert len(part) == n - k
        for (x1, y1, u1), (x2, y2, u2) in zip(full[k:n], part):
            assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(u1, u2)


def test_num_batches_beyond_epoch_or_skip_beyond_num_batches_raises(even):
    td = train(even, workers=0)
    with pytest.raises(ValueError, match=r"num_batches=13 .*batches_per_epoch=12"):
        next(td.epoch_batches(0, num_batches=13))
    with pytest.raises(ValueError, match=r"skip_batches=6 outside \[0, 5\]"):
        next(td.epoch_batches(0, skip_batches=6, num_batches=5))


def test_batches_for_follows_resampled_rule(even):
    td = P.TrainData(cfg(even, mode="partitioned"), P.read_info(even), img_size=16, rank=0, world_size=2,
                     local_batch=4, seed=0, batches_multiple=3)
    assert td.batches_for(96) == 12 and td.batches_for(95) == 9 and td.batches_for(7) == 0
    rs = P.TrainData(cfg(even, mode="resampled"), P.read_info(even), img_size=16, rank=0, world_size=2,
                     local_batch=4, seed=0, batches_multiple=3)
    keep = np.zeros(96, bool)
    keep[:61] = True
    rs.set_keep_set(keep)
    assert rs.batches_for(61) == rs.batches_per_epoch == 6
    fixed = P.TrainData(cfg(even, mode="resampled", steps_per_epoch=2), P.read_info(even), img_size=16,
                        rank=0, world_size=2, local_batch=4, seed=0, batches_multiple=3)
    assert fixed.batches_for(96) == fixed.batches_for(10) == fixed.batches_per_epoch == 6


@pytest.mark.parametrize("mode", ["partitioned", "resampled"])
def test_keep_set_filters_before_decode(even, decoded_uids, mode):
    decoded = decoded_uids
    td = train(even, mode=mode, workers=0)
    assert td.batches_per_epoch == 12
    keep = np.zeros(96, bool)
    keep[::3] = True  # 32 kept
    td.set_keep_set(keep)
    assert td.batches_per_epoch == 4
    _, _, u = collect(finished(td.epoch_batches(0)))
    assert keep[u.numpy()].all() and keep[np.array(decoded)].all()
    if mode == "partitioned":
        assert sorted(u.tolist()) == list(range(0, 96, 3))
    assert td.counters()["filtered"] > 0
    td.set_keep_set(None)
    assert td.batches_per_epoch == 12


def test_partitioned_needs_a_shard_per_stream_and_streams_per_rank(uneven):
    with pytest.raises(ValueError, match="deals whole shards to data.streams=16 streams, but .* has 9 shards; reshard"):
        train(uneven, world=2, streams=16)
    with pytest.raises(ValueError, match="data.streams=8 must be a positive multiple of the world size 16: set data.streams=16"):
        train(uneven, world=16)
    with pytest.raises(ValueError, match=r"global micro-batch \(24 = .*not divisible by data.streams=16"):
        train(uneven, world=2, batch=12, streams=16, mode="resampled")


def test_batches_multiple_and_steps_per_epoch(even):
    td = P.TrainData(cfg(even, mode="resampled"), P.read_info(even), img_size=16, rank=0, world_size=1,
                     local_batch=8, seed=0, batches_multiple=5)
    assert td.batches_per_epoch == 10
    td = P.TrainData(cfg(even, mode="resampled", steps_per_epoch=30), P.read_info(even), img_size=16,
                     rank=0, world_size=1, local_batch=8, seed=0, batches_multiple=2)
    assert td.batches_per_epoch == 60


def test_corrupt_sample_skip_and_raise(tmp_path):
    root = write_dataset(tmp_path / "d", 24, 4, shard_sizes=24, fmt="jpeg")
    shard = tmp_path / "d" / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    at = data.index(b"\xff\xd8\xff")  # first JPEG: smash its bytes after the marker
    data[at + 20:at + 400] = b"\x00" * 380
    shard.write_bytes(bytes(data))
    td = train(root, batch=8, workers=0, streams=1)
    x, y, u = collect(finished(td.epoch_batches(0)))
    assert x.shape[0] == 24 and td.counters()["corrupt_skipped"] == 1
    with pytest.raises(RuntimeError, match="corrupt sample: shard .*train-000000.tar key"):
        list(finished(train(root, batch=8, workers=0, streams=1, corrupt="raise").epoch_batches(0)))


def test_read_info_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="_info.json not found"):
        P.read_info(str(tmp_path))
    (tmp_path / "_info.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        P.read_info(str(tmp_path))


def test_brace_pattern_overrides_shard_list(even):
    td = train(even, mode="resampled", shards=f"{even}/train-{{000000..000003}}.tar")
    assert td.batches_per_epoch == 6
    _, _, u = collect(finished(td.epoch_batches(0)))
    assert u.max() < 48  # uids of the first 4 shards are 0..47
