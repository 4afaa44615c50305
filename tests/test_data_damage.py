"""Damaged datasets: short, empty and garbage shards (train and val), corrupt samples, per-epoch
counters in samples, incomplete _info.json, object arrays in an .npz."""
import json
import logging

import numpy as np
import pytest
import torch

from dsvit.data import pipeline as P
from dsvit.data.tar_reader import CorruptShardError, iter_shard
from host_images import finished
from data_helpers import collect, cut_samples, cfg, member_offsets, write_dataset

COUNTERS = ("corrupt_skipped", "filtered", "short_shards", "short_shard_missing")


@pytest.fixture
def root(shards_96_50_copy):  # 96 train in 8 shards of 12, 50 val in 2 shards of 25, ours to damage
    return shards_96_50_copy


@pytest.fixture
def warnings_seen(caplog):
    """Warnings of dsvit.data, even where the 'dsvit' logger does not propagate."""
    logger = logging.getLogger("dsvit.data")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)


def train(root, world=1, rank=0, batch=8, streams=1, **kw):
    """One stream per rank by default: these tests damage shards of a rank's single stream."""
    return P.TrainData(cfg(root, streams=streams, **kw), P.read_info(root), img_size=16, rank=rank, world_size=world,
                       local_batch=batch, seed=0)


def evaldata(root, world=1, rank=0, batch=8, **kw):
    return P.EvalData(cfg(root, **kw), P.read_info(root), img_size=16, rank=rank, world_size=world,
                      local_batch=batch)


def shard(root, name):
    from pathlib import Path
    return Path(root) / name


def smash_jpegs(path, count):
    data = bytearray(path.read_bytes())
    at = 0
    for _ in range(count):
        at = data.index(b"\xff\xd8\xff", at + 1)
        data[at + 20:at + 400] = b"\x00" * 380
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ short and empty train shards
@pytest.mark.parametrize("how", ["tarfile", "bytes"])
def test_shard_cut_at_member_boundary_raise_names_shard_counts_and_fix(root, how):
    path = shard(root, "train-000003.tar")
    if how == "tarfile":
        cut_samples(path, 7)
    else:  # cut right before the 8th sample's first header: no end-of-archive blocks
        path.write_bytes(path.read_bytes()[:member_offsets(path)[3 * 7]])
    with pytest.raises(RuntimeError) as e:
        list(finished(train(root, corrupt="raise").epoch_batches(0)))
    msg = str(e.value)
    assert "train-000003.tar holds 7 samples but _info.json lists 12" in msg
    assert "dsvit shards imagefolder|npz ... --overwrite" in msg and "data.corrupt=skip" in msg
    assert f"dsvit shards verify {root}" in msg


def test_empty_shard_raise(root):
    shard(root, "train-000005.tar").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"train-000005.tar holds 0 samples but _info.json lists 12: "
                                           r"it is empty.*--overwrite.*data.corrupt=skip"):
        list(finished(train(root, corrupt="raise", mode="resampled", steps_per_epoch=40).epoch_batches(0)))


@pytest.mark.parametrize("workers", [0, 2])
def test_short_shard_skip_counts_missing_keeps_epoch_length(root, workers, warnings_seen):
    cut_samples(shard(root, "train-000003.tar"), 7)
    shard(root, "train-000005.tar").write_bytes(b"")
    td = train(root, workers=workers)
    assert td.batches_per_epoch == 12
    _, _, u = collect(finished(td.epoch_batches(0)))
    assert len(u) == 96 and len(set(u.tolist())) == 96 - 5 - 12  # the epoch is filled by re-reading
    assert td.counters() == dict(corrupt_skipped=0, filtered=0, short_shards=2, short_shard_missing=17)
    text = warnings_seen.text
    assert "train-000003.tar delivered 7 of the 12 samples" in text
    assert "train-000005.tar delivered 0 of the 12 samples" in text and "short_shard_missing" in text


