"""Nothing lost, nothing mixed: a run folder belongs to one run, a refused resume changes nothing,
a damaged checkpoint is skipped by auto-resume, eval/export read no pickles, a finished run resumed
reports its accuracy. Every test asserts on what the folder holds afterwards."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch import ROOT, launch, loss_trace
from plugin_harness import assert_runs_equal

pytestmark = pytest.mark.slow


def snapshot(run: Path) -> dict:
    """Every file under the run folder with its bytes."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def tags(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())


def test_fresh_run_in_a_folder_of_another_run(tmp_path):
    run = tmp_path / "run"
    first = ["run.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=5"]
    launch(run, first)
    before = snapshot(run)
    proc = launch(run, ["run.max_steps=2", "model.depth=3", "checkpoint.every_steps=1"], check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "already holds a run (checkpoints, tb, config.yaml)" in out
    assert "checkpoint.resume=auto" in out and "run.overwrite=true" in out
    assert snapshot(run) == before                       # nothing changed, not even config.yaml

    launch(run, ["run.max_steps=2", "model.depth=3", "checkpoint.every_steps=1", "checkpoint.keep_last=1",
                 "run.overwrite=true"])
    (aside,) = sorted(run.glob("replaced-*"))
    # the old run, intact (final_logits.pt is the test script's, not a run file: it stays)
    assert snapshot(aside) == {k: v for k, v in before.items() if k != "final_logits.pt"}
    assert tags(run) == ["step00000002"]                  # keep_last=1 pruned only this run's tags
    marker = json.loads((run / "checkpoints" / "step00000002" / "COMPLETE").read_text())
    assert marker["depth"] == 3 and sorted(loss_trace(run)) == [1, 2]


def test_refused_resume_leaves_the_folder_unchanged(tmp_path):
    run = tmp_path / "run"
    launch(run, ["run.max_steps=2"])
    before = snapshot(run)
    proc = launch(run, ["run.max_steps=2", "model.depth=3", "checkpoint.resume=auto"], check=False)
    assert proc.returncode != 0 and "depth: checkpoint has 2, this run has 3" in proc.stdout + proc.stderr
    assert snapshot(run) == before


def test_damaged_checkpoint_is_skipped_by_auto_resume(tmp_path):
    common = ["run.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=3"]
    launch(tmp_path / "straight", common)
    run = tmp_path / "run"
    launch(run, common)
    damaged = run / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])     # truncated, as by a full disk or a bad copy
    proc = launch(run, common + [f"checkpoint.resume={damaged.parent}"], check=False)
    assert proc.returncode != 0
    assert "step00000004 is damaged: mp_rank_00_model_states.pt has 1000 bytes" in proc.stdout + proc.stderr
    proc = launch(run, common + ["checkpoint.resume=auto"])
    assert "skips a damaged checkpoint" in proc.stdout and "mp_rank_00_model_states.pt" in proc.stdout
    assert "resumed from" in proc.stdout and "step00000002" in proc.stdout
    assert_runs_equal(tmp_path / "straight", run, 4)     # the redone steps equal the lost ones


def test_export_and_eval_weights_need_no_pickled_files(tmp_path):
    run = tmp_path / "run"
    launch(run, ["run.max_steps=2", "run.zero_stage=2", "train.ema_decay=0.5"])
    tag = run / "checkpoints" / "step00000002"
    for f in list(tag.glob("*model_states.pt")) + list(tag.glob("*optim_states.pt")):
        f.unlink()                                       # DeepSpeed's pickles: eval/export never read them
    from dsvit.cli import main
    from dsvit.engine.checkpoint import MARKER
    marker = json.loads((tag / MARKER).read_text())
    marker["files"] = {k: v for k, v in marker["files"].items() if (tag / k).exists()}
    (tag / MARKER).write_text(json.dumps(marker))
    assert main(["export", str(run), str(tmp_path / "m.safetensors")]) == 0
    assert main(["export", str(run), str(tmp_path / "e.safetensors"), "--ema"]) == 0


def test_export_without_checkpoint_is_one_clear_line(tmp_path, capsys):
    from dsvit.cli import main
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no intact checkpoint under" in err[0] and "train first" in err[0]


def dsvit_train(run: Path, *overrides) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("dsvit")), "train", "--config", "tiny_test",
           f"run.dir={run}", "data.synthetic_train=128", "data.synthetic_val=40", "data.workers=0",
           "train.epochs=1", *overrides]
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_finished_run_resumed_reports_its_accuracy(tmp_path):
    run = tmp_path / "run"
    first = dsvit_train(run)
    assert first.returncode == 0, first.stdout + first.stderr
    top1 = [l for l in first.stdout.splitlines() if l.startswith("final top-1")]
    (run / "checkpoints" / "latest").unlink()            # a user tidied up: still a clean exit
    again = dsvit_train(run, "checkpoint.resume=auto")
    assert again.returncode == 0, again.stdout + again.stderr
    assert [l for l in again.stdout.splitlines() if l.startswith("final top-1")] == top1
    assert "nan" not in top1[0]


def test_unwritable_run_dir_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = launch(blocker / "run", ["run.max_steps=1"], check=False)
    assert proc.returncode != 0
    assert f"run.dir={blocker / 'run'} cannot be written" in proc.stdout + proc.stderr
