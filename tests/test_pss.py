"""Patch Sampling Schedule: schedules, counts, samplers, gradients, model-level behaviour."""
from collections import Counter

import pytest
import torch

from dsvit.config import Config, ConfigError, RunConfig
from dsvit.model.token_stage import TokenStage
from model_helpers import block_inputs, next_step, small_vit, start_plugin, vanilla_vit
from dsvit.plugins.pss import (PatchSampling, PSSConfig, drop_ratio, generator_seed,
                                          keep_rate, num_keep, quantize, select_patches,
                                          sweep_keep_rates)

LEVELS = {0.0, 0.2, 0.4, 0.6, 0.8}


def pss_on(model, stage, step=0, total_steps=1000, steps_per_epoch=100, rank=0, seed=0, **cfg):
    conf = Config(run=RunConfig(seed=seed))
    return start_plugin(PatchSampling(PSSConfig(**cfg), conf), model, stage, rank=rank, step=step,
                        total_steps=total_steps, steps_per_epoch=steps_per_epoch)


# ---------------------------------------------------------------- schedules
def cyc(t, I=2502, T=10 ** 9, cooldown=0):
    return drop_ratio(t, "cyclic", 0.8, -0.1, T + cooldown, I, cooldown)


def test_quantize():
    assert quantize(0.5) == 0.4 and quantize(0.7) == 0.8 and quantize(-0.3) == 0 and quantize(1.4) == 1
    assert quantize(0.33, levels=0) == 0.33 and quantize(0.3, levels=10) == 0.3


def test_fixed_and_linear():
    assert {drop_ratio(t, "fixed", 0.4, 0.0, 100) for t in range(150)} == {0.4}
    lin = [drop_ratio(t, "linear", 0.8, -0.1, 900) for t in range(1200)]
    assert lin[0] == 0.8 and lin[900] == 0 and set(lin[900:]) == {0.0} and set(lin) == LEVELS
    assert all(a >= b for a, b in zip(lin, lin[1:]))
    # 100 epochs x 2502 steps: level changes at epochs 11.1, 33.3, 55.6, 77.8
    T = 100 * 2502
    changes = [t for t in range(1, T) if drop_ratio(t, "linear", 0.8, -0.1, T) != drop_ratio(t - 1, "linear", 0.8, -0.1, T)]
    assert [round(t / 2502, 1) for t in changes] == [11.1, 33.3, 55.6, 77.8]


