"""A rank that dies or hangs (gloo on CPU, two simulated nodes on 127.0.0.1, one deepspeed launcher per
node as launchers/per_node.sh starts them): the other rank and both launchers exit within a bounded
time, the survivor prints one line naming the lost rank and the checkpoint to resume from, no checkpoint
is left half-written, and ``checkpoint.resume=auto`` continues the run to its end.

One run in three launches: (1) SIGKILL rank 1 while checkpoints are being written (aimed at a save in
progress); (2) resume on two nodes, then SIGSTOP rank 1 (a hung rank or a frozen node: its sockets
stay open, so only run.collective_timeout_s ends the wait); (3) resume with a single launcher
(``--num_gpus 2``) to the end."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from dsvit import config as C
from dsvit.engine.checkpoint import MARKER, find_resumable, problems
from launch import DEEPSPEED, ENV, ROOT, free_port, group_run, loss_trace, node_commands, release_shm

STEPS = 30   # under one epoch (32 steps): no epoch-end evaluation
TRAIN = ["--module", "dsvit", "train", "--config", "tiny_test", "data.synthetic_train=512",
         "data.synthetic_val=40", "data.workers=0", f"run.max_steps={STEPS}", "checkpoint.every_steps=2",
         "checkpoint.keep_last=3"]


class Nodes:
    """Two per-node launchers (node rank 0 and 1, one rank each), output to RUN.node{K}.log."""

    def __init__(self, run: Path, overrides: list[str]):
        self.port = free_port()
        self.logs = [run.parent / f"{run.name}.node{k}.log" for k in (0, 1)]
        self.launchers = []
        for log, cmd in zip(self.logs, node_commands(run, self.port, [*TRAIN, f"run.dir={run}", *overrides])):
            with open(log, "w") as out:
                self.launchers.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=out,
                                                       stderr=subprocess.STDOUT, start_new_session=True))

    def rank(self, k: int) -> psutil.Process:
        """Node k's training process (its only rank)."""
        for child in psutil.Process(self.launchers[k].pid).children(recursive=True):
            if child.cmdline()[1:4] == ["-u", "-m", "dsvit"]:
                return child
        raise AssertionError(f"node {k} runs no dsvit process:\n{self.output(k)[-3000:]}")

    def output(self, k: int) -> str:
        return self.logs[k].read_text()

    def wait(self, k: int, timeout: float) -> int:
        try:
            return self.launchers[k].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"launcher of node {k} still running after {timeout:.0f} s:\n"
                                 f"{self.output(k)[-3000:]}") from None

    def close(self) -> None:
        """Whatever is left of both launchers' process groups (only after a failed assertion)."""
        for p in self.launchers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        release_shm(self.port)


def wait_for(predicate, timeout: float, nodes: Nodes, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if any(p.poll() is not None for p in nodes.launchers):
            break
        time.sleep(0.005)
    raise AssertionError(f"no {what} within {timeout:.0f} s:\n{nodes.output(0)[-3000:]}")


def latest(ckpts: Path) -> str:
    try:
        return (ckpts / "latest").read_text()
    except FileNotFoundError:
        return ""


def saving(ckpts: Path, done: str) -> bool:
    """A tag newer than the newest complete one is on disk without its marker: a save in progress."""
    return any(p.is_dir() and p.name > done and not (p / MARKER).exists() for p in ckpts.iterdir())


def check_tags(ckpts: Path) -> Path:
    """Every tag is complete with intact files or has no marker (is never resumed); returns the
    newest complete one, which ``latest`` names."""
    tags = sorted(p for p in ckpts.iterdir() if p.is_dir())
    for tag in tags:
        if (tag / MARKER).exists():
            assert problems(tag) == [], tag
    last, skipped = find_resumable(ckpts)
    assert last is not None and not skipped and latest(ckpts) == last.name
    return last


def lost_rank_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("dsvit: rank 0: rank 1 stopped answering")]
    assert lines, output[-3000:]
    return lines[-1]


@pytest.mark.parametrize("value", ["0", "-5", "inf"])
def test_collective_timeout_must_be_a_positive_number(value):
    cfg = C.load_config("tiny_test", [f"run.collective_timeout_s={value}"])
    with pytest.raises(C.ConfigError, match=r"run.collective_timeout_s must be a finite number > 0"):
        C.validate(cfg)


@pytest.mark.slow
def test_lost_rank_ends_the_run_and_it_resumes(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    start = time.monotonic()

    # (1) SIGKILL rank 1 once the first checkpoint is complete, in the middle of the next save if
    # one shows up within 1 s. Rank 0 sees the connection reset at once; the bound is the timeout.
    nodes = Nodes(run, ["run.collective_timeout_s=20"])
    try:
        first = wait_for(lambda: latest(ckpts), 240, nodes, "first checkpoint")
        try:
            mid_save = wait_for(lambda: saving(ckpts, latest(ckpts)), 1, nodes, "save in progress")
        except AssertionError:
            mid_save = False   # killed between saves: the same assertions hold
        nodes.rank(1).kill()
        killed = time.monotonic()
        assert nodes.wait(1, 30) != 0
        assert nodes.wait(0, 20 + 15) != 0
        exited = time.monotonic() - killed
        line = lost_rank_line(nodes.output(0))
    finally:
        nodes.close()
    assert exited < 20 + 15
    last = check_tags(ckpts)
    assert last.name >= first and f"the last complete checkpoint is {last};" in line, line
    print(f"\n(1) {time.monotonic() - start:.0f} s: SIGKILL{' during a save' if mid_save else ''}: rank 0's "
          f"launcher exited {exited:.1f} s after the kill: {line}")

    # (2) resume on two nodes, then SIGSTOP rank 1 after the next complete checkpoint: rank 0's
    # collective times out after run.collective_timeout_s and it exits, naming rank 1
    nodes = Nodes(run, ["run.collective_timeout_s=8", "checkpoint.resume=auto"])
    try:
        wait_for(lambda: latest(ckpts) > last.name, 240, nodes, "checkpoint after the resume")
        stopped_rank = nodes.rank(1)
        stopped_rank.suspend()
        stopped = time.monotonic()
        assert nodes.wait(0, 8 + 20) != 0
        exited = time.monotonic() - stopped
        stopped_rank.kill()     # what the cluster does with a hung node
        assert nodes.wait(1, 30) != 0
    finally:
        nodes.close()
    assert f"resumed from {last}" in nodes.output(0)
    line = lost_rank_line(nodes.output(0))
    assert "timed out after 8 s (run.collective_timeout_s)" in line, line
    assert 8 <= exited < 8 + 20
    resumed = check_tags(ckpts)
    assert resumed.name > last.name and f"the last complete checkpoint is {resumed};" in line, line
    print(f"(2) {time.monotonic() - start:.0f} s: SIGSTOP: rank 0's launcher exited {exited:.1f} s after "
          f"the stop: {line}")

    # (3) resume with one launcher on 2 ranks: it finishes from the newest complete checkpoint, and
    # no unfinished tag is left behind
    port = free_port()
    status, output = group_run([str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(port), *TRAIN,
                                f"run.dir={run}", "checkpoint.resume=auto", "checkpoint.every_steps=0"],
                               timeout=300, port=port)
    assert status == 0, output[-3000:]
    assert f"resumed from {resumed}" in output
    assert max(loss_trace(run)) == STEPS
    assert check_tags(ckpts).name == f"step{STEPS:08d}"
    assert all((p / MARKER).exists() for p in ckpts.iterdir() if p.is_dir())
    print(f"(3) {time.monotonic() - start:.0f} s: resumed from {resumed.name} and finished")
