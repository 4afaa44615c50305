"""EfficientTrain / EfficientTrain++ (Wang et al., ICCV 2023 / TPAMI 2024): the low-frequency crop
against worked numbers, the step-space schedule against the released DeiT-S bookkeeping, the cost
model against the papers' speed-ups, the plugin's loader settings and device-side reduction, the
composition with growth, and (slow) resume equivalence and off-equals-absent through the launcher."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsvit import config as C
from dsvit.engine.compose import check_composition
from dsvit.engine.host_sync import HostSyncGuard
from dsvit.engine.plugin import Batch, State
from dsvit.errors import ConfigError, RunStateError
from dsvit.plugins.efficienttrain import EfficientTrain, lowpass_crop, reduce_batch
from dsvit.plugins.efficienttrain import schedule as S
from dsvit.plugins.efficienttrain.config import policy_at
from dsvit.registry import build_plugins

DEIT_S = [96, 96, 160, 160, 160, 160, 192, 192, 224, 224]
ON = "plugins.efficienttrain.enabled=true"
D = torch.float64   # the worked numbers are float64; the plugin's batches run in fp32


def row(k, n=32, fn=torch.cos):
    """A 32 x 32 image constant down the columns: fn(2 pi k n / 32)."""
    return fn(2 * math.pi * k * torch.arange(n, dtype=D) / n).expand(n, n)


# ---------------------------------------------------------------- the low-frequency crop
def test_shape_real_and_channel_means():
    x = torch.randn(3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(0))
    y = lowpass_crop(x, 16)
    assert y.shape == (3, 16, 16) and not y.is_complex()
    assert torch.allclose(y.mean((-2, -1)), x.mean((-2, -1)), atol=1e-9)


@pytest.mark.parametrize("k", [3, 7])
def test_pass_band_is_decimation(k):
    y = lowpass_crop(row(k), 16)
    assert torch.allclose(y, row(k)[::2, ::2], atol=1e-12)
    if k == 3:
        want = [1, 0.3827, -0.7071, -0.9239, 0, 0.9239]
        assert torch.allclose(y[0, :6], torch.tensor(want, dtype=D), atol=5e-5)


def test_nyquist_edge_half_amplitude_and_stop_band():
    assert torch.allclose(lowpass_crop(row(8), 16)[0], 0.5 * (-1.0) ** torch.arange(16, dtype=D), atol=1e-12)
    assert lowpass_crop(row(8, fn=torch.sin), 16).abs().max() < 1e-12
    for k in (9, 10, 15):
        assert lowpass_crop(row(k), 16).abs().max() < 1e-12


def test_constant_and_ramp():
    assert torch.allclose(lowpass_crop(torch.full((32, 32), 0.7, dtype=D), 16), torch.tensor(0.7, dtype=D))
    ramp = torch.arange(16, dtype=D).view(4, 4)
    assert torch.allclose(lowpass_crop(ramp, 2), torch.tensor([[5.0, 6.0], [9.0, 10.0]], dtype=D))


def test_band_limited_image_equals_decimation():
    x = torch.randn(32, 32, dtype=D, generator=torch.Generator().manual_seed(1))
    k = torch.fft.fftfreq(32, 1 / 32).abs()
    band = (k[:, None] < 8) & (k[None, :] < 8)
    x = torch.fft.ifft2(torch.fft.fft2(x) * band).real
    assert torch.allclose(lowpass_crop(x, 16), x[::2, ::2], atol=1e-12)


@pytest.mark.parametrize("n,b", [(32, 16), (224, 160)])
def test_corner_gather_is_the_central_crop_of_the_shifted_spectrum(n, b):
    x = torch.randn(2, n, n, dtype=D, generator=torch.Generator().manual_seed(2))
    lo = n // 2 - b // 2
    centre = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))[..., lo:lo + b, lo:lo + b]
    ref = torch.fft.ifft2(torch.fft.ifftshift(centre, dim=(-2, -1)) * (b / n) ** 2).real
    assert torch.allclose(lowpass_crop(x, b), ref, atol=1e-12)


def test_commutes_with_normalisation_and_refuses_odd_sizes():
    x = torch.rand(3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(3))
    mu, sigma = 0.485, 0.229
    assert torch.allclose(lowpass_crop((x - mu) / sigma, 16), (lowpass_crop(x, 16) - mu) / sigma, atol=1e-12)
    with pytest.raises(ValueError, match="even size, got 15"):
        lowpass_crop(x, 15)
    assert lowpass_crop(x.float(), 16).dtype == torch.float32
    assert reduce_batch(x[None].bfloat16(), 16, "fft").dtype == torch.bfloat16   # computed in fp32


def test_patch_tokens_per_side_with_one_position_table():
    import timm
    model = timm.create_model("vit_tiny_patch16_224", embed_dim=8, depth=1, num_heads=1, num_classes=0,
                              dynamic_img_size=True)
    assert tuple(model.pos_embed.shape) == (1, 197, 8)
    for side, patches in ((96, 36), (160, 100), (192, 144), (224, 196)):
        assert model.forward_features(torch.zeros(1, 3, side, side)).shape[1] == patches + 1
    assert tuple(model.pos_embed.shape) == (1, 197, 8)


# ---------------------------------------------------------------- the schedule
def test_stage_sides_round_to_the_patch():
    assert S.stage_sides(S.DEIT_S_FRACTIONS, 224, 16) == DEIT_S
    assert S.stage_sides(S.DEIT_S_FRACTIONS, 32, 4) == [12, 12, 24, 24, 24, 24, 28, 28, 32, 32]
    assert S.stage_sides([0.05, 1.2], 32, 4) == [0, 40]   # refused by the config check below


def test_deit_s_budget_in_steps():
    """ET++ DeiT-S, E_eq 200, 312 steps per data epoch (ImageNet at batch 4096)."""
    # the released launcher: stage i relaunches with T_i = floor(E_eq (224 / B_i)^2) epochs
    assert sorted({200 * 224 ** 2 // b ** 2 for b in DEIT_S}, reverse=True) == [1088, 392, 272, 200]
    total = S.budget_steps(200, 312, DEIT_S, 224)
    assert round(total / 312) == 469                     # data epochs (the code: 469, 146,328 steps)
    starts = S.stage_starts(total, DEIT_S, 224)
    lengths = S.stage_lengths(starts, total)
    want = [33973] * 2 + [12230] * 4 + [8493] * 2 + [6240] * 2
    assert sum(lengths) == total and all(abs(a - b) <= 1 for a, b in zip(lengths, want)), lengths
    # equal compute per stage: progress i/10 at stage i's start; B and m as functions of p
    for i, a in enumerate(starts):
        assert S.compute_progress(a, starts, DEIT_S, 224, total) == pytest.approx(i / 10, abs=1e-4)
    for step in range(0, total, 997):
        p = S.compute_progress(step, starts, DEIT_S, 224, total)
        side = DEIT_S[S.stage_of(step, starts)]
        assert side == (96 if p < 0.2 else 160 if p < 0.6 else 192 if p < 0.8 else 224), step
        assert S.magnitude(S.stage_of(step, starts), 10, 9) == math.floor(10 * p + 1e-9), step
    swin = [96, 96, 160, 160, 160, 160, 224, 224, 224, 224]
    st = S.stage_starts(10_000, swin, 224)
    assert [round(S.compute_progress(st[i], st, swin, 224, 10_000), 3) for i in (2, 6)] == [0.2, 0.6]


def test_stage_boundaries_and_magnitudes():
    # 100 steps at 32 px: weights (32/12)^2, (32/24)^2, (32/28)^2, 1
    sides = [12, 12, 24, 24, 24, 24, 28, 28, 32, 32]
    assert S.stage_starts(100, sides, 32) == [0, 27, 55, 62, 69, 75, 82, 87, 92, 96]
    assert [S.stage_of(s, [0, 27, 55]) for s in (0, 26, 27, 54, 55, 99)] == [0, 0, 1, 1, 2, 2]
    assert [S.magnitude(i, 10, 9) for i in range(10)] == list(range(10))
    assert [S.magnitude(i, 5, 9) for i in range(5)] == [0, 2, 4, 7, 9] and S.magnitude(0, 1, 9) == 9
    starts = S.stage_starts(6, [8, 8, 12, 12, 12, 12, 12, 12, 16, 16], 16)   # tiny_test's 6 steps
    assert starts == [0, 1, 2, 3, 3, 4, 4, 5, 5, 6] and S.stage_lengths(starts, 6)[-1] == 0   # one empty
    assert S.stage_of(4, starts) == 6 and S.stage_of(3, starts) == 4     # the last of a shared start


def test_cost_model_matches_the_papers_speedups():
    vit = {192: 1.593, 384: 1.562}             # ET, DeiT-T / DeiT-S: 300 epochs, 5 stages of 60
    for dim, speedup in vit.items():
        cost = lambda s: S.vit_cost(s, 16, dim, 12)   # noqa: E731
        et = S.run_cost([60] * 5, [160, 160, 160, 192, 224], cost)
        assert 300 * cost(224) / et == pytest.approx(speedup, abs=5e-4)
    for e_eq in (100, 200, 300):               # ET++ in pixels: exactly 300 / E_eq of a 300-epoch run
        total = S.budget_steps(e_eq, 312, DEIT_S, 224)
        lengths = S.stage_lengths(S.stage_starts(total, DEIT_S, 224), total)
        ratio = 300 * 312 * S.pixel_cost(224) / S.run_cost(lengths, DEIT_S, S.pixel_cost)
        assert ratio == pytest.approx(300 / e_eq, rel=1e-4)
    # ET++ in ViT MACs: the code's data epochs (217 @96, 157 @160, 54 @192, 41 @224) give the
    # 1.58x / 1.53x cross-check; the step form (no rounding) 1.583x / 1.539x
    total = S.budget_steps(200, 312, DEIT_S, 224)
    lengths = S.stage_lengths(S.stage_starts(total, DEIT_S, 224), total)
    for dim, code, steps in ((192, 1.58, 1.583), (384, 1.53, 1.539)):
        cost = lambda s: S.vit_cost(s, 16, dim, 12)   # noqa: E731
        assert 300 * cost(224) / S.run_cost([217, 157, 54, 41], [96, 160, 192, 224], cost) == \
            pytest.approx(code, abs=5e-3)
        assert 300 * 312 * cost(224) / S.run_cost(lengths, DEIT_S, cost) == pytest.approx(steps, abs=5e-4)


def test_magnitude_zero_is_still_randaugment():
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform
    policy = policy_at("rand-m9-mstd0.5-inc1", 0)
    assert policy == "rand-m0-mstd0.5-inc1" and policy_at("rand-m9-n3-mstd0.5", 4) == "rand-m4-n3-mstd0.5"
    aug = rand_augment_transform(policy, {"translate_const": 10, "img_mean": (124, 116, 104)})
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(20)]
    changed = sum(not np.array_equal(np.asarray(aug(im)), np.asarray(im)) for im in images)
    assert changed > 0   # Invert, Equalize, AutoContrast, Posterize at 4 bits ignore the magnitude


# ---------------------------------------------------------------- config and composition
def check(*overrides, recipe="default"):
    cfg = C.load_config(recipe, list(overrides))
    C.validate(cfg)
    check_composition(build_plugins(cfg), cfg)
    return cfg


@pytest.mark.parametrize("item,match", [
    ("plugins.efficienttrain.resolutions=[0.05,1]", r"resolutions=\[0.05, 1\]: 0.05 x model.img_size=32 rounds to 0"),
    ("plugins.efficienttrain.resolutions=[0.5,1.2]", "rounds to 40 px .* above the input size"),
    ("plugins.efficienttrain.lowpass=lanczos", "lowpass must be one of"),
    ("plugins.efficienttrain.decode=half", "decode must be one of"),
    ("data.auto_augment=original", "data.auto_augment='original' has no -m<N>.*augment=false"),
])
def test_config_errors_name_the_key(item, match):
    with pytest.raises(ConfigError, match=f"plugins.efficienttrain: .*{match}"):
        check(ON, item)


def test_fft_refuses_odd_sizes():
    with pytest.raises(ConfigError, match=r"odd sizes \[15, 15, 30.*lowpass=bicubic"):
        check(ON, "plugins.efficienttrain.lowpass=fft", "model.img_size=40", "model.patch_size=5")
    check(ON, "model.img_size=40", "model.patch_size=5")           # a resize takes any size


def test_one_owner_of_the_input_size_with_growth():
    msg = str(pytest.raises(ConfigError, check, ON, "plugins.growth.enabled=true").value)
    assert "plugins efficienttrain, growth all set the model's input size" in msg
    assert "plugins.efficienttrain.resolutions=[0.4286" in msg and "plugins.growth.resolution_scale=0.5" in msg
    assert "model.img_size=32" in msg and "enabled=false" in msg
    check(ON, "plugins.growth.enabled=true", "plugins.growth.resolution_scale=1")   # depth-only growth
    with pytest.raises(ConfigError, match="all set the model's input size"):   # AutoProg scores at its sizes
        check(ON, "plugins.growth.enabled=true", "plugins.growth.resolution_scale=1", "plugins.growth.mode=auto")
    check("plugins.growth.enabled=true")                                            # growth alone


def test_one_owner_of_the_augmentation_schedule_with_growth():
    # both would call set_augmentation each epoch, growth (later) silently replacing ET++'s magnitude
    depth_only = (ON, "plugins.growth.enabled=true", "plugins.growth.resolution_scale=1")
    with pytest.raises(ConfigError, match=r"plugins efficienttrain, growth all schedule the loader's "
                       r"augmentation per epoch: plugins.efficienttrain.augment; plugins.growth.augreg; only one "
                       r"may: switch all but one schedule off \(plugins.efficienttrain.augment=false, "
                       r"plugins.growth.augreg=false\)"):
        check(*depth_only, "data.auto_augment=rand-m9-mstd0.5-inc1")
    check(*depth_only, "data.auto_augment=rand-m9-mstd0.5-inc1", "plugins.growth.augreg=false")
    check(*depth_only, "data.auto_augment=rand-m9-mstd0.5-inc1", "plugins.efficienttrain.augment=false")
    check(*depth_only)   # no RandAugment policy: ET++ schedules none, growth its erasing and drop-path


def test_depth_only_growth_leaves_the_reduced_batch_alone():
    from dsvit.plugins.growth import ProgressiveGrowth
    cfg = check(ON, "plugins.growth.enabled=true", "plugins.growth.resolution_scale=1")
    growth = ProgressiveGrowth(cfg.plugins["growth"], cfg)
    growth.step_res = 32
    images = torch.zeros(2, 3, 12, 12)
    state = SimpleNamespace(batch=Batch(images, torch.zeros(2, 10), torch.zeros(2)))
    growth.on_batch_start(state)
    assert state.batch.images is images


def test_architecture_footprint_and_state():
    cfg = check(ON)
    plugin = EfficientTrain(cfg.plugins["efficienttrain"], cfg)
    assert plugin.architecture() == {"dynamic_img_size": True}
    assert plugin.footprint().input_sizes == (12, 12, 24, 24, 24, 24, 28, 28, 32, 32)
    full = check(ON, "plugins.efficienttrain.resolutions=[1.0,1.0]")
    flat = EfficientTrain(full.plugins["efficienttrain"], full)
    assert flat.architecture() == {} and flat.footprint().input_sizes == ()
    plugin.load_state_dict(plugin.state_dict())
    with pytest.raises(RunStateError, match=r"another schedule.*'lowpass': \('fft', 'bicubic'\)"):
        plugin.load_state_dict({"schedule": {**plugin.state_dict()["schedule"], "lowpass": "fft"}})
    older = {k: v for k, v in plugin.state_dict()["schedule"].items() if k != "lr_clock"}
    plugin.load_state_dict({"schedule": older})              # trained before the clock existed: steps
    clocked = check(ON, "plugins.efficienttrain.lr_clock=compute")
    with pytest.raises(RunStateError, match=r"'lr_clock': \('steps', 'compute'\)"):
        EfficientTrain(clocked.plugins["efficienttrain"], clocked).load_state_dict({"schedule": older})


# ---------------------------------------------------------------- the plugin in a run
class Recorder:
    def __init__(self):
        self.sizes, self.policies, self.lines = [], [], []

    def set_decode_size(self, size):
        self.sizes.append(size)

    def set_augmentation(self, auto_augment, reprob):
        self.policies.append((auto_augment, reprob))

    def info(self, msg, *a):
        self.lines.append(msg)

    def scalar(self, *a):
        pass


def started(*overrides, total=100, epochs=(50, 50)):
    cfg = check(ON, "data.auto_augment=rand-m9-mstd0.5-inc1", "data.reprob=0.25", *overrides)
    plugin = EfficientTrain(cfg.plugins["efficienttrain"], cfg)
    rec = Recorder()
    state = State(rank=0, world_size=1, logger=rec, data=rec, num_classes=10, total_steps=total,
                  epoch_steps=tuple(epochs), steps_per_epoch=epochs[0])
    plugin.on_fit_start(state)
    return plugin, state, rec


def test_loader_crop_and_magnitude_per_epoch():
    """100 steps at 32 px (stages start at 0, 27, 55, ...: test_stage_boundaries_and_magnitudes):
    epoch 0 (steps 0-49) trains at 12 px only, epoch 1 (50-99) up to 32 px."""
    plugin, state, rec = started()
    for e in (0, 1):
        state.epoch = e
        plugin.on_epoch_start(state)
    assert rec.sizes == [12, 32]
    assert rec.policies == [("rand-m0-mstd0.5-inc1", 0.25), ("rand-m1-mstd0.5-inc1", 0.25)]
    assert any("loader per epoch: epoch 0: crop 12 px, m0; epoch 1: crop 32 px, m1" in x for x in rec.lines)
    plugin, state, rec = started("plugins.efficienttrain.decode=full", "plugins.efficienttrain.augment=false")
    plugin.on_epoch_start(state)
    assert rec.sizes == [] and rec.policies == []


@pytest.mark.parametrize("lowpass", ["bicubic", "fft"])
def test_a_batch_below_the_crop_size_is_reduced_on_the_device(lowpass):
    plugin, state, _ = started(f"plugins.efficienttrain.lowpass={lowpass}")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))   # epoch 1's crop
    want = (F.interpolate(images, size=(24, 24), mode="bicubic", antialias=True, align_corners=False)
            if lowpass == "bicubic" else lowpass_crop(images, 24))
    state.step = 60                                              # stage 2: 24 px
    state.batch = Batch(images.clone(), torch.zeros(4, 10), torch.zeros(4))
    with HostSyncGuard():
        plugin.on_step_start(state)
        plugin.on_batch_start(state)
    assert state.batch.images.shape == (4, 3, 24, 24) and torch.equal(state.batch.images, want)
    state.step = 99                                              # the last stage: full size, untouched
    plugin.on_step_start(state)
    state.batch = Batch(images, torch.zeros(4, 10), torch.zeros(4))
    plugin.on_batch_start(state)
    assert state.batch.images is images


def test_compute_clock_for_the_learning_rate():
    """lr_clock=compute: the LR schedule reads total x (share of the compute done); at the start of
    stage i of K equal-compute stages that is i/K of the run (up to the rounding of the starts)."""
    plugin, state, rec = started("plugins.efficienttrain.lr_clock=compute")
    assert plugin.footprint().lr_clock and state.lr_clock == plugin.lr_step
    starts = plugin.starts                              # [0, 27, 55, 62, 69, 75, 82, 87, 92, 96]
    clock = [state.lr_clock(s) for s in range(101)]
    assert clock[0] == 0 and clock[100] == pytest.approx(100)
    assert all(b >= a for a, b in zip(clock, clock[1:]))
    for i, start in enumerate(starts):
        assert clock[start] == pytest.approx(10 * i, abs=1.5)
    # a 12 px step moves the clock (12/32)^2 as far as a 32 px one
    assert clock[11] - clock[10] == pytest.approx((clock[99] - clock[98]) * (12 / 32) ** 2, rel=0.02)
    assert any("learning rate on compute progress" in x for x in rec.lines)
    plugin, state, _ = started()                        # the default: the step itself
    assert state.lr_clock is None and not plugin.footprint().lr_clock
    flat = check(ON, "plugins.efficienttrain.resolutions=[1.0,1.0]", "plugins.efficienttrain.lr_clock=compute")
    assert not EfficientTrain(flat.plugins["efficienttrain"], flat).footprint().lr_clock   # nothing to clock


def test_one_owner_of_the_learning_rate_clock():
    from dsvit.engine.compose import Footprint

    class Clocked:
        def __init__(self, name):
            self.name, self.order = name, 0

        def footprint(self):
            return Footprint(lr_clock=True)
    cfg = check()
    check_composition([Clocked("a")], cfg)
    with pytest.raises(ConfigError, match=r"plugins a, b all set the learning rate's clock.*plugins.b.enabled=false"):
        check_composition([Clocked("a"), Clocked("b")], cfg)


# ---------------------------------------------------------------- through the launcher
@pytest.mark.slow
def test_resume_equivalence_and_the_sizes_trained(tmp_path):
    """tiny_test (16 px, patch 4): 6 steps at 8, 8, 12, 12, 12, 16 px; the run stopped at step 3
    and resumed equals the straight one, with the FFT crop on every reduced batch."""
    import json
    from plugin_harness import check_resume_equivalence
    check_resume_equivalence(tmp_path, [ON, "plugins.efficienttrain.lowpass=fft",
                                        "plugins.efficienttrain.lr_clock=compute"], world_size=1)
    rows = [json.loads(x) for x in (tmp_path / "straight1" / "tb" / "metrics.jsonl").read_text().splitlines()]
    sides = {r["step"]: r["efficienttrain/resolution"] for r in rows if "efficienttrain/resolution" in r}
    tokens = {r["step"]: r["train/tokens_per_image"] for r in rows if "train/tokens_per_image" in r}
    assert [sides[s] for s in range(1, 7)] == [8, 8, 12, 12, 12, 16]
    assert [tokens[s] for s in range(1, 7)] == [5, 5, 10, 10, 10, 17]   # the blocks ran on them
    # the LR each step trained with: the run's warm-up + cosine read at 6 x compute progress
    from dsvit.engine.setup import lr_schedule
    cfg = C.load_config("tiny_test", [])
    starts = S.stage_starts(6, [8, 8, 12, 12, 12, 12, 12, 12, 16, 16], 16)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.train.lr)
    first = next(r for r in rows if r.get("step") == 1 and "train/epoch" in r)
    per_epoch = round(1 / first["train/epoch"])         # the harness's data: 32 steps per epoch
    sched = lr_schedule(opt, cfg.train, 6, per_epoch)   # warm-up: the first 5 of the clock's 6 steps
    lrs = {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}
    for step in range(1, 7):   # logged after step `step`: the LR of the step after it
        sched.step_update(6 * S.compute_progress(step, starts, [8, 8, 12, 12, 12, 12, 12, 12, 16, 16], 16, 6))
        assert lrs[step] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6), step


@pytest.mark.slow
def test_switched_off_equals_absent(tmp_path):
    from plugin_harness import check_off_equals_absent
    check_off_equals_absent(tmp_path, "efficienttrain")
