"""The start-time composition check (dsvit.engine.compose): plugin combinations that cannot work are
refused from the config alone, naming both plugins and the keys to change; every shipped recipe
passes; the runtime refusals it anticipates still stand behind it."""
from types import SimpleNamespace

import pytest
import torch

from dsvit import config as C
from dsvit.engine.compose import check_composition
from dsvit.engine.compose import Blocks, Footprint
from dsvit.engine.plugin import Plugin
from dsvit.errors import ConfigError
from dsvit.registry import build_plugins

# default: depth 4, 32 px, patch 4 (64 patches); growth's defaults: depths [2, 3, 3, 4], 16..32 px
GROW = ["plugins.growth.enabled=true"]
TOE = ["plugins.toe.enabled=true"]
PSS = ["plugins.pss.enabled=true"]
TOKENS = ["plugins.token_pruning.enabled=true"]
MASKS = ["plugins.attention_sparsity.enabled=true"]


def check(*overrides, recipe="default"):
    cfg = C.load_config(recipe, list(overrides))
    C.validate(cfg)
    check_composition(build_plugins(cfg), cfg)


def refused(*overrides, recipe="default") -> str:
    with pytest.raises(ConfigError) as e:
        check(*overrides, recipe=recipe)
    return str(e.value)


@pytest.mark.parametrize("recipe", C.list_recipes())
def test_every_shipped_recipe_composes(recipe):
    unset = C.load_config(recipe).data.root == C.DATA_ROOT_UNSET   # the DeiT recipes: the user's data
    check(*(["data.root=/data/imagenet-shards"] if unset else []), recipe=recipe)


# ---------------------------------------------------------------- 1. blocks at the initial depth
def test_explicit_pruning_block_beyond_growths_first_depth():
    check(*TOKENS, "plugins.token_pruning.blocks=[1,3]")           # depth 4 without growth: fine
    msg = refused(*GROW, *TOKENS, "plugins.token_pruning.blocks=[1,3]")
    assert "plugins.token_pruning.blocks=[1, 3]" in msg and "block(s) [3]" in msg
    assert "starts with 2 blocks" in msg and "plugins.growth.depth_scale=0.5" in msg
    check(*GROW, *TOKENS, "plugins.token_pruning.blocks=[1]")


def test_toe_block_beyond_growths_first_depth():
    check(*TOE, "plugins.toe.insert_before_block=2")
    msg = refused(*GROW, *TOE, "plugins.toe.insert_before_block=2")
    assert "plugins.toe.insert_before_block=2" in msg and "plugins.growth.depth_scale" in msg


def test_explicit_block_beyond_the_timm_models_own_depth():
    # model.depth unset: the config check cannot see vit_tiny's 12 blocks; this one reads them
    msg = refused("model.depth=None", *TOKENS, "plugins.token_pruning.blocks=[3,12]")
    assert "plugins.token_pruning.blocks" in msg and "vit_tiny_patch16_224's depth 12" in msg


# ---------------------------------------------------------------- 2. token flow
def test_pss_then_toe_on_growths_smallest_input_leaves_no_seed():
    check(*PSS, *TOE)                                  # 64 patches -> 12 after PSS -> 3 seeds
    msg = refused(*GROW, *PSS, *TOE)                   # 16 patches -> 2 after PSS -> no seed
    assert msg.startswith("plugins.toe needs at least 4 patch tokens before block 1")
    assert "as few as 2 arrive at depth 2" in msg
    assert "plugins.pss.drop_start=0.8" in msg and "plugins.toe.init_keep_rate" in msg
    assert "plugins.growth.resolution_scale" in msg
    check(*GROW, *PSS, *TOE, "plugins.pss.drop_start=0.6")    # 6 patches: one seed


def test_token_pruning_upstream_of_toe_counts():
    args = [*TOKENS, "plugins.token_pruning.blocks=[0,1]", *TOE, "plugins.toe.insert_before_block=2"]
    check(*args, "plugins.token_pruning.keep_rate=0.5")               # 64 -> 32 -> 16
    msg = refused(*args, "plugins.token_pruning.keep_rate=0.1")         # 64 -> 7 -> 1
    assert "plugins.toe needs at least 4" in msg and "as few as 1 arrive" in msg
    assert "plugins.token_pruning inside block 1 (plugins.token_pruning.keep_rate=0.1)" in msg


def test_a_small_input_alone_names_the_input():
    msg = refused(*TOE, "plugins.toe.init_keep_rate=0.05", "model.img_size=16")   # 16 patches, needs 20
    assert "plugins.toe needs at least 20" in msg and "model.img_size" in msg


