"""Engine rebuilds through the real deepspeed launcher (gloo on CPU), driven by the test plugin
``rebuild_probe`` (tests/scripts/rebuild_probe.py): an identity rebuild is invisible, a growth
carries fp32 weights and Adam's state by the block map, a checkpoint of a grown model resumes, and
repeated rebuilds do not grow host memory."""
import json

import pytest
import torch

from dsvit.model import surgery
from launch import launch, loss_trace
from plugin_harness import assert_runs_equal, check_resume_equivalence

pytestmark = pytest.mark.slow
PROBE = "plugins.rebuild_probe"


def probe(at_steps, **options) -> list[str]:
    return [f"{PROBE}.enabled=true", f"{PROBE}.at_steps={list(at_steps)}",
            *[f"{PROBE}.{k}={v}" for k, v in options.items()]]


def dumps(run, world_size, n=1):
    return [torch.load(run / f"rebuild{n}_rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_identity_rebuild_is_invisible(tmp_path, stage, world_size):
    """Rebuilding around the same model after step 2 changes nothing: checkpoints (weights,
    optimizer state, plugin state, RNG) and losses equal a run without the rebuild, bit for bit."""
    common = ["run.max_steps=4", f"run.zero_stage={stage}", "run.precision=fp32"]
    launch(tmp_path / "plain", common + probe([]), world_size)
    launch(tmp_path / "rebuilt", common + probe([2]), world_size)
    assert_runs_equal(tmp_path / "plain", tmp_path / "rebuilt", 4)
    rows = [json.loads(x) for x in (tmp_path / "rebuilt" / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "engine/rebuild_s" in r] == [2]


def test_identity_rebuild_bf16_within_tolerance(tmp_path):
    common = ["run.max_steps=4", "run.zero_stage=2", "run.precision=bf16"]
    launch(tmp_path / "plain", common + probe([]))
    launch(tmp_path / "rebuilt", common + probe([2]))
    a, b = loss_trace(tmp_path / "plain"), loss_trace(tmp_path / "rebuilt")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-2), step


def expected_weight_decay(name, shape, no_decay, wd):
    return 0.0 if len(shape) <= 1 or name.endswith(".bias") or name in no_decay else wd


@pytest.mark.parametrize("stage,world_size", [(0, 1), (1, 2), (2, 2), (3, 2)])
def test_growth_carries_weights_and_adam_state(tmp_path, stage, world_size):
    """Depth 2 -> 3 by duplicating the last block after step 2, on every rank: fp32 masters equal the
    request's values, moments and step equal their source's before the rebuild, weight decay follows
    timm's rule on the new model, the LR is the uninterrupted schedule's, the EMA is remapped."""
    run = tmp_path / "grow"
    launch(run, ["run.max_steps=3", f"run.zero_stage={stage}", "run.precision=fp32", "train.ema_decay=0.9",
                 *probe([2], grow_by=1, weights="request")], world_size, extra=["--dump-rebuilds"])
    src = surgery.duplicate_last(2, 3)
    assert src == [0, 1, 1]
    for d in dumps(run, world_size):
        before, after = d["before"], d["after"]
        assert d["block_map"] == src and d["step"] == 2
        assert d["fresh"] == sorted(n for n in after["masters"] if n.startswith("blocks.2."))
        for name, master in after["masters"].items():
            source = d["param_map"][name]
            assert source == surgery.source_name(name, src)
            assert torch.equal(master, d["request"][name].float()), name
            for got, want in zip(after["moments"][name], before["moments"][source]):
                assert torch.equal(got, want), name
            assert after["steps"][name] == before["steps"][source] == 2.0
            assert d["weight_decay"][name] == expected_weight_decay(
                name, master.shape, set(d["no_weight_decay"]), 0.05), name
        assert d["lr_after"] == pytest.approx(d["lr_before"], rel=0, abs=0)
        assert after["counters"] == before["counters"]
        for name, value in d["ema_after"].items():      # the EMA grows by the same block map
            assert torch.equal(value, d["ema_before"][surgery.source_name(name, src)]), name
    marker = json.loads((run / "checkpoints" / "step00000003" / "COMPLETE").read_text())
    assert marker["architecture"] == {"depth": 3}
    assert sorted(loss_trace(run)) == [1, 2, 3]


@pytest.mark.parametrize("options,moments,step", [
    (dict(new_param_state="zero", step="reset"), "fresh-zero", 0.0),
    (dict(optimizer_state="reset"), "all-zero", 0.0),
])
def test_growth_state_policies(tmp_path, options, moments, step):
    run = tmp_path / "grow"
    launch(run, ["run.max_steps=3", "run.zero_stage=2", *probe([2], grow_by=1, **options)],
           extra=["--dump-rebuilds"])
    (d,) = dumps(run, 1)
    for name, got in d["after"]["moments"].items():
        zero = moments == "all-zero" or name in d["fresh"]
        want = d["before"]["moments"][d["param_map"][name]]
        for g, w in zip(got, want):
            assert torch.equal(g, torch.zeros_like(w) if zero else w), name
        assert d["after"]["steps"][name] == step
    # weights="masters": every parameter starts from its source's fp32 master
    for name, master in d["after"]["masters"].items():
        assert torch.equal(master, d["before"]["masters"][d["param_map"][name]])


@pytest.mark.parametrize("world_size", [1, 2])
def test_checkpoint_of_grown_model_resumes_exactly(tmp_path, world_size):
    """Grow after step 2 and again after step 4; stop at step 3 (a grown checkpoint), resume in a new
    process: the model is rebuilt at depth 3 before loading, and the rest (EMA included, remapped
    by the same block map at each growth) is bit-identical."""
    check_resume_equivalence(tmp_path, ["run.zero_stage=2", "train.ema_decay=0.9",
                                        *probe([2, 4], grow_by=1)], world_size)
    tag = tmp_path / f"resumed{world_size}" / "checkpoints" / "step00000006"
    assert json.loads((tag / "COMPLETE").read_text())["architecture"] == {"depth": 4}
    from safetensors.torch import load_file
    ema = load_file(str(tag / "ema.safetensors"))
    assert "blocks.3.attn.qkv.weight" in ema and "blocks.4.attn.qkv.weight" not in ema


def test_ten_rebuilds_keep_host_memory_flat(tmp_path):
    run = tmp_path / "many"
    launch(run, ["run.max_steps=11", "run.zero_stage=2", *probe(range(1, 11))],
           extra=["--dump-rebuilds"])
    rss = [dumps(run, 1, n)[0]["rss_mib"] for n in range(1, 11)]
    assert rss[-1] <= 1.05 * rss[0], rss
