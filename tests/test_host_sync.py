"""No host sync inside a training step: every shipped recipe trains under ``HostSyncGuard``
(``dsvit/engine/host_sync.py``), which fails on ``.item()``, ``.cpu()``, ``.tolist()``,
``bool(tensor)``, ``nonzero``, boolean-mask indexing, ... made by dsvit's code outside the points it
names (logging intervals, epoch boundaries, evaluation, checkpoints, rebuilds, the data iterator)."""
import json

import pytest
import torch

from dsvit.engine.host_sync import HostSyncError, HostSyncGuard, allowed
from launch import ROOT, launch

SCRIPT = ROOT / "tests" / "scripts" / "host_sync_recipes.py"


def test_the_guard_sees_what_it_should():
    from dsvit.engine.checkpoint import state_digest
    x = torch.arange(6.0)
    with HostSyncGuard() as guard:
        with pytest.raises(HostSyncError, match=r"Tensor.cpu\(\) at dsvit/engine/checkpoint.py:\d+"):
            state_digest({"x": x})
        with allowed("a test"):
            state_digest({"x": x})
        x[x > 2].sum().item()       # the test's own code is not dsvit's: not counted
    assert [g.split(":")[1] for g in guard.seen] == [" Tensor.cpu() at dsvit/engine/checkpoint.py",
                                                      " Tensor.numpy() at dsvit/engine/checkpoint.py"]
    assert all(g.startswith("a test: ") for g in guard.seen)


def test_toe_selects_without_a_boolean_index():
    """ToE's unselected patches came from ``arange(p)[mask]`` (a nonzero on every forward)."""
    from dsvit.plugins.toe import chunk_sizes, seed_positions, token_expansion
    torch.manual_seed(0)
    x = torch.randn(2, 1 + 64, 16)
    seeds = torch.tensor(seed_positions(64, 0.25))
    chunks = chunk_sizes(64, 0.25, [0.5, 0.75, 1.0], 1, 2)
    with HostSyncGuard():
        y, keep, merged, host = token_expansion(x, 1, seeds, chunks)
    assert torch.equal(torch.sort(torch.cat([keep[:, 1:] - 1, merged - 1], 1), 1).values,
                       torch.arange(64).expand(2, -1))   # every patch kept or merged, once


@pytest.mark.slow
def test_every_shipped_recipe_trains_without_a_host_sync_in_its_steps(tmp_path):
    launch(tmp_path / "runs", [], script=SCRIPT)
    results = json.loads((tmp_path / "runs" / "host_sync.json").read_text())
    assert set(results) == {"default", "stack", "toe", "pss", "toe_pss", "growth", "autoprog", "trilevel",
                            "infobatch", "efficienttrain", "stack-et"}
    for recipe, r in results.items():
        assert "error" not in r, f"{recipe}: {r.get('error')}"
        assert r["sync"] is None, f"{recipe}: {r['sync']}"
        assert r["steps"] == r["total_steps"] >= 18, recipe           # trained to the end
        assert any(a.startswith("logging interval") for a in r["allowed"]), recipe   # the guard was on
    assert any("AutoProg" in a for a in results["autoprog"]["allowed"])   # a search scored
