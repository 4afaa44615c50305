"""The loader's data path to the device: uint8 batches from the workers, finished on the device exactly
as the workers used to finish them; workers free of the stream count, persistent, and one global RNG
draw per epoch as before."""
import threading
import time

import psutil
import pytest
import torch
from timm.data.random_erasing import RandomErasing

from dsvit.data import pipeline as P
from dsvit.data.device import HostImages, erase_boxes, finish_on_device
from dsvit.data.loader import pin_batches
from dsvit.data.transforms import BatchNormalize, seed_rngs, torch_seed
from dsvit.engine.host_sync import HostSyncGuard
from data_helpers import cfg, collect
from host_images import finished

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def train(root, workers, **kw):
    return P.TrainData(cfg(root, workers=workers, **kw), P.read_info(root), img_size=16, rank=kw.pop("rank", 0),
                       world_size=1, local_batch=8, seed=0)


def test_device_normalisation_and_erasing_equal_the_workers_old_ones_bit_for_bit():
    """What a worker did before (BatchNormalize, then timm's RandomErasing per chunk with torch's
    and python's RNGs seeded per chunk) == uint8 HostImages finished on the device (the CPU here)."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (12, 3, 24, 20), dtype=torch.uint8, generator=g)
    eraser = RandomErasing(0.6, mode="pixel", device="cpu")
    chunks = [(0, 4), (4, 4), (8, 4)]   # three streams' chunks of 4
    old = BatchNormalize(MEAN, STD)(pixels)
    erase = []
    for j, (row, n) in enumerate(chunks):
        seed_rngs(1, 2, j, 3, 9)
        eraser(old[row:row + n])
        seed_rngs(1, 2, j, 3, 9)
        boxes = erase_boxes(eraser, n, 24, 20, row0=row)
        if boxes:
            erase.append((torch_seed(1, 2, j, 3, 9), boxes))
    assert sum(len(b) for _, b in erase) >= 4   # the test erases something
    with HostSyncGuard():   # inside the step (the trainer's _batch): no host sync
        new = HostImages(pixels, MEAN, STD, tuple(erase), fill=((5, 0),)).to_device("cpu")
    old[5] = old[0]
    assert new.dtype == torch.float32 and torch.equal(new, old)
    assert torch.equal(HostImages(pixels, MEAN, STD).to_device("cpu"), BatchNormalize(MEAN, STD)(pixels))
    plain = torch.rand(2, 3, 4, 4)                    # in-memory data: float, copied as it is
    assert finish_on_device(plain, "cpu") is plain or torch.equal(finish_on_device(plain, "cpu"), plain)


def test_uint8_reaches_the_trainer_a_quarter_of_the_float_bytes(shards_96_50):
    td = train(shards_96_50, 0, reprob=0.25)
    images, labels, uids = next(td.epoch_batches(0))
    assert isinstance(images, HostImages) and images.pixels.dtype == torch.uint8
    assert images.pixels.shape == (8, 3, 16, 16) and images.pixels.is_contiguous()
    finished_images = images.to_device("cpu")
    assert images.pixels.nbytes * 4 == finished_images.nbytes
    ed = P.EvalData(cfg(shards_96_50), P.read_info(shards_96_50), img_size=16, rank=0, world_size=1,
                    local_batch=10)
    x, _, valid = next(ed.batches())
    assert isinstance(x, HostImages) and x.pixels.dtype == torch.uint8 and valid.all()


@pytest.mark.skipif(not pin_batches(), reason="pinning needs an accelerator")
def test_pinned_batches_on_an_accelerator(shards_96_50):
    images, labels, _ = next(train(shards_96_50, 1).epoch_batches(0))
    assert images.pixels.is_pinned() and labels.is_pinned()


@pytest.mark.parametrize("mode", ["partitioned", "resampled"])
def test_more_workers_than_streams_same_batches(shards_96_50, mode):
    """2 streams on the rank, 3 and 5 decode workers: the batches of 0 and 1 workers, bit for bit,
    random erasing included (before, workers were capped at the rank's streams)."""
    kw = dict(mode=mode, streams=2, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.5)
    ref = collect(finished(train(shards_96_50, 0, **kw).epoch_batches(1)))
    for workers in (1, 3, 5):
        td = train(shards_96_50, workers, **kw)
        assert td.workers == workers
        got = collect(finished(td.epoch_batches(1)))
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), workers


def _worker_pids() -> set:
    return {p.pid for p in psutil.Process().children()}


