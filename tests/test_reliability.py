"""Issue 27, items 1, 2, 4, 5: a resume with another data layout is refused, export/eval build the
checkpoint's own architecture, a full disk during a checkpoint is one line and leaves the last tag
intact, and a run folder is locked for a run's life. Each test asserts on what the run folder holds
afterwards and what was printed. Training runs are single-process ``dsvit train`` on the tiny_test
recipe (one trained run is shared, copied where a test changes it)."""
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from launch import ROOT

TINY = ["data.synthetic_train=128", "data.synthetic_val=40", "data.workers=0", "train.epochs=1",
        "run.max_steps=4", "checkpoint.every_steps=2"]
ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}


def train(run: Path, *overrides, code: str = "") -> subprocess.CompletedProcess:
    """``dsvit train --config tiny_test`` in a fresh process; ``code`` runs first in it (injection)."""
    argv = ["train", "--config", "tiny_test", f"run.dir={run}", *TINY, *overrides]
    script = f"{code}\nimport sys\nfrom dsvit.cli import main\nsys.exit(main({argv!r}))"
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)


def snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reliability") / "run"
    proc = train(run)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (run / "run.lock").exists()               # released at the end of the run
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ---------------------------------------------------------------- 1. resume guards
def test_resume_with_other_data_streams_is_refused(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    before = snapshot(run)
    proc = train(run, "data.streams=4", "checkpoint.resume=auto")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "data_streams: checkpoint has 8, this run has 4 (set data.streams=8)" in out
    assert snapshot(run) == before                        # nothing trained, nothing rewritten


def test_resume_says_which_other_settings_changed(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    proc = train(run, "train.lr=0.002", "train.eval_samples=20", "checkpoint.resume=auto")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if "resuming with settings that differ" in l]
    assert len(lines) == 1, proc.stdout + proc.stderr       # one line, not one per key
    assert "train.eval_samples: 0 -> 20; train.lr: 0.001 -> 0.002" in lines[0]
    assert "checkpoint.resume" not in lines[0] and "data.mean" not in lines[0]   # launch keys; tuples == lists


def test_changed_settings_flattens_and_skips_launch_keys():
    from dsvit.engine.resume import changed_settings
    before = {"train": {"lr": 0.001, "betas": [0.9, 0.999]}, "checkpoint": {"resume": ""}, "plugins": {"toe": {"enabled": False}}}
    after = {"train": {"lr": 0.002, "betas": [0.9, 0.999]}, "checkpoint": {"resume": "auto"}, "plugins": {"toe": {"enabled": True}}}
    assert changed_settings(before, after) == ["plugins.toe.enabled: False -> True", "train.lr: 0.001 -> 0.002"]
    assert changed_settings(before, before) == []


def test_every_marker_field_is_compared_or_allowed(trained):
    """A field recorded in the marker that changes the run's meaning must be in the fingerprint
    (compared on resume); the others are listed, with the reason, in MAY_DIFFER."""
    from dsvit import config as C
    from dsvit.engine.checkpoint import MAY_DIFFER
    from dsvit.engine.trainer import Trainer
    marker = json.loads((trained / "checkpoints" / "step00000004" / "COMPLETE").read_text())
    cfg = C.load_config("tiny_test", [])
    fake = SimpleNamespace(model_cfg=cfg.model, arch={}, num_classes=10, plugins=[], cfg=cfg,
                           total_steps=4, epoch_steps=[8], zero_stage=0)
    assert set(marker) == set(Trainer.fingerprint(fake)) | set(MAY_DIFFER)
    assert not set(Trainer.fingerprint(fake)) & set(MAY_DIFFER)


# ---------------------------------------------------------------- 2. export/eval from the checkpoint
def foreign_config(run: Path) -> None:
    """A config.yaml of another model beside the run's checkpoints."""
    from dsvit import config as C
    C.save_resolved(C.load_config("tiny_test", ["model.embed_dim=64", "model.depth=3",
                                                "model.num_heads=4", f"run.dir={run}"]), run / "config.yaml")


def printed_call(out: str) -> str:
    (line,) = [l for l in out.splitlines() if l.startswith("load it with: ")]
    return line[len("load it with: "):]


def load_printed(call: str) -> torch.nn.Module:
    import timm
    return eval(call, {"timm": timm})


def test_export_and_eval_use_the_checkpoints_architecture(trained, tmp_path, capsys):
    from safetensors.torch import load_file

    from dsvit.cli import main
    run = copy_of(trained, tmp_path)
    foreign_config(run)
    out = tmp_path / "m.safetensors"
    assert main(["export", str(run), str(out)]) == 0
    printed = capsys.readouterr()
    assert "model.embed_dim: config.yaml has 64, the checkpoint 32" in printed.err
    call = printed_call(printed.out)
    assert "embed_dim=32" in call and "depth=2" in call
    model = load_printed(call)                             # the printed call loads the file
    exported = load_file(str(out))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in exported.items())

    from dsvit.engine.eval_run import run_eval
    from dsvit.engine.setup import World
    from dsvit.registry import build_plugins
    assert run_eval(run, [], World(), build_plugins) == 0
    printed = capsys.readouterr()
    assert "model.depth: config.yaml has 3, the checkpoint 2" in printed.err
    assert re.search(r"^\s+model\s+[\d.]+\s+[\d.]+", printed.out, re.M)   # a result row

    # a grown model (a growth plugin's depth recorded in the marker): the call says the grown depth
    from dsvit import config as C
    from dsvit.model.vit import create_vit
    from safetensors.torch import save_file
    tag = run / "checkpoints" / "step00000004"
    grown = create_vit(C.load_config("tiny_test", ["model.depth=3"]).model, 10)
    save_file({k: v.contiguous() for k, v in grown.state_dict().items()}, str(tag / "weights.safetensors"))
    marker = json.loads((tag / "COMPLETE").read_text())
    marker.update(depth=3, architecture={"depth": 3})
    marker["files"]["weights.safetensors"] = (tag / "weights.safetensors").stat().st_size
    (tag / "COMPLETE").write_text(json.dumps(marker))
    C.save_resolved(C.load_config("tiny_test", [f"run.dir={run}"]), run / "config.yaml")   # the recipe's depth 2
    assert main(["export", str(run), str(out)]) == 0
    call = printed_call(capsys.readouterr().out)
    assert "depth=3" in call and len(load_printed(call).blocks) == 3

    # weights that fit neither: refused before anything is written, naming the difference
    out.unlink()
    marker.update(depth=2, architecture={})
    (tag / "COMPLETE").write_text(json.dumps(marker))
    assert main(["export", str(run), str(out)]) == 2
    err = capsys.readouterr().err
    assert "do not fit the model" in err and "blocks.2." in err and not out.exists()