def test_short_shard_counted_once_per_epoch_per_shard_resampled(tmp_path):
    root = write_dataset(tmp_path / "one", 24, 4, shard_sizes=24)  # 1 train shard, drawn again and again
    cut_samples(shard(root, "train-000000.tar"), 17)
    td = train(root, mode="resampled", steps_per_epoch=5)
    assert len(list(td.epoch_batches(0))) == 5  # 40 samples read from 17
    assert td.counters()["short_shards"] == 1 and td.counters()["short_shard_missing"] == 7


@pytest.mark.parametrize("mode", ["partitioned", "resampled"])
def test_counters_per_epoch_worker_and_resume_independent(root, mode):
    cut_samples(shard(root, "train-000002.tar"), 4)
    keep = np.ones(96, bool)
    keep[::4] = False
    full = train(root, mode=mode, shuffle_buffer=30, streams=4)
    full.set_keep_set(keep)
    list(finished(full.epoch_batches(1)))
    want = full.counters()
    assert want["filtered"] > 0
    if mode == "partitioned":
        assert want["short_shards"] == 1 and want["short_shard_missing"] == 8
    list(finished(full.epoch_batches(1)))
    assert full.counters() == want  # per epoch: a second epoch does not add to the first
    for workers, skip in ((2, 0), (3, 0), (0, 4), (2, 5)):
        td = train(root, mode=mode, shuffle_buffer=30, workers=workers, streams=4)
        td.set_keep_set(keep)
        list(finished(td.epoch_batches(1, skip_batches=skip)))
        got = td.counters()
        assert {k: got[k] for k in COUNTERS[1:]} == {k: want[k] for k in COUNTERS[1:]}, (workers, skip)


def test_partitioned_all_shards_empty_says_which_and_what_to_do(root):
    for i in range(8):
        shard(root, f"train-00000{i}.tar").write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"data stream 0: none of its 8 shards delivers a sample.*holds 0 of 12.*--overwrite"):
        list(finished(train(root).epoch_batches(0)))
    with pytest.raises(RuntimeError, match="none of its 8 shards delivers a sample"):  # no endless loop
        list(finished(train(root, mode="resampled").epoch_batches(0)))


# ------------------------------------------------------------------ garbage and cut-off bytes
def test_random_bytes_shard_skip_counts_raise_names_shard_and_offset(root):
    path = shard(root, "train-000002.tar")
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    td = train(root, corrupt="skip")
    assert len(list(td.epoch_batches(0))) == 12
    assert td.counters()["short_shards"] == 1 and td.counters()["short_shard_missing"] == 12
    with pytest.raises(RuntimeError, match=r"train-000002.tar is unreadable after 0 of the 12 samples "
                                           r"_info.json lists \(no valid tar header .* at byte 0\).*--overwrite"):
        list(finished(train(root, corrupt="raise").epoch_batches(0)))


def test_garbage_header_mid_shard_reports_member_offset(root):
    path = shard(root, "train-000001.tar")
    at = member_offsets(path)[3 * 4]  # the 5th sample's first header
    data = bytearray(path.read_bytes())
    data[at:at + 512] = np.random.default_rng(1).integers(0, 256, 512, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=f"train-000001.tar: no valid tar header.* at byte {at}"):
        list(iter_shard(str(path)))
    it, keys = iter_shard(str(path)), []
    with pytest.raises(CorruptShardError):
        for key, _ in it:
            keys.append(key)
    assert len(keys) == 4  # the samples before the damage
    td = train(root)
    list(finished(td.epoch_batches(0)))
    assert td.counters()["short_shard_missing"] == 8
    with pytest.raises(RuntimeError, match=f"unreadable after 4 of the 12 samples .* at byte {at}"):
        list(finished(train(root, corrupt="raise").epoch_batches(0)))


