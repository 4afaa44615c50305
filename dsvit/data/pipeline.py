"""Streaming training and evaluation data from webdataset shards (any URL webdataset opens).

An epoch is read as ``S = data.streams`` virtual streams (``dsvit.data.stream``): global micro-batch
``g`` is chunk ``g`` (``B_micro / S`` samples) of every stream, in stream order, and rank ``r`` of
``R`` reads and decodes the chunks of its ``S/R`` streams. The batches therefore depend on (seed,
epoch, S, keep set) only: not on the world size, the node layout or the loader's worker count. The
rank's process reads its streams and ``data.workers`` persistent processes decode whole
micro-batches (``dsvit.data.loader``), so every shard byte is read once per epoch by the rank that
needs it (``tests/test_data_read_once.py`` counts the bytes) and the worker count is free. Batches
are uint8 ``HostImages`` (pinned on an accelerator), normalised and erased on the device
(``dsvit.data.device``): a quarter of the bytes of float32.

* partitioned: shards are dealt to the S streams once (greedy by active sample count); each epoch a
  stream reads its shards in an order drawn from (seed, epoch, stream). An epoch is
  ``min over streams floor(active_s / chunk)`` micro-batches (rounded down to ``batches_multiple``):
  every sample is seen at most once, and exactly once when the streams' shares are equal multiples of
  the chunk; a stream's tail beyond that is dropped for the epoch. Needs at least S shards.
* resampled: each stream draws shards with replacement (weighted by active samples) from (seed,
  epoch, stream); streams never run dry. An epoch is ``floor(N_active / B_micro)`` micro-batches
  (rounded down to ``batches_multiple``), or ``steps_per_epoch * batches_multiple`` if > 0: the same
  number of samples as one pass over the data, drawn at random.

In both modes an epoch has the same length and the same global batches at any world size (with S
fixed): only which rank decodes which chunk changes. With ``data.repeated_aug = R`` each stream
emits every sample R times in a row (``dsvit.data.stream``): the same micro-batch count, so an
epoch sees 1/R of the distinct samples, each R times, as DeiT's repeated augmentation does.

Resume semantics: ``epoch_batches(epoch, skip_batches=k)`` yields exactly batches k..B-1 of what
``epoch_batches(epoch)`` yields (equal tensors): each stream is rebuilt and its first ``k * chunk``
samples are passed over after its shuffle buffer, without decoding. Batches are counted in
micro-batches (not optimizer steps); with the same global batch and grad_accum they are the same on
any world size, so a run resumed on another number of ranks continues with the very batches it
would have trained on. ``epoch_batches(epoch, k, num_batches=n)`` (a planned epoch shorter than
``batches_per_epoch``) yields batches k..n-1 of that same stream, cut after batch n-1.

Damaged data (``cfg.corrupt``). Every shard's sample count is checked against ``_info.json`` when
a stream reaches its end; a shard cut off (at a member boundary or not), empty, or holding garbage
where a tar header should be is *short*. 'raise' errors naming the shard (and key or byte offset),
what it holds against the index, and what to do. 'skip' fills a corrupt sample's slot with a copy
of another sample of the rank's micro-batch (shapes stay fixed), and reads on past a short shard (a
partitioned stream starts another pass over its shards if it would run short), so the epoch keeps
its length; both are counted, in samples and per epoch (``TrainData.counters()``), and a short
shard is logged by name. Evaluation streams the val split (no shuffle, no filter), shards split
across ranks and then across each rank's workers; every rank yields the same number of batches and
padding has ``valid=False``; with 'skip', corrupt val samples are ``valid=False`` too, so the
evaluated count shows what is missing, and ``EvalData.counters()`` says why.

Modules: this one lists shards and sizes epochs (``TrainData``, ``EvalData``); ``.stream`` reads the
streams; ``.loader`` runs the reader thread and the workers; ``.tar_reader`` reads the tars.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from dsvit.config import check_streams
from dsvit.data.shards import INFO_NAME, check_info
from dsvit.data.loader import READ_AHEAD, MicroBatchDecoder, ReadAhead, TaskFeed, eval_loader, train_loader
from dsvit.data.stream import STREAM_COUNTERS, EvalStream, StreamPlan, decode_image, read_micro_batches
from dsvit.data.tar_reader import iter_shard
from dsvit.data.transforms import BatchNormalize, build_eval_transform, image_stages, stack_images
from dsvit.errors import ConfigError, MissingFileError

log = logging.getLogger("dsvit.data")
TRAIN_COUNTERS = ("corrupt_skipped",) + STREAM_COUNTERS
EVAL_COUNTERS = ("corrupt_skipped", "short_shards", "short_shard_missing", "samples_listed", "samples_evaluated")


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
        raise MissingFileError(f"{path} not found: data.root must be a shard folder written by "
                                f"`dsvit shards` (or 'synthetic')") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); rewrite the dataset with `dsvit shards ... --overwrite`") from None
    check_info(info, path)
    info["root"] = root   # shard file names in _info.json are relative to it
    return info


def resampled_batches(active_samples: int, global_micro_batch: int, steps_per_epoch: int, multiple: int) -> int:
    """Micro-batches per rank of an epoch (resampled-mode rule), before rounding down to ``multiple``."""
    return steps_per_epoch * multiple if steps_per_epoch > 0 else active_samples // global_micro_batch


def num_classes(info: dict) -> int:
    return int(info.get("num_classes") or len(info["class_names"]))


def _split_shards(cfg, info: dict, split: str):
    """(urls, lengths, uid_starts) of a split; cfg.shards (brace pattern/URLs) overrides the list."""
    if split not in info["splits"]:
        raise ConfigError(f"split '{split}' not in {cfg.root}/{INFO_NAME} (has {sorted(info['splits'])})")
    s = info["splits"][split]
    starts = np.concatenate([[0], np.cumsum(s["shard_lengths"])[:-1]]).astype(np.int64)
    by_name = {f: (n, st) for f, n, st in zip(s["filenames"], s["shard_lengths"], starts)}
    if cfg.shards and split == cfg.train_split:
        from webdataset.shardlists import expand_urls
        urls = expand_urls(cfg.shards)
        missing = [u for u in urls if os.path.basename(u) not in by_name]
        if missing:
            raise ConfigError(f"data.shards: {missing[0]} is not listed in {cfg.root}/{INFO_NAME}; "
                             f"per-shard counts are needed, so point data.root at its dataset folder")
        lengths = [by_name[os.path.basename(u)][0] for u in urls]
        starts = [by_name[os.path.basename(u)][1] for u in urls]
    else:
        urls = [os.path.join(info.get("root", cfg.root), f) for f in s["filenames"]]
        lengths = list(s["shard_lengths"])
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        raise MissingFileError(
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


class TrainData:
    def __init__(self, cfg, info: dict, *, img_size: int, rank: int, world_size: int,
                 local_batch: int, seed: int, batches_multiple: int = 1):
        self.cfg, self.rank, self.world, self.batch = cfg, rank, world_size, local_batch
        self.seed, self.multiple, self.img_size = seed, max(1, batches_multiple), img_size
        self.urls, self.lengths, self.starts = _split_shards(cfg, info, cfg.train_split)
        self.num_samples = int(info["splits"][cfg.train_split]["num_samples"])
        self.classes = num_classes(info)   # every label is checked against it
        self.streams = streams = cfg.streams
        check_streams(streams, world_size, local_batch * world_size)
        self.chunk = local_batch * world_size // streams
        per_rank = streams // world_size
        self.my_streams = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.workers = max(0, cfg.workers)   # decode processes; the rank's process reads the streams
        if cfg.mode == "partitioned" and len(self.urls) < streams:
            raise ConfigError(
                f"data.mode=partitioned deals whole shards to data.streams={streams} streams, but "
                f"{cfg.root} has {len(self.urls)} shards; reshard with `dsvit shards ... --shard-size "
                f"{max(1, self.num_samples // (streams * 4))}` (4 shards per stream), lower data.streams "
                f"(a multiple of the world size {world_size}) or use data.mode=resampled")
        self.normalize = BatchNormalize(cfg.mean, cfg.std)
        self.augmentation = (cfg.auto_augment, cfg.reprob, img_size)
        self._counters = dict.fromkeys(TRAIN_COUNTERS, 0)
        self.set_keep_set(None)
        # made at the first epoch (its workers live as long as this object); see epoch_batches
        self._feed, self._loader, self._reading = TaskFeed(), None, 0

    def set_augmentation(self, auto_augment: str, reprob: float) -> None:
        """Train with another RandAugment policy string and random-erasing probability from the next
        ``epoch_batches`` call on (a plugin's per-stage regularisation); the config is not changed.
        The policy travels with each micro-batch to the workers, which build its transform once."""
        self.augmentation = (auto_augment, float(reprob), self.augmentation[2])

    def set_decode_size(self, size: int) -> None:
        """Crop training images to ``size`` px from the next ``epoch_batches`` call on (a plugin
        training at a lower input resolution): the random resized crop draws its box from the
        source image whatever the output size, so the crops are those of the full size, resampled
        once to ``size`` instead of twice (to the full size, then down on the device), and
        augmentation and the copy to the device work on fewer pixels. Evaluation is unchanged."""
        if not 0 < size <= self.img_size:
            raise ValueError(f"decode size {size} must be in [1, {self.img_size}] (the model's input size)")
        self.augmentation = self.augmentation[:2] + (int(size),)

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
            self.assign = _balance(active, self.streams)
            smallest = min(int(active[s].sum()) for s in self.assign)
            n = smallest // self.chunk
            if self.cfg.steps_per_epoch > 0:
                n = min(n, self.cfg.steps_per_epoch * m)
            where = f"the smallest stream's share ({smallest} samples, {self.chunk} per micro-batch)"
        else:
            n = resampled_batches(int(active.sum()), self.batch * self.world, self.cfg.steps_per_epoch, m)
            where = f"{int(active.sum())} active samples / ({self.batch} x {self.world} ranks)"
        self.batches_per_epoch = n // m * m
        if self.batches_per_epoch < 1:
            raise ConfigError(f"not enough training data for one step: {where} gives {n} batches, need a "
                             f"multiple of {m}; lower train.batch_size or use more data")

    def batches_for(self, active_samples: int) -> int:
        """Micro-batches per rank of an epoch of ``active_samples`` samples, by the resampled-mode
        rule (in either mode): what a data plugin's epoch plan turns into."""
        m = self.multiple
        return resampled_batches(active_samples, self.batch * self.world, self.cfg.steps_per_epoch, m) // m * m

    def _plan(self, epoch: int, skip_batches: int, num_batches: Optional[int] = None) -> StreamPlan:
        partitioned = self.cfg.mode == "partitioned"
        return StreamPlan(
            mode=self.cfg.mode, urls=self.urls, lengths=self.lengths, keep=self.keep, active=self.active,
            streams=tuple((sid, self.assign[sid] if partitioned else None) for sid in self.my_streams),
            seed=self.seed, epoch=epoch, chunk=self.chunk,
            num_batches=self.batches_per_epoch if num_batches is None else num_batches,
            skip_batches=skip_batches, shuffle_buffer=self.cfg.shuffle_buffer, corrupt=self.cfg.corrupt,
            img_size=self.img_size, repeats=self.cfg.repeated_aug, starts=self.starts, num_classes=self.classes)

    def epoch_batches(self, epoch: int, skip_batches: int = 0, num_batches: Optional[int] = None):
        """Batches skip_batches..num_batches-1 of the epoch (default: all batches_per_epoch). A
        shorter epoch is the head of the full one: the stream is the same, only cut earlier."""
        if num_batches is None:
            num_batches = self.batches_per_epoch
        elif not 0 <= num_batches <= self.batches_per_epoch:
            raise ValueError(f"num_batches={num_batches} must be in [0, batches_per_epoch="
                             f"{self.batches_per_epoch}] (this epoch's batches per rank with the current keep set)")
        if not 0 <= skip_batches <= num_batches:
            raise ValueError(f"skip_batches={skip_batches} outside [0, {num_batches}]")
        self._counters = dict.fromkeys(TRAIN_COUNTERS, 0)   # per epoch
        self._reading += 1
        reading, count = self._reading, 0
        tasks = ReadAhead(read_micro_batches(self._plan(epoch, skip_batches, num_batches), self.augmentation),
                          READ_AHEAD)
        try:
            batches = self._epoch_loader(tasks)
            while True:
                if self.workers and reading != self._reading:   # before taking a batch of the newer epoch
                    raise RuntimeError("another epoch_batches() of this TrainData has started since: its "
                                       "persistent loader serves one epoch at a time; read the newest one")
                try:
                    images, labels, uids, stats = next(batches)
                except StopIteration:
                    break
                for url, got, listed, why in stats.pop("short", ()):
                    log.warning("epoch %d rank %d: shard %s delivered %d of the %d samples %s lists (%s); the "
                                "epoch is filled from the other shards (counted as short_shard_missing). "
                                "Re-create it (`dsvit shards verify %s` lists the damaged shards)",
                                epoch, self.rank, url, got, listed, INFO_NAME, why, os.path.dirname(url) or ".")
                for k, v in stats.items():
                    self._counters[k] += v
                count += 1
                yield images, labels, uids
        finally:
            tasks.close()
        assert count == num_batches - skip_batches, (count, num_batches, skip_batches)

    def _epoch_loader(self, tasks: ReadAhead):
        """The DataLoader over this epoch's read tasks. With workers it is made once and kept (persistent
        workers); without, made per epoch. Either way torch's global RNG gives one draw per epoch, as
        when every epoch made its own DataLoader (its iterator draws the workers' base seed there):
        dropout and drop-path, and so every loss, stay what they were."""
        self._feed.tasks = tasks
        if self.workers == 0:
            return iter(train_loader(MicroBatchDecoder(self.cfg, self._decoder_plan(), self.rank), self._feed, 0))
        if self._loader is None:
            self._loader = train_loader(MicroBatchDecoder(self.cfg, self._decoder_plan(), self.rank),
                                        self._feed, self.workers)
        else:
            torch.empty((), dtype=torch.int64).random_()   # the draw a new DataLoader iterator would make
        return iter(self._loader)

    def _decoder_plan(self) -> StreamPlan:
        """What the decode workers need of the plan: no keep set (filtered by the reader), no epoch."""
        return dataclasses.replace(self._plan(0, 0), keep=None, active=None)

    def images_by_uid(self, uids):
        """Training samples ``uids`` decoded with the eval transform, normalised float [n, 3, H, W] in
        the order given. Reads only the shards holding them (a shard's uids are contiguous) and each
        only up to its last wanted uid: for occasional looks (a plugin's image grid), not training."""
        want = np.asarray(uids, np.int64).reshape(-1)
        ends = self.starts + self.lengths
        found = {}
        for i in np.flatnonzero(((want[:, None] >= self.starts) & (want[:, None] < ends)).any(0)):
            need = set(want[(want >= self.starts[i]) & (want < ends[i])].tolist())
            for key, sample in iter_shard(self.urls[i]):
                uid = int(key.rsplit("/", 1)[-1])
                if uid in need:
                    try:
                        found[uid] = decode_image(sample)
                    except Exception as e:
                        raise ValueError(f"{self.urls[i]}: sample {key}: {e}") from e
                    need.discard(uid)
                    if not need:
                        break
        missing = sorted(set(want.tolist()) - set(found))
        if missing:
            raise KeyError(f"training uids {missing[:8]} are not in the shards of {self.cfg.root}")
        imgs = [found[u] for u in want.tolist()]
        for stage in image_stages(build_eval_transform(self.cfg, self.img_size)):
            imgs = [stage(x) for x in imgs]
        return self.normalize(stack_images(imgs))

    def counters(self) -> dict:
        """This rank's counts for the epoch being read (reset when ``epoch_batches`` starts), in
        samples: corrupt_skipped (did not decode; their slots got copies of other samples of the
        batch), filtered (passed over by the keep set), short_shards / short_shard_missing (shards
        holding fewer samples than _info.json lists, each once per epoch, and the samples they lack;
        the stream reads on to keep the epoch's length). Stream counts (all but corrupt_skipped)
        cover the whole epoch after a mid-epoch resume too; corrupt_skipped only the decoded batches."""
        return dict(self._counters)


class EvalData:
    def __init__(self, cfg, info: dict, *, img_size: int, rank: int, world_size: int, local_batch: int):
        self.cfg, self.rank, self.batch, self.img_size = cfg, rank, local_batch, img_size
        self.urls, self.lengths, self.starts = _split_shards(cfg, info, cfg.val_split)
        self.classes = num_classes(info)
        self.assign = _balance(self.lengths, world_size)
        # a rank's shards are dealt to its workers; each pads its last batch, and worker 0 adds the
        # padding batches that give every rank the same count
        nw = max(1, cfg.workers)
        per_worker = [[math.ceil(int(self.lengths[a[w::nw]].sum()) / local_batch) for w in range(nw)]
                      for a in self.assign]
        self.num_batches = max(sum(q) for q in per_worker)
        self.quotas = per_worker[rank]
        self.quotas[0] += self.num_batches - sum(self.quotas)
        self.num_samples = int(self.lengths.sum())
        self.transform = build_eval_transform(cfg, img_size)
        self._counters = dict.fromkeys(EVAL_COUNTERS, 0)

    def batches(self, max_batches: Optional[int] = None):
        """This rank's val batches (HostImages, labels, valid). Samples that are missing (short shards)
        or corrupt (``data.corrupt=skip``) are not evaluated: a corrupt one is a valid=False slot.
        Each pass resets ``counters()``; a shortfall is logged as a warning at the end. ``max_batches``:
        the first ones only (``train.eval_samples``; a random subset of a split ``dsvit shards`` shuffled)."""
        part = max_batches is not None and max_batches < self.num_batches
        listed = 0 if part else int(self.lengths[self.assign[self.rank]].sum())
        self._counters = dict.fromkeys(EVAL_COUNTERS, 0)
        self._counters["samples_listed"] = listed
        plan = StreamPlan(mode="partitioned", urls=self.urls, lengths=self.lengths, keep=None, active=None,
                          streams=((0, self.assign[self.rank]),), seed=0, epoch=0, chunk=self.batch,
                          num_batches=self.num_batches, skip_batches=0, shuffle_buffer=0,
                          corrupt=self.cfg.corrupt, img_size=self.img_size, train=False, starts=self.starts,
                          num_classes=self.classes)
        ds = EvalStream(plan, self.transform, self.cfg.mean, self.cfg.std, self.quotas)
        short = []
        for images, labels, valid, stats in itertools.islice(eval_loader(ds, self.cfg.workers),
                                                             max_batches if part else None):
            short += stats.pop("short", ())
            for k, v in stats.items():
                if k in self._counters:   # not 'filtered': no keep set here
                    self._counters[k] += v
            self._counters["samples_evaluated"] += int(valid.sum())
            yield images, labels, valid
        c = self._counters
        if not part and c["samples_evaluated"] < listed:
            why = [f"shard {u} holds {g} of {n} ({w})" for u, g, n, w in short]
            why += [f"{c['corrupt_skipped']} corrupt samples left out"] if c["corrupt_skipped"] else []
            log.warning("val rank %d: evaluated %d of the %d samples %s lists for its shards: %s. "
                        "Re-create the damaged shards (`dsvit shards verify %s` lists them)",
                        self.rank, c["samples_evaluated"], listed, INFO_NAME, "; ".join(why),
                        os.path.dirname(self.urls[0]) or ".")

    def counters(self) -> dict:
        """This rank's counts for the last ``batches()`` pass, in samples: corrupt_skipped (did not
        decode; left out, valid=False), short_shards / short_shard_missing (val shards holding fewer
        samples than _info.json lists, and the samples they lack), samples_listed (what _info.json
        lists for this rank's shards) and samples_evaluated (valid samples yielded). Sum over ranks
        (``dsvit.engine.meter.log_data_counters`` does) to compare with evaluate_model's "samples"."""
        return dict(self._counters)


def stream_data(cfg, world, run_dir) -> tuple:
    """(TrainData, EvalData, number of classes) of a run; ``data.root=synthetic`` makes the
    embedded dataset under ``run_dir/data`` first (rank 0 writes, the others wait)."""
    d, root = cfg.data, cfg.data.root
    if root == "synthetic":
        from dsvit.data.synthetic import ensure_synthetic
        root = str(Path(run_dir) / "data")
        if world.rank == 0:
            ensure_synthetic(root, d.synthetic_train, d.synthetic_val, seed=0)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    info, t = read_info(root), cfg.train
    common = dict(img_size=cfg.model.img_size, rank=world.rank, world_size=world.world_size)
    train = TrainData(d, info, local_batch=t.batch_size // (world.world_size * t.grad_accum),
                      seed=cfg.run.seed, batches_multiple=t.grad_accum, **common)
    ev = EvalData(d, info, local_batch=t.eval_batch_size // world.world_size, **common)
    return train, ev, num_classes(info)
