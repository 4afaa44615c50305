"""One rank's epoch as a DataLoader dataset: the stream described in ``dsvit.data.pipeline``.

``StreamPlan`` is everything that defines the stream (no state); ``RankStream`` reads it, filters,
shuffles, and decodes/augments the batches of its loader worker. ``TrainData`` and ``EvalData``
(``dsvit.data.pipeline``) build the plans.

Counters. Every batch carries the counts of what happened while its samples were read (stream
events: ``filtered``, ``short_shards``, ``short_shard_missing``, and the short shards themselves
under ``short``) and decoded (``corrupt_skipped``). A stream event is booked on the batch whose
sample was being read when it happened (at the earliest on the first batch decoded, so a resumed
epoch books the events of the batches it passes over), and only the worker that decodes that batch
reports it: the counts do not depend on the worker count. Each shard is checked against the
sample count ``_info.json`` lists when its end is reached; a short shard counts once per stream.
"""
from __future__ import annotations

import io
import itertools
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from dsvit.data.shards import IMAGE_EXTS, INFO_NAME
from dsvit.data.tar_reader import CorruptShardError, iter_shard
from dsvit.data.transforms import image_stages, seed_rngs, stack_images

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


@dataclass(frozen=True)
class StreamPlan:
    """What one rank's stream for one epoch is made of."""
    mode: str                      # "partitioned" or "resampled"
    urls: list                     # every shard of the split
    keep: Optional[np.ndarray]     # bool per uid, None: keep all
    shards: Optional[list]         # partitioned: this rank's shard indices into urls
    shuffle: bool                  # partitioned: shuffle this rank's shard order each pass
    seed: int
    epoch: int
    rank: int
    local_batch: int
    num_batches: int               # batches the stream yields, counting the skipped ones
    skip_batches: int              # leading batches passed over without decoding (resume)
    shuffle_buffer: int            # samples; <= 1: no shuffle buffer
    corrupt: str                   # "raise" or "skip"
    img_size: int                  # size of eval padding batches
    lengths: np.ndarray            # samples per shard (of urls) as _info.json lists them
    active: Optional[np.ndarray] = None  # resampled: active samples per shard (draw weights)


class _Events:
    """Stream events since they were last booked on a batch."""
    __slots__ = ("counts", "short", "dirty")

    def __init__(self):
        self.clear()

    def clear(self):
        self.counts, self.short, self.dirty = dict.fromkeys(STREAM_COUNTERS, 0), [], False

    def add(self, name: str, k: int = 1):
        self.counts[name] += k
        self.dirty = True

    def move_to(self, other: "_Events"):
        for k, v in self.counts.items():
            other.counts[k] += v
        other.short += self.short
        other.dirty = True
        self.clear()