def test_shard_cut_mid_member_counts_samples_not_events(root):
    path = shard(root, "train-000004.tar")
    offsets = member_offsets(path)
    names = [n for n in __import__("tarfile").open(path).getnames()]
    assert names[3 * 9 + 1].endswith(".png")
    path.write_bytes(path.read_bytes()[:offsets[3 * 9 + 1] + 700])  # inside sample 10's image
    td = train(root)
    list(finished(td.epoch_batches(0)))
    # sample 10 comes with its .cls only: a corrupt sample; samples 11 and 12 are missing
    assert td.counters()["short_shard_missing"] == 2 and td.counters()["corrupt_skipped"] == 1
    with pytest.raises(RuntimeError, match=r"train-000004.tar is unreadable after 10 of the 12 samples.*cut off"):
        list(finished(train(root, corrupt="raise").epoch_batches(0)))


def test_corrupt_samples_counted_in_samples_per_epoch(tmp_path):
    root = write_dataset(tmp_path / "j", 24, 4, shard_sizes=24, fmt="jpeg")
    smash_jpegs(shard(root, "train-000000.tar"), 3)
    td = train(root)
    for epoch in (0, 1):
        x, _, _ = collect(finished(td.epoch_batches(epoch)))
        assert x.shape[0] == 24 and td.counters()["corrupt_skipped"] == 3  # not 6 after epoch 1


# ------------------------------------------------------------------ validation split
@pytest.mark.parametrize("damage", ["cut", "empty"])
def test_short_val_shard_raise(root, damage):
    path = shard(root, "val-000001.tar")
    cut_samples(path, 20) if damage == "cut" else path.write_bytes(b"")
    with pytest.raises(RuntimeError, match=r"val-000001.tar holds (20|0) samples but _info.json lists 25.*data.corrupt=skip"):
        list(evaldata(root, corrupt="raise").batches())


@pytest.mark.parametrize("workers", [0, 2])
def test_short_val_shard_skip_is_counted_logged_and_visible(root, workers, warnings_seen):
    from dsvit.engine.evaluate import evaluate_model
    cut_samples(shard(root, "val-000001.tar"), 20)
    ed = evaldata(root, workers=workers)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    metrics = evaluate_model(model, ed.batches(), torch.device("cpu"))
    assert metrics["samples"] == 45
    assert ed.counters() == dict(corrupt_skipped=0, short_shards=1, short_shard_missing=5,
                                 samples_listed=50, samples_evaluated=45)
    assert "val rank 0: evaluated 45 of the 50 samples" in warnings_seen.text
    assert "val-000001.tar holds 20 of 25" in warnings_seen.text


def test_empty_val_shard_two_ranks(root):
    shard(root, "val-000000.tar").write_bytes(b"")
    per_rank = []
    for rank in (0, 1):
        ed = evaldata(root, world=2, rank=rank, workers=1)
        bs = list(ed.batches())
        per_rank.append((len(bs), sum(int(v.sum()) for _, _, v in bs), ed.counters()))
    assert per_rank[0][0] == per_rank[1][0]  # equal steps on every rank
    assert sorted(n for _, n, _ in per_rank) == [0, 25]
    assert sum(c["short_shard_missing"] for _, _, c in per_rank) == 25
    assert sum(c["samples_listed"] for _, _, c in per_rank) == 50


def test_corrupt_val_sample_left_out_and_counted(tmp_path):
    root = write_dataset(tmp_path / "j", 8, 10, fmt="jpeg")
    smash_jpegs(shard(root, "val-000000.tar"), 2)
    ed = evaldata(root, batch=4)
    bs = list(ed.batches())
    labels = torch.cat([y[v] for _, y, v in bs])
    assert len(labels) == 8 and ed.counters()["corrupt_skipped"] == 2
    assert ed.counters()["samples_evaluated"] == 8 and ed.counters()["samples_listed"] == 10
    with pytest.raises(RuntimeError, match="corrupt sample: shard .*val-000000.tar key .*--overwrite"):
        list(evaldata(root, batch=4, corrupt="raise").batches())


