"""Repeated augmentation (data.repeated_aug; DeiT's RASampler, Hoffer et al. CVPR 2020) inside the
streams: each stream is the stream without repeats with every sample R times in a row, each copy
augmented differently; the epoch keeps its length; off is today's pipeline; workers, world size and
resume change nothing; keep sets (example pruning) still filter before decoding."""
import hashlib

import numpy as np
import pytest
import torch

from dsvit import config as C
from dsvit.data import pipeline as P
from dsvit.data.stream import decode_image
from dsvit.data.tar_reader import iter_shard
from dsvit.data.transforms import build_train_transform, image_stages, seed_rngs, stack_images
from dsvit.errors import ConfigError
from data_helpers import cfg
from example_pruning_helpers import FORGET, INFOB, Run, make_cfg
from host_images import finished

AUG = "rand-m9-mstd0.5-inc1"


def train(root, repeats, rank=0, world=1, batch=12, streams=2, workers=0, **kw):
    """``batch``: the global micro-batch, split over ``world`` ranks."""
    return P.TrainData(cfg(root, repeated_aug=repeats, streams=streams, workers=workers, auto_augment=AUG, **kw),
                       P.read_info(root), img_size=16, rank=rank, world_size=world, local_batch=batch // world,
                       seed=0)


def global_batches(root, repeats, world=1, epoch=1, skip=0, **kw):
    """The epoch's global micro-batches (images as the device finishes them, labels, uids), ranks
    concatenated in rank order."""
    ranks = [list(finished(train(root, repeats, rank=r, world=world, **kw).epoch_batches(epoch, skip)))
             for r in range(world)]
    return [tuple(torch.cat(t) for t in zip(*step)) for step in zip(*ranks)]


def stream_sequences(batches, streams: int) -> list:
    """Each stream's uids in order: global micro-batch g is chunk g of every stream, in stream order."""
    chunk = len(batches[0][2]) // streams
    return [torch.cat([b[2][s * chunk:(s + 1) * chunk] for b in batches]).tolist() for s in range(streams)]