# ---------------------------------------------------------------- 4. a full disk
FULL_DISK = """
import collections, shutil, torch
real_save = torch.save
def save(obj, f, *a, **k):   # the disk fills up while step 4 is written: torch's own words
    if str(f).endswith("step00000004/dsvit_state.pt"):
        raise RuntimeError("basic_ios::clear: iostream error")
    return real_save(obj, f, *a, **k)
torch.save = save
usage = collections.namedtuple("usage", "total used free")
shutil.disk_usage = lambda path: usage(10 << 30, (10 << 30) - 4096, 4096)
"""


def test_full_disk_during_a_checkpoint_is_one_line(tmp_path):
    run = tmp_path / "run"
    proc = train(run, code=FULL_DISK)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [l for l in proc.stderr.splitlines() if "no space left" in l]
    ckpts = run / "checkpoints"
    size = sum(json.loads((ckpts / "step00000002" / "COMPLETE").read_text())["files"].values())
    assert f"writing checkpoint step00000004 to {ckpts / 'step00000004'} failed" in line
    assert "no space left on device (4.0 KiB free" in line
    assert f"about {size / 1024:.1f} KiB, the size of step00000002" in line
    assert f"the last complete checkpoint {ckpts / 'step00000002'} is intact" in line
    assert "checkpoint.resume=auto" in line and "unfinished step00000004 was removed" in line
    # what is left: the last complete tag, named by latest; the unfinished one gone; no lock
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step00000002"]
    assert (ckpts / "latest").read_text() == "step00000002" and not (run / "run.lock").exists()
    proc = train(run, "checkpoint.resume=auto")            # space freed: it resumes from it
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in proc.stdout + proc.stderr
    assert (ckpts / "step00000004" / "COMPLETE").is_file()


