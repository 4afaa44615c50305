"""Logs a person can read: a redirected log holds plain progress lines (no carriage-return frames),
``log.progress=false`` keeps the numbers, and TensorBoard's first-sorting group answers "how is my
run doing"; images land at their own steps with ``log.image_every_steps`` alone; data counters show
only when non-zero."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dsvit.config import load_config
from dsvit.engine.logging import RunLogger, tensorboard_tag
from dsvit.engine.meter import log_data_counters
from dsvit.registry import build_plugins
from launch import ENV, ROOT

STEPS, EVERY = 6, 2
TRAIN = [sys.executable, "-m", "dsvit", "train", "--config", "tiny_test", "data.synthetic_train=128",
         "data.synthetic_val=40", "data.workers=0", f"run.max_steps={STEPS}", f"log.every_steps={EVERY}"]
LINE = re.compile(r"step (\d+)/(\d+) \(\d+%\) epoch [\d.]+ loss [\d.]+ lr [\d.e+-]+ images/s \d+ eta [\d:]+$")


def train_to_file(tmp_path, name: str, overrides: list[str]) -> tuple[str, list[int]]:
    """A short training with stdout and stderr redirected to a file: its text, the plain lines' steps."""
    out = tmp_path / f"{name}.log"
    with open(out, "w") as f:
        proc = subprocess.run([*TRAIN, f"run.dir={tmp_path / name}", *overrides], cwd=ROOT, env=ENV,
                              stdout=f, stderr=subprocess.STDOUT, timeout=300)
    text = out.read_text()
    assert proc.returncode == 0, text[-3000:]
    steps = [int(m.group(1)) for m in map(LINE.search, text.splitlines()) if m]
    return text, steps


