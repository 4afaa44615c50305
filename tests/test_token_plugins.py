"""PSS and ToE together, through the registry, the config loader, the plugin set and the logger."""
import pytest
import torch

from dsvit.config import Config, apply_override, load_config, validate
from dsvit.engine.plugin import State
from dsvit.engine.plugin_set import PluginSet
from dsvit.model.vit import build_model
from dsvit.config import LogConfig, ModelConfig
from dsvit.registry import build_plugins, plugin_registry
from dsvit.plugins.pss import PatchSampling, PSSConfig
from dsvit.plugins.toe import ToEConfig, TokenExpansion
from dsvit.plugins.token_viz import TokenViz, TokenVizConfig, token_grid

MODEL = ModelConfig(name="vit_tiny_patch16_224", embed_dim=32, depth=3, num_heads=2)


class FakeLogger:
    def __init__(self):
        self.scalars, self.images = {}, {}

    def scalar(self, name, value):
        self.scalars[name] = float(value)

    def image(self, name, img, step=None):
        self.images[name] = img

    def info(self, msg, *args):
        pass


def fit(plugins, step=0, total_steps=300, image_every=0):
    torch.manual_seed(0)
    model, stage = build_model(MODEL, num_classes=10)
    state = State(rank=0, world_size=1, model=model, token_stage=stage, logger=FakeLogger(),
                  step=step, total_steps=total_steps, steps_per_epoch=100)
    pset = PluginSet(plugins)
    pset.fire("fit_start", state)
    return model, stage, state, pset


def test_registry_and_order():
    assert plugin_registry()["toe"] is TokenExpansion and plugin_registry()["pss"] is PatchSampling
    pset = PluginSet([TokenExpansion(ToEConfig()), PatchSampling(PSSConfig())])
    assert [p.name for p in pset] == ["pss", "toe"]
    assert [p.name for p in PluginSet([TokenExpansion(ToEConfig(order=150)),
                                       PatchSampling(PSSConfig())])] == ["toe", "pss"]


def test_config_overrides_and_validation():
    cfg = Config()
    for item in ("plugins.toe.keep_rates=[0.4,0.7,1.0]", "plugins.toe.init_keep_rate=0.2",
                 "plugins.toe.stage_unit=epoch", "plugins.toe.stage_starts=[0,3,6]",
                 "plugins.pss.schedule=linear", "plugins.pss.eval_keep_rate=0.5"):
        cfg = apply_override(cfg, item)
    cfg = apply_override(cfg, "train.epochs=9")
    assert cfg.plugins["toe"].keep_rates == [0.4, 0.7, 1.0] and cfg.plugins["pss"].schedule == "linear"
    validate(cfg)
    assert [p.name for p in build_plugins(cfg)] == ["toe", "pss"]
    cfg = apply_override(cfg, "plugins.toe.stage_starts=[0,3,12]")
    with pytest.raises(Exception, match="plugins.toe"):
        validate(cfg)


@pytest.mark.parametrize("recipe", ["toe", "pss", "toe_pss"])
def test_recipes_load(recipe):
    cfg = load_config(recipe)
    validate(cfg)
    assert set(cfg.plugins) == set(recipe.split("_"))


def test_pss_then_toe_counts_positions_and_logging():
    sizes = []
    pss = PatchSampling(PSSConfig(schedule="fixed", drop_start=0.4))     # K = 118: 117 patches
    toe = TokenExpansion(ToEConfig())                                      # stage 1 at step 0
    model, stage, state, pset = fit([toe, pss], image_every=1)
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[1]))
    seen = {}

    def after_pss(x, st):
        seen["pss"] = st.positions
        return x
    stage.add_after_embed(after_pss)
    pset.fire("step_start", state)
    pset.fire("before_forward", state)
    img = torch.randn(2, 3, 224, 224)
    model(img)
    # ToE on P = 117 survivors: n0 = 29, + floor(117 * 0.25) = 29 in chunks 14 + 15 -> 58 kept
    assert sizes == [118, 59, 59]
    pss_pos, pos = seen["pss"], stage.positions
    assert (pos[:, 0] == 0).all() and pos.shape == (2, 59)
    for b in range(2):
        assert set(pos[b].tolist()) <= set(pss_pos[b].tolist())
        assert (pss_pos[b, 1:].diff() > 0).all()                           # raster order after PSS
        assert torch.equal(pos[b, 1:30], pss_pos[b, 1 + torch.arange(29) * 117 // 29])  # seeds
        merged = stage.last_merge.merged[b]
        assert sorted(pos[b, 1:].tolist() + merged.tolist()) == pss_pos[b, 1:].tolist()
        assert set(stage.last_merge.host[b].tolist()) <= set(pos[b, 1:].tolist())
    state.batch = type("B", (), {"images": img})()
    pset.fire("after_forward", state)                     # no visualiser registered: nothing logged
    state.step += 1
    pset.fire("after_step", state)
    assert state.logger.scalars == {"pss/keep_rate": 0.6, "pss/tokens_sampled": 118.0, "toe/stage": 1.0,
                                    "toe/keep_rate": 0.5, "toe/tokens_after_merge": 59.0}
    model.eval()                                                                  # eval: full tokens
    sizes.clear()
    with torch.no_grad():
        model(img)
    assert sizes == [197] * 3


def test_visualizer_grid():
    pss = PatchSampling(PSSConfig(schedule="fixed", drop_start=0.4))
    viz = TokenViz(TokenVizConfig(num_images=2), Config(log=LogConfig(image_every_steps=1)))
    model, stage, state, pset = fit([TokenExpansion(ToEConfig()), pss, viz], image_every=1)
    pset.fire("step_start", state)
    pset.fire("before_forward", state)
    img = torch.randn(3, 3, 224, 224)
    model(img)
    state.batch = type("B", (), {"images": img})()
    pset.fire("after_forward", state)
    grid = state.logger.images["tokens/kept"]
    assert grid.shape == (3, 224, 2 * 224 + 2) and 0 <= grid.min() and grid.max() <= 1
    full = token_grid(img[:1], torch.arange(197)[None], 1, 16, (0.0,) * 3, (1.0,) * 3)
    assert torch.equal(full, img[0].clamp(0, 1))                     # every patch kept: the image
