"""Progressive growth's pure parts against the AutoProg paper's tables (Li et al., CVPR 2022): the
growth map, the supernet's active sets, the stage table, the candidates, the decision rule, the
momentum copies, and the elastic depth of the token stage."""
import dataclasses

import pytest
import torch

from dsvit.config import Config, ModelConfig, apply_override, validate
from dsvit.errors import ConfigError
from dsvit.model import surgery
from dsvit.model.vit import build_model, build_plain, create_vit
from dsvit.plugins.growth import schedule as S
from dsvit.plugins.growth.config import stage_augment
from dsvit.plugins.growth.momentum import MomentumCopies, rescaled_decay

DEIT = ModelConfig(name="vit_tiny_patch16_224", img_size=64, patch_size=16, embed_dim=32, depth=6,
                   num_heads=2, dynamic_img_size=True)


@pytest.mark.parametrize("p,n,want", [
    (6, 12, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]), (9, 12, [0, 1, 2, 3, 4, 5, 6, 6, 7, 7, 8, 8]),
    (6, 8, [0, 1, 2, 3, 4, 4, 5, 5]), (8, 10, [0, 1, 2, 3, 4, 5, 6, 6, 7, 7]), (5, 5, [0, 1, 2, 3, 4])])
def test_growth_map_matches_the_paper(p, n, want):
    src = surgery.duplicate_last(p, n)
    assert src == want and len(surgery.new_positions(src)) == n - p
    assert surgery.duplicate_last(p, 2 * p) == [i // 2 for i in range(2 * p)]


def test_supernet_active_sets():
    assert [surgery.supernet_active(6, 12, d) for d in (6, 8, 10, 12)] == [
        [0, 2, 4, 6, 8, 10], [0, 2, 4, 6, 8, 9, 10, 11], [0, 2, 4, 5, 6, 7, 8, 9, 10, 11], list(range(12))]
    for base, top in ((6, 12), (9, 18), (8, 12), (10, 12), (7, 14)):
        grown = surgery.duplicate_last(base, top)
        for d in range(base, top + 1):   # sub-network d = MoGrow from base straight to d
            assert [grown[i] for i in surgery.supernet_active(base, top, d)] == surgery.duplicate_last(base, d)
    with pytest.raises(ValueError, match="between 6 and 12"):
        surgery.supernet_active(6, 12, 5)


def test_stage_table_matches_the_paper():
    starts = [int(e) for e in S.linspace(0, 100, 5)[:-1]]
    assert starts == [0, 25, 50, 75]
    assert S.default_resolutions(224, 0.5, 4, 32) == [128, 160, 192, 224]
    assert S.default_depths(18, 0.5, 4) == [9, 12, 15, 18]
    assert S.default_depths(12, 0.5, 4) == [6, 8, 10, 12]
    rows = S.stage_table(starts, [9, 12, 15, 18], [128, 160, 192, 224], 9, 0.1, 0.25, 0.5, 0.0, 0.0)
    assert [r.magnitude for r in rows] == [4, 6, 7, 9]
    assert [round(r.drop_path, 4) for r in rows] == [0, 0.0333, 0.0667, 0.1]
    assert [round(r.reprob, 4) for r in rows] == [0, 0.0833, 0.1667, 0.25]
    assert stage_augment("rand-m9-mstd0.5-inc1", 4) == "rand-m4-mstd0.5-inc1"
    assert stage_augment("rand-m9-mstd0.5-inc1", 0) == ""


def test_candidates():
    R, L = [128, 160, 192, 224], [6, 8, 10, 12]
    assert S.candidates(0, 128, 6, R, L) == [(r, d) for r in (128, 192, 224) for d in (6, 10, 12)]
    assert S.candidates(1, 128, 6, R, L) == [(r, d) for r in (128, 160) for d in (8, 10, 12)]
    assert S.candidates(2, 224, 12, R, L) == [(224, 12)]


def test_decision_rule():
    cost = [1.0, 2.0, 3.0, 4.0, 5.0]
    on_curve = [2.0 * t ** -0.3 for t in cost]
    a, b = S.fit_power_law(cost, on_curve)
    assert a == pytest.approx(2.0 * 5 ** -0.3, rel=1e-6) and b == pytest.approx(-0.3, abs=1e-6)
    # an inner candidate 1 % below the curve wins, whatever the cost scale (lowering an end point
    # tilts the fitted curve itself: then the rule need not pick it)
    for pick in (1, 2, 3):
        loss = [v * (0.99 if i == pick else 1.0) for i, v in enumerate(on_curve)]
        for scale in (1.0, 1e-3, 7e9):
            index, scores, w = S.decide([c * scale for c in cost], loss)
            assert index == pick and w == pytest.approx(0.3, abs=0.02)
    index, _, w = S.decide(cost, [1.0, 1.1, 1.2, 1.3, 1.4])   # loss rises with cost: lowest loss
    assert (index, w) == (0, 0.0)
    assert S.decide([3.0], [2.0])[0] == 0


def test_loss_points_follow_the_original():
    # two search epochs of 40 steps: end of epoch 1, then 1/4, 1/2, 3/4 and the end of epoch 2
    assert S.loss_points(80) == [40, 50, 60, 70, 80]


def test_momentum_decay_rescaling():
    assert rescaled_decay(0.9996, "batch", 128, 1024, 1000, 125000) == pytest.approx(0.9996 ** 0.125)
    d = rescaled_decay(0.9996, "run", 128, 1024, 12500, 125000)   # 2500 of 125k steps = 250 of 12.5k
    assert 1 / (1 - d) == pytest.approx(250.0)


def grown_pair(base=3, top=6):
    torch.manual_seed(0)
    small = create_vit(dataclasses.replace(DEIT, depth=base), 10).eval()
    big = create_vit(dataclasses.replace(DEIT, depth=top), 10).eval()
    src = surgery.duplicate_last(base, top)
    big.load_state_dict(surgery.remap_state_dict(small.state_dict(), src, big.state_dict()))
    return small, big, src


def test_momentum_copies_grow_bit_identically():
    torch.manual_seed(0)
    online = create_vit(dataclasses.replace(DEIT, depth=3), 10)
    copies = MomentumCopies([0.5, 0.9])
    copies.start(online, [create_vit(dataclasses.replace(DEIT, depth=3), 10) for _ in range(2)], False)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    copies.update()
    like = create_vit(dataclasses.replace(DEIT, depth=5), 10).state_dict()
    src = surgery.duplicate_last(3, 5)
    for copy, grown in zip(copies.copies, copies.remapped(src)):
        assert grown.keys() == like.keys()   # exactly the grown model's tensors
        old = copy.state_dict()
        for name, value in grown.items():
            assert torch.equal(value, old[surgery.source_name(name, src)]), name
    a, b = (c.state_dict()["cls_token"] for c in copies.copies)
    assert not torch.equal(a, b)    # different decays, different averages


@pytest.mark.parametrize("res", [32, 48, 64])
def test_supernet_at_base_depth_is_the_momentum_model(res):
    """Blocks ``supernet_active(base, top, base)`` of the grown supernet reproduce the pre-growth
    model's logits exactly (eval, fp32), at any input size (dynamic_img_size, one position table);
    the whole supernet is the plain grown model; an extracted depth-d model equals the supernet at d."""
    small, big, _ = grown_pair()
    x = torch.randn(2, 3, res, res)
    sup, stage = build_model(dataclasses.replace(DEIT, depth=6), 10)
    sup.load_state_dict(big.state_dict())
    sup.eval()
    with torch.no_grad():
        stage.active_blocks = surgery.supernet_active(3, 6, 3)
        assert torch.equal(sup(x), small(x))
        stage.active_blocks = None
        assert torch.equal(sup(x), big(x))
        for d in (4, 5):
            stage.active_blocks = surgery.supernet_active(3, 6, d)
            part = create_vit(dataclasses.replace(DEIT, depth=d), 10).eval()
            part.load_state_dict(surgery.remap_state_dict(big.state_dict(), stage.active_blocks,
                                                          part.state_dict()))
            assert torch.equal(sup(x), part(x))


def test_hooks_of_skipped_blocks_run_before_the_next_active_one():
    model, stage = build_model(dataclasses.replace(DEIT, depth=4), 10)
    seen = []
    stage.add_before_block(1, lambda x, s: seen.append(("before1", x.shape[1])) or x[:, :5])
    stage.active_blocks = [0, 2, 3]
    model(torch.randn(1, 3, 64, 64))
    assert seen == [("before1", 17)] and stage.mean_block_tokens == pytest.approx((17 + 5 + 5) / 3)
    stage.active_blocks = [2, 0]
    with pytest.raises(ValueError, match="ascending"):
        model(torch.randn(1, 3, 64, 64))


def test_set_drop_path_is_linear_over_the_span():
    model = create_vit(dataclasses.replace(DEIT, depth=4, drop_path_rate=0.1), 10)
    surgery.set_drop_path(model, 0.3, span=7)
    assert [b.drop_path1.drop_prob for b in list(model.blocks)[1:]] == pytest.approx([0.05, 0.1, 0.15])


@pytest.mark.parametrize("item,match", [
    ("plugins.growth.depths=[2,5,6,12]", "at most doubles"),
    ("plugins.growth.resolutions=[16,18,24,32]", "multiples of the patch"),
    ("plugins.growth.mode=sideways", "mode must be"),
    ("plugins.growth.stage_starts=[0,0.5,0.3,0.9]", "ascending"),
])
def test_config_errors_name_the_key(item, match):
    cfg = Config()
    for kv in ("model.depth=12", "model.img_size=32", "model.patch_size=4", "plugins.growth.enabled=true",
               item):
        cfg = apply_override(cfg, kv)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_auto_search_must_fit_in_a_stage():
    cfg = Config()
    for kv in ("model.depth=12", "model.img_size=32", "model.patch_size=4", "plugins.growth.mode=auto",
               "plugins.growth.search_length=0.3"):
        cfg = apply_override(cfg, kv)
    with pytest.raises(ConfigError, match="plugins.growth: search_length"):
        validate(cfg)
    cfg = apply_override(cfg, "plugins.growth.search_length=0.05")
    validate(cfg)
    cfg = apply_override(cfg, "model.depth=null")
    with pytest.raises(ConfigError, match="model.depth"):
        validate(cfg)


class Logger:
    def info(self, *a):
        pass

    def scalar(self, *a):
        pass


def test_mogrow_request_takes_the_slowest_copy():
    """The grown online model's weights are the slowest momentum copy's, duplicated by the growth
    map; every copy grows from itself (checked after a few updates, so copies and model differ)."""
    from dsvit.engine.plugin import State
    from dsvit.plugins.growth import GrowthConfig, ProgressiveGrowth
    cfg = Config()
    for kv in ("model.depth=4", "model.img_size=32", "model.patch_size=4", "model.embed_dim=16",
               "model.num_heads=2", "plugins.growth.decay_rescale=none", "plugins.growth.decays=[0.5,0.9]"):
        cfg = apply_override(cfg, kv)
    plugin = ProgressiveGrowth(cfg.plugins["growth"], cfg)
    torch.manual_seed(0)
    model, stage = build_model(dataclasses.replace(cfg.model, **plugin.architecture()), 10)
    state = State(rank=0, world_size=1, model=model, token_stage=stage, logger=Logger(),
                  num_classes=10, total_steps=100, epoch_steps=(100,))
    plugin.on_fit_start(state)
    assert len(model.blocks) == 2 and plugin.table[1].start == 25
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        plugin.copies.update()
    slow = {k: v.clone() for k, v in plugin.copies.model(-1).state_dict().items()}
    fast = {k: v.clone() for k, v in plugin.copies.model(0).state_dict().items()}
    state.step, state.event, state.plugin = 25, "step_start", "growth"
    plugin.on_step_start(state)
    request = state.rebuild_request
    src = surgery.duplicate_last(2, 3)
    assert request.block_map == src and request.arch["depth"] == 3 and plugin.depth == 3
    grown_model = build_plain(cfg.model, 10, **request.arch)
    assert request.weights.keys() == grown_model.state_dict().keys()
    for name, value in request.weights.items():
        assert torch.equal(value, slow[surgery.source_name(name, src)]), name
    for grown, old in zip(plugin._pending, (fast, slow)):
        for name, value in grown.items():
            assert torch.equal(value, old[surgery.source_name(name, src)]), name
    assert request.optimizer_state == "carry"


class CopiesStub:
    def remapped(self, active):
        return active


@pytest.mark.parametrize("quirk", [False, True])
def test_quirk_smallest_base_changes_sampling_only_not_the_extracted_blocks(quirk):
    """The released AutoProg samples sub-networks with the smallest candidate as base, but extracts
    the chosen one with the current depth as base; ``quirk_smallest_base`` reproduces the sampling
    only, so the extracted blocks are MoGrow from the current depth either way."""
    from dsvit.engine.plugin import State
    from dsvit.plugins.growth import ProgressiveGrowth
    from dsvit.plugins.growth.search import Search
    cfg = Config()
    for kv in ("model.depth=12", "model.img_size=32", "model.patch_size=4", "plugins.growth.mode=auto",
               "plugins.growth.cost=flops", f"plugins.growth.quirk_smallest_base={str(quirk).lower()}"):
        cfg = apply_override(cfg, kv)
    plugin = ProgressiveGrowth(cfg.plugins["growth"], cfg)
    cands = [(32, 8), (32, 10), (32, 12)]
    plugin.search = Search(stage=1, base=6, max_depth=12, cands=cands, start=0, end=10, points=[5],
                           losses=[[1.0, 1.0, 1.0]])   # equal losses: the cheapest candidate wins
    plugin.depth, plugin.resolution, plugin.copies = 12, 32, CopiesStub()
    plugin._costs = lambda: [8.0, 10.0, 12.0]
    state = State(rank=0, world_size=1, logger=Logger(), num_classes=10, total_steps=100, epoch_steps=(100,))
    state.step, state.event, state.plugin = 10, "after_step", "growth"
    sampled = plugin.search.active(8, quirk)
    plugin._finish_search(state)
    assert plugin.depth == 8
    assert state.rebuild_request.block_map == surgery.supernet_active(6, 12, 8) == plugin._pending
    assert (sampled != surgery.supernet_active(6, 12, 8)) == quirk   # the switch did change the sampling


class DataRecorder:
    def __init__(self):
        self.sizes = []

    def set_decode_size(self, size):
        self.sizes.append(size)

    def set_augmentation(self, auto_augment, reprob):
        pass


@pytest.mark.parametrize("mode", ["manual", "auto"])
def test_growth_crops_each_epoch_at_the_largest_resolution_the_epoch_trains_at(mode):
    """A manual schedule crops the data at the largest stage resolution any step of the epoch uses
    (the device resizes only across a stage start inside an epoch); AutoProg's resolutions are
    decided by its searches, so it leaves the crops at the full size."""
    from dsvit.engine.plugin import State
    from dsvit.plugins.growth import ProgressiveGrowth
    cfg = Config()
    for kv in ("model.depth=4", "model.img_size=32", "model.patch_size=4", "model.embed_dim=16",
               "model.num_heads=2", f"plugins.growth.mode={mode}", "plugins.growth.search_length=0.2",
               "plugins.growth.search_batches=2"):
        cfg = apply_override(cfg, kv)
    plugin = ProgressiveGrowth(cfg.plugins["growth"], cfg)
    model, stage = build_model(dataclasses.replace(cfg.model, **plugin.architecture()), 10)
    data = DataRecorder()
    state = State(rank=0, world_size=1, model=model, token_stage=stage, logger=Logger(), data=data,
                  num_classes=10, total_steps=100, epoch_steps=(20,) * 5)
    plugin.on_fit_start(state)
    for epoch in range(5):
        state.epoch = epoch
        plugin.on_epoch_start(state)
    res = [row.resolution for row in plugin.table]
    assert [row.start for row in plugin.table] == [0, 25, 50, 75] and res == [16, 20, 28, 32]
    # epochs of steps 0-19, 20-39 (stages 1-2), 40-59 (2-3), 60-79 (3-4), 80-99
    assert data.sizes == ([16, 20, 28, 32, 32] if mode == "manual" else [])
