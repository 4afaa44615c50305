"""One global batch, any topology: 1 process, 2 processes on one node and 2 simulated nodes x 1
process (one launcher each, ``--no_ssh --node_rank K`` on 127.0.0.1) train the same run, and a run
checkpointed on 2 ranks resumes on 1 (and 1 on 2) with ``checkpoint.resume=auto``: the same losses
(fp32, 1e-5 relative), the same plugin decisions, the optimizer state carried (through DeepSpeed's
universal checkpoint under ZeRO 1-3) with the no-decay group's weight decay still 0."""
import json
import shutil

import pytest
import torch

from launch import launch, launch_nodes, loss_trace

pytestmark = pytest.mark.slow
E = "plugins.example_pruning"
G = "plugins.growth"
# train_memory.py: 512 in-memory samples, global batch 64; forgetting keeps 409: 6 steps per epoch,
# round 1 at step 6. Growth 2 -> 3 -> 3 -> 4 blocks (and 16 -> 32 px) at steps 2, 8 and 11.
# Checkpoints at steps 5 (mid-epoch: 5 steps of events per rank, one before the round) and 10, 12.
RUN = ["run.precision=fp32", "train.batch_size=64", "train.epochs=3", "run.max_steps=12",
       "checkpoint.every_steps=5", "checkpoint.keep_last=5", "model.depth=4", "model.img_size=32"]
PRUNE = [f"{E}.enabled=true", f"{E}.round_epochs=[1,2]", f"{E}.remove_fraction=0.1",
         f"{E}.window_presentations=3"]
GROW = [f"{G}.enabled=true", f"{G}.stage_unit=step", f"{G}.stage_starts=[0,2,8,11]"]


def resume_elsewhere(src, dst, overrides, world_size, step=5):
    """Copy ``src``'s run folder with its checkpoints up to ``step`` and resume it on world_size ranks."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("resumed_rank*.pt"))
    ckpts = dst / "checkpoints"
    for tag in ckpts.iterdir():
        if tag.is_dir() and int(tag.name[4:]) > step:
            shutil.rmtree(tag)
    (ckpts / "latest").write_text(f"step{step:08d}")
    launch(dst, [*overrides, "checkpoint.resume=auto"], world_size, extra=["--dump-resumed", "--dump-plugins"])


def assert_traces_close(want, got, what):
    assert sorted(got) == sorted(want) == list(range(1, 13)), what
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (what, step, want[step], got[step])


def active_set(run):
    return torch.load(run / "plugins_rank0.pt", weights_only=True)["example_pruning"]["state"]["core"]["active"]


@pytest.mark.parametrize("stage", [2, 3])
def test_topologies_agree_and_resume_on_another_world_size(tmp_path, stage):
    common = [*RUN, *PRUNE, *GROW, f"run.zero_stage={stage}"]
    one, two, nodes = tmp_path / "one", tmp_path / "two", tmp_path / "nodes"
    launch(one, common, 1, extra=["--dump-plugins"])
    launch(two, common, 2, extra=["--dump-plugins"])
    launch_nodes(nodes, common, 2, extra=["--dump-plugins"])
    want = loss_trace(one)
    assert want[12] != want[1]   # it trained
    assert_traces_close(want, loss_trace(two), "2 processes, one node")
    assert_traces_close(want, loss_trace(nodes), "2 nodes x 1 process")

    # 2 ranks -> 1 and 1 -> 2 from step 5: through the growth at 8 and 11 and the round at step 6
    resume_elsewhere(two, tmp_path / "two_to_one", common, 1)
    resume_elsewhere(one, tmp_path / "one_to_two", common, 2)
    for run, ranks_then in ((tmp_path / "two_to_one", 2), (tmp_path / "one_to_two", 1)):
        assert_traces_close(want, loss_trace(run), run.name)
        assert torch.equal(active_set(run), active_set(one)), run.name
        resumed = torch.load(run / "resumed_rank0.pt", weights_only=False)
        assert resumed["step"] == 5
        # timm's groups: no decay for biases, norms, tokens; DeepSpeed's ZeRO-3 universal loader
        # would give every group the first group's value
        assert resumed["weight_decay"] == [0.0, 0.05], run.name
        assert resumed["built_weight_decay"]["blocks.0.norm1.weight"] == 0.0
    marker = (tmp_path / "two_to_one" / "checkpoints" / "step00000005" / "universal" / "COMPLETE")
    assert marker.is_file()   # the 2-rank tag was converted once, beside its files


def test_zero1_resumes_on_another_world_size_without_plugins(tmp_path):
    common = [*RUN, "run.zero_stage=1"]
    one = tmp_path / "one"
    launch(one, common, 1)
    resume_elsewhere(one, tmp_path / "one_to_two", common, 2)
    assert_traces_close(loss_trace(one), loss_trace(tmp_path / "one_to_two"), "ZeRO-1, 1 -> 2 ranks")


@pytest.mark.parametrize("mode", ["partitioned", "resampled"])
def test_every_plugin_on_two_nodes_streaming_shards(tmp_path, mode):
    """`dsvit train` on 2 simulated nodes from real shards (the synthetic set, 3 shards, 2 streams,
    2 loader workers per rank): PSS, growth, token pruning and ToE (partitioned) or the attention
    level and example pruning (resampled) train two epochs; every rank runs every step of
    every epoch (a rank short of batches fails the trainer's count) and both evaluate. ToE and the
    attention level do not compose at growth's first depth (ToE changes the tokens between two mask
    blocks: refused at start, dsvit.engine.compose), so each mode runs one of them; with ToE, PSS
    starts at drop 0.6 so that its survivors on 16 px give ToE a seed."""
    E = "plugins.example_pruning"
    plugins = ["plugins.pss.enabled=true", "plugins.growth.enabled=true", "plugins.growth.stage_unit=step",
               "plugins.growth.stage_starts=[0,10,20,30]", "plugins.token_pruning.enabled=true"]
    if mode == "resampled":   # example pruning refuses partitioned data (its epoch plan)
        plugins += ["plugins.attention_sparsity.enabled=true", f"{E}.enabled=true", f"{E}.round_epochs=[1]",
                    f"{E}.remove_fraction=0.1"]
    else:
        plugins += ["plugins.toe.enabled=true", "plugins.pss.drop_start=0.6"]
    run = tmp_path / mode
    launch_nodes(run, [f"data.mode={mode}", "data.streams=2", "data.workers=2", "data.synthetic_train=2048",
                               "data.synthetic_val=100", "train.batch_size=64", "train.epochs=2", "model.depth=4",
                               "model.img_size=32", "run.precision=fp32", "run.zero_stage=2", *plugins],
                         2, extra=["train", "--config", "tiny_test"], script="dsvit")
    rows = [json.loads(x) for x in (run / "tb" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/top1" in r]
    assert steps == list(range(1, steps[-1] + 1)) and len(evals) == 2, (steps, evals)
    assert [r["model/depth"] for r in rows if "model/depth" in r][-1] == 4
