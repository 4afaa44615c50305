"""The launchers check their inputs before starting anything and print what they start: bad
hostfiles, a batch the world size does not divide, an unresolvable master, a busy port are refused
with one clear line (exit 2); DRY_RUN=1 prints the exact deepspeed/srun command. No training."""
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from launch import free_port

ROOT = Path(__file__).resolve().parent.parent
L = ROOT / "launchers"
VENV_BIN = str(Path(sys.executable).parent)


def run(script, *args, cwd=None, path_extra=(), **env):
    """``script args`` with DRY_RUN=1 and the venv on PATH; run in ``cwd``, which is also HOME
    (the launcher reads .deepspeed_env from both)."""
    e = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    e.update(DRY_RUN="1", DS_ACCELERATOR="cpu",
             PATH=os.pathsep.join([*map(str, path_extra), VENV_BIN, os.environ["PATH"]]), **env)
    if cwd is not None:
        e["HOME"] = str(cwd)
    return subprocess.run(["bash", str(L / script), *map(str, args)], cwd=cwd or ROOT, env=e,
                          capture_output=True, text=True, timeout=60)


def refused(proc, message):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert message in proc.stderr, proc.stderr
    assert proc.stdout == ""   # nothing printed as started


def hostfile(tmp_path, text, name="hostfile"):
    f = tmp_path / name
    f.write_text(text)
    return f


def test_single_node_dry_run_prints_the_command():
    proc = run("single_node.sh", 2, "tiny_test", "run.max_steps=3")
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.strip()
    assert cmd.startswith("OMP_NUM_THREADS=")
    assert " DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --master_port " in cmd
    assert cmd.endswith("--module dsvit train --config tiny_test run.max_steps=3")
    assert "global batch 16 = 2 rank(s) x 8 per micro-batch" in proc.stderr
    assert "nothing started" in proc.stderr


def test_batch_not_divisible_by_world_size(tmp_path):
    refused(run("single_node.sh", 3, "tiny_test"),
            "train.batch_size=16 is not divisible by world size 3 x train.grad_accum 1")
    hf = hostfile(tmp_path, "a slots=2\nb slots=2\n")
    refused(run("per_node.sh", hf, 0, "127.0.0.1", "tiny_test", "train.batch_size=10"),
            "world size 4 (the hostfile's slots): train.batch_size=10 is not divisible by world size 4")
    refused(run("single_node.sh", "two", "tiny_test"), "NPROC must be a whole number >= 1, got 'two'")
    refused(run("single_node.sh", 1, "tiny_test", "train.no_such_key=1"), "no_such_key")


@pytest.mark.parametrize("text,message", [
    ("localhost slots=1\nnode-b slots=x\n", "line 2: 'node-b slots=x' is not 'HOST slots=N'"),
    ("localhost slots=1\nnode-b\n", "line 2: 'node-b' is not 'HOST slots=N'"),
    ("localhost slots=0\n", "line 1: localhost has slots=0; give at least 1"),
    ("# nodes\nlocalhost slots=1\nlocalhost slots=1\n", "line 3: localhost is listed twice"),
    ("# only a comment\n\n", "lists no host"),
])
def test_malformed_hostfile(tmp_path, text, message):
    refused(run("per_node.sh", hostfile(tmp_path, text), 0, "127.0.0.1", "tiny_test"), message)


def test_missing_hostfile_and_node_rank_outside_it(tmp_path):
    refused(run("per_node.sh", tmp_path / "nope", 0, "127.0.0.1", "tiny_test"),
            "does not exist (DeepSpeed would train on this machine alone)")
    hf = hostfile(tmp_path, "localhost slots=1\n127.0.0.1 slots=1\n")
    refused(run("per_node.sh", hf, 2, "127.0.0.1", "tiny_test"),
            "node rank 2 is outside the hostfile's 2 node(s) (0..1)")


def test_unresolvable_master(tmp_path):
    hf = hostfile(tmp_path, "localhost slots=1\n127.0.0.1 slots=1\n")
    refused(run("per_node.sh", hf, 1, "no-such-host.invalid", "tiny_test"),
            "MASTER_ADDR 'no-such-host.invalid' does not resolve")


