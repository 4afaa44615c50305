"""Loader processes: the rank's process reads, any number of workers decode.

Training. The rank's process reads its streams in a thread (``ReadAhead`` over
``stream.read_micro_batches``: tar parsing, keep filter, shuffle buffers; no decoding) and hands
each micro-batch's undecoded samples to the DataLoader as the "index" of a map-style dataset
(``TaskFeed`` is the sampler, ``MicroBatchDecoder`` the dataset). The DataLoader deals these tasks
round-robin to ``data.workers`` processes and returns the results in task order, so:

* the worker count is free: it neither has to divide the rank's streams nor be at most their number
  (before, a worker owned whole streams: with 8 streams on an 8-GPU node each rank had one worker);
* every shard byte is still read once per epoch per rank (by the reader, whatever the workers);
* a micro-batch is decoded by one worker with the RNGs seeded per (seed, epoch, stream, g, stage),
  so the batches do not depend on the worker count (tests/test_data_workers.py);
* workers are persistent (started once per run, not per epoch): a task carries what changes
  between epochs (epoch, ``set_augmentation``'s policy, ``set_decode_size``'s size), and each worker
  builds the transform of an augmentation once;
* batches are uint8 ``HostImages``, pinned by the DataLoader's thread when an accelerator is present.

The reader thread exists for latency, not throughput: a shard opened from object storage
(``pipe:``) blocks it, not the training loop, while the DataLoader still has tasks in hand.
Evaluation keeps its workers per pass (one pass per evaluation; persistent ones would hold a second
set of processes per rank for the whole run) and reads in them (``stream.EvalStream``).
"""
from __future__ import annotations

import dataclasses
import os
import queue
import signal
import threading

import torch
from torch.utils.data import DataLoader, Dataset

from dsvit.data.device import HostImages, erase_boxes
from dsvit.data.stream import ReadTask, SampleDecoder, StreamPlan
from dsvit.data.transforms import build_eraser, build_train_transform, seed_rngs, torch_seed
from dsvit.errors import DataError

PREFETCH_PER_WORKER = 2   # tasks a worker holds: enough to keep it busy, each one a micro-batch of raw bytes
READ_AHEAD = 2            # micro-batches the reader thread reads beyond those the DataLoader holds


def pin_batches() -> bool:
    """Pin host batches when there is an accelerator to copy them to (non-blocking copies). The
    DataLoader's pinning thread works on the device current when its iterator is made: the engine
    has set the rank's device by then (the first epoch, an evaluation), so no rank touches GPU 0."""
    accelerator = getattr(torch, "accelerator", None)   # torch >= 2.6; before it CUDA was the one
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def as_is(item):
    """The DataLoader's collate function: the dataset's items are batches already."""
    return item


class MicroBatchDecoder(Dataset):
    """Map-style dataset whose indices are ``ReadTask``s: one micro-batch decoded and augmented.
    ``plan``: the run's stream plan without a keep set (the epoch comes with each task)."""

    def __init__(self, cfg, plan: StreamPlan, rank: int):
        self.cfg, self.plan, self.rank = cfg, plan, rank
        self.augmentations = {}

    def augmentation(self, key: tuple):
        """(transform, eraser) of (auto_augment, reprob, size), built once per worker."""
        if key not in self.augmentations:
            aug = dataclasses.replace(self.cfg, auto_augment=key[0], reprob=key[1])
            self.augmentations[key] = (build_train_transform(aug, key[2]), build_eraser(aug))
        return self.augmentations[key]

    def __getitem__(self, task: ReadTask):
        """(HostImages, labels, uids, stats) of the task's micro-batch; stats: the reader's stream
        events plus corrupt_skipped."""
        transform, eraser = self.augmentation(task.augmentation)
        plan = dataclasses.replace(self.plan, epoch=task.epoch, img_size=task.augmentation[2])
        decoder = SampleDecoder(plan, transform)
        stats = dict(task.stats, corrupt_skipped=0)
        parts, erase, row = [], [], 0
        for sid, raw in task.chunks:
            part = decoder.decode_chunk(raw, sid, task.g, stats)
            if eraser is not None:   # rectangles now (python random), noise on the device
                seed = (plan.seed, plan.epoch, sid, task.g, len(decoder.stages))
                seed_rngs(*seed)
                boxes = erase_boxes(eraser, len(raw), *part[0].shape[-2:], row0=row)
                if boxes:
                    erase.append((torch_seed(*seed), boxes))
            parts.append(part)
            row += len(raw)
        images, labels, uids, bad = parts[0] if len(parts) == 1 else (torch.cat(t) for t in zip(*parts))
        fill = ()
        if bad.any():   # corrupt slots: copies of good samples of the micro-batch (labels here, pixels on the device)
            good = (~bad).nonzero().flatten()
            if not len(good):
                url = task.chunks[0][1][0][1]
                raise DataError(f"every sample of micro-batch {task.g} on rank {self.rank} is corrupt (uids "
                                f"{uids[:8].tolist()}...); check the shards with `dsvit shards verify "
                                f"{os.path.dirname(url) or '.'}`")
            slots = bad.nonzero().flatten()
            src = good[torch.arange(len(slots)) % len(good)]
            labels, uids = labels.clone(), uids.clone()
            labels[slots], uids[slots] = labels[src], uids[src]
            fill = tuple(zip(slots.tolist(), src.tolist()))
        pixels = HostImages(images.contiguous(), tuple(self.cfg.mean), tuple(self.cfg.std), tuple(erase), fill)
        return pixels, labels, uids, stats


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class ReadAhead:
    """Runs a generator in a thread, at most ``depth`` items ahead of the consumer; its exceptions
    are raised in the consumer. ``close()`` stops it and closes the generator (its shards)."""
    _END = object()

    def __init__(self, items, depth: int):
        self.items, self.queue, self.stopped = items, queue.Queue(max(1, depth)), threading.Event()
        self.thread = None

    def __iter__(self):
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="dsvit-reader", daemon=True)
            self.thread.start()
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def _run(self):
        try:
            for item in self.items:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:   # handed to the consumer, raised there
            self._put(_Failed(e))
        finally:
            self.items.close()

    def _put(self, item) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self):
        self.stopped.set()
        if self.thread is None:
            self.items.close()


class TaskFeed:
    """The training DataLoader's sampler: the read tasks of the epoch being loaded."""

    def __init__(self):
        self.tasks = ()

    def __iter__(self):
        return iter(self.tasks)


def leave_stop_signals_to_the_rank(worker_id: int) -> None:
    """Workers ignore SIGTERM/SIGUSR1 (torch's own handler ends a worker on a SIGTERM from anyone
    but its parent): a scheduler signals every process of a job, DeepSpeed's launcher the rank's
    whole tree, and the rank needs its workers to finish the step it checkpoints after
    (``dsvit.engine.preemption``). They still end with the rank (torch's sentinel and watchdog)."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


def train_loader(decoder: MicroBatchDecoder, feed: TaskFeed, workers: int) -> DataLoader:
    """Persistent workers when there are any; tasks in, (HostImages, labels, uids, stats) out."""
    return DataLoader(decoder, batch_size=None, sampler=feed, num_workers=workers, collate_fn=as_is,
                      pin_memory=pin_batches(), persistent_workers=workers > 0,
                      prefetch_factor=PREFETCH_PER_WORKER if workers > 0 else None,
                      worker_init_fn=leave_stop_signals_to_the_rank)


def eval_loader(ds, workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=False,
                      pin_memory=pin_batches(), prefetch_factor=4 if workers > 0 else None,
                      worker_init_fn=leave_stop_signals_to_the_rank)