# ---------------------------------------------------------------- 3. attention-mask spans
def test_toe_between_mask_blocks_at_growths_first_depth():
    check(*TOE, *MASKS)                                 # depth 4: masks at 1, 2, 3; ToE before 1
    msg = refused(*GROW, *TOE, *MASKS)                  # depth 2: masks at 0, 1; ToE before 1
    assert msg.startswith("plugins.toe changes the token set before block 1")
    assert "plugins.attention_sparsity's attention masks: built at blocks [0, 1] at depth 2" in msg
    assert "plugins.toe.insert_before_block" in msg and "plugins.attention_sparsity.block_fractions" in msg


def test_toe_after_the_first_mask_block():
    check(*TOE, *MASKS, "plugins.attention_sparsity.blocks=[1,3]")
    msg = refused(*TOE, "plugins.toe.insert_before_block=2", *MASKS, "plugins.attention_sparsity.blocks=[1,3]")
    assert "plugins.toe changes the token set before block 2" in msg
    assert "Move plugins.toe.insert_before_block to block 1 or earlier" in msg


def test_toe_moved_by_a_growth_into_a_mask_span():
    """ToE's hook is registered once and growth's block map moves it (depth 2 -> 4: before block 1
    -> before block 2); the mask blocks are recomputed from the fractions (1 at both depths)."""
    grow = [*GROW, "plugins.growth.stages=2", "plugins.growth.depths=[2,4]", *TOE, *MASKS]
    check(*grow, "plugins.attention_sparsity.block_fractions=[0.4]")         # masks at 1, then 2
    msg = refused(*grow, "plugins.attention_sparsity.block_fractions=[0.3]")  # masks at 1, then 1
    assert "plugins.toe changes the token set before block 2" in msg and "built at blocks [1] at depth 4" in msg


def test_pruning_block_that_is_not_a_mask_block():
    check(*TOKENS, "plugins.token_pruning.blocks=[1,3]", *MASKS, "plugins.attention_sparsity.blocks=[1,3]")
    check(*TOKENS, "plugins.token_pruning.blocks=[0,3]", *MASKS, "plugins.attention_sparsity.blocks=[1,2]")
    msg = refused(*TOKENS, "plugins.token_pruning.blocks=[1,2]", *MASKS, "plugins.attention_sparsity.blocks=[1,3]")
    assert "plugins.token_pruning changes the token set inside block 2" in msg
    assert "plugins.attention_sparsity.blocks" in msg and "plugins.token_pruning.blocks" in msg


def test_pruning_ordered_after_the_mask_in_the_same_block():
    msg = refused(*TOKENS, "plugins.token_pruning.order=350", *MASKS)
    assert "set plugins.token_pruning.order below 300" in msg


def test_no_mask_no_span():
    check(*GROW, *TOE, *MASKS, "plugins.attention_sparsity.keep_rate=1.0")


# ---------------------------------------------------------------- 4. one mask provider, one depth plugin
class Declares(Plugin):
    def __init__(self, name, footprint):
        super().__init__(SimpleNamespace(order=0))
        self.name, self._footprint = name, footprint

    def footprint(self):
        return self._footprint


def test_two_mask_providers_and_two_depth_plugins():
    cfg = C.load_config()
    masks = Footprint(mask_blocks=Blocks("blocks", indices=(1,)))
    with pytest.raises(ConfigError, match=r"plugins a, b all provide attention masks.*plugins.b.enabled=false"):
        check_composition([Declares("a", masks), Declares("b", masks)], cfg)
    depths = Footprint(depths=(2, 4))
    with pytest.raises(ConfigError, match="plugins c, d all change the model's depth"):
        check_composition([Declares("c", depths), Declares("d", depths)], cfg)


# ---------------------------------------------------------------- where it runs; the runtime backstops
def test_the_trainer_refuses_before_any_setup():
    from dsvit.engine.trainer import Trainer, World
    cfg = C.load_config("default", [*GROW, *TOE, *MASKS])
    with pytest.raises(ConfigError, match="plugins.toe changes the token set"):
        Trainer(cfg, World(), build_plugins(cfg), train_data=object())   # no data touched


def test_runtime_refusals_still_stand_behind_the_check():
    """Paths that skip the check (dsvit eval, plugins used directly) still meet the old refusals."""
    from dsvit.plugins.attention_sparsity import MASK_KEY, AttentionSparsity, AttentionSparsityConfig
    from dsvit.plugins.toe import ToEConfig, TokenExpansion
    stage = SimpleNamespace(scratch=lambda owner: {MASK_KEY: torch.zeros(1, 1, 5, 5)})
    with pytest.raises(RuntimeError, match="covers 5 tokens but the block gets 4"):
        AttentionSparsity(AttentionSparsityConfig())._provide(torch.zeros(1, 4, 8), stage)
    state = SimpleNamespace(model=SimpleNamespace(blocks=[0, 1]))
    with pytest.raises(ValueError, match="insert_before_block=2 but the model has 2 blocks"):
        TokenExpansion(ToEConfig(insert_before_block=2)).on_fit_start(state)
