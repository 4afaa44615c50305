"""Streaming training and evaluation data from webdataset shards (any URL webdataset opens).

One epoch on one rank is a single ordered *stream* of samples, defined only by
(seed, epoch, rank, world_size, keep set):

    shard sequence -> tar -> samples (undecoded) -> keep[uid] filter -> shuffle buffer -> batch index g

* partitioned: shards are assigned to ranks once (greedy by active sample count, the same on every
  rank); each epoch a rank reads its shards in an order drawn from (seed, epoch, rank). All ranks run
  ``batches_per_epoch = min over ranks floor(active_r / local_batch)`` batches (rounded down to
  ``batches_multiple``); the tail of a rank's shuffled stream beyond that is dropped for the epoch.
  With balanced shards and a batch dividing the counts, every sample is seen exactly once.
* resampled: shards are drawn with replacement (weighted by active samples) from (seed, epoch,
  rank); the stream never runs dry. ``batches_per_epoch = floor(N_active / (local_batch * world))``
  rounded down to ``batches_multiple``, or ``steps_per_epoch * batches_multiple`` if > 0.

Loader workers all read the rank's stream (tar bytes only: cheap next to decode) and worker ``w`` of
``W`` decodes and augments batches ``g`` with ``(g - skip) % W == w``; the DataLoader returns worker
batches round-robin, i.e. in order ``g``. A batch is processed stage by stage (decode all, crop all,
flip all, RandAugment all, stack, normalise, erase), and the augmentation RNGs (python ``random``,
numpy, torch) are seeded per (seed, epoch, rank, g, stage). So the batches depend on (seed, epoch,
rank, world_size, keep set) and NOT on the worker count.

Resume semantics: ``epoch_batches(epoch, skip_batches=k)`` yields exactly batches k..B-1 of what
``epoch_batches(epoch)`` yields (equal tensors): the stream is rebuilt and its first ``k * local_batch``
samples are passed over after the shuffle buffer, without decoding. The trainer must call it with the
same data config, world size, seed and keep set as the interrupted run; batches are counted per rank
(micro-batches, not optimizer steps).

Corrupt samples (``cfg.corrupt``): 'raise' errors naming shard and key; 'skip' counts them and fills
the slot with a copy of another sample of the same batch so shapes stay fixed; a truncated or
unreadable shard ends that shard (the partitioned stream then starts another pass over its shards
if it would run short). Evaluation streams the val split (no shuffle, no filter), shards split
across ranks; every rank yields the same number of batches and padding has ``valid=False``.
"""
from __future__ import annotations

import io
import itertools
import json
import math
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dsvit.data.shards import IMAGE_EXTS, INFO_NAME
from dsvit.data.transforms import (BatchNormalize, build_eraser, build_eval_transform,
                                   build_train_transform, image_stages, seed_rngs,
                                   stack_images)


def read_info(root: str) -> dict:
    path = os.path.join(root, INFO_NAME)
    try:
        if "://" in root or root.startswith("pipe:"):
            import webdataset as wds
            with wds.gopen(path) as f:
                info = json.loads(f.read())
        else:
            with open(path) as f:
                info = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: data.root must be a shard folder written by "
                                f"`dsvit shards` (or 'synthetic')") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rewrite the dataset with `dsvit shards ... --overwrite`") from None
    if not isinstance(info, dict) or "splits" not in info:
        raise ValueError(f"{path} has no 'splits'; it is not a dsvit/timm shard _info.json")
    info["root"] = root   # shard file names in _info.json are relative to it
    return info


def num_classes(info: dict) -> int:
    return int(info.get("num_classes") or len(info["class_names"]))


def _split_shards(cfg, info: dict, split: str):
    """(urls, lengths, uid_starts) of a split; cfg.shards (brace pattern/URLs) overrides the list."""
    if split not in info["splits"]:
        raise ValueError(f"split '{split}' not in {cfg.root}/{INFO_NAME} (has {sorted(info['splits'])})")
    s = info["splits"][split]
    starts = np.concatenate([[0], np.cumsum(s["shard_lengths"])[:-1]]).astype(np.int64)
    by_name = {f: (n, st) for f, n, st in zip(s["filenames"], s["shard_lengths"], starts)}
    if cfg.shards and split == cfg.train_split:
        from webdataset.shardlists import expand_urls
        urls = expand_urls(cfg.shards)
        missing = [u for u in urls if os.path.basename(u) not in by_name]
        if missing:
            raise ValueError(f"data.shards: {missing[0]} is not listed in {cfg.root}/{INFO_NAME}; "
                             f"per-shard counts are needed, so point data.root at its dataset folder")
        lengths = [by_name[os.path.basename(u)][0] for u in urls]
        starts = [by_name[os.path.basename(u)][1] for u in urls]
    else:
        urls = [os.path.join(info.get("root", cfg.root), f) for f in s["filenames"]]
        lengths = list(s["shard_lengths"])
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} shard(s) of split '{split}' are missing, e.g. {missing[0]}; restore them or "
            f"rewrite the dataset (`dsvit shards ... --overwrite`), then `dsvit shards verify`")
    return urls, np.asarray(lengths, np.int64), np.asarray(starts, np.int64)


