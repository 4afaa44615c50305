"""Reading an epoch: undecoded samples from tar shards, as streams a rank reads once.

Training. The data of an epoch is ``S = data.streams`` virtual *streams*, each an ordered sequence
of undecoded samples defined by (seed, epoch, stream id, keep set) only: its shards (partitioned: a
fixed share; resampled: drawn with replacement) -> tar -> keep[uid] filter -> its own shuffle
buffer. Global micro-batch ``g`` is chunk ``g`` of every stream, in stream order (a chunk is
``B_micro / S`` samples). Rank ``r`` of ``R`` owns streams ``r*S/R .. (r+1)*S/R - 1``, so its
micro-batch is the concatenation of its streams' chunks, and the global batch does not depend on
the world size as long as ``S`` is fixed. The rank's own process reads its streams
(``read_micro_batches``, in a thread: ``dsvit.data.loader``), so each shard byte is read once per
epoch per rank however many loader workers there are, and hands each micro-batch, undecoded, to
one decode worker (``ReadTask``). Decoding and augmentation (``SampleDecoder``) are seeded per
(seed, epoch, stream, g, stage), so nothing depends on the worker count either.

Repeated augmentation (``data.repeated_aug = R``; Hoffer et al., "Augment Your Batch", CVPR 2020;
Berman et al., "MultiGrain", arXiv:1902.05509; DeiT, Touvron et al., ICML 2021, trains with R = 3).
A stream with repeats is the stream without them with every sample emitted R times in a row,
after its shuffle buffer: the order of distinct samples is still shuffled, and the copies are
consecutive. Chunks are then cut as above, so the epoch keeps its micro-batch count and sees the
first 1/R of each stream's distinct samples, as DeiT's RASampler gives each rank
len(dataset)/world_size indices of the 3x repeated permutation (DeiT also rounds down to a multiple
of 256; dsvit's epoch is its own, rounded to train.grad_accum). Keeping the step count keeps the
run length, the LR schedule and a data plugin's epoch plan as they are without repeats; a
partitioned stream reads only what its epoch uses: about the first 1/R of its shards in the
epoch's shard order. When the chunk is a multiple of R, the copies of a sample always share a
micro-batch (hence an optimizer step); otherwise one group per chunk boundary straddles two
consecutive micro-batches of the stream, as DeiT's groups occasionally straddle two steps. Copies
differ in augmentation with no new seed: they are separate slots drawn in turn from the chunk's
RNGs (seeded per seed, epoch, stream, g, stage); the bytes are decoded once per chunk. DeiT's slicing puts the copies on different GPUs; here a sample
belongs to one stream and so to one rank. That is sound for ViTs, which have no BatchNorm: no
forward op mixes samples, and the gradient is averaged over the global batch, so where a copy is
computed changes the sum's rounding only (mixup pairs slot i with B-1-i: copies meet only in a group
spanning the middle of a rank's micro-batch). Resume (skip ``k * chunk`` items of the repeated
stream), world size and worker independence hold as without repeats.

Evaluation (``EvalStream``): a rank's val shards are dealt to its workers (``shards[w::W]``); each
worker batches its own samples and pads its last batch, and worker 0 adds the fully padded batches
that give every rank the same batch count. Both yield uint8 ``HostImages`` (normalised on the device).

Counters. Every micro-batch carries the counts of what happened while its samples were read
(stream events: ``filtered``, ``short_shards``, ``short_shard_missing``, and the short shards
themselves under ``short``) and decoded (``corrupt_skipped``). Events of one stream are booked on
the chunk being read when they happen (at the earliest on the first chunk decoded, so a resumed
epoch books the events of the chunks it passes over): the counts do not depend on the worker
count. Each shard is checked against the sample count ``_info.json`` lists when its end is
reached; a short shard counts once per stream and epoch.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from dsvit.data.device import HostImages
from dsvit.data.shards import IMAGE_EXTS, INFO_NAME
from dsvit.data.tar_reader import CorruptShardError, iter_shard
from dsvit.data.transforms import image_stages, seed_rngs, stack_images
from dsvit.errors import DataError, MissingFileError

STREAM_COUNTERS = ("filtered", "short_shards", "short_shard_missing")


def recreate_hint(url: str, lost: str = "missing samples", counter: str = "short_shard_missing") -> str:
    """What to do about a damaged shard."""
    return (f"re-create it with `dsvit shards imagefolder|npz ... --overwrite` (`dsvit shards verify "
            f"{os.path.dirname(url) or '.'}` lists every damaged shard), or set data.corrupt=skip to go "
            f"on without the {lost} (counted as {counter})")


def decode_image(sample: dict) -> Image.Image:
    """A sample's image member (undecoded tar bytes) as an RGB PIL image."""
    ext = next((e for e in sample if e in IMAGE_EXTS), None)
    if ext is None:
        raise ValueError(f"no image member (has {sorted(sample)})")
    with Image.open(io.BytesIO(sample[ext])) as im:
        return im.convert("RGB")


