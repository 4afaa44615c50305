"""In-memory tensor datasets with the TrainData/EvalData interface, for tests and benchmarks.

The global micro-batch j of an epoch is a fixed slice of a (seed, epoch) permutation of the kept
samples, and rank r takes its r-th part, so 1 rank with batch B and W ranks with B/W each see the same
samples per step. The uid of a sample is its index.
"""
from __future__ import annotations

from typing import Optional

import torch


class MemoryTrainData:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, rank: int, world_size: int,
                 local_batch: int, seed: int = 0, batches_multiple: int = 1):
        self.images, self.labels = images, labels
        self.rank, self.world_size, self.local_batch, self.seed = rank, world_size, local_batch, seed
        self.multiple = batches_multiple
        self.num_samples = len(images)
        self.set_keep_set(None)

    def batches_for(self, active_samples: int) -> int:
        per_epoch = active_samples // (self.local_batch * self.world_size)
        return per_epoch - per_epoch % self.multiple

    def set_augmentation(self, auto_augment: str, reprob: float) -> None:
        """In-memory samples are used as stored: there is no augmentation to change."""

    def set_decode_size(self, size: int) -> None:
        """In-memory samples are used as stored (a resolution plugin resizes them on the device)."""

    def set_keep_set(self, keep) -> None:
        """Train on the samples whose ``keep[uid]`` is true from the next epoch on (None: all)."""
        self.keep = None if keep is None else torch.as_tensor(keep, dtype=torch.bool)
        active = self.num_samples if keep is None else int(self.keep.sum())
        self.batches_per_epoch = self.batches_for(active)

    def epoch_batches(self, epoch: int, skip_batches: int = 0, num_batches=None):
        num_batches = self.batches_per_epoch if num_batches is None else num_batches
        if num_batches > self.batches_per_epoch:
            raise ValueError(f"{num_batches} batches asked, the epoch has {self.batches_per_epoch}")
        g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        order = torch.randperm(self.num_samples, generator=g)
        if self.keep is not None:
            order = order[self.keep[order]]
        glob = self.local_batch * self.world_size
        for j in range(skip_batches, num_batches):
            idx = order[j * glob + self.rank * self.local_batch:][:self.local_batch]
            yield self.images[idx], self.labels[idx], idx

    def counters(self) -> dict:
        return {}

    def images_by_uid(self, uids) -> torch.Tensor:
        """The stored images of ``uids`` (uid = index), as float [n, 3, H, W]."""
        return self.images[torch.tensor([int(u) for u in uids], dtype=torch.long)].float()


class MemoryEvalData:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, rank: int, world_size: int,
                 local_batch: int):
        self.images, self.labels = images, labels
        self.rank, self.world_size, self.local_batch = rank, world_size, local_batch

    @property
    def num_batches(self) -> int:
        return -(-len(self.images) // (self.local_batch * self.world_size))

    def batches(self, max_batches: Optional[int] = None):
        n, glob = len(self.images), self.local_batch * self.world_size
        for start in range(0, n if max_batches is None else min(n, max_batches * glob), glob):
            idx = torch.arange(start + self.rank * self.local_batch,
                               start + (self.rank + 1) * self.local_batch)
            valid = idx < n
            idx = idx.clamp(max=n - 1)
            yield self.images[idx], self.labels[idx], valid


def random_dataset(n: int, img_size: int, num_classes: int, seed: int = 0):
    """Learnable random data: class-dependent mean patterns plus noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(num_classes, 3, img_size, img_size, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    images = protos[labels] + 0.5 * torch.randn(n, 3, img_size, img_size, generator=g)
    return images, labels