def _balance(weights: np.ndarray, n_bins: int) -> list[list[int]]:
    """Greedy: largest shard first to the lightest bin; deterministic."""
    bins, load = [[] for _ in range(n_bins)], np.zeros(n_bins, np.int64)
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        b = int(np.argmin(load))
        bins[b].append(i)
        load[b] += weights[i]
    return [sorted(b) for b in bins]


def _tar_members(stream, url: str):
    """Yield (name, bytes) of regular files in a tar stream. A minimal ustar/pax/GNU reader, used
    instead of webdataset's ``tar_file_iterator`` + ``group_by_keys`` (tarfile-based): 9-15 vs 80-121
    us per CIFAR-10 sample (benchmarks/bench_loader_ablation.py), and every loader worker reads its rank's whole stream, so that would cost
    more than the JPEG decode. Raises EOFError if cut off."""
    long_name = None
    while True:
        header = stream.read(512)
        if len(header) < 512 or not header.strip(b"\0"):
            if header and header.strip(b"\0"):
                raise EOFError(f"{url}: truncated tar header")
            return
        size_field = header[124:136].strip(b"\0 ")
        size = int(size_field, 8) if size_field else 0
        kind = header[156:157]
        data = stream.read(size)
        if len(data) < size:
            raise EOFError(f"{url}: truncated member ({len(data)}/{size} bytes)")
        pad = -size % 512
        if pad and len(stream.read(pad)) < pad:
            raise EOFError(f"{url}: truncated padding")
        if kind == b"x":      # pax extended header: may carry a long path
            for rec in data.decode("utf-8", "replace").split("\n"):
                if " path=" in rec:
                    long_name = rec.split(" path=", 1)[1]
            continue
        if kind == b"L":      # GNU long name
            long_name = data.rstrip(b"\0").decode()
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue
        name = long_name or (header[345:500].rstrip(b"\0").decode() + "/" if header[345] else "") + \
            header[0:100].rstrip(b"\0").decode()
        long_name = None
        yield name, data


def iter_shard(url: str):
    """Yield (key, {ext: bytes}) from one tar shard, members grouped by key (webdataset rules)."""
    import webdataset as wds
    with wds.gopen(url) as stream:
        key, sample = None, {}
        for name, data in _tar_members(stream, url):
            d, base = os.path.split(name)
            k, _, ext = base.partition(".")
            k = f"{d}/{k}" if d else k
            if k != key and sample:
                yield key, sample
                sample = {}
            key = k
            sample[ext.lower()] = data
        if sample:
            yield key, sample