# ------------------------------------------------------------------ index and input errors
@pytest.mark.parametrize("drop,where", [("shard_lengths", "split 'train' has no 'shard_lengths'"),
                                        ("num_samples", "split 'train' has no 'num_samples'"),
                                        ("class_names", "neither 'num_classes' nor 'class_names'")])
def test_incomplete_info_names_file_key_and_fix(root, drop, where):
    path = shard(root, "_info.json")
    info = json.loads(path.read_text())
    if drop == "class_names":
        del info["class_names"], info["num_classes"]
    else:
        del info["splits"]["train"][drop]
    path.write_text(json.dumps(info))
    with pytest.raises(ValueError) as e:
        P.read_info(root)
    assert str(path) in str(e.value) and where in str(e.value) and "dsvit shards" in str(e.value)
    from dsvit.data.shards import verify_dataset
    problems, _ = verify_dataset(root, progress=False)
    assert len(problems) == 1 and where in problems[0]


def test_info_lengths_disagree(root):
    path = shard(root, "_info.json")
    info = json.loads(path.read_text())
    info["splits"]["val"]["shard_lengths"] = [25]
    path.write_text(json.dumps(info))
    with pytest.raises(ValueError, match="split 'val' lists 2 filenames, 1 shard_lengths.*--overwrite"):
        P.read_info(root)


@pytest.mark.parametrize("key", ["images", "labels"])
def test_npz_object_array_named(tmp_path, key):
    import argparse
    from dsvit.data.cli import add_shards_parser
    arrays = {"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.array([0, 1])}
    ragged = np.empty(2, object)
    ragged[0], ragged[1] = np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)
    arrays[key] = ragged if key == "images" else np.array(["a", 1], object)
    np.savez(tmp_path / "d.npz", **arrays)
    parser = argparse.ArgumentParser()
    add_shards_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["shards", "npz", str(tmp_path / "d.npz"), str(tmp_path / "o"), "--split", "train"])
    with pytest.raises(SystemExit, match=f"array '{key}' in .*d.npz has dtype object"):
        args.func(args)


# ------------------------------------------------------------------ shards and _info.json that disagree
def _append_members(dst, src, count):
    """Append the first ``count`` samples of tar ``src`` to tar ``dst`` (as another writer would)."""
    import tarfile
    with tarfile.open(src) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]
    keys = sorted({m.name.split(".", 1)[0] for m, _ in members})[:count]
    with tarfile.open(dst, "a") as t:
        for m, data in members:
            if m.name.split(".", 1)[0] in keys:
                import io
                t.addfile(m, io.BytesIO(data))


@pytest.mark.parametrize("extra", ["other shard's samples", "its own sample again"])
@pytest.mark.parametrize("corrupt", ["skip", "raise"])
def test_a_shard_holding_more_than_info_lists_is_refused_naming_it(root, extra, corrupt):
    src = "train-000002.tar" if extra == "other shard's samples" else "train-000001.tar"
    _append_members(shard(root, "train-000001.tar"), shard(root, src), 2)
    for mode in ("partitioned", "resampled"):
        with pytest.raises(RuntimeError, match=r"shard .*train-000001.tar holds .*the shards and _info.json "
                                               r"disagree.*dsvit shards verify"):
            list(finished(train(root, mode=mode, corrupt=corrupt).epoch_batches(0)))


def test_a_label_outside_the_class_list_is_refused_naming_the_sample(root):
    path = shard(root, "_info.json")
    info = json.loads(path.read_text())
    info["class_names"] = info["class_names"][:2]
    info.pop("num_classes", None)
    path.write_text(json.dumps(info))
    with pytest.raises(RuntimeError, match=r"sample \d+ has class \d+, but _info.json lists 2 classes \(0..1\).*"
                                           r"dsvit shards verify"):
        list(finished(train(root).epoch_batches(0)))
    with pytest.raises(RuntimeError, match="but _info.json lists 2 classes"):
        list(evaldata(root).batches())