def test_workers_persist_across_epochs_and_take_set_augmentation(shards_96_50):
    td = train(shards_96_50, 2)
    before = _worker_pids()
    first = collect(finished(td.epoch_batches(0)))
    mine = _worker_pids() - before
    assert len(mine) == 2
    td.set_augmentation("rand-m9-mstd0.5-inc1", 0.5)    # travels with the tasks to the same workers
    second = collect(finished(td.epoch_batches(0)))
    assert _worker_pids() - before == mine
    fresh = train(shards_96_50, 0, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.5)
    assert all(torch.equal(a, b) for a, b in zip(collect(finished(fresh.epoch_batches(0))), second))
    assert torch.equal(first[2], second[2]) and not torch.equal(first[0], second[0])


def test_one_global_rng_draw_per_epoch_as_with_a_loader_per_epoch(shards_96_50):
    """Dropout and drop-path draw from torch's global RNG after the loader: a DataLoader made per
    epoch drew one int64 from it per epoch; the persistent one must too (bit-identical losses)."""
    td = train(shards_96_50, 1, mode="resampled", steps_per_epoch=2)
    torch.manual_seed(7)
    for epoch in range(3):
        list(td.epoch_batches(epoch))
    after = torch.rand(3)
    torch.manual_seed(7)
    for _ in range(3):
        torch.empty((), dtype=torch.int64).random_()
    assert torch.equal(after, torch.rand(3))


def test_an_abandoned_epoch_stops_its_reader_and_a_newer_epoch_wins(shards_96_50):
    td = train(shards_96_50, 1)
    old = td.epoch_batches(0)
    next(old)
    newer = td.epoch_batches(1)
    next(newer)
    with pytest.raises(RuntimeError, match="another epoch_batches"):
        next(old)
    assert len(list(newer)) == td.batches_per_epoch - 1
    gen = td.epoch_batches(2)
    next(gen)
    gen.close()
    deadline = time.time() + 5
    while any(t.name == "dsvit-reader" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "dsvit-reader" for t in threading.enumerate())


def test_evaluating_host_images_equals_evaluating_the_finished_floats(shards_96_50):
    from dsvit.engine.evaluate import evaluate_model
    ed = P.EvalData(cfg(shards_96_50, workers=1), P.read_info(shards_96_50), img_size=16, rank=0,
                    world_size=1, local_batch=16)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    host = evaluate_model(model, ed.batches(), torch.device("cpu"))
    floats = evaluate_model(model, finished(ed.batches()), torch.device("cpu"))
    assert {k: host[k] for k in ("top1", "top5", "loss", "samples")} == \
        {k: floats[k] for k in ("top1", "top5", "loss", "samples")} and host["samples"] == 50


def test_decode_size_crops_the_same_samples_once_at_the_smaller_size(shards_96_50):
    """``set_decode_size`` (growth's early stages): the same samples in the same order, each cropped
    and resampled once to the smaller size. With a crop that is the whole image (scale 1, no flip)
    every image equals the source resized by PIL straight to that size (bicubic); the batches do not
    depend on the worker count."""
    import glob
    import io
    import numpy as np
    from PIL import Image
    from dsvit.data.tar_reader import iter_shard
    sources = {int(k.rsplit("/", 1)[-1]): s["png"] for url in sorted(glob.glob(f"{shards_96_50}/train-*.tar"))
               for k, s in iter_shard(url)}

    def epoch(workers, size=None):
        td = train(shards_96_50, workers, scale_min=1.0, hflip=0.0)
        if size:
            td.set_decode_size(size)
        parts = [(x.pixels, y, u) for x, y, u in td.epoch_batches(0)]
        return [torch.cat(t) for t in zip(*parts)]
    full, small = epoch(0), epoch(0, 8)
    assert small[0].shape[1:] == (3, 8, 8) and full[0].shape[1:] == (3, 16, 16)
    assert torch.equal(small[1], full[1]) and torch.equal(small[2], full[2])
    for img, uid in zip(small[0], small[2].tolist()):
        with Image.open(io.BytesIO(sources[uid])) as src:
            want = np.asarray(src.convert("RGB").resize((8, 8), Image.BICUBIC))
        assert np.array_equal(img.permute(1, 2, 0).numpy(), want), uid
    assert all(torch.equal(a, b) for a, b in zip(epoch(2, 8), small))
    with pytest.raises(ValueError, match="decode size 32 must be in"):
        train(shards_96_50, 0).set_decode_size(32)