def worker_slot() -> tuple[int, int]:
    """(this loader worker's id, the number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


@dataclass(frozen=True)
class StreamPlan:
    """What one rank's streams of one epoch are made of (no state)."""
    mode: str                      # "partitioned" or "resampled"
    urls: list                     # every shard of the split
    lengths: np.ndarray            # samples per shard (of urls) as _info.json lists them
    keep: Optional[np.ndarray]     # bool per uid, None: keep all
    active: Optional[np.ndarray]   # resampled: active samples per shard (draw weights)
    streams: tuple                 # this rank's (stream id, shard indices; None when resampled)
    seed: int
    epoch: int
    chunk: int                     # samples a stream gives each micro-batch
    num_batches: int               # micro-batches of the epoch, counting the skipped ones
    skip_batches: int              # leading micro-batches passed over without decoding (resume)
    shuffle_buffer: int            # samples per stream; <= 1: no shuffle buffer
    corrupt: str                   # "raise" or "skip"
    img_size: int                  # output size (the placeholder of a corrupt or padding slot)
    train: bool = True
    repeats: int = 1               # data.repeated_aug: each sample emitted this many times in a row
    starts: Optional[np.ndarray] = None   # first uid of each shard (of urls); None: not checked
    num_classes: int = 0           # labels must lie in [0, num_classes); 0: not checked


class _Events:
    """Stream events since they were last booked on a chunk."""
    __slots__ = ("counts", "short")

    def __init__(self):
        self.clear()

    def clear(self):
        self.counts, self.short = dict.fromkeys(STREAM_COUNTERS, 0), []

    def add(self, name: str, k: int = 1):
        self.counts[name] += k

    def book(self, stats: dict) -> None:
        """Add these events to an item's stats and forget them."""
        for k, v in self.counts.items():
            stats[k] = stats.get(k, 0) + v
        stats.setdefault("short", []).extend(self.short)
        self.clear()