@pytest.mark.parametrize("mode", ["partitioned", "resampled"])
def test_each_sample_three_times_in_a_row_differently_augmented_same_epoch_length(shards_96_50, mode):
    once, thrice = train(shards_96_50, 1, mode=mode), train(shards_96_50, 3, mode=mode)
    assert thrice.batches_per_epoch == once.batches_per_epoch == 8
    off = list(once.epoch_batches(1))
    on = list(thrice.epoch_batches(1))
    # the definition: each stream is the stream without repeats, each sample 3 times in a row
    # (so the epoch covers its first third)
    for seq1, seq3 in zip(stream_sequences(off, 2), stream_sequences(on, 2)):
        assert seq3 == [u for u in seq1[:len(seq3) // 3] for _ in range(3)]
    uids = torch.cat([b[2] for b in on])
    counts = np.bincount(uids.numpy(), minlength=96)
    assert (counts % 3 == 0).all() and counts.sum() == 96
    if mode == "partitioned":   # every sample at most once per stream: 32 distinct, each exactly 3 times
        assert sorted(set(counts.tolist())) == [0, 3] and (counts == 3).sum() == 32
    for images, labels, u in on:   # chunks of 6 = two whole groups: copies share a micro-batch
        pixels = images.pixels
        for j in range(0, len(u), 3):
            assert u[j] == u[j + 1] == u[j + 2] and labels[j] == labels[j + 1] == labels[j + 2]
            a, b, c = pixels[j:j + 3]
            assert not torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(b, c)


@pytest.mark.parametrize("mode, pinned", [("partitioned", "e18f5b370a6843be"), ("resampled", "49f162acb8d8ff98")])
def test_off_is_todays_pipeline(shards_96_50, mode, pinned):
    """repeated_aug=1: the uids of the epoch are the ones the pipeline gave before the option existed
    (digest taken at commit bbd915d; only numpy's seeded draws and the tar order enter it), and every
    chunk's pixels are today's definition recomputed here: its samples decoded, then each stage over
    the chunk with the RNGs seeded per (seed, epoch, stream, g, stage)."""
    td = train(shards_96_50, 1, mode=mode)
    batches = list(td.epoch_batches(1))
    uids = torch.cat([b[2] for b in batches])
    assert hashlib.sha256(uids.numpy().astype("<i8").tobytes()).hexdigest()[:16] == pinned
    raw = {int(k.rsplit("/", 1)[-1]): smp for url in td.urls for k, smp in iter_shard(url)}
    stages = image_stages(build_train_transform(td.cfg, 16))
    for g, (images, labels, u) in enumerate(batches):
        for s in range(2):
            chunk = u[s * 6:(s + 1) * 6].tolist()
            imgs = [decode_image(raw[i]) for i in chunk]
            for k, stage in enumerate(stages):
                seed_rngs(0, 1, s, g, k)
                imgs = [stage(x) for x in imgs]
            assert torch.equal(images.pixels[s * 6:(s + 1) * 6], stack_images(imgs))
            assert labels[s * 6:(s + 1) * 6].tolist() == [int(raw[i]["cls"]) for i in chunk]


@pytest.mark.parametrize("mode", ["partitioned", "resampled"])
@pytest.mark.parametrize("streams, batch", [(2, 12), (4, 8)])   # chunks of 6 (whole groups) and of 2 (groups straddle)
def test_same_batches_on_one_and_two_ranks_any_workers(shards_96_50, mode, streams, batch):
    kw = dict(mode=mode, streams=streams, batch=batch, reprob=0.25)
    one = global_batches(shards_96_50, 3, world=1, workers=0, **kw)
    two = global_batches(shards_96_50, 3, world=2, workers=2, **kw)
    assert len(one) == len(two) == 96 // batch
    for a, b in zip(one, two):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for seq in stream_sequences(one, streams):   # copies in a row, across chunk boundaries too
        assert len(seq) % 3 == 0 and all(seq[j] == seq[j + 1] == seq[j + 2] for j in range(0, len(seq), 3))


@pytest.mark.parametrize("mode", ["partitioned", "resampled"])
def test_resumed_epoch_continues_with_the_same_batches(shards_96_50, mode):
    kw = dict(mode=mode, streams=4, batch=8, reprob=0.25)   # chunks of 2: resume points inside a group
    full = global_batches(shards_96_50, 3, **kw)
    for k, workers in ((1, 0), (5, 2), (len(full), 0)):
        tail = global_batches(shards_96_50, 3, skip=k, workers=workers, **kw)
        assert len(tail) == len(full) - k
        for a, b in zip(full[k:], tail):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_keep_set_filters_before_the_copies_and_each_sample_is_decoded_once_per_chunk(shards_96_50, decoded_uids):
    decoded = decoded_uids
    td = train(shards_96_50, 3, mode="partitioned")
    keep = np.zeros(96, bool)
    keep[::2] = True
    td.set_keep_set(keep)
    assert td.batches_per_epoch == train(shards_96_50, 1, mode="partitioned").batches_per_epoch // 2 == 4
    uids = torch.cat([b[2] for b in td.epoch_batches(0)]).numpy()
    counts = np.bincount(uids, minlength=96)
    assert keep[uids].all() and sorted(set(counts.tolist())) == [0, 3]
    assert sorted(decoded) == sorted(set(uids.tolist()))   # 16 distinct samples, each decoded once
    assert td.counters()["filtered"] > 0


@pytest.mark.parametrize("policy", ["forgetting", "infobatch"])
def test_example_pruning_on_repeated_streams(shards_96_50, policy):
    """Copies of a uid are events of their own: forgetting counts each as a presentation (as the
    original, trained with DeiT's RASampler), InfoBatch keeps the last copy's loss; pruned examples
    have no copy in any batch."""
    over = ["data.streams=2", *(FORGET if policy == "forgetting" else INFOB)]
    run = Run(make_cfg(*over, batch=12, epochs=4), data=train(shards_96_50, 3, mode="resampled"))
    run.fit()
    for e, seen in run.seen.items():
        keep = np.ones(96, bool) if run.keeps[e] is None else run.keeps[e]
        counts = np.bincount(np.asarray(seen), minlength=96)
        assert keep[seen].all() and (counts % 3 == 0).all()
    assert any(k is not None and not k.all() for k in run.keeps.values())   # something was pruned


def test_validate_refuses_repeated_aug_below_one(shards_96_50):
    C.validate(C.load_config("default", ["data.repeated_aug=3"]))
    with pytest.raises(ConfigError, match=r"data.repeated_aug must be an integer >= 1 .*got 0; set data.repeated_aug=1 or 3"):
        C.validate(C.load_config("default", ["data.repeated_aug=0"]))
    with pytest.raises(ValueError, match="data.repeated_aug must be >= 1, got 0"):   # not a stream that never ends
        next(train(shards_96_50, 0).epoch_batches(0))