class _RankStream(IterableDataset):
    """One rank's epoch: yields (images, labels, uids_or_valid, stats) batches for this worker."""

    def __init__(self, plan: dict, transform, normalize, eraser, train: bool):
        self.plan, self.normalize, self.eraser, self.train = plan, normalize, eraser, train
        self.stages = image_stages(transform)

    def _passes(self):
        """Shard sequences, one per pass over the data; each pass is shuffled on its own."""
        p = self.plan
        if p["mode"] == "resampled":  # one endless pass
            rng = np.random.default_rng([p["seed"], p["epoch"], p["rank"], 7])
            prob = p["active"] / p["active"].sum()
            yield (int(i) for _ in itertools.count() for i in rng.choice(len(p["urls"]), size=64, p=prob))
            return
        for pas in range(1 << 30):  # a partitioned training stream only repeats if shards were unreadable
            order = list(p["shards"])
            if p["shuffle"]:
                order = [int(i) for i in np.random.default_rng([p["seed"], p["epoch"], p["rank"], pas]).permutation(order)]
            yield order
            if not self.train:
                return

    def _samples(self, shards, stats, report: bool):
        """Undecoded (uid, url, key, sample), filtered by keep before anything else."""
        p, keep = self.plan, self.plan["keep"]
        for i in shards:
            url = p["urls"][i]
            try:
                for key, sample in iter_shard(url):
                    try:
                        uid = int(key.rsplit("/", 1)[-1])
                    except ValueError:
                        raise ValueError(f"{url}: key '{key}' is not an integer uid; write shards with `dsvit shards`") from None
                    if keep is not None and not keep[uid]:
                        stats["filtered"] += report
                        continue
                    yield uid, url, key, sample
            except FileNotFoundError as e:
                raise FileNotFoundError(f"shard {url} is missing: {e}") from e
            except (EOFError, OSError) as e:
                if p["corrupt"] == "raise":
                    raise RuntimeError(f"shard {url} is truncated or unreadable: {e}") from e
                stats["corrupt_skipped"] += report

    def _stream(self, stats, report: bool):
        for pas, shards in enumerate(self._passes()):
            n = 0
            for item in self._shuffled(self._samples(shards, stats, report), pas):
                n += 1
                yield item
            if n == 0 and self.train:
                raise RuntimeError(f"rank {self.plan['rank']}: no readable samples in its shards")

    def _shuffled(self, it, pas: int):
        size, p = self.plan["shuffle_buffer"], self.plan
        if not (self.train and size > 1):
            yield from it
            return
        rng = np.random.default_rng([p["seed"], p["epoch"], p["rank"], 11, pas])
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
        ext = next((e for e in sample if e in IMAGE_EXTS), None)
        try:
            if ext is None:
                raise ValueError(f"no image member (has {sorted(sample)})")
            with Image.open(io.BytesIO(sample[ext])) as im:
                img = im.convert("RGB")
            return img, int(sample["cls"])
        except Exception as e:  # corrupt bytes, bad label
            if self.plan["corrupt"] == "raise":
                raise RuntimeError(f"corrupt sample: shard {url} key {key}: {type(e).__name__}: {e}") from e
            stats["corrupt_skipped"] += 1
            return None

    def _batch(self, raw, g, stats):
        """Decode, augment and collate batch ``g`` from its undecoded (uid, url, key, sample)s.

        Each stage runs over the whole batch before the next (decode all, crop all, ...): on small
        images, where Python and Pillow call overhead dominate, that is 1.4-1.6x faster than running
        the whole transform per image (benchmarks/bench_loader_ablation.py). Training RNGs are seeded per
        (seed, epoch, rank, batch, stage), so the batch does not depend on the loader's worker count."""
        items = [self._decode(uid, url, key, sample, stats) for uid, url, key, sample in raw]
        uids = [r[0] for r in raw]
        good = [i for i, it in enumerate(items) if it is not None]
        if not good:
            raise RuntimeError(f"every sample of a batch is corrupt (uids {uids[:8]}...); check the shards with `dsvit shards verify`")
        for n, i in enumerate([i for i, it in enumerate(items) if it is None]):
            items[i], uids[i] = items[good[n % len(good)]], uids[good[n % len(good)]]
        p = self.plan
        imgs = [img for img, _ in items]
        for k, stage in enumerate(self.stages):
            if self.train:
                seed_rngs(p["seed"], p["epoch"], p["rank"], g, k)
            imgs = [stage(x) for x in imgs]
        images = self.normalize(stack_images(imgs))
        if self.eraser is not None:
            seed_rngs(p["seed"], p["epoch"], p["rank"], g, len(self.stages))
            self.eraser(images)  # per sample, in place
        return images, torch.tensor([y for _, y in items], dtype=torch.long), uids

    def _emit(self, images, labels, third, stats):
        out = (images, labels, third, dict(stats))
        stats.update(corrupt_skipped=0, filtered=0)
        return out

    def __iter__(self):
        p = self.plan
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        b, n_batches, skip = p["batch"], p["n_batches"], p["skip"]
        stats = {"corrupt_skipped": 0, "filtered": 0}
        raw, n = [], 0
        for item in self._stream(stats, w == 0):
            g, n = n // b, n + 1
            if g >= n_batches:
                return
            if g < skip or (g - skip) % nw != w:
                continue
            raw.append(item)
            if len(raw) == b:
                images, labels, uids = self._batch(raw, g, stats)
                third = torch.tensor(uids, dtype=torch.long) if self.train else torch.ones(b, dtype=torch.bool)
                yield self._emit(images, labels, third, stats)
                raw = []
        if self.train:
            raise RuntimeError(f"rank {p['rank']}: training stream ended after {n} samples")
        # eval: pad this worker's partial batch, then emit its fully padded batches
        for g in range(n // b, n_batches):
            if (g - skip) % nw != w:
                continue
            size, m = p["img_size"], len(raw)
            images = torch.zeros(b, 3, size, size)
            labels = torch.zeros(b, dtype=torch.long)
            if raw:
                images[:m], labels[:m], _ = self._batch(raw, g, stats)
            valid = torch.arange(b) < m
            yield self._emit(images, labels, valid, stats)
            raw = []


def _loader(ds, workers: int):
    return DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None)


