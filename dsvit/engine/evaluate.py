"""Distributed evaluation: exact top-1/top-5 over the validation split, all-reduced across ranks."""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsvit.data.device import finish_on_device


def intermediate_eval_batches(eval_samples: int, eval_batch_size: int, num_batches: int) -> Optional[int]:
    """Batches per rank of an intermediate evaluation for ``train.eval_samples`` (global samples;
    ``eval_batch_size`` global): None, a whole pass, when that is not fewer than the split's."""
    part = -(-eval_samples // eval_batch_size)
    return part if 0 < part < num_batches else None


@torch.no_grad()
def evaluate_model(model, batches, device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """``batches`` yields (images, labels, valid), images float or uint8 ``HostImages`` (normalised on
    the device); every rank must yield the same number of batches.
    Returns top1/top5 (percent), mean loss, sample count and images/s (this rank's wall clock)."""
    sums = torch.zeros(4, device=device, dtype=torch.float64)   # top1 hits, top5 hits, count, loss
    t0 = time.perf_counter()
    for images, labels, valid in batches:
        images = finish_on_device(images, device).to(dtype)   # uint8 from the shard loader: normalised here
        labels = labels.to(device, non_blocking=True)
        valid = valid.to(device, non_blocking=True)
        logits = model(images).float()
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels.view(-1, 1)
        loss = F.cross_entropy(logits, labels, reduction="none")
        sums += torch.stack([(hit[:, 0] & valid).sum(), (hit.any(1) & valid).sum(), valid.sum(),
                             (loss * valid).sum()]).double()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    top1, top5, n, loss = sums.tolist()
    elapsed = time.perf_counter() - t0
    n_safe = max(n, 1)
    return {"top1": 100 * top1 / n_safe, "top5": 100 * top5 / n_safe, "loss": loss / n_safe,
            "samples": int(n), "images_per_s": n / elapsed if elapsed > 0 else 0.0}
