"""Example-level pruning through the real deepspeed launcher (gloo on CPU): identical replicated
state on two ranks (ZeRO-3), the active set after a round, bit-exact resume mid-epoch and across a
round / prune decision for both policies at world size 1 and 2, activation checkpointing (the
CLS-variance hook records once per forward), per-rank splits, switched off equals absent, and the
epoch plan the trainer runs."""
import json

import numpy as np
import pytest
import torch

from dsvit.plugins.example_pruning import STREAM
from dsvit.plugins.example_pruning.forgetting import initial_active
from launch import assert_same, launch, loss_trace
from plugin_harness import check_off_equals_absent, check_resume_equivalence

pytestmark = pytest.mark.slow
NAME = "example_pruning"
E = f"plugins.{NAME}"
# train_memory.py: 512 in-memory samples; a global batch of 64 makes epochs of a few steps
BASE = ["run.precision=fp32", "train.batch_size=64", f"{E}.enabled=true"]
# 409 of 512 active: 6 steps per epoch; rounds at the start of epochs 1 and 2 (steps 6 and 12)
FORGET = [*BASE, "train.epochs=3", f"{E}.round_epochs=[1,2]", f"{E}.remove_fraction=0.1",
          f"{E}.window_presentations=3"]
# 8 full steps, then 2 pruned epochs of (512 - 153) // 64 = 5 steps, then 8 full (anneal)
INFOB = [*BASE, "train.epochs=4", f"{E}.policy=infobatch", f"{E}.anneal_fraction=0.25"]


def plugin_states(run, world_size):
    return [torch.load(run / f"plugins_rank{r}.pt", weights_only=True)[NAME] for r in range(world_size)]


def test_two_ranks_hold_identical_state_after_a_round_under_zero3(tmp_path):
    run = tmp_path / "z3"
    launch(run, [*FORGET, "run.max_steps=12", "run.zero_stage=3"], 2, extra=["--dump-plugins"])
    a, b = plugin_states(run, 2)
    assert_same(a["state"], b["state"])
    core = a["state"]["core"]
    assert a["state"]["rounds_done"] == 1
    start = initial_active(512, 409, np.random.default_rng([0, STREAM]))
    active = core["active"].numpy()
    assert active.sum() == 409 and (active ^ start).sum() == 2 * 51   # 51 dropped, 51 restored
    # epoch 1's window (applied at its end): 6 steps x 64 presentations, one CLS variance each
    assert int(core["npres"].sum()) == int(core["clsvar_n"].sum()) == 384
    assert np.isfinite(core["clsvar_sum"].numpy()).all() and core["clsvar_sum"].sum() > 0
    assert active[core["npres"].numpy() > 0].all()             # only active examples presented


@pytest.mark.parametrize("world_size", [1, 2])
def test_forgetting_resumes_exactly_mid_epoch_and_across_a_round(tmp_path, world_size):
    """Stop at step 5 (one step before round 1, epoch 0's events half recorded), resume: the same
    round, weights, plugin state, events buffer and losses as the uninterrupted run at step 10."""
    check_resume_equivalence(tmp_path, FORGET, world_size, k=5)
    rows = [json.loads(x) for x in (tmp_path / f"resumed{world_size}" / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get(f"{NAME}/dropped") == 51 for r in rows)


@pytest.mark.parametrize("world_size,k", [(1, 10), (2, 6)])
def test_infobatch_resumes_exactly(tmp_path, world_size, k):
    """k=6: stop inside the full epoch 0, resume through the first prune decision (step 8);
    k=10: stop inside pruned epoch 1 (its prune set re-applied, not re-drawn), through epoch 2's
    decision and into the anneal epoch."""
    check_resume_equivalence(tmp_path, INFOB, world_size, k=k)
    run = tmp_path / f"straight{world_size}"
    tag = run / "checkpoints" / f"step{2 * k:08d}"
    assert json.loads((tag / "COMPLETE").read_text())["epoch_steps"] == [8, 5, 5, 8]   # the plan
    assert sorted(loss_trace(run)) == list(range(1, 2 * k + 1))
    rows = [json.loads(x) for x in (run / "tb" / "metrics.jsonl").read_text().splitlines()]
    pruned = [r[f"{NAME}/pruned"] for r in rows if f"{NAME}/pruned" in r]
    p = [r[f"{NAME}/p"] for r in rows if f"{NAME}/p" in r]
    assert pruned and all(0 < n <= 153 for n in pruned) and all(0 < x <= 0.5 for x in p)


def test_activation_checkpointing_records_the_same_events(tmp_path):
    """model.grad_checkpointing: the CLS-variance hook runs outside the recomputed halves, so the
    plugin state (variances included) and the losses equal the plain run's."""
    over = [*FORGET, "run.max_steps=12"]
    launch(tmp_path / "plain", over, 1, extra=["--dump-plugins"])
    launch(tmp_path / "ckpt", [*over, "model.grad_checkpointing=true"], 1, extra=["--dump-plugins"])
    (a,), (b,) = plugin_states(tmp_path / "plain", 1), plugin_states(tmp_path / "ckpt", 1)
    assert_same(a, b)
    assert int(a["state"]["core"]["clsvar_n"].sum()) == 6 * 64
    assert loss_trace(tmp_path / "plain") == loss_trace(tmp_path / "ckpt")


def test_per_rank_split_keeps_per_rank_state(tmp_path):
    run = tmp_path / "per_rank"
    launch(run, [*FORGET, "run.max_steps=8", f"{E}.per_rank_split=true", f"{E}.tie_break=uid"], 2,
           extra=["--dump-plugins"])
    a, b = plugin_states(run, 2)
    assert "core" not in a["state"] and a["state"] == b["state"]
    act = [s["rank"]["core"]["active"].numpy() for s in (a, b)]
    assert act[0].sum() == act[1].sum() == 409 and not np.array_equal(act[0], act[1])
    for r, s in enumerate((a, b)):   # each rank's own seed (seed + rank), its own round
        start = initial_active(512, 409, np.random.default_rng([r, STREAM]))
        assert (act[r] ^ start).sum() == 2 * 51


def test_switched_off_equals_absent(tmp_path):
    check_off_equals_absent(tmp_path, NAME, ["run.precision=fp32", "train.batch_size=64", "train.epochs=3"],
                            steps=7)