def test_cyclic_counts_changes_symmetry():
    I = 2502
    r = [cyc(t) for t in range(I)]
    counts = Counter(r)
    assert [counts[v] for v in (0.8, 0.6, 0.4, 0.2, 0.0)] == [279, 556, 556, 554, 557]
    assert [t for t in range(1, I) if r[t] != r[t - 1]] == [140, 418, 696, 973, 1530, 1807, 2085, 2363]
    assert r[0] == 0.8 and r[I // 2] == 0 and all(r[c] == r[I - c] for c in range(1, I))
    assert [cyc(t + 7 * I) for t in range(I)] == r                      # pure function of the step
    assert set(r) <= LEVELS


def test_cooldown_means_all_tokens_for_every_schedule():
    total, cool = 1000, 100
    for sched in ("fixed", "linear", "cyclic", "cosine"):
        rs = [drop_ratio(t, sched, 0.4, 0.4 if sched == "fixed" else -0.1, total, 50, cool)
              for t in range(total)]
        assert set(rs[900:]) == {0.0} and rs[0] == 0.4
    assert drop_ratio(950, "fixed", 0.4, 0.4, 1000, 50, 0) == 0.4     # no cooldown: fixed stays


def test_cosine_endpoints():
    rs = [drop_ratio(t, "cosine", 0.8, -0.1, 500) for t in range(600)]
    assert rs[0] == 0.8 and set(rs[499:]) == {0.0} and all(a >= b for a, b in zip(rs, rs[1:]))
    assert set(rs) == LEVELS


def test_period_from_steps_per_epoch():
    model, stage = small_vit()
    plugin, _ = pss_on(model, stage, steps_per_epoch=40, total_steps=400)
    assert plugin.period == 40 and plugin.drop_at(20) == 0 and plugin.drop_at(40) == 0.8
    plugin, _ = pss_on(*small_vit(), period_steps=10, cooldown_epochs=2, steps_per_epoch=40, total_steps=400)
    assert plugin.period == 10 and plugin.drop_at(5) == 0 and plugin.drop_at(10) == 0.8
    assert plugin.drop_at(319) == 0.6 and plugin.drop_at(320) == 0          # last 2 epochs: all tokens


def test_num_keep_table():
    drops = [i / 10 for i in range(9)]
    assert [num_keep(197, r) for r in drops] == [197, 177, 158, 138, 118, 98, 79, 59, 39]
    assert [num_keep(577, r) for r in drops] == [577, 519, 462, 404, 346, 288, 231, 173, 115]
    assert [num_keep(197, quantize(r)) - 1 for r in (0.2, 0.4, 0.6, 0.8)] == [157, 117, 78, 38]


# ---------------------------------------------------------------- samplers
def test_magnitude_is_brute_force_topk_l1():
    x = torch.randn(4, 197, 12)
    idx = select_patches(x, 98, 1, "magnitude")
    assert idx.shape == (4, 98) and (idx[:, 0] == 0).all()
    for b in range(4):
        l1 = x[b, 1:].abs().sum(-1)
        expect = sorted((l1.argsort(descending=True)[:97] + 1).tolist())
        assert idx[b, 1:].tolist() == expect                        # raster order
    score_order = select_patches(x, 98, 1, "magnitude", raster_order=False)
    l1 = x[:, 1:].abs().sum(-1).gather(1, score_order[:, 1:] - 1)
    assert (l1[:, :-1] >= l1[:, 1:]).all()                          # faithful: descending score
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(select_patches(x[perm], 98, 1), idx[perm])
    assert torch.equal(select_patches(x, 98, 1), idx)


def test_random_sampler_seeded_by_seed_step_rank():
    x = torch.zeros(2, 197, 8)

    def draw(step, rank=0, seed=0):
        stage = TokenStage()
        plugin, _ = pss_on(None, stage, step=step, rank=rank, seed=seed, sampler="random",
                           schedule="fixed", drop_start=0.6)
        plugin(x, stage)
        return stage.positions

    a = draw(3)
    assert a.shape == (2, 79) and torch.equal(a, draw(3))
    assert not torch.equal(a, draw(4)) and not torch.equal(a, draw(3, rank=1))
    assert not torch.equal(a, draw(3, seed=1)) and not torch.equal(a[0], a[1])
    assert len(set(a[0].tolist())) == 79 and (a[:, 0] == 0).all()
    g = torch.Generator().manual_seed(0)
    freq = torch.zeros(197)
    for _ in range(200):
        freq.index_add_(0, select_patches(torch.zeros(4, 197, 2), 59, 1, "random", g).flatten(),
                        torch.ones(4 * 59))
    rate = freq[1:] / 800
    assert abs(rate.mean() - 58 / 196) < 1e-6 and (rate - 58 / 196).abs().max() < 0.1



def test_random_sampler_faithful_keeps_smallest_draws_clean_largest():
    x = torch.zeros(3, 197, 4)
    faithful = select_patches(x, 59, 1, "random", torch.Generator().manual_seed(5), raster_order=False)
    clean = select_patches(x, 59, 1, "random", torch.Generator().manual_seed(5), raster_order=True)
    noise = torch.rand(3, 196, generator=torch.Generator().manual_seed(5))    # the same draws
    assert torch.equal(faithful[:, 1:], noise.argsort(dim=1)[:, :58] + 1)    # the original's selection
    assert torch.equal(clean[:, 1:], noise.topk(58, dim=1).indices.sort(dim=1).values + 1)
    assert (faithful[:, 0] == 0).all() and (clean[:, 0] == 0).all()
    stage = TokenStage()
    plugin, _ = pss_on(None, stage, step=3, sampler="random", schedule="fixed", drop_start=0.6,
                       raster_order=False)
    plugin(x, stage)
    g = torch.Generator().manual_seed(generator_seed(0, 3, 0))               # seed 0, step 3, rank 0
    ref = torch.rand(3, 196, generator=g).argsort(dim=1)[:, :78] + 1
    assert torch.equal(stage.positions[:, 1:], ref)

# ---------------------------------------------------------------- on a model
def test_drop_zero_bit_identical_and_eval_full():
    model, stage = small_vit()
    ref = vanilla_vit()
    img = torch.randn(2, 3, 224, 224)
    pss_on(model, stage, schedule="fixed", drop_start=0.0)
    with torch.no_grad():
        assert torch.equal(model(img), ref(img))
    model2, stage2 = small_vit()
    pss_on(model2, stage2, schedule="fixed", drop_start=0.6)
    model2.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(model2(img), ref(img))


def test_counts_in_blocks_and_reference_forward():
    model, stage = small_vit()
    sizes = block_inputs(model, blocks=[0])
    img = torch.randn(2, 3, 224, 224)
    plugin, state = pss_on(model, stage, step=0)                    # cyclic start: drop 0.8
    out = model(img)
    assert sizes == [39] and plugin.tokens == 39
    idx = stage.positions
    with torch.no_grad():                                           # embed -> gather -> blocks -> head
        x = model._pos_embed(model.patch_embed(img))
        x = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
        ref = model.forward_head(model.norm(model.blocks(x)))
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=1e-6)
    state.step = 50
    next_step(plugin, state)
    sizes.clear(), model(img)
    assert sizes == [197]


