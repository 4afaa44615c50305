"""``run.compile``: the blocks compiled by torch.compile (inductor on CPU) train like eager ones,
through a growth rebuild (new blocks are compiled too), and the graph count is logged."""
import json

import pytest

from launch import launch, loss_trace

pytestmark = pytest.mark.slow


def test_compiled_blocks_train_like_eager_through_a_rebuild(tmp_path):
    common = ["run.max_steps=4", "log.every_steps=1", "plugins.rebuild_probe.enabled=true",
              "plugins.rebuild_probe.at_steps=[2]", "plugins.rebuild_probe.grow_by=1"]
    launch(tmp_path / "eager", common)
    launch(tmp_path / "compiled", common + ["run.compile=true"])
    eager, compiled = loss_trace(tmp_path / "eager"), loss_trace(tmp_path / "compiled")
    assert sorted(eager) == sorted(compiled) == [1, 2, 3, 4]
    for step in eager:   # the same math in other kernels: equal to float32 rounding
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5), step
    rows = [json.loads(x) for x in (tmp_path / "compiled" / "tb" / "metrics.jsonl").read_text().splitlines()]
    graphs = [r["compile/graphs"] for r in rows if "compile/graphs" in r]
    assert len(graphs) == 4 and graphs[0] >= 1 and graphs == sorted(graphs)
