"""Per-epoch event buffers on the device, their one gather per epoch, and the agreement check.

Every micro-batch of an epoch writes its events (uid and one or two statistics per sample) into
row ``micro-step within the epoch`` of a preallocated ``[rows, local_batch, columns]`` float64
tensor on the training device: a few small kernels, no host sync. float64 holds the uids exactly
(< 2^53) next to the float32 statistics, so one tensor and one collective carry everything.

At the epoch end the buffers of all ranks are gathered once (``all_gather_single``, formerly
``all_gather_into_tensor``; gloo supports it) into
``[W, rows, B]``, permuted to ``[rows, W, B]`` and flattened: time order (step, rank, position),
the same on every rank, so every rank applies the same events in the same order to its copy of the
replicated state. Without torch.distributed (or with one rank) nothing is gathered.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class EventBuffer:
    """One rank's events of one epoch."""

    def __init__(self, epoch: int, rows: int, batch: int, columns: int, device):
        self.epoch, self.rows, self.batch, self.columns = epoch, rows, batch, columns
        self.data = torch.zeros((rows, batch, columns), dtype=torch.float64, device=device)
        self.filled = 0

    def write(self, row: int, *cols: torch.Tensor) -> None:
        """Row ``row`` <- the columns (each [batch]); asynchronous on the device."""
        if row != self.filled or row >= self.rows:
            raise RuntimeError(f"example_pruning: event row {row} of epoch {self.epoch} is out of step "
                               f"(filled {self.filled} of {self.rows} rows)")
        if cols[0].shape[0] != self.batch:
            raise RuntimeError(f"example_pruning: a micro-batch of {cols[0].shape[0]} samples, the "
                               f"event buffer expects the local batch of {self.batch}")
        self.data[row].copy_(torch.stack([c.to(torch.float64) for c in cols], 1))
        self.filled += 1

    def gather(self, across_ranks: bool) -> np.ndarray:
        """All events of the epoch as [events, columns] in (step, rank, position) order."""
        if self.filled != self.rows:
            raise RuntimeError(f"example_pruning: epoch {self.epoch} ended with {self.filled} of its "
                               f"{self.rows} micro-batches recorded")
        x = self.data
        if across_ranks and distributed():
            w = dist.get_world_size()
            out = torch.empty((w * self.rows, self.batch, self.columns), dtype=x.dtype, device=x.device)
            # all_gather_single is the newer name of all_gather_into_tensor (torch >= 2.3 has one)
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            gather(out, x.contiguous())
            x = out
        return time_order(x.cpu().numpy(), self.rows)

    # ------------------------------------------------------------ mid-epoch checkpoints
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "rows": self.filled, "events": self.data[:self.filled].cpu()}

    def load(self, saved: dict, rows_expected: int) -> None:
        """Put back the rows a mid-epoch checkpoint saved (the micro-batches already trained)."""
        if int(saved["epoch"]) != self.epoch or int(saved["rows"]) != rows_expected:
            raise RuntimeError(
                f"example_pruning: the checkpoint holds {saved['rows']} event rows of epoch "
                f"{saved['epoch']}, but the run resumes {rows_expected} micro-batches into epoch "
                f"{self.epoch}; resume from a checkpoint written by this run")
        events = saved["events"]
        if tuple(events.shape[1:]) != (self.batch, self.columns):
            raise RuntimeError(f"example_pruning: saved events of shape {tuple(events.shape)} do not "
                               f"fit a local batch of {self.batch}; resume with the same world size "
                               f"and batch size")
        self.data[:rows_expected].copy_(events.to(self.data.device))
        self.filled = rows_expected


def time_order(gathered: np.ndarray, rows: int) -> np.ndarray:
    """[W * rows, B, C] as all_gather stacks the ranks' buffers -> [events, C] in (step, rank,
    position) order: [W, rows, B] permuted to [rows, W, B] and flattened."""
    w = gathered.shape[0] // rows
    x = gathered.reshape(w, rows, *gathered.shape[1:]).swapaxes(0, 1)
    return x.reshape(-1, gathered.shape[-1])


def digest(*arrays: np.ndarray) -> int:
    """A 56-bit fingerprint of arrays (fits an int64 tensor with its negation)."""
    h = hashlib.blake2b(digest_size=7)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
    return int.from_bytes(h.digest(), "little")


def check_agree(value: int, what: str, device: Optional[torch.device] = None) -> None:
    """Collective: every rank must hold the same ``value``; one all-reduce(max) of (v, -v) gives
    the max and the min at once. A no-op without torch.distributed or with one rank."""
    if not distributed():
        return
    device = device if device is not None else torch.device("cpu")
    t = torch.tensor([value, -value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise RuntimeError(f"plugin 'example_pruning': the ranks took different decisions ({what}); "
                           f"the replicated state diverged: every rank must see the same events "
                           f"(same data, world size and config)")