class SampleReader:
    """Undecoded (uid, url, key, sample)s of a sequence of shards, filtered by keep before anything
    else; each shard's count is checked against _info.json at its end. One per stream (its short
    and barren shards are remembered across passes)."""

    def __init__(self, plan: StreamPlan, readable: list, owner: str):
        self.plan, self.readable, self.owner = plan, readable, owner
        self.short, self.barren = {}, set()

    def samples(self, shards, ev: _Events):
        p, keep = self.plan, self.plan.keep
        for i in shards:
            url, got, kept, err = p.urls[i], 0, 0, None
            listed = int(p.lengths[i])
            first = int(p.starts[i]) if p.starts is not None else None
            try:
                for key, sample in iter_shard(url):
                    got += 1
                    try:
                        uid = int(key.rsplit("/", 1)[-1])
                    except ValueError:
                        raise ValueError(f"{url}: key '{key}' is not an integer uid; write shards with `dsvit shards`") from None
                    if first is not None and (got > listed or not first <= uid < first + listed):
                        self._unlisted(i, got, key)
                    if keep is not None and not keep[uid]:
                        ev.add("filtered")
                        continue
                    kept += 1
                    yield uid, url, key, sample
            except FileNotFoundError as e:
                raise MissingFileError(f"shard {url} is missing: {e}") from e
            except (EOFError, OSError) as e:  # CorruptShardError: cut off mid-member, not a tar
                err = e
            if got < p.lengths[i] or err is not None:
                self._short(i, got, err, ev)
            if not kept and p.train:
                self.barren.add(i)
                self._check_barren()

    def _unlisted(self, i: int, got: int, key: str):
        """A sample the shard should not hold by _info.json: more samples than listed, or a uid of
        another shard. The uids then no longer name samples (keep sets, per-sample scores, exact
        resume rest on them), so this is never skipped."""
        p = self.plan
        url, listed, first = p.urls[i], int(p.lengths[i]), int(p.starts[i])
        what = (f"holds more than the {listed} samples {INFO_NAME} lists" if got > listed else
                f"holds sample {key}, outside its uids {first}..{first + listed - 1} in {INFO_NAME}")
        raise DataError(f"shard {url} {what}: the shards and {INFO_NAME} disagree (a shard rewritten or "
                           f"copied in from another dataset); re-create the dataset with `dsvit shards ... "
                           f"--overwrite`, or check it with `dsvit shards verify {os.path.dirname(url) or '.'}`")

    def _short(self, i: int, got: int, err, ev: _Events):
        p = self.plan
        url, listed = p.urls[i], int(p.lengths[i])
        if err is None:
            why = "empty" if got == 0 else "ends early"
            what = (f"shard {url} holds {got} samples but {INFO_NAME} lists {listed}: it "
                    f"{'is empty' if got == 0 else 'ends early'} (cut off or incompletely written)")
        else:
            why = f"{err.reason} at byte {err.offset}" if isinstance(err, CorruptShardError) else f"{type(err).__name__}: {err}"
            what = f"shard {url} is unreadable after {got} of the {listed} samples {INFO_NAME} lists ({why})"
        if p.corrupt == "raise":
            raise DataError(f"{what}; {recreate_hint(url)}") from err
        if i not in self.short and got < listed:  # once per stream: a partitioned pass may read it again
            self.short[i] = (url, got, listed, why)
            ev.add("short_shards")
            ev.add("short_shard_missing", listed - got)
            ev.short.append(self.short[i])

    def _check_barren(self):
        """Raise if every shard the stream can read has been found to deliver no sample."""
        if self.barren.issuperset(self.readable):
            eg = next(iter(self.short.values()), None)
            example = f", e.g. {eg[0]} holds {eg[1]} of {eg[2]} samples" if eg else ""
            raise DataError(f"{self.owner}: none of its {len(self.readable)} shards delivers a sample "
                               f"it may use{example}; {recreate_hint(self.plan.urls[self.readable[0]])}")


def stream_samples(plan: StreamPlan, sid: int, shards: Optional[list], ev: Optional[_Events] = None):
    """Stream ``sid``'s ordered, endless sequence of undecoded samples for the epoch: its shards pass
    after pass (partitioned: each pass in its own shuffled order; a pass only repeats if shards come
    up short) or drawn with replacement (resampled), each pass through the stream's shuffle buffer,
    each sample coming out ``plan.repeats`` times in a row (repeated augmentation)."""
    p, ev = plan, ev if ev is not None else _Events()
    if p.mode == "resampled":
        readable = np.flatnonzero(p.active > 0).tolist()
        rng = np.random.default_rng([p.seed, p.epoch, sid, 7])
        prob = p.active / p.active.sum()
        passes = iter([(int(i) for _ in itertools.count() for i in rng.choice(len(p.urls), size=64, p=prob))])
    else:
        readable = list(shards)
        passes = ([int(i) for i in np.random.default_rng([p.seed, p.epoch, sid, pas]).permutation(shards)]
                  for pas in itertools.count())
    reader = SampleReader(p, readable, f"data stream {sid}")
    for pas, order in enumerate(passes):
        yield from repeated(shuffled(reader.samples(order, ev), p.shuffle_buffer,
                                     np.random.default_rng([p.seed, p.epoch, sid, 11, pas])), p.repeats)