def test_redirected_log_has_plain_lines_and_tensorboard_opens_on_the_run(tmp_path):
    text, steps = train_to_file(tmp_path, "bar", ["log.progress=true", "log.tensorboard=true",
                                                  "log.image_every_steps=3"])
    assert "\r" not in text and "train:" not in text           # no tqdm frames in a file
    assert steps == list(range(EVERY, STEPS + 1, EVERY))        # one plain line per interval
    # 4 steps an epoch: an intermediate evaluation at step 4 reads the first 20 val samples, the last all 40
    quiet_text, quiet = train_to_file(tmp_path, "quiet", ["log.progress=false", "log.tensorboard=false",
                                                          "data.synthetic_train=64", "train.eval_samples=20"])
    assert quiet == steps                                       # progress=false: no bar, same numbers
    assert re.search(r"step 4 eval_part: top1 [\d.]+ top5 [\d.]+ loss [\d.]+ on 20 samples", quiet_text)
    assert re.search(r"step 6 eval: top1 [\d.]+ top5 [\d.]+ loss [\d.]+ on 40 samples", quiet_text)
    assert "(best" in quiet_text and "wall time" in quiet_text

    acc = EventAccumulator(str(tmp_path / "bar" / "tb"), size_guidance={"images": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    groups = sorted({t.split("/")[0] for t in scalars})
    first = {t for t in scalars if t.startswith(groups[0] + "/")}
    assert first == {"1_run/loss", "1_run/top1", "1_run/lr", "1_run/images_per_s"}
    assert [e.step for e in acc.Scalars("1_run/loss")] == steps
    # the grid of steps 3 and 6 at steps 3 and 6 (3 is no logging step), without naming the plugin
    assert [e.step for e in acc.Images("tokens/kept")] == [3, 6]
    assert not any(t.startswith("data/") for t in scalars)     # the synthetic data counts nothing
    rows = [json.loads(r) for r in (tmp_path / "bar" / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == steps   # tools' names stay stable
    # where the wall time went: start-up first, every evaluation and checkpoint, totals to match
    intervals = [(r["interval"], r["time"] - r["began"]) for r in rows if r.get("interval", "steps") != "steps"]
    assert intervals[0][0] == "startup" and [k for k, _ in intervals[1:]] == ["eval", "checkpoint"]
    # each logged step time's wall-clock span, written before its row, inside the run's steps
    spans = [(r["step"], r["began"], r["time"]) for r in rows if r.get("interval") == "steps"]
    logged = {r["step"]: r["time"] for r in rows if "train/loss" in r}
    assert [s for s, _, _ in spans] == steps
    assert all(a < b <= logged[s] for s, a, b in spans) and all(x[2] <= y[1] for x, y in zip(spans, spans[1:]))
    totals = {k: v for k, v in rows[-1].items() if k.startswith("time/") and k != "time/wall_s"}
    assert totals["time/eval_s"] == pytest.approx(intervals[1][1], abs=1e-3)
    assert totals["time/startup_s"] == pytest.approx(intervals[0][1], abs=1e-3) and totals["time/steps_s"] > 0
    assert "time/startup_s" in scalars and "time/checkpoint_s" in scalars
    assert re.search(r"wall time \d+ s: start-up [\d.]+ s, steps [\d.]+ s \(data wait [\d.]+ s\), evaluation", text)


def test_image_every_steps_alone_builds_the_image_grid_and_enabled_false_wins():
    assert [p.name for p in build_plugins(load_config("tiny_test", ["log.image_every_steps=5"]))] == ["token_viz"]
    assert build_plugins(load_config("tiny_test")) == []
    off = load_config("tiny_test", ["log.image_every_steps=5", "plugins.token_viz.enabled=false"])
    assert build_plugins(off) == []


def test_values_with_their_own_step_are_written_there(tmp_path):
    log = RunLogger(tmp_path, 0, tensorboard=True, progress=True)
    assert log.bar_enabled is False                             # pytest captures stdout: no terminal
    log.scalar("engine/rebuild_s", 1.5, step=3)
    log.scalar("train/loss", torch.tensor(2.0))
    log.image("grid", torch.zeros(3, 4, 4), step=2)
    assert log.flush(5) == {"train/loss": 2.0}
    log.close()
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], sorted(set(r) - {"step", "time"})) for r in rows] == [
        (3, ["engine/rebuild_s"]), (5, ["train/loss"])]
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("engine/rebuild_s")] == [3]
    assert [e.step for e in acc.Scalars(tensorboard_tag("train/loss"))] == [5]
    assert [e.step for e in acc.Images("grid")] == [2]


class Counted:
    def __init__(self, counters):
        self._counters = counters

    def counters(self):
        return dict(self._counters)


class Recorder:
    def __init__(self):
        self.scalars, self.lines = {}, []

    def scalar(self, name, value, step=None):
        self.scalars[name] = value

    def info(self, msg, *args):
        self.lines.append(msg % args)


def test_data_counters_only_when_non_zero_and_explained():
    rec = Recorder()
    log_data_counters(Counted({"corrupt_skipped": 0, "filtered": 3, "short_shards": 0}), rec,
                      torch.device("cpu"), epoch=1)
    assert rec.scalars == {"data/filtered": 3.0}
    assert rec.lines == ["epoch 1 data: filtered=3 (samples the keep set passed over: a data plugin "
                         "trains on a subset)"]
    rec = Recorder()
    log_data_counters(Counted({"corrupt_skipped": 0, "filtered": 0}), rec, torch.device("cpu"), epoch=1)
    assert rec.scalars == {} and rec.lines == []


def test_an_intermediate_evaluation_is_a_part_only_below_the_split():
    from dsvit.engine.evaluate import intermediate_eval_batches
    assert intermediate_eval_batches(20, 20, 2) == 1          # the first 20 of 40: one global batch
    assert intermediate_eval_batches(21, 20, 3) == 2          # rounded up to whole batches
    assert intermediate_eval_batches(0, 20, 2) is None        # off: every evaluation reads all
    assert intermediate_eval_batches(40, 20, 2) is None       # the whole split is no part of it
    assert intermediate_eval_batches(100, 20, 2) is None
