"""Per-interval training metrics: accumulated on device between logging points, one host sync per
interval. Time spent in evaluation, checkpoints and engine rebuilds inside an interval (``pause``)
is not step time.

Where the wall time goes (``time/*``, cumulative seconds of this launch, logged at every interval and
at the end of the run): ``startup_s`` (process start to the first step: imports, DeepSpeed's
start-up, data and engine set-up, a resume's loading), ``steps_s`` (optimizer steps, the data wait
inside them included), ``data_wait_s``, ``eval_s``, ``checkpoint_s``, ``rebuild_s``. What a run spends
outside the steps caps its end-to-end speed-up: ``dsvit bench report`` tabulates these per variant."""
from __future__ import annotations

import time

import psutil
import torch
import torch.distributed as dist


PAUSE_KINDS = ("eval", "checkpoint", "rebuild")   # time outside the steps, by what it was spent on


def seconds_since_process_start() -> float:
    """Wall seconds since this process started (the OS's start time: imports included)."""
    return time.time() - psutil.Process().create_time()


class StepMeter:
    def __init__(self, device: torch.device, world_size: int, global_batch: int):
        self.world_size, self.global_batch = world_size, global_batch
        self.loss_sum = torch.zeros((), device=device)
        self.start_step = 0
        self.totals = {"startup_s": 0.0, "steps_s": 0.0, "data_wait_s": 0.0,
                       **{f"{k}_s": 0.0 for k in PAUSE_KINDS}}
        self.intervals: list = []   # (kind, began, ended) in time.time(), written at the next log
        self.reset(0)

    def reset(self, step: int) -> None:
        self.loss_sum.zero_()
        self.loss_count, self.data_wait, self.tokens, self.macs, self.paused = 0, 0.0, 0.0, 0.0, 0.0
        self.t_last, self.step_last = time.perf_counter(), step
        self.t_last_wall = time.time()

    def micro_batch(self, loss: torch.Tensor, data_wait: float, tokens: float, macs: float = 0.0) -> None:
        self.loss_sum += loss
        self.loss_count += 1
        self.data_wait += data_wait
        self.tokens += tokens
        self.macs += macs

    def pause(self, seconds: float, kind: str) -> None:
        """``seconds`` of this interval spent outside the steps, on ``kind`` (one of PAUSE_KINDS)."""
        self.paused += seconds
        self.totals[f"{kind}_s"] += seconds
        now = time.time()
        self.intervals.append((kind, now - seconds, now))

    def started(self, step: int) -> None:
        """Step ``step + 1`` is next: the time since the process started is start-up."""
        self.totals["startup_s"] = seconds_since_process_start()
        self.t_started = time.perf_counter()
        self.intervals.append(("startup", time.time() - self.totals["startup_s"], time.time()))
        self.reset(step)

    def finish(self, logger, step: int) -> None:
        """At the end of the run (its last evaluation and checkpoint done): the totals, and a line."""
        self.log_totals(logger, step)
        logger.flush(step)
        logger.info("%s", self.describe_totals(self.totals["startup_s"] + time.perf_counter() - self.t_started))

    def log_totals(self, logger, step: int) -> None:
        """The ``time/*`` totals as scalars (written at the logger's next flush), and the intervals."""
        for name, value in self.totals.items():
            logger.scalar(f"time/{name}", value)
        for kind, began, ended in self.intervals:
            logger.wall_interval(kind, began, ended, step)
        self.intervals.clear()

    def describe_totals(self, wall_s: float) -> str:
        """One line: where this launch's wall time went."""
        t = self.totals
        outside = wall_s - t["steps_s"] - sum(t[f"{k}_s"] for k in PAUSE_KINDS) - t["startup_s"]
        return (f"wall time {wall_s:.0f} s: start-up {t['startup_s']:.1f} s, steps {t['steps_s']:.1f} s "
                f"(data wait {t['data_wait_s']:.1f} s), evaluation {t['eval_s']:.1f} s, checkpoints "
                f"{t['checkpoint_s']:.1f} s, rebuilds {t['rebuild_s']:.1f} s, other {max(0.0, outside):.1f} s")

    def log(self, logger, step: int, lr: float, epoch: float, wall_s: float) -> None:
        """Collective (all-reduces the loss): every rank calls it at the same steps."""
        dt = time.perf_counter() - self.t_last - self.paused
        # the timed span in wall-clock time: `dsvit bench report` takes out only the stops inside it
        logger.wall_interval("steps", self.t_last_wall, time.time(), step)
        n_steps = step - self.step_last
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(self.loss_sum)
        loss = self.loss_sum.item() / (self.loss_count * self.world_size)
        img_s = n_steps * self.global_batch / dt
        logger.scalar("train/loss", loss)
        logger.scalar("train/lr", lr)
        logger.scalar("train/images_per_s", img_s)
        logger.scalar("train/step_time_s", dt / n_steps)
        logger.scalar("train/data_wait_s", self.data_wait / n_steps)
        logger.scalar("train/data_wait_fraction", self.data_wait / dt)
        logger.scalar("train/tokens_per_image", self.tokens / self.loss_count)
        # forward GMACs per image in the blocks: `dsvit bench` integrates it into the FLOP reduction
        logger.scalar("train/block_gmacs_per_image", self.macs / self.loss_count / 1e9)
        logger.scalar("train/epoch", epoch)
        self.totals["steps_s"] += dt
        self.totals["data_wait_s"] += self.data_wait
        self.log_totals(logger, step)
        logger.scalar("time/wall_s", wall_s)
        logger.flush(step)
        logger.advance(n_steps, epoch=epoch, loss=loss, lr=lr, images_per_s=img_s)
        self.reset(step)


# what a data counter counts, for the log line (TensorBoard shows only the names)
COUNTER_MEANINGS = {
    "corrupt_skipped": "samples that did not decode, replaced by others of their batch",
    "filtered": "samples the keep set passed over: a data plugin trains on a subset",
    "short_shards": "shards holding fewer samples than _info.json lists",
    "short_shard_missing": "samples those shards lack",
}


def log_data_counters(data, logger, device: torch.device, epoch: int, prefix: str = "data") -> None:
    """The data's counters of its last pass (an epoch, an evaluation: corrupt samples skipped,
    short shards, ...), summed over ranks. Collective. Only non-zero counters are logged, so
    TensorBoard shows a ``data/*`` chart only when something happened."""
    counters = getattr(data, "counters", lambda: {})()
    if counters:
        values = torch.tensor([float(v) for v in counters.values()], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values)
        nonzero = {name: v for name, v in zip(counters, values.tolist()) if v}
        for name, v in nonzero.items():
            logger.scalar(f"{prefix}/{name}", v)
        if nonzero:
            logger.info("epoch %d %s: %s", epoch, prefix.replace("_", " "),
                        ", ".join(f"{k}={int(v)}" + (f" ({COUNTER_MEANINGS[k]})" if k in COUNTER_MEANINGS else "")
                                  for k, v in nonzero.items()))
