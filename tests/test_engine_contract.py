"""The plugin contract's rules: handlers only for real events, one rebuild request at a time and
only between steps, step_start once per optimizer step, a replaced loss_per_sample is the loss,
a data plugin's epoch plan fixes the run length, replicated plugin state is checked."""
import json

import pytest
import torch

from dsvit.engine import checkpoint as ckpt
from dsvit.engine.plugin import Plugin, State
from dsvit.engine.plugin_set import PluginSet
from launch import launch, loss_trace
from plugin_harness import assert_runs_equal, straight_and_resumed


class _Typo(Plugin):
    name = "typo"

    def on_after_stpe(self, state):
        pass


def test_misspelled_handler_is_refused():
    with pytest.raises(TypeError, match=r"typo.*on_after_stpe.*did you mean on_after_step"):
        PluginSet([_Typo(None)])


class _Grower(Plugin):
    def __init__(self, name):
        super().__init__(None)
        self.name = name

    def on_after_step(self, state):
        state.request_rebuild(type("Request", (), {})())


def test_two_rebuild_requests_name_both_plugins():
    plugins = PluginSet([_Grower("growth_a"), _Grower("growth_b")])
    state = State(rank=0, world_size=1)
    with pytest.raises(RuntimeError, match=r"'growth_a'.*'growth_b'"):
        plugins.fire("after_step", state)


def test_rebuild_request_inside_a_step_is_refused():
    class Early(_Grower):
        def on_after_loss(self, state):
            state.request_rebuild(object())
    state = State(rank=0, world_size=1)
    with pytest.raises(RuntimeError, match=r"'early'.*after_loss.*between optimizer steps"):
        PluginSet([Early("early")]).fire("after_loss", state)


def test_state_digest_sees_any_difference():
    a = {"x": torch.arange(4), "y": [1, 2.0, "z"], "n": None}
    assert ckpt.state_digest(a) == ckpt.state_digest({"n": None, "y": [1, 2.0, "z"], "x": torch.arange(4)})
    assert ckpt.state_digest(a) != ckpt.state_digest(dict(a, x=torch.tensor([0, 1, 2, 4])))
    assert ckpt.state_digest(a) != ckpt.state_digest(dict(a, x=torch.arange(4.0)))


def metrics(run):
    return [json.loads(x) for x in (run / "tb" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_step_start_fires_once_per_step_with_grad_accumulation(tmp_path):
    run = tmp_path / "run"
    launch(run, ["run.max_steps=3", "train.grad_accum=2", "plugins.probe.enabled=true"])
    rows = {r["step"]: r for r in metrics(run) if "probe/step_starts" in r}
    assert [rows[s]["probe/step_starts"] for s in (1, 2, 3)] == [1, 2, 3]
    assert [rows[s]["probe/batch_starts"] for s in (1, 2, 3)] == [2, 4, 6]


@pytest.mark.slow
def test_replaced_loss_per_sample_is_the_loss(tmp_path):
    """Assigning a new per-sample loss trains exactly like re-weighting it in place (the reference),
    and differently from not re-weighting at all."""
    common = ["run.max_steps=3"]
    launch(tmp_path / "inplace", common + ["plugins.probe.enabled=true"])
    launch(tmp_path / "replaced", common + ["plugins.probe.enabled=true", "plugins.probe.replace=true"])
    launch(tmp_path / "plain", common)
    ref = torch.load(tmp_path / "inplace" / "final_logits.pt")
    assert torch.equal(torch.load(tmp_path / "replaced" / "final_logits.pt"), ref)
    assert not torch.allclose(torch.load(tmp_path / "plain" / "final_logits.pt"), ref)
    assert loss_trace(tmp_path / "inplace") == loss_trace(tmp_path / "replaced")


@pytest.mark.slow
def test_epoch_plan_sets_run_length_and_resumes(tmp_path):
    """keep_probe trains odd epochs on 128 of 512 samples: 32 + 8 steps at batch 16, known at start
    (the LR schedule ends on the last step); a resume inside the short epoch is bit-identical."""
    run = tmp_path / "plan"
    launch(run, ["plugins.keep_probe.enabled=true", "plugins.keep_probe.keep=128", "train.min_lr=0"])
    rows = metrics(run)
    lrs = {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}
    assert sorted(lrs) == list(range(1, 41))
    assert lrs[40] == 0.0 and lrs[39] > 0
    epochs = {r["step"]: r["train/epoch"] for r in rows if "train/epoch" in r}
    assert epochs[36] == pytest.approx(1.5)
    straight, resumed = straight_and_resumed(
        tmp_path, ["plugins.keep_probe.enabled=true", "plugins.keep_probe.keep=128", "run.max_steps=0",
                   "checkpoint.every_epochs=0"], 1, k=36)
    assert_runs_equal(straight, resumed, 40)


@pytest.mark.slow
def test_replicated_state_that_differs_across_ranks_is_refused(tmp_path):
    proc = launch(tmp_path / "run", ["run.max_steps=2", "plugins.probe.enabled=true",
                                     "plugins.probe.rank_in_state=true"], world_size=2, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "plugin 'probe' declares its state replicated, but rank(s) [1]" in out
    assert not (tmp_path / "run" / "checkpoints" / "step00000002" / "COMPLETE").exists()