class RankStream(IterableDataset):
    """One rank's epoch: yields (images, labels, uids_or_valid, stats) batches for this worker;
    stats: {counter: int} and "short": [(url, samples read, samples listed, why)]."""

    def __init__(self, plan: StreamPlan, transform, normalize, eraser, train: bool):
        self.plan, self.normalize, self.eraser, self.train = plan, normalize, eraser, train
        self.stages = image_stages(transform)

    def _passes(self):
        """Shard sequences, one per pass over the data; each pass is shuffled on its own."""
        p = self.plan
        if p.mode == "resampled":  # one endless pass
            rng = np.random.default_rng([p.seed, p.epoch, p.rank, 7])
            prob = p.active / p.active.sum()
            yield (int(i) for _ in itertools.count() for i in rng.choice(len(p.urls), size=64, p=prob))
            return
        for pas in range(1 << 30):  # a partitioned training stream only repeats if shards come up short
            order = list(p.shards)
            if p.shuffle:
                order = [int(i) for i in np.random.default_rng([p.seed, p.epoch, p.rank, pas]).permutation(order)]
            yield order
            if not self.train:
                return

    def _samples(self, shards, ev: _Events, short: dict, barren: set):
        """Undecoded (uid, url, key, sample), filtered by keep before anything else; each shard's
        count is checked against _info.json at its end."""
        p, keep = self.plan, self.plan.keep
        for i in shards:
            url, got, kept, err = p.urls[i], 0, 0, None
            try:
                for key, sample in iter_shard(url):
                    got += 1
                    try:
                        uid = int(key.rsplit("/", 1)[-1])
                    except ValueError:
                        raise ValueError(f"{url}: key '{key}' is not an integer uid; write shards with `dsvit shards`") from None
                    if keep is not None and not keep[uid]:
                        ev.add("filtered")
                        continue
                    kept += 1
                    yield uid, url, key, sample
            except FileNotFoundError as e:
                raise FileNotFoundError(f"shard {url} is missing: {e}") from e
            except (EOFError, OSError) as e:  # CorruptShardError: cut off mid-member, not a tar
                err = e
            if got < p.lengths[i] or err is not None:
                self._short(i, got, err, ev, short)
            if not kept and self.train:
                barren.add(i)
                self._check_barren(barren, short)

    def _short(self, i: int, got: int, err, ev: _Events, short: dict):
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
            raise RuntimeError(f"{what}; {recreate_hint(url)}") from err
        if i not in short and got < listed:  # once per stream: a partitioned pass may read it again
            short[i] = (url, got, listed, why)
            ev.add("short_shards")
            ev.add("short_shard_missing", listed - got)
            ev.short.append(short[i])

    def _check_barren(self, barren: set, short: dict):
        """Raise if every shard the stream can read has been found to deliver no sample."""
        p = self.plan
        readable = p.shards if p.mode != "resampled" else np.flatnonzero(p.active > 0).tolist()
        if barren.issuperset(readable):
            eg = next(iter(short.values()), None)
            example = f", e.g. {eg[0]} holds {eg[1]} of {eg[2]} samples" if eg else ""
            raise RuntimeError(f"rank {p.rank}: none of its {len(readable)} shards delivers a sample it "
                               f"may use{example}; {recreate_hint(p.urls[readable[0]])}")

    def _stream(self, ev, report: bool = True):
        """The rank's ordered stream of undecoded samples; events go to ``ev`` (an _Events; anything
        else, and ``report``, as the benchmarks pass them: events are dropped)."""
        ev = ev if isinstance(ev, _Events) else _Events()
        short, barren = {}, set()
        for pas, shards in enumerate(self._passes()):
            yield from self._shuffled(self._samples(shards, ev, short, barren), pas)

    def _shuffled(self, it, pas: int):
        p = self.plan
        size = p.shuffle_buffer
        if not (self.train and size > 1):
            yield from it
            return
        rng = np.random.default_rng([p.seed, p.epoch, p.rank, 11, pas])
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

    def _decode(self, uid, url, key, sample, stats):
        """Bytes -> (RGB PIL image, label); None for a corrupt sample in skip mode."""
        try:
            return decode_image(sample), int(sample["cls"])
        except Exception as e:  # corrupt bytes, bad label
            if self.plan.corrupt == "raise":
                raise RuntimeError(f"corrupt sample: shard {url} key {key}: {type(e).__name__}: {e}; "
                                   f"{recreate_hint(url, 'corrupt samples', 'corrupt_skipped')}") from e
            stats["corrupt_skipped"] += 1
            return None

    def _augment(self, imgs, g):
        p = self.plan
        for k, stage in enumerate(self.stages):
            if self.train:
                seed_rngs(p.seed, p.epoch, p.rank, g, k)
            imgs = [stage(x) for x in imgs]
        return self.normalize(stack_images(imgs))

    def _batch(self, raw, g, stats):
        """Decode, augment and collate training batch ``g`` from its undecoded (uid, url, key, sample)s;
        a corrupt sample's slot gets a copy of another sample of the batch.

        Each stage runs over the whole batch before the next (decode all, crop all, ...): on small
        images, where Python and Pillow call overhead dominate, that is 1.4-1.6x faster than running
        the whole transform per image (benchmarks/bench_loader_ablation.py). Training RNGs are seeded per
        (seed, epoch, rank, batch, stage), so the batch does not depend on the loader's worker count."""
        items = [self._decode(uid, url, key, sample, stats) for uid, url, key, sample in raw]
        uids = [r[0] for r in raw]
        good = [i for i, it in enumerate(items) if it is not None]
        if not good:
            raise RuntimeError(f"every sample of a batch is corrupt (shard {raw[0][1]}, uids {uids[:8]}...); "
                               f"check the shards with `dsvit shards verify {os.path.dirname(raw[0][1]) or '.'}`")
        for n, i in enumerate([i for i, it in enumerate(items) if it is None]):
            items[i], uids[i] = items[good[n % len(good)]], uids[good[n % len(good)]]
        images = self._augment([img for img, _ in items], g)
        if self.eraser is not None:
            p = self.plan
            seed_rngs(p.seed, p.epoch, p.rank, g, len(self.stages))
            self.eraser(images)  # per sample, in place
        return images, torch.tensor([y for _, y in items], dtype=torch.long), uids

    def _eval_batch(self, raw, g, stats):
        """An eval batch of ``local_batch`` slots: the decoded samples of ``raw``, valid; corrupt
        samples (skip mode) and padding are zeros with valid=False."""
        b, size = self.plan.local_batch, self.plan.img_size
        images, labels = torch.zeros(b, 3, size, size), torch.zeros(b, dtype=torch.long)
        valid = torch.zeros(b, dtype=torch.bool)
        items = [self._decode(uid, url, key, sample, stats) for uid, url, key, sample in raw]
        good = [i for i, it in enumerate(items) if it is not None]
        if good:
            images[good] = self._augment([items[i][0] for i in good], g)
            labels[good] = torch.tensor([items[i][1] for i in good], dtype=torch.long)
            valid[good] = True
        return images, labels, valid

    @staticmethod
    def _emit(batch, stats, booked: dict, g: int):
        ev = booked.pop(g, None)
        out = dict(stats)
        if ev is not None:
            out.update(ev.counts)
            out["short"] = ev.short
        stats.update(corrupt_skipped=0)
        return (*batch, out)

    def __iter__(self):
        p = self.plan
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        b, n_batches, skip = p.local_batch, p.num_batches, p.skip_batches
        stats = {"corrupt_skipped": 0}   # of this worker's batch being decoded
        ev, booked = _Events(), {}       # stream events not yet booked; this worker's booked, by batch

        def book(g):
            g = max(g, skip)
            if (g - skip) % nw == w:
                ev.move_to(booked.setdefault(g, _Events()))
            else:
                ev.clear()
        raw, n = [], 0
        for item in self._stream(ev):
            g, n = n // b, n + 1
            if g >= n_batches:
                return
            if ev.dirty:
                book(g)
            if g < skip or (g - skip) % nw != w:
                continue
            raw.append(item)
            if len(raw) == b:
                if self.train:
                    images, labels, uids = self._batch(raw, g, stats)
                    yield self._emit((images, labels, torch.tensor(uids, dtype=torch.long)), stats, booked, g)
                else:
                    yield self._emit(self._eval_batch(raw, g, stats), stats, booked, g)
                raw = []
        if self.train:
            raise RuntimeError(f"rank {p.rank}: training stream ended after {n} samples")
        if ev.dirty and n // b < n_batches:   # events at the end of the stream: the partial batch
            book(n // b)
        # eval: this worker's partial batch (padded), then its fully padded batches
        for g in range(n // b, n_batches):
            if (g - skip) % nw == w:
                yield self._emit(self._eval_batch(raw, g, stats), stats, booked, g)
                raw = []