def repeated(items, times: int):
    """Each item of the generator ``items`` ``times`` times in a row; closing this closes ``items``
    (and so the shards it reads)."""
    if times < 1:   # validate() refuses it at start; a stream of nothing would read forever
        raise ValueError(f"data.repeated_aug must be >= 1, got {times}")
    with contextlib.closing(items):
        for item in items:
            yield from itertools.repeat(item, times)


def shuffled(it, size: int, rng):
    """A shuffle buffer of ``size`` items over ``it``."""
    if size <= 1:
        yield from it
        return
    buf = []
    for item in it:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        buf[j], item = item, buf[j]
        yield item
    for j in rng.permutation(len(buf)):
        yield buf[j]


class SampleDecoder:
    """Bytes -> augmented uint8 tensors: the part shared by training and evaluation."""

    def __init__(self, plan: StreamPlan, transform):
        self.plan = plan
        self.stages = image_stages(transform)

    def decode(self, uid, url, key, sample, stats):
        """(RGB PIL image, label); None for a corrupt sample in skip mode."""
        try:
            label = int(sample["cls"])
        except Exception:   # a missing or unreadable label member: a corrupt sample
            label = None
        n = self.plan.num_classes
        if label is not None and n and not 0 <= label < n:   # the data and its _info.json disagree
            raise DataError(f"shard {url} sample {key} has class {label}, but {INFO_NAME} lists {n} classes "
                               f"(0..{n - 1}): re-create the dataset with `dsvit shards ... --overwrite` (every "
                               f"class a folder), or fix class_names in {INFO_NAME}; `dsvit shards verify "
                               f"{os.path.dirname(url) or '.'}` checks every label")
        try:
            if label is None:
                raise ValueError("no readable label (.cls member)")
            return decode_image(sample), label
        except Exception as e:  # corrupt bytes, bad label
            if self.plan.corrupt == "raise":
                raise DataError(f"corrupt sample: shard {url} key {key}: {type(e).__name__}: {e}; "
                                   f"{recreate_hint(url, 'corrupt samples', 'corrupt_skipped')}") from e
            stats["corrupt_skipped"] = stats.get("corrupt_skipped", 0) + 1
            return None

    def decode_slots(self, raw, stats) -> list:
        """``decode`` of every slot of a chunk, a sample in several slots (repeated augmentation's
        copies) decoded once: the stages make new images, so its slots may share it. A corrupt one
        counts once per slot, as separate samples would."""
        done, items = {}, []
        for r in raw:
            if r[0] not in done:
                done[r[0]] = self.decode(*r, stats)
            elif done[r[0]] is None:
                stats["corrupt_skipped"] = stats.get("corrupt_skipped", 0) + 1
            items.append(done[r[0]])
        return items

    def augment(self, imgs, *seed):
        """uint8 [n, 3, H, W]. Each stage over the whole list before the next (decode all, crop all,
        ...): on small images, where Python and Pillow call overhead dominate, that is 1.4-1.6x
        faster than the whole transform per image (benchmarks/bench_loader_ablation.py). ``seed``:
        training RNG seed."""
        for k, stage in enumerate(self.stages):
            if seed:
                seed_rngs(*seed, k)
            imgs = [stage(x) for x in imgs]
        return stack_images(imgs)

    def decode_chunk(self, raw, sid: int, g: int, stats):
        """uint8 images (zeros in corrupt slots), labels, uids, corrupt mask of stream ``sid``'s
        chunk of micro-batch ``g``, augmented with the RNGs seeded per (seed, epoch, sid, g, stage)."""
        p = self.plan
        items = self.decode_slots(raw, stats)
        good = [i for i, it in enumerate(items) if it is not None]
        images = self.augment([items[i][0] for i in good], p.seed, p.epoch, sid, g) if good else None
        if len(good) < len(raw):
            full = torch.zeros(len(raw), 3, p.img_size, p.img_size, dtype=torch.uint8)
            if good:
                full[good] = images
            images = full
        labels = torch.tensor([it[1] if it is not None else 0 for it in items], dtype=torch.long)
        bad = torch.tensor([it is None for it in items], dtype=torch.bool)
        return images, labels, torch.tensor([r[0] for r in raw], dtype=torch.long), bad


