"""ToE + PSS through the real deepspeed launcher: compose, train and resume on 2 ranks with ZeRO-2
and activation checkpointing; switched off equals absent; dynamic-inference sweep from the CLI."""
import json

import pytest

from launch import launch
from plugin_harness import check_off_equals_absent, check_resume_equivalence

pytestmark = pytest.mark.slow

TOKENS = ["plugins.pss.enabled=true", "plugins.pss.drop_start=0.6", "plugins.pss.period_steps=3",
          "plugins.toe.enabled=true", "model.grad_checkpointing=true", "run.zero_stage=2"]


def test_toe_and_pss_train_and_resume_on_two_ranks(tmp_path):
    check_resume_equivalence(tmp_path, TOKENS, world_size=2, k=2)
    rows = [json.loads(l) for l in (tmp_path / "straight2" / "tb" / "metrics.jsonl").read_text().splitlines()]
    tokens = [r["train/tokens_per_image"] for r in rows if "train/tokens_per_image" in r]
    assert min(tokens) < 17            # the plugins acted (17 = CLS + 16 patches) ...
    assert all("pss/keep_rate" in r for r in rows if "train/loss" in r)   # ... and reported it


def test_toe_and_pss_resume_with_grad_accumulation(tmp_path):
    """2 micro-batches per optimizer step: a run stopped and resumed equals the straight run in every
    checkpointed tensor (weights, optimizer, plugin state, RNG) and in the loss trace."""
    check_resume_equivalence(tmp_path, TOKENS + ["train.grad_accum=2", "plugins.pss.period_steps=2"],
                             world_size=2, k=2)


@pytest.mark.parametrize("plugin", ["toe", "pss"])
def test_switched_off_equals_absent(tmp_path, plugin):
    check_off_equals_absent(tmp_path, plugin, ["model.grad_checkpointing=true"])


def test_eval_keep_rate_sweep(tmp_path, capsys):
    run = tmp_path / "run"
    launch(run, ["run.max_steps=2", "plugins.pss.enabled=true"])
    # the memory dataset has no shard folder: evaluate on a synthetic one written for the purpose
    from dsvit.data.synthetic import ensure_synthetic
    root = ensure_synthetic(str(tmp_path / "data"), 40, 60, seed=0)
    from dsvit.cli import main
    assert main(["eval", str(run), "--keep-rate", "1.0,0.5,0.25", f"data.root={root}",
                 "model.img_size=16", "data.workers=0"]) == 0
    out = capsys.readouterr().out
    lines = [l.split() for l in out.splitlines() if l.strip().startswith(("1.00", "0.50", "0.25"))]
    assert [l[0] for l in lines] == ["1.00", "0.50", "0.25"]
    assert all(int(l[-1]) == 60 for l in lines)     # every val sample once, at every keep rate
    assert main(["eval", str(run), "--keep-rate", "abc", f"data.root={root}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--keep-rate abc" in err[0] and "eval_keep_rate" in err[0]
