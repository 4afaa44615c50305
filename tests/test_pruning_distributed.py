"""Token and attention levels through the real deepspeed launcher: trained, stopped and resumed on 1
and 2 ranks under ZeRO 1-3 with activation checkpointing while the keep rates move; switched off
equals absent."""
import json

import pytest

from plugin_harness import check_off_equals_absent, check_resume_equivalence

pytestmark = pytest.mark.slow
# depth 4, 16 patches: pruning blocks 1, 2, 3; the rates fall from step 1 to step 5 of 6
LEVELS = ["model.depth=4", "run.precision=fp32",
          "plugins.token_pruning.enabled=true", "plugins.token_pruning.keep_rate=0.5",
          "plugins.token_pruning.warmup=0.1", "plugins.token_pruning.decay=0.6",
          "plugins.attention_sparsity.enabled=true", "plugins.attention_sparsity.keep_rate=0.3",
          "plugins.attention_sparsity.warmup=0.1", "plugins.attention_sparsity.decay=0.6"]


def test_levels_resume_on_two_ranks_zero3_checkpointing(tmp_path):
    check_resume_equivalence(tmp_path, LEVELS + ["run.zero_stage=3", "model.grad_checkpointing=true"],
                             world_size=2, k=3)
    rows = [json.loads(l) for l in (tmp_path / "straight2" / "tb" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens/keep_rate"] for r in rows if "tokens/keep_rate" in r]
    tokens = [r["train/tokens_per_image"] for r in rows if "train/tokens_per_image" in r]
    assert rates[0] == 1.0 and rates[-1] == 0.5 and len(set(rates)) >= 4
    assert tokens[0] == 17 and min(tokens) < 12      # pruning acted as the rate fell


def test_levels_resume_on_one_rank(tmp_path):
    """ZeRO-1 here; ZeRO-2 is the composition test's, ZeRO-3 the two-rank test's."""
    check_resume_equivalence(tmp_path, LEVELS + ["run.zero_stage=1"], world_size=1, k=3)


@pytest.mark.parametrize("plugin", ["token_pruning", "attention_sparsity"])
def test_switched_off_equals_absent(tmp_path, plugin):
    check_off_equals_absent(tmp_path, plugin, ["model.depth=4", "model.grad_checkpointing=true"])


def test_all_levels_compose_with_growth_and_pss_and_resume(tmp_path):
    """Forgetting rounds + token + attention levels + PSS + progressive growth (2 -> 3 -> 3 -> 4
    blocks at steps 4, 8; 16 -> 32 px) on 2 ranks, ZeRO-2, activation checkpointing: stopped at step 5
    (after the first growth, one step before the round at epoch 1) and resumed through the second
    growth and the round, it equals the straight run (pruning blocks follow the depth; the example
    statistics survive the rebuilds)."""
    E = "plugins.example_pruning"
    check_resume_equivalence(tmp_path, [
        *LEVELS, "run.zero_stage=2", "model.grad_checkpointing=true", "model.img_size=32",
        "train.batch_size=64", "train.epochs=3", f"{E}.enabled=true", f"{E}.round_epochs=[1,2]",
        f"{E}.remove_fraction=0.1", f"{E}.window_presentations=3",
        "plugins.growth.enabled=true", "plugins.growth.stage_unit=step",
        "plugins.growth.stage_starts=[0,4,8,12]", "plugins.pss.enabled=true",
        "plugins.pss.drop_start=0.25"], 2, k=5)
    rows = [json.loads(l) for l in (tmp_path / "resumed2" / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("example_pruning/dropped") == 51 for r in rows)
    assert [r["model/depth"] for r in rows if "model/depth" in r] == [3]   # the growth at step 8
