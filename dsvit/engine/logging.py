"""Rank-0 logging: TensorBoard scalars/images, a metrics.jsonl mirror, plain log lines, a tqdm bar.

Scalars are buffered as (possibly on-device) tensors and converted to floats only in ``flush``,
which the trainer calls once per logging interval: no host sync per step. Every rank may call
``scalar``; only rank 0 writes.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
import torch

log = logging.getLogger("dsvit")


def setup_console(rank: int) -> None:
    """Plain log lines on rank 0 only; other ranks log warnings and errors."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s dsvit %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False


class RunLogger:
    def __init__(self, log_dir: Path, rank: int, tensorboard: bool = True, progress: bool = True):
        self.rank = rank
        self.enabled = rank == 0
        self.progress_enabled = progress and self.enabled
        self._pending: dict[str, torch.Tensor | float] = {}
        self._images: dict[str, torch.Tensor] = {}
        self._histograms: dict = {}
        self.writer = None
        self._jsonl = None
        self.bar = None
        if self.enabled:
            log_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(log_dir))
            self._jsonl = open(log_dir / "metrics.jsonl", "a")

    # ------------------------------------------------------------ recording
    def scalar(self, name: str, value) -> None:
        if self.enabled:
            self._pending[name] = value.detach() if torch.is_tensor(value) else value

    def image(self, name: str, img: torch.Tensor) -> None:
        if self.enabled:
            self._images[name] = img.detach().float().cpu()

    def histogram(self, name: str, values) -> None:
        """A TensorBoard histogram of ``values`` (written at the next flush; rank 0 only)."""
        if self.enabled and self.writer is not None:
            v = values.detach().cpu() if torch.is_tensor(values) else torch.as_tensor(values)
            self._histograms[name] = v.float().reshape(-1)

    def flush(self, step: int) -> dict:
        """Write everything recorded since the last flush at ``step``; returns the floats."""
        if not self.enabled:
            return {}
        values = {k: float(v) for k, v in self._pending.items()}
        self._pending.clear()
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            for k, img in self._images.items():
                self.writer.add_image(k, img, step)
            for k, v in self._histograms.items():
                if v.numel():
                    self.writer.add_histogram(k, v, step)
        self._images.clear()
        self._histograms.clear()
        if values:
            self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
            self._jsonl.flush()
        return values

    # ------------------------------------------------------------ progress bar
    def start_progress(self, total: int, initial: int) -> None:
        if self.progress_enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stdout)

    def advance(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def info(self, msg: str, *args) -> None:
        if self.bar is not None:
            self.bar.clear()
        log.info(msg, *args)
        if self.bar is not None:
            self.bar.refresh()