def test_dropped_patch_pixels_get_zero_gradient():
    model, stage = small_vit()
    plugin, _ = pss_on(model, stage, schedule="fixed", drop_start=0.6)
    img = torch.randn(2, 3, 224, 224, requires_grad=True)
    model(img).square().sum().backward()
    kept = torch.zeros(2, 196, dtype=torch.bool)
    kept.scatter_(1, stage.positions[:, 1:] - 1, True)
    per_patch = img.grad.abs().reshape(2, 3, 14, 16, 14, 16).sum((1, 3, 5)).reshape(2, 196)
    assert (per_patch[~kept] == 0).all() and (per_patch[kept] > 0).all()
    assert all(p.grad is not None for p in model.parameters())


def test_eval_keep_rate_and_inference_helpers():
    model, stage = small_vit()
    sizes = block_inputs(model, blocks=[0])
    img = torch.randn(2, 3, 224, 224)
    pss_on(model, stage, eval_keep_rate=0.5)
    model.eval()
    with torch.no_grad():
        model(img)
    assert sizes == [98]
    vit, vstage = small_vit()
    vit.eval()
    counts = []
    vit.blocks[0].register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1]))
    with torch.no_grad():
        for rate in sweep_keep_rates():
            with keep_rate(vstage, rate):
                vit(img)
        vit(img)
    assert counts == [197, 177, 158, 138, 118, 98, 79, 59, 39, 197]
    assert vstage.after_embed == []


def test_resume_check_and_validation():
    plugin = PatchSampling(PSSConfig())
    PatchSampling(PSSConfig()).load_state_dict(plugin.state_dict())
    with pytest.raises(RuntimeError, match="schedule"):
        PatchSampling(PSSConfig(schedule="linear")).load_state_dict(plugin.state_dict())
    PSSConfig().validate(Config())
    for kw in (dict(sampler="gate"), dict(schedule="step"), dict(eval_keep_rate=0), dict(cooldown_epochs=10)):
        with pytest.raises(ConfigError):
            PSSConfig(**kw).validate(Config())