class TrainData:
    def __init__(self, cfg, info: dict, *, img_size: int, rank: int, world_size: int,
                 local_batch: int, seed: int, batches_multiple: int = 1):
        self.cfg, self.rank, self.world, self.batch = cfg, rank, world_size, local_batch
        self.seed, self.multiple, self.img_size = seed, max(1, batches_multiple), img_size
        self.urls, self.lengths, self.starts = _split_shards(cfg, info, cfg.train_split)
        self.num_samples = int(info["splits"][cfg.train_split]["num_samples"])
        if cfg.mode == "partitioned" and len(self.urls) < world_size:
            raise ValueError(
                f"data.mode=partitioned needs at least one shard per rank: {world_size} ranks but "
                f"{len(self.urls)} shards in {cfg.root}; reshard with `dsvit shards ... --shard-size "
                f"{max(1, self.num_samples // (world_size * 4))}` (4 shards per rank) or use data.mode=resampled")
        self.transform = build_train_transform(cfg, img_size)
        self.normalize, self.eraser = BatchNormalize(cfg.mean, cfg.std), build_eraser(cfg)
        self._counters = {"corrupt_skipped": 0, "filtered": 0}
        self.set_keep_set(None)

    def set_keep_set(self, keep):
        if keep is not None:
            keep = np.asarray(keep, dtype=bool)
            if keep.shape != (self.num_samples,):
                raise ValueError(f"keep set has shape {keep.shape}, expected ({self.num_samples},) train uids")
            cs = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
            active = cs[self.starts + self.lengths] - cs[self.starts]   # uids of a shard are contiguous
        else:
            active = self.lengths.copy()
        self.keep, self.active = keep, active
        m = self.multiple
        if self.cfg.mode == "partitioned":
            self.assign = _balance(active, self.world)
            per_rank = min(int(active[s].sum()) for s in self.assign)
            n = per_rank // self.batch
            if self.cfg.steps_per_epoch > 0:
                n = min(n, self.cfg.steps_per_epoch * m)
            where = f"the smallest rank's share ({per_rank} samples)"
        else:
            n = self.cfg.steps_per_epoch * m if self.cfg.steps_per_epoch > 0 else \
                int(active.sum()) // (self.batch * self.world)
            where = f"{int(active.sum())} active samples / ({self.batch} x {self.world} ranks)"
        self.batches_per_epoch = n // m * m
        if self.batches_per_epoch < 1:
            raise ValueError(f"not enough training data for one step: {where} gives {n} batches, need a "
                             f"multiple of {m}; lower train.batch_size or use more data")

    def _plan(self, epoch: int, skip: int) -> dict:
        return {"mode": self.cfg.mode, "urls": self.urls, "active": self.active, "keep": self.keep,
                "shards": self.assign[self.rank] if self.cfg.mode == "partitioned" else None,
                "shuffle": True, "seed": self.seed, "epoch": epoch, "rank": self.rank,
                "batch": self.batch, "n_batches": self.batches_per_epoch, "skip": skip,
                "shuffle_buffer": self.cfg.shuffle_buffer, "corrupt": self.cfg.corrupt,
                "img_size": self.img_size}

    def epoch_batches(self, epoch: int, skip_batches: int = 0):
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise ValueError(f"skip_batches={skip_batches} outside [0, {self.batches_per_epoch}]")
        ds = _RankStream(self._plan(epoch, skip_batches), self.transform, self.normalize, self.eraser, True)
        count = 0
        for images, labels, uids, stats in _loader(ds, self.cfg.workers):
            for k, v in stats.items():
                self._counters[k] += v
            count += 1
            yield images, labels, uids
        assert count == self.batches_per_epoch - skip_batches, (count, self.batches_per_epoch, skip_batches)

    def counters(self) -> dict:
        return dict(self._counters)


class EvalData:
    def __init__(self, cfg, info: dict, *, img_size: int, rank: int, world_size: int, local_batch: int):
        self.cfg, self.rank, self.batch, self.img_size = cfg, rank, local_batch, img_size
        self.urls, lengths, _ = _split_shards(cfg, info, cfg.val_split)
        self.assign = _balance(lengths, world_size)
        most = max(int(lengths[s].sum()) for s in self.assign)
        self.num_batches = math.ceil(most / local_batch)
        self.num_samples = int(lengths.sum())
        self.transform = build_eval_transform(cfg, img_size)
        self.normalize = BatchNormalize(cfg.mean, cfg.std)

    def batches(self):
        plan = {"mode": "partitioned", "urls": self.urls, "keep": None, "shards": self.assign[self.rank],
                "shuffle": False, "seed": 0, "epoch": 0, "rank": self.rank, "batch": self.batch,
                "n_batches": self.num_batches, "skip": 0, "shuffle_buffer": 0, "corrupt": self.cfg.corrupt,
                "img_size": self.img_size}
        ds = _RankStream(plan, self.transform, self.normalize, None, False)
        workers = min(self.cfg.workers, self.num_batches)
        for images, labels, valid, _ in _loader(ds, workers):
            yield images, labels, valid
