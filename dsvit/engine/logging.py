"""Rank-0 logging: TensorBoard scalars/images, a metrics.jsonl mirror, plain log lines, progress.

Scalars are buffered as (possibly on-device) tensors and converted to floats only in ``flush``,
which the trainer calls once per logging interval: no host sync per step. Every rank may call
``scalar``; only rank 0 writes. A value recorded with its own ``step`` (an image, a rebuild's time)
is written at that step, not at the flush's.

Progress: a tqdm bar only when stdout (the bar's and the log lines' stream) is a terminal and
``log.progress`` is on; otherwise (a redirected log, a batch job, ``log.progress=false``) one plain
line per logging interval with the same numbers, so a log file holds no carriage-return frames.

TensorBoard sorts tag groups by name, so the numbers that say how a run is doing (loss, top-1, lr,
images/s) are shown under ``1_run/``, which sorts first, and each method's own under its name
(its config section); ``metrics.jsonl`` keeps the stable names tools read
(``train/loss``, ``eval/top1``, ...): ``TENSORBOARD_TAGS`` is the only place the two differ.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("dsvit")

# metrics.jsonl name -> TensorBoard tag, where they differ: the first screen ("how is my run
# doing") under 1_run/, and a name that says what it counts
TENSORBOARD_TAGS = {"train/loss": "1_run/loss", "eval/top1": "1_run/top1", "eval_ema/top1": "1_run/top1_ema",
                    "train/lr": "1_run/lr", "train/images_per_s": "1_run/images_per_s",
                    "train/tokens_per_image": "train/mean_tokens_per_block"}


def tensorboard_tag(name: str) -> str:
    return TENSORBOARD_TAGS.get(name, name)


def is_terminal(stream) -> bool:
    """Whether ``stream`` is an interactive terminal (a bar can redraw itself in place)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


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
        # the one place the progress display is decided: a bar needs a terminal to redraw in
        self.bar_enabled = progress and self.enabled and is_terminal(sys.stdout)
        self._pending: dict[str, torch.Tensor | float] = {}
        self._at_step: list[tuple[int, str, float]] = []        # scalars with their own step
        self._images: list[tuple[str, torch.Tensor, Optional[int]]] = []
        self._histograms: dict = {}
        self.writer = None
        self._jsonl = None
        self.bar = None
        self._total = self._done = self._done0 = 0         # steps: of the run, done, done at start
        self._t0 = time.perf_counter()
        if self.enabled:
            log_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(log_dir))
            self._jsonl = open(log_dir / "metrics.jsonl", "a")

    # ------------------------------------------------------------ recording
    def scalar(self, name: str, value, step: Optional[int] = None) -> None:
        """``value`` at the next flush's step, or at ``step`` (a python number) when given."""
        if not self.enabled:
            return
        if step is None:
            self._pending[name] = value.detach() if torch.is_tensor(value) else value
        else:
            self._at_step.append((step, name, float(value)))

    def wall_interval(self, kind: str, began: float, ended: float, step: int) -> None:
        """A stretch of wall time (``time.time()`` values) spent on ``kind`` (start-up, an evaluation,
        a checkpoint, a rebuild): a metrics.jsonl row of its own, for ``dsvit bench report``, which
        subtracts the time its scheduler had the run stopped; TensorBoard has the totals (time/*)."""
        if self.enabled:
            self._jsonl.write(json.dumps({"step": step, "time": ended, "interval": kind, "began": began}) + "\n")

    def image(self, name: str, img: torch.Tensor, step: Optional[int] = None) -> None:
        """A CHW image in [0, 1], written at the next flush at ``step`` (default: the flush's)."""
        if self.enabled:
            self._images.append((name, img.detach().float().cpu(), step))

    def histogram(self, name: str, values) -> None:
        """A TensorBoard histogram of ``values`` (written at the next flush; rank 0 only)."""
        if self.enabled and self.writer is not None:
            v = values.detach().cpu() if torch.is_tensor(values) else torch.as_tensor(values)
            self._histograms[name] = v.float().reshape(-1)

    def flush(self, step: int) -> dict:
        """Write everything recorded since the last flush (at ``step`` unless recorded with its
        own); returns the floats recorded for ``step``."""
        if not self.enabled:
            return {}
        values = {k: float(v) for k, v in self._pending.items()}
        self._pending.clear()
        rows: dict[int, dict] = {}
        for at, k, v in self._at_step:
            rows.setdefault(at, {})[k] = v
        self._at_step.clear()
        if values:
            rows.setdefault(step, {}).update(values)
        if self.writer is not None:
            for at, row in sorted(rows.items()):
                for k, v in row.items():
                    self.writer.add_scalar(tensorboard_tag(k), v, at)
            for k, img, at in self._images:
                self.writer.add_image(k, img, step if at is None else at)
            for k, v in self._histograms.items():
                if v.numel():
                    self.writer.add_histogram(k, v, step)
        self._images.clear()
        self._histograms.clear()
        for at, row in sorted(rows.items()):
            self._jsonl.write(json.dumps({"step": at, "time": time.time(), **row}) + "\n")
        if rows:
            self._jsonl.flush()
        return values

    # ------------------------------------------------------------ progress
    def start_progress(self, total: int, initial: int) -> None:
        self._total, self._done, self._t0, self._done0 = total, initial, time.perf_counter(), initial
        if self.bar_enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stdout)

    def advance(self, n: int, *, epoch: float, loss: float, lr: float, images_per_s: float) -> None:
        """``n`` more steps done: the bar moves, or (no terminal) one plain line."""
        if not self.enabled:
            return
        self._done += n
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}",
                                 refresh=False)
            self.bar.update(n)
            return
        total = max(1, self._total, self._done)
        elapsed, done = time.perf_counter() - self._t0, self._done - self._done0
        eta = elapsed / done * (total - self._done) if done > 0 else 0.0   # evaluations included
        log.info("step %d/%d (%.0f%%) epoch %.2f loss %.4f lr %.2e images/s %.0f eta %s",
                 self._done, total, 100 * self._done / total, epoch, loss, lr, images_per_s,
                 format_duration(eta))

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


def format_duration(seconds: float) -> str:
    """1:02:03 (h:mm:ss) or 2:03 (m:ss)."""
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