@dataclass(frozen=True)
class ReadTask:
    """One micro-batch of a rank, read but not decoded: what the reader hands a decode worker."""
    g: int                         # micro-batch of the epoch
    epoch: int
    chunks: tuple                  # ((stream id, ((uid, url, key, sample), ...)), ...) in stream order
    stats: dict                    # stream events booked on this micro-batch
    augmentation: tuple            # (auto_augment, reprob, decode size) of the epoch


def read_micro_batches(plan: StreamPlan, augmentation: tuple):
    """The rank's micro-batches skip_batches..num_batches-1 of the epoch as ``ReadTask``s: all its
    streams read here (each shard byte once), the skipped chunks passed over without decoding."""
    p = plan
    events = [_Events() for _ in p.streams]
    its = [stream_samples(p, sid, shards, ev) for (sid, shards), ev in zip(p.streams, events)]
    try:
        for it in its:   # resume: pass over the skipped chunks
            for _ in itertools.islice(it, p.skip_batches * p.chunk):
                pass
        for g in range(p.skip_batches, p.num_batches):
            stats, chunks = {}, []
            for (sid, _), it, ev in zip(p.streams, its, events):
                raw = tuple(itertools.islice(it, p.chunk))
                if len(raw) < p.chunk:
                    raise RuntimeError(f"data stream {sid} ended inside micro-batch {g}")
                chunks.append((sid, raw))
                ev.book(stats)
            yield ReadTask(g, p.epoch, tuple(chunks), stats, augmentation)
    finally:   # close the shards being read now (a pipe: URL's process) rather than at collection
        for it in its:
            it.close()


class EvalStream(IterableDataset):
    """One rank's val pass: yields ``(HostImages, labels, valid, stats)`` batches of ``chunk`` slots; worker
    ``w`` reads shards ``shards[w::W]`` and yields ``quotas[w]`` batches (its samples, then padding)."""

    def __init__(self, plan: StreamPlan, transform, mean: tuple, std: tuple, quotas: list):
        self.plan, self.quotas, self.mean, self.std = plan, quotas, tuple(mean), tuple(std)
        self.decoder = SampleDecoder(plan, transform)

    def _batch(self, raw, stats):
        """uint8 images (zeros where not valid), labels, valid."""
        b, size = self.plan.chunk, self.plan.img_size
        images = torch.zeros(b, 3, size, size, dtype=torch.uint8)
        labels, valid = torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.bool)
        items = [self.decoder.decode(*r, stats) for r in raw]
        good = [i for i, it in enumerate(items) if it is not None]
        if good:
            images[good] = self.decoder.augment([items[i][0] for i in good])
            labels[good] = torch.tensor([items[i][1] for i in good], dtype=torch.long)
            valid[good] = True
        return HostImages(images, self.mean, self.std), labels, valid

    def __iter__(self):
        p = self.plan
        w, nw = worker_slot()
        shards = list(p.streams[0][1])[w::nw]
        quota, ev = self.quotas[w], _Events()
        reader = SampleReader(p, shards, f"val worker {w}")
        samples = reader.samples(shards, ev)
        for _ in range(quota):
            stats = {"corrupt_skipped": 0}
            raw = list(itertools.islice(samples, p.chunk))   # short: its shards' end was checked
            ev.book(stats)
            yield (*self._batch(raw, stats), stats)