def test_no_space_is_recognised_only_as_such():
    import errno

    from dsvit.engine.disk_space import is_no_space
    assert is_no_space(OSError(errno.ENOSPC, "No space left on device"), free=10 << 30, needed=0)
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert is_no_space(wrapped, free=10 << 30, needed=0)
    torch_words = RuntimeError("basic_ios::clear: iostream error")
    assert is_no_space(torch_words, free=4096, needed=1 << 20)
    assert not is_no_space(torch_words, free=10 << 30, needed=1 << 20)   # space left: another cause
    assert not is_no_space(OSError(errno.EACCES, "Permission denied"), free=0, needed=1)


# ---------------------------------------------------------------- 5. the run folder's lock
def lock_file(run: Path, pid: int, host: str = None) -> None:
    from dsvit.engine.run_folder import _start_time
    run.mkdir(parents=True, exist_ok=True)
    (run / "run.lock").write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                              "started": _start_time(pid), "since": "earlier",
                                              "token": "theirs"}))


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "120"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_live_run_keeps_its_folder(trained, tmp_path, live_pid):
    fresh = tmp_path / "fresh"
    lock_file(fresh, live_pid)                             # a run started a moment earlier
    proc = train(fresh)
    assert proc.returncode == 2
    assert f"run.dir={fresh} is in use by a live run (pid {live_pid}" in proc.stderr
    assert sorted(p.name for p in fresh.iterdir()) == ["run.lock"]   # no data, tb, checkpoints
    assert json.loads((fresh / "run.lock").read_text())["pid"] == live_pid

    run = copy_of(trained, tmp_path)                       # resume=auto while that run still trains
    lock_file(run, live_pid)
    before = snapshot(run)
    proc = train(run, "checkpoint.resume=auto")
    assert proc.returncode == 2 and "is in use by a live run" in proc.stderr
    assert snapshot(run) == before


def test_stale_and_foreign_locks(tmp_path, caplog):
    from dsvit.engine.run_folder import lock
    from dsvit.errors import ConfigError
    log = logging.getLogger("test_lock")
    run = tmp_path / "run"
    # a run SIGKILLed while holding the lock leaves it behind: the next start takes it over
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys, logging, time; from pathlib import Path; "
                              "from dsvit.engine.run_folder import lock; "
                              "lock(Path(sys.argv[1]), 0, logging.getLogger()); print('held', flush=True); "
                              "time.sleep(120)", str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=f"in use by a live run \\(pid {child.pid} on host"):
        lock(run, 0, log)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert json.loads((run / "run.lock").read_text())["pid"] == child.pid   # left behind
    with caplog.at_level(logging.WARNING, logger="test_lock"):
        held = lock(run, 0, log)
    assert "taking over the stale lock" in caplog.text and f"pid {child.pid}" in caplog.text
    assert json.loads((run / "run.lock").read_text())["pid"] == os.getpid()
    held.release()
    assert sorted(run.iterdir()) == []                      # released, nothing else left
    # a lock from another host cannot be checked: refused, saying how to remove it
    lock_file(run, 1, host="elsewhere")
    with pytest.raises(ConfigError) as e:
        lock(run, 0, log)
    assert "in use by another run (pid 1 on host elsewhere" in str(e.value)
    assert f"delete {run / 'run.lock'}" in str(e.value)
