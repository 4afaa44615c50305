"""`dsvit train --check` (dsvit/engine/plan.py, dsvit/bench/timeline.py) and the DeiT recipes: every
shipped recipe plans; the DeiT recipes hold the paper's values; the -stack variants grow at the
fractions of the run stack.yaml grows at; the plan's numbers equal the code a run uses."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsvit import config as C
from dsvit.bench.timeline import describe, growth_stages
from dsvit.cli import main
from dsvit.data.pipeline import TrainData, read_info
from dsvit.engine.plan import SizedData, activation_bytes, make_plan, model_state_bytes
from dsvit.model.vit import meta_model
from dsvit.registry import build_plugins

ROOT = Path(__file__).resolve().parent.parent
NOWHERE = "data.root=/nonexistent/imagenet-shards"
DEIT = ("deit_tiny", "deit_small", "deit_base")

# Touvron et al., ICML 2021: the hyper-parameter table (Table 9) and the official main.py defaults;
# published ImageNet-1k top-1 of the three models
PAPER = dict(epochs=300, batch=1024, lr_per_512=5e-4, weight_decay=0.05, warmup_epochs=5,
             warmup_lr=1e-6, min_lr=1e-5, label_smoothing=0.1, mixup=0.8, cutmix=1.0, reprob=0.25,
             drop_path=0.1, rand_augment="rand-m9-mstd0.5-inc1", repeated_aug=3, img_size=224,
             crop_pct=0.875, interpolation="bicubic", imagenet_train=1281167)
TOP1 = {"deit_tiny": "72.2", "deit_small": "79.8", "deit_base": "81.8"}


def plan(recipe: str, *overrides, world_size: int = 1):
    cfg = C.load_config(recipe)
    extra = [NOWHERE] if cfg.data.root == C.DATA_ROOT_UNSET else []
    return make_plan(C.load_config(recipe, extra + list(overrides)), world_size, build_plugins, describe)


@pytest.mark.parametrize("recipe", C.list_recipes())
def test_every_shipped_recipe_passes_check(recipe):
    p = plan(recipe)
    assert p.lines[0].startswith("plan of ") and p.params > 0
    if p.train_samples is None:   # a recipe whose data is not on this machine and states no size
        assert p.total_steps is None and any("data.train_samples" in n for n in p.notes)
        return
    assert len(p.epoch_steps) == C.load_config(recipe).train.epochs
    assert p.total_steps == sum(p.epoch_steps) and p.warmup_steps < p.total_steps


def test_the_embedded_dataset_plans_from_its_stated_size():
    p = plan("default")
    cfg = C.load_config("default")
    assert (p.train_samples, p.num_classes) == (cfg.data.synthetic_train, 10)
    assert p.epoch_steps == [cfg.data.synthetic_train // cfg.train.batch_size] * cfg.train.epochs
    assert p.warmup_steps == round(cfg.train.warmup_epochs * p.epoch_steps[0])


def test_deit_recipes_hold_the_published_values():
    for name in DEIT:
        cfg = C.load_config(name, [NOWHERE])
        t, d, m = cfg.train, cfg.data, cfg.model
        assert m.name == f"{name}_patch16_224" and m.img_size == PAPER["img_size"]
        assert t.lr == pytest.approx(PAPER["lr_per_512"] * t.batch_size / 512)   # the linear rule
        assert (t.epochs, t.batch_size, t.grad_accum) == (PAPER["epochs"], PAPER["batch"], 1)
        assert (t.weight_decay, t.warmup_epochs, t.warmup_lr, t.min_lr) == (
            PAPER["weight_decay"], PAPER["warmup_epochs"], PAPER["warmup_lr"], PAPER["min_lr"])
        assert (t.label_smoothing, t.mixup, t.cutmix, t.mixup_prob) == (
            PAPER["label_smoothing"], PAPER["mixup"], PAPER["cutmix"], 1.0)
        assert (t.ema_decay, t.clip_grad, t.betas) == (0.0, 0.0, (0.9, 0.999))
        assert (d.auto_augment, d.reprob, d.repeated_aug, m.drop_path_rate) == (
            PAPER["rand_augment"], PAPER["reprob"], PAPER["repeated_aug"], PAPER["drop_path"])
        assert (d.crop_pct, d.interpolation, d.train_samples) == (
            PAPER["crop_pct"], PAPER["interpolation"], PAPER["imagenet_train"])
        assert cfg.run.ds_config == "zero1-bf16" and not cfg.plugins
        header = (C.RECIPE_DIR / f"{name}.yaml").read_text().split("\nbase:")[0].split("\nrun:")[0]
        assert f"{TOP1[name]} % top-1" in header and "5e-4 x train.batch_size / 512" in header
        assert C.load_config(name).data.root == C.DATA_ROOT_UNSET


def test_unset_data_root_is_refused_naming_the_key_and_the_converter(capsys):
    assert main(["train", "--config", "deit_small", "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.root" in err and "dsvit shards imagefolder" in err


def test_check_on_the_command_line_exits_2_naming_a_wrong_key(capsys, monkeypatch):
    assert main(["train", "--config", "deit_small-stack", NOWHERE, "train.lrr=1", "--check"]) == 2
    err = capsys.readouterr().err
    assert "train.lrr" in err and "did you mean lr" in err and len(err.strip().splitlines()) == 1
    # the world size from the launcher's environment: 128 ranks cannot share 64 streams
    monkeypatch.setenv("WORLD_SIZE", "128")
    assert main(["train", "--config", "deit_small", NOWHERE, "--check"]) == 2
    assert "data.streams=64" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "32")
    assert main(["train", "--config", "deit_small", NOWHERE, "--check"]) == 0
    assert "on 32 rank(s)" in capsys.readouterr().out


def test_dsvit_train_check_subprocess_plans_deit_small_stack_on_32_ranks():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "dsvit", "train", "--config", "deit_small-stack",
                           "--check", "--world-size", "32", NOWHERE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # 1,281,167 // 1024 = 1251 steps a epoch, 300 epochs, 5 warm-up epochs
    assert "375,300 optimizer steps" in out and "warm-up 6,255 steps" in out
    assert "32 rank(s) x 32 per micro-batch" in out and "22.05 M parameters" in out
    assert "engine rebuilds at steps 93,825, 187,650, 281,475" in out
    assert "depth 6, 112 px" in out and "depth 12, 224 px" in out
    assert "no DeepSpeed" in out and not list(ROOT.glob("runs/deit_small-stack*"))


def test_stack_variants_grow_at_stack_yaml_fractions_of_a_300_epoch_run():
    ref = plan("stack", "train.epochs=300")
    ref_cfg = C.load_config("stack", ["train.epochs=300"])
    ref_rows = growth_stages(ref_cfg.plugins["growth"], ref_cfg, ref.total_steps, ref.epoch_steps)
    for name in DEIT:
        cfg = C.load_config(f"{name}-stack", [NOWHERE])
        assert cfg.plugins["growth"].stage_unit == cfg.plugins["toe"].stage_unit == "fraction"
        for key in ("growth", "toe", "token_pruning"):   # the plugins exactly as stack.yaml sets them
            assert cfg.plugins[key] == ref_cfg.plugins[key], key
        p = plan(f"{name}-stack", world_size=32)
        rows = growth_stages(cfg.plugins["growth"], cfg, p.total_steps, p.epoch_steps)
        assert [r.depth for r in rows] == [6, 8, 10, 12] and [r.resolution for r in rows] == [112, 144, 192, 224]
        for r, q in zip(rows, ref_rows):
            assert r.start / p.total_steps == pytest.approx(q.start / ref.total_steps, abs=1 / ref.total_steps)
        assert rows[-1].drop_path == PAPER["drop_path"] and rows[-1].magnitude == 9


def test_stack_et_variants_are_stack_et_with_efficienttrains_published_deit_schedule():
    import dataclasses
    ref = C.load_config("stack-et")
    published = C.load_config("efficienttrain").plugins["efficienttrain"]
    for name in DEIT:
        cfg = C.load_config(f"{name}-stack-et", [NOWHERE])
        # growth as stack-et grows (the depth only) but leaving the augmentation to EfficientTrain++
        assert cfg.plugins["growth"] == dataclasses.replace(ref.plugins["growth"], augreg=False)
        assert cfg.plugins["token_pruning"] == ref.plugins["token_pruning"]
        assert cfg.plugins["efficienttrain"] == dataclasses.replace(published, lr_clock="compute")
        assert cfg.data.auto_augment == PAPER["rand_augment"] and set(cfg.plugins) == set(ref.plugins)
        p = plan(f"{name}-stack-et", world_size=32)
        rows = growth_stages(cfg.plugins["growth"], cfg, p.total_steps, p.epoch_steps)
        assert [r.depth for r in rows] == [6, 8, 10, 12] and {r.resolution for r in rows} == {224}
        assert "96 px (36 patches), RandAugment m0" in "\n".join(p.lines)


@pytest.mark.parametrize("unit,starts", [("fraction", [0.0, 0.3, 0.55, 0.8]), ("epoch", [0, 1, 2, 3]),
                                         ("step", [0, 50, 120, 250])])
def test_growth_stage_starts_are_the_plugins_own(unit, starts):
    cfg = C.load_config("stack", [f"plugins.growth.stage_unit={unit}", f"plugins.growth.stage_starts={starts}"])
    p = plan("stack", f"plugins.growth.stage_unit={unit}", f"plugins.growth.stage_starts={starts}")
    rows = growth_stages(cfg.plugins["growth"], cfg, p.total_steps, p.epoch_steps)
    expected = ([round(f * p.total_steps) for f in starts] if unit == "fraction" else
                [sum(p.epoch_steps[:e]) for e in starts] if unit == "epoch" else starts)
    assert [r.start for r in rows] == expected
    assert cfg.plugins["growth"].start_steps(p.total_steps, p.epoch_steps) == expected   # what the plugin runs


def test_sized_data_sizes_epochs_as_train_data(shards_96_50):
    info = read_info(shards_96_50)
    for world, accum, steps, batch in ((1, 1, -1, 16), (2, 2, -1, 16), (2, 1, 3, 8), (4, 3, -1, 24)):
        d = C.DataConfig(root=shards_96_50, mode="resampled", streams=4, steps_per_epoch=steps, workers=0)
        real = TrainData(d, info, img_size=16, rank=0, world_size=world, local_batch=batch // (world * accum),
                         seed=0, batches_multiple=accum)
        sized = SizedData(96, batch // accum, accum, steps)
        assert sized.batches_per_epoch == real.batches_per_epoch
        assert [sized.batches_for(n) for n in (40, 61, 96)] == [real.batches_for(n) for n in (40, 61, 96)]


def test_plan_reads_the_data_when_it_is_here_and_says_when_the_stated_size_disagrees(shards_96_50):
    p = plan("tiny_test", f"data.root={shards_96_50}", "data.train_samples=1000", "data.streams=4",
             "data.mode=partitioned")
    assert (p.train_samples, p.num_classes) == (96, 4)
    # partitioned, 8 shards of 12 dealt to 4 streams: 24 samples each, 4 per stream per batch of 16
    assert p.epoch_steps == [6, 6]
    assert any("data.train_samples=1,000" in n and "96" in n for n in p.notes)
    assert not any("partitioned" in n for n in p.notes)    # exact: the shards are here


def test_model_states_follow_the_zero_paper():
    psi, n = 1000, 4
    mixed = [model_state_bytes(psi, "bf16", s, n, False, False) for s in range(4)]
    assert [sum(m.values()) for m in mixed] == [16 * psi, 4 * psi + 12 * psi // n,
                                                2 * psi + 14 * psi // n, 16 * psi // n]
    fp32 = [model_state_bytes(psi, "fp32", s, n, False, False) for s in range(4)]
    assert [sum(m.values()) for m in fp32] == [16 * psi, 8 * psi + 8 * psi // n,
                                               4 * psi + 12 * psi // n, 16 * psi // n]
    off = model_state_bytes(psi, "bf16", 2, n, True, False)
    assert off["optimizer"] == 0 and off["host"] == 16 * psi // n


def test_activation_estimate_is_the_measured_theory_for_vit_small():
    # benchmarks/RESULTS.md, "Activation checkpointing": ViT-S/16, 224, batch 32, fp32: 1884 MiB
    # without checkpointing (measured 1844), 268 MiB with per-block checkpointing (measured 325)
    model = meta_model(C.ModelConfig(name="vit_small_patch16_224"), 1000)
    assert round(activation_bytes(model, 32, "fp32", False) / 2 ** 20) == 1884
    assert round(activation_bytes(model, 32, "fp32", True) / 2 ** 20) == 268
    assert activation_bytes(model, 32, "bf16", False) * 2 == activation_bytes(model, 32, "fp32", False)
