"""Checks every plugin must pass, reusable by each plugin's tests.

- resume equivalence: 2k steps straight vs k steps, stop, new process, resume, k steps: identical
  checkpoint contents (weights, optimizer state, plugin state, RNG) and loss trace;
- switched off equals absent: ``plugins.NAME.enabled=false`` trains bit-identically to no plugin.
"""
from __future__ import annotations

from pathlib import Path

from launch import assert_same, checkpoint_contents, launch, loss_trace


def straight_and_resumed(tmp: Path, overrides: list[str], world_size: int, k: int = 3,
                         script=None) -> tuple[Path, Path]:
    common = [f"run.max_steps={2 * k}", f"checkpoint.every_steps={k}", "checkpoint.keep_last=3",
              *overrides]
    kw = {"script": script} if script else {}
    straight, resumed = tmp / f"straight{world_size}", tmp / f"resumed{world_size}"
    launch(straight, common, world_size, **kw)
    launch(resumed, common, world_size, extra=["--stop-at", str(k)], **kw)
    launch(resumed, common + ["checkpoint.resume=auto"], world_size, **kw)
    return straight, resumed


def assert_runs_equal(a: Path, b: Path, step: int) -> None:
    tag = f"step{step:08d}"
    assert_same(checkpoint_contents(a / "checkpoints" / tag), checkpoint_contents(b / "checkpoints" / tag))
    ta, tb = loss_trace(a), loss_trace(b)
    assert sorted(ta) == sorted(tb) and len(ta) >= step
    assert all(ta[s] == tb[s] for s in ta), {s: (ta[s], tb[s]) for s in ta if ta[s] != tb[s]}


def check_resume_equivalence(tmp: Path, overrides: list[str], world_size: int, k: int = 3, script=None):
    straight, resumed = straight_and_resumed(tmp, overrides, world_size, k, script)
    assert_runs_equal(straight, resumed, 2 * k)


def check_off_equals_absent(tmp: Path, plugin: str, overrides: list[str] = (), steps: int = 3,
                            world_size: int = 1, script=None):
    common = [f"run.max_steps={steps}", *overrides]
    kw = {"script": script} if script else {}
    launch(tmp / "absent", common, world_size, **kw)
    launch(tmp / "off", common + [f"plugins.{plugin}.enabled=false"], world_size, **kw)
    assert_runs_equal(tmp / "absent", tmp / "off", steps)
