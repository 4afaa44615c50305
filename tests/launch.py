"""Run the test training script through the real deepspeed launcher and read back its results."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "train_memory.py"
DEEPSPEED = Path(sys.executable).with_name("deepspeed")


ENV = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def release_shm(port: int) -> list[Path]:
    """Unlink the DeepSpeed shm all-reduce buffers a run on ``port`` left; returns what was left.

    dsvit unlinks DeepSpeed's 66 MiB /dev/shm all-reduce buffer names right after init
    (cli._release_shm_buffer_name); a launch that left any behind is a failure, but the caller cleans
    up first so one failure cannot fill /dev/shm for the rest of the suite."""
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    for f in left:
        f.unlink(missing_ok=True)
    return left


def node_commands(run_dir: Path, port: int, args: list[str], nodes: int = 2) -> list[list[str]]:
    """One deepspeed launcher command per simulated node on 127.0.0.1 (``--no_ssh --node_rank K``,
    one rank each), as a cluster without ssh between its nodes runs them; the hostfile is written
    beside ``run_dir``."""
    hostfile = Path(run_dir).parent / f"{Path(run_dir).name}.hostfile"
    hostfile.parent.mkdir(parents=True, exist_ok=True)
    hostfile.write_text("".join(f"{h} slots=1\n" for h in ["localhost", "127.0.0.1"][:nodes]))
    return [[str(DEEPSPEED), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(k),
             "--master_addr", "127.0.0.1", "--master_port", str(port), *args] for k in range(nodes)]


def group_run(cmd: list, during=lambda proc: None, timeout: float = 300, port: int = 0) -> tuple[int, str]:
    """Run ``cmd`` as its own process group (stdout and stderr together), ``during(proc)`` while it
    runs (e.g. wait for a step, then signal it); (exit status, output). Whatever happens, nothing of
    the group is left running, nor (``port``) a DeepSpeed shm buffer of the run."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        during(proc)
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if port:
            release_shm(port)
    return proc.returncode, output


def launch(run_dir: Path, overrides: list[str], world_size: int = 1, extra: list[str] = (),
           check: bool = True, script: Path = SCRIPT) -> subprocess.CompletedProcess:
    port = free_port()
    cmd = [str(DEEPSPEED), "--num_gpus", str(world_size), "--master_port", str(port),
           str(script), *extra, f"run.dir={run_dir}", *overrides]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    finally:
        left = release_shm(port)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    if check:
        assert not left, f"the run left DeepSpeed shm buffers behind: {[f.name for f in left]}"
    return proc


def launch_nodes(run_dir: Path, overrides: list[str], nodes: int = 2, extra: list[str] = (),
                 script: Path = SCRIPT) -> list[subprocess.CompletedProcess]:
    """Simulated nodes (``node_commands``); all must succeed. ``script="dsvit"``: the real CLI
    (``--module dsvit``; ``extra`` starts with ``train``)."""
    port = free_port()
    args = [*(["--module", "dsvit"] if script == "dsvit" else [str(script)]), *extra,
            f"run.dir={run_dir}", *overrides]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in node_commands(run_dir, port, args, nodes)]
    done = []
    for k, p in enumerate(procs):
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    release_shm(port)
    bad = [(k, d) for k, d in enumerate(done) if d.returncode != 0]
    if bad:
        k, d = bad[0]
        raise AssertionError(f"node {k} failed ({d.returncode}): {' '.join(d.args)}\n{d.stdout[-3000:]}\n{d.stderr[-3000:]}")
    return done


def loss_trace(run_dir: Path) -> dict[int, float]:
    """step -> logged train/loss; a step logged twice (after a kill and resume) keeps the last."""
    trace = {}
    for line in (Path(run_dir) / "tb" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            trace[row["step"]] = row["train/loss"]
    return trace


def checkpoint_contents(tag_dir: Path) -> dict:
    """Every file of a checkpoint tag loaded, minus things that legitimately differ between runs."""
    from safetensors.torch import load_file
    out = {}
    for f in sorted(Path(tag_dir).iterdir()):
        if f.suffix == ".safetensors":
            out[f.name] = load_file(str(f))
        if f.suffix == ".pt":
            data = torch.load(f, map_location="cpu", weights_only=False)
            if isinstance(data, dict):
                data.pop("config", None)   # run.dir differs
                data.pop("ds_config", None)
            out[f.name] = data
    return out


def assert_same(a, b, path="") -> None:
    """Recursive bit-exact equality of nested checkpoint structures."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype, path
        assert torch.equal(a, b), f"{path}: max diff {(a.float() - b.float()).abs().max()}"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        assert type(a) is type(b), path
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"
