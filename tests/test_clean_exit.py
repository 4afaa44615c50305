"""A multi-rank command that ended cleanly exits 0 on every rank.

Without ``close_world`` a gloo worker thread can free a finished collective's tensor while the
interpreter shuts down and the rank aborts ("terminate called without an active exception"): 12 of
30 two-rank launches of tests/scripts/gloo_exit.py without ``--close`` aborted, 0 of 30 with it
(torch 2.14, 2 CPU cores). Six launches: a regression fails this test with a probability of ~0.95."""
from __future__ import annotations

import subprocess
import sys

from launch import DEEPSPEED, ENV, ROOT, free_port, release_shm

SCRIPT = ROOT / "tests" / "scripts" / "gloo_exit.py"
PROBE = ROOT / "tests" / "scripts" / "world_after_train.py"


def test_ranks_exit_cleanly_after_close_world():
    for _ in range(6):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(SCRIPT), "--close"]
        done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert "terminate called" not in done.stderr


def test_a_clean_two_rank_train_destroys_its_process_groups(tmp_path):
    """What ``dsvit train`` runs: after ``cli.main`` returns 0 on both ranks no group is left."""
    port = free_port()
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(port), str(PROBE), str(tmp_path),
           "--config", "tiny_test", f"run.dir={tmp_path / 'run'}", "data.synthetic_train=128",
           "data.synthetic_val=40", "data.workers=0", "run.max_steps=3"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        release_shm(port)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "status=0 initialized=False\n"
