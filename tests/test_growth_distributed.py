"""Progressive growth through the real deepspeed launcher (gloo on CPU): carried and reset Adam state
at a growth under ZeRO 1-3 on 2 ranks, resume equivalence (also inside an AutoProg search), the
search's decision on every rank, switched off equals absent, and the plugin composed with ToE, PSS,
EMA, activation checkpointing and gradient accumulation."""
import json

import pytest
import torch

from dsvit.model import surgery
from launch import launch
from plugin_harness import check_off_equals_absent, check_resume_equivalence

pytestmark = pytest.mark.slow
G = "plugins.growth"
# tiny_test at depth 4 and 32 px: depths [2, 3, 3, 4], resolutions [16, 20, 28, 32]
BASE = ["model.depth=4", "model.img_size=32", "run.precision=fp32", f"{G}.enabled=true"]
STEPS = [f"{G}.stage_unit=step", f"{G}.stage_starts=[0,4,8,12]"]
AUTO = [*STEPS, f"{G}.mode=auto", f"{G}.search_length=3", f"{G}.search_batches=1", f"{G}.cost=flops"]


def dumps(run, world_size, n=1):
    return [torch.load(run / f"rebuild{n}_rank{r}.pt", weights_only=False) for r in range(world_size)]


def rows(run):
    return [json.loads(x) for x in (run / "tb" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_growth_carries_adam_state_on_two_ranks(tmp_path, stage):
    """Growth 2 -> 3 blocks at step 4: on every rank each parameter's fp32 master is the grown
    momentum copy's value, its moments and step are its source's from before the rebuild."""
    run = tmp_path / "grow"
    launch(run, [*BASE, *STEPS, "run.max_steps=5", f"run.zero_stage={stage}"], 2, extra=["--dump-rebuilds"])
    src = surgery.duplicate_last(2, 3)
    for d in dumps(run, 2):
        before, after = d["before"], d["after"]
        assert d["block_map"] == src and d["step"] == 4
        for name, master in after["masters"].items():
            source = d["param_map"][name]
            assert source == surgery.source_name(name, src)
            assert torch.equal(master, d["request"][name].float()), name
            if name.startswith("blocks.2."):     # the duplicate equals its source block
                assert torch.equal(master, after["masters"][name.replace("blocks.2.", "blocks.1.")])
            for got, want in zip(after["moments"][name], before["moments"][source]):
                assert torch.equal(got, want), name
            assert after["steps"][name] == before["steps"][source] == 4.0
        assert d["lr_after"] == d["lr_before"]


def test_reset_policy_gives_a_fresh_optimizer(tmp_path):
    run = tmp_path / "reset"
    launch(run, [*BASE, *STEPS, "run.max_steps=5", "run.zero_stage=2", f"{G}.optimizer_state=reset"], 2,
           extra=["--dump-rebuilds"])
    for d in dumps(run, 2):
        for name, (m1, m2) in d["after"]["moments"].items():
            assert not m1.any() and not m2.any(), name
            assert d["after"]["steps"][name] == 0.0


@pytest.mark.parametrize("world_size", [1, 2])
def test_manual_growth_resumes_exactly(tmp_path, world_size):
    """Stop at step 5 (grown once, at 20 px), resume: the same weights, Adam state, momentum copies,
    EMA and losses as the uninterrupted run through the growth at step 8 and 12 (resolution only)."""
    check_resume_equivalence(tmp_path, [*BASE, *STEPS, "run.zero_stage=2", "train.ema_decay=0.9"],
                             world_size, k=5)
    tag = tmp_path / f"resumed{world_size}" / "checkpoints" / "step00000010"
    assert json.loads((tag / "COMPLETE").read_text())["architecture"] == {"depth": 3,
                                                                         "dynamic_img_size": True}
    res = {r["step"]: r["growth/resolution"] for r in rows(tmp_path / f"resumed{world_size}")
           if "growth/resolution" in r}
    assert res[1] == 16 and res[5] == 20 and res[9] == 28


def test_resume_inside_a_search_takes_the_same_decision(tmp_path):
    """2 ranks, ZeRO-3 (ZeRO-2: the composition test below), AutoProg: the stage-0 search trains the 4-block supernet on steps 0-2; stop at step
    2, inside it (its scoring batches saved per rank), resume: the same decision at step 3 (in the
    plugin state), weights, momentum copies and losses as the uninterrupted run."""
    check_resume_equivalence(tmp_path, [*BASE, *AUTO, "run.zero_stage=3"], 2, k=2)
    state = torch.load(tmp_path / "resumed2" / "checkpoints" / "step00000004" / "dsvit_state.pt",
                       weights_only=True)
    (decision,) = state["plugins"]["growth"]["decisions"]
    assert decision["step"] == 3 and decision["kind"] == "search"
    assert len(decision["candidates"]) == 9 and len(decision["scores"]) == 9
    assert state["architecture"]["depth"] == decision["depth"]


def test_search_with_measured_times_agrees_across_ranks(tmp_path):
    run = tmp_path / "timed"
    launch(run, [*BASE, *AUTO, f"{G}.cost=time", f"{G}.time_iters=2", "run.max_steps=8"], 2)
    logged = [r for r in rows(run) if any(k.startswith("growth/search0/") for k in r)]
    assert logged and "growth/search0/w" in logged[0]


def test_switched_off_equals_absent(tmp_path):
    check_off_equals_absent(tmp_path, "growth", ["model.depth=4", "model.img_size=32"], steps=4)


def test_composes_with_token_plugins_ema_checkpointing_and_accumulation(tmp_path):
    """ToE (before block 1: it follows the growth map), PSS, AutoProg, EMA, activation checkpointing
    and 2 micro-batches per step on 2 ranks, ZeRO-2: stopped inside the stage-0 search and resumed,
    the same."""
    check_resume_equivalence(tmp_path, [
        *BASE, *AUTO, "run.zero_stage=2", "train.ema_decay=0.9", "model.grad_checkpointing=true",
        "train.grad_accum=2", "train.batch_size=32", "plugins.toe.enabled=true",
        "plugins.toe.stage_starts=[0,0.3,0.6]", "plugins.pss.enabled=true", "plugins.pss.drop_start=0.6"], 2, k=2)


def test_zero3_does_not_reapply_a_skipped_layers_gradient(tmp_path):
    """DeepSpeed 0.19.8's ZeRO-3 steps a layer that took no part in a step with its previous
    gradient; with the trainer's clearing it moves as under ZeRO-2 (Adam's momentum only)."""
    from launch import ROOT
    script = ROOT / "tests" / "scripts" / "zero_unused_grad.py"
    out = {}
    for name, stage, extra in (("z2", 2, []), ("z3", 3, []), ("z3_stale", 3, ["--no-clear"])):
        launch(tmp_path / name, [], 1, script=script, extra=[str(stage), str(tmp_path / f"{name}.pt"), *extra])
        out[name] = torch.load(tmp_path / f"{name}.pt")
    assert torch.equal(out["z2"], out["z3"])
    assert not torch.allclose(out["z3_stale"], out["z2"])   # the behaviour worked around is still there