def test_master_port_busy_on_node_0(tmp_path):
    hf = hostfile(tmp_path, "localhost slots=1\n127.0.0.1 slots=1\n")
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        refused(run("per_node.sh", hf, 0, "127.0.0.1", "tiny_test", MASTER_PORT=str(port)),
                f"MASTER_PORT {port} is in use on this machine")


def test_per_node_dry_run_warns_when_master_not_up(tmp_path):
    hf = hostfile(tmp_path, "localhost slots=1\n127.0.0.1 slots=1\n")
    port = free_port()
    proc = run("per_node.sh", hf, 1, "127.0.0.1", "tiny_test", MASTER_PORT=str(port))
    assert proc.returncode == 0, proc.stderr
    assert f"warning: master 127.0.0.1:{port} not reachable yet" in proc.stderr
    assert proc.stdout.strip().endswith(
        f"deepspeed --hostfile {hf} --no_ssh --node_rank 1 --master_addr 127.0.0.1 --master_port {port} "
        f"--module dsvit train --config tiny_test")


def fake_tools(tmp_path, **scripts):
    """Executables on a private PATH folder: name -> bash body."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        f = bin_dir / name
        f.write_text(f"#!/usr/bin/env bash\n{body}\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_ssh_path_checks_pdsh_and_deepspeed_env(tmp_path):
    hf = hostfile(tmp_path, "localhost slots=1\n127.0.0.1 slots=1\n")
    if not any((Path(d) / "pdsh").exists() for d in os.environ["PATH"].split(os.pathsep)):
        refused(run("hostfile_multi_node.sh", hf, "127.0.0.1", "tiny_test", cwd=tmp_path),
                "pdsh is not installed")
    bin_dir = fake_tools(tmp_path, pdsh="exit 1")
    (tmp_path / ".deepspeed_env").write_text("OMP_NUM_THREADS=1\n\nGLOO_SOCKET_IFNAME=lo\n")
    refused(run("hostfile_multi_node.sh", hf, "127.0.0.1", "tiny_test", cwd=tmp_path, path_extra=[bin_dir]),
            ".deepspeed_env, line 2: '' is not VAR=value")
    (tmp_path / ".deepspeed_env").write_text("OMP_NUM_THREADS=1\nGLOO_SOCKET_IFNAME=lo\n")
    proc = run("hostfile_multi_node.sh", hf, "127.0.0.1", "tiny_test", cwd=tmp_path, path_extra=[bin_dir])
    assert proc.returncode == 0, proc.stderr
    assert "forwards to every node: OMP_NUM_THREADS, GLOO_SOCKET_IFNAME" in proc.stderr
    assert proc.stdout.strip().endswith(
        f"deepspeed --hostfile {hf} --launcher pdsh --master_addr 127.0.0.1 --master_port 29500 "
        f"--module dsvit train --config tiny_test")


def test_slurm_dry_run_writes_hostfile_and_prints_srun(tmp_path):
    bin_dir = fake_tools(tmp_path, scontrol='printf "localhost\\n127.0.0.1\\n"', srun="exit 1")
    proc = run("slurm.sbatch", "tiny_test", "train.batch_size=8", cwd=tmp_path, path_extra=[bin_dir],
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[1-2]", SLURM_SUBMIT_DIR=str(ROOT),
               GPUS_PER_NODE="2")
    assert proc.returncode == 0, proc.stderr
    hf = tmp_path / "hostfile.4242"
    assert hf.read_text() == "localhost slots=2\n127.0.0.1 slots=2\n"
    assert "hostfile " + str(hf) + ": 2 node(s), world size 4" in proc.stderr
    assert "srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c" in proc.stdout
    assert proc.stdout.strip().endswith(f"{L} {hf} localhost tiny_test train.batch_size=8")
    refused(run("slurm.sbatch", "tiny_test", "train.batch_size=6", cwd=tmp_path, path_extra=[bin_dir],
                SLURM_JOB_ID="4243", SLURM_JOB_NODELIST="node[1-2]", SLURM_SUBMIT_DIR=str(ROOT),
                GPUS_PER_NODE="2"),
            "train.batch_size=6 is not divisible by world size 4")
