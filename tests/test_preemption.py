"""SIGTERM / SIGUSR1 (preemption, a time limit coming): the ranks agree on a step, write a complete
checkpoint there, say so in one line and exit 128 + signal; ``checkpoint.resume=auto`` continues to
the uninterrupted run's very losses. ``launchers/slurm.sbatch`` requeues on those statuses.

Runs: ``python -m dsvit train`` (one process, loader workers on) signalled as Slurm signals a job,
the whole process group; two ranks through the deepspeed launcher where only rank 1 gets the
signal, and where every process gets it with the launchers started as the batch script starts
them; the batch script with stand-ins for ``srun``/``scontrol``."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from dsvit.engine.checkpoint import MARKER, problems, rank_file, tag_for
from dsvit.engine.preemption import StopSignals, exit_status
from launch import DEEPSPEED, ENV, ROOT, free_port, group_run, loss_trace

STEPS_PER_EPOCH = 32   # 512 samples / global batch 16; one epoch
TRAIN = ["train", "--config", "tiny_test", "data.synthetic_train=512", "data.synthetic_val=40",
         "train.epochs=1"]
LINE = re.compile(r"^dsvit: preempted by (SIG\w+) at step (\d+): checkpoint (step\d+) written \((.+)\); "
                  r"resume with checkpoint\.resume=auto$", re.M)


def test_the_first_signal_is_recorded_and_the_handlers_restored():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    stop = StopSignals(world_size=1)
    try:
        assert stop.agreed() == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)       # later signals do not rename the stop
        deadline = time.monotonic() + 5
        while stop.received is None and time.monotonic() < deadline:
            time.sleep(0.01)                        # handlers run in the main thread, between bytecodes
        assert stop.received == signal.SIGUSR1 and stop.agreed() == signal.SIGUSR1
    finally:
        stop.restore()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before
    assert exit_status(signal.SIGTERM) == 143 and exit_status(signal.SIGUSR1) == 138


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 240) -> None:
    metrics = run / "tb" / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(l).get("step", 0) >= step for l in metrics.read_text().splitlines()):
            return
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"step {step} not logged within {timeout:.0f} s:\n{proc.communicate()[0][-3000:]}")


def stopped_at(output: str, run: Path, signame: str) -> int:
    """The step of the one preemption line, checked against what the run folder holds."""
    lines = LINE.findall(output)
    assert len(lines) == 1, output[-3000:]
    name, step, tag, path = lines[0]
    step = int(step)
    assert name == signame and tag == tag_for(step) and Path(path) == run / "checkpoints" / tag
    assert (run / "checkpoints" / tag / MARKER).is_file() and problems(run / "checkpoints" / tag) == []
    assert (run / "checkpoints" / "latest").read_text() == tag
    return step


def dsvit_train(run: Path, *overrides) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dsvit", *TRAIN, f"run.dir={run}", "data.workers=0", *overrides],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def final_top1(output: str) -> list[str]:
    return [l for l in output.splitlines() if l.startswith("final top-1")]


@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_and_the_resume_matches_the_uninterrupted_run(tmp_path):
    ref = dsvit_train(tmp_path / "ref")

    # SIGTERM to the whole process group (Slurm, kill -- -PGID): the rank and its loader
    # workers, which must survive it (the batches do not depend on the worker count)
    run = tmp_path / "run"

    def sigterm_at_step_5(proc):
        wait_for_step(proc, run, 5)
        os.killpg(proc.pid, signal.SIGTERM)
    status, output = group_run([sys.executable, "-m", "dsvit", *TRAIN, f"run.dir={run}", "data.workers=2"],
                               sigterm_at_step_5, timeout=120)
    assert status == 143, output[-3000:]
    step = stopped_at(output, run, "SIGTERM")
    assert 5 <= step < STEPS_PER_EPOCH                      # mid-epoch: the default would lose it
    assert max(loss_trace(run)) == step                     # it stopped right there
    assert "Traceback" not in output and not final_top1(output)

    resumed = dsvit_train(run, "checkpoint.resume=auto")
    assert f"resumed from {run / 'checkpoints' / tag_for(step)}" in resumed.stdout + resumed.stderr
    assert loss_trace(run) == loss_trace(tmp_path / "ref")  # every step, bit for bit
    assert len(loss_trace(run)) == STEPS_PER_EPOCH
    assert final_top1(resumed.stdout) == final_top1(ref.stdout)


def rank_process(launcher: subprocess.Popen, local_rank: int) -> psutil.Process:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                cmd = child.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "dsvit" in cmd and f"--local_rank={local_rank}" in cmd:
                return child
        time.sleep(0.1)
    raise AssertionError(f"no rank {local_rank} under the launcher")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rank 1", "process group"])
def test_a_signal_under_the_launcher_stops_every_rank_at_one_step(tmp_path, target):
    """SIGUSR1 under ``deepspeed --num_gpus 2``, and the launcher passes on 138:

    - to rank 1 alone (as when a launcher forwards a signal rank by rank): rank 0 learns it from
      the per-step all-reduce, both write their part of one checkpoint, rank 0 prints the line;
    - to every process of the job, as Slurm's ``--signal=USR1@180`` does, with the launchers started
      as ``launchers/slurm.sbatch`` starts them (USR1 and TERM ignored; USR1 would kill them) and a
      loader worker per rank."""
    run, port = tmp_path / "run", free_port()
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(port), "--module", "dsvit", *TRAIN,
           "train.epochs=2", f"run.dir={run}", f"data.workers={int(target == 'process group')}"]
    if target == "process group":
        cmd = ["bash", "-c", 'trap "" USR1 TERM; exec "$@"', "bash", *cmd]
    def sigusr1_at_step_5(launcher):
        wait_for_step(launcher, run, 5)
        if target == "rank 1":
            rank_process(launcher, 1).send_signal(signal.SIGUSR1)
        else:
            os.killpg(launcher.pid, signal.SIGUSR1)
    status, output = group_run(cmd, sigusr1_at_step_5, timeout=120, port=port)
    assert status == 138, output[-3000:]
    step = stopped_at(output, run, "SIGUSR1")
    assert 5 <= step < 2 * STEPS_PER_EPOCH    # checks every ~0.25 s: not necessarily mid-epoch
    tag = run / "checkpoints" / tag_for(step)
    assert all((tag / rank_file(r)).is_file() for r in (0, 1))
    assert json.loads((tag / MARKER).read_text())["world_size"] == 2


def fake_tools(tmp_path: Path, **scripts) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("srun_status, requeued", [(138, True), (1, False)])   # 143: the same test
def test_the_batch_script_requeues_a_run_that_stopped_at_a_checkpoint(tmp_path, srun_status, requeued):
    log = tmp_path / "calls"
    bin_dir = fake_tools(tmp_path, scontrol=f'if [ "$1" = show ]; then echo localhost; else echo "$*" >> {log}; fi',
                         srun=f'printf "%s\\n" "$@" > {log}.srun; exit {srun_status}')
    env = {k: v for k, v in os.environ.items() if k != "DRY_RUN"}
    env.update(DS_ACCELERATOR="cpu", PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent),
                                                           os.environ["PATH"]]),
               SLURM_JOB_ID="4321", SLURM_JOB_NODELIST="node1", SLURM_SUBMIT_DIR=str(ROOT), GPUS_PER_NODE="1",
               SLURM_RESTART_COUNT="1", MASTER_PORT=str(free_port()))
    proc = subprocess.run(["bash", str(ROOT / "launchers" / "slurm.sbatch"), "tiny_test", "run.max_steps=3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == srun_status, proc.stderr
    srun_args = (tmp_path / "calls.srun").read_text().splitlines()
    assert srun_args[-2:] == ["run.max_steps=3", "checkpoint.resume=auto"]   # a requeued job resumes
    assert any(a.startswith('trap "" USR1 TERM; exec ') for a in srun_args)  # launchers keep out of it
    assert (log.read_text() if log.exists() else "") == ("requeue 4321\n" if requeued else "")
    assert ("requeueing job 4321" in proc.stderr) == requeued
