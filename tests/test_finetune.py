"""Fine-tuning: ``model.init`` (dsvit/model/pretrained.py) and ``train.layer_decay``
(dsvit/engine/setup.py): the weights after init equal the file's for every accepted source, position
table and patch kernel resampled as timm's own functions do, a new class count re-initialises the
head only, pickles and misfits refused by name; layer-decay groups and the LR every parameter is
stepped with match an independent computation at ZeRO 0-3; a ToE fine-tune from an init file
resumes exactly (one run through the deepspeed launcher, three launches).

The ZeRO part runs as a subprocess of this file (``python tests/test_finetune.py OUT``): one
``init_distributed``, a world of one, and the pytest process keeps no process group."""
import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.optim import create_optimizer_v2

from dsvit import config as C
from dsvit.errors import ConfigError
from dsvit.model.pretrained import load_pretrained
from dsvit.model.vit import build_model, create_vit

ROOT = Path(__file__).resolve().parent.parent
TINY = C.load_config("tiny_test").model          # 16 px, patch 4 (4x4 grid), width 32, depth 2


def model_cfg(**kw) -> C.ModelConfig:
    return C.ModelConfig(**{**TINY.__dict__, **kw})


def source(seed=1, num_classes=10, **kw) -> dict:
    """A plain timm model's weights, drawn from another seed than the model they go into."""
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in create_vit(model_cfg(**kw), num_classes).state_dict().items()}


def target(num_classes=10, **kw):
    """dsvit's model (token stage attached), random init, and a copy of its initial weights."""
    torch.manual_seed(0)
    model, _ = build_model(model_cfg(**kw), num_classes)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def init(model, path, read_run=None):
    load_pretrained(model, str(path), 0, read_run)
    return model.state_dict()


def assert_equal(got: dict, want: dict, keys):
    for k in keys:
        assert torch.equal(got[k], want[k]), k


# ---------------------------------------------------------------- sources
def test_timm_pth_with_model_wrapper_and_module_prefix(tmp_path):
    weights = source()
    torch.save({"model": {f"module.{k}": v for k, v in weights.items()}, "epoch": 300}, tmp_path / "w.pth")
    model, built = target()
    got = init(model, tmp_path / "w.pth")
    assert_equal(got, weights, weights)
    assert not torch.equal(built["blocks.0.attn.qkv.weight"], weights["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("wrapper", ["state_dict", "module", None])
def test_other_wrappers_and_suffixes(tmp_path, wrapper):
    weights = source(seed=2)
    path = tmp_path / ("w.bin" if wrapper else "w.pt")
    torch.save({wrapper: weights} if wrapper else weights, path)
    assert_equal(init(target()[0], path), weights, weights)


def test_safetensors_file(tmp_path):
    weights = source(seed=3)
    save_file(weights, str(tmp_path / "w.safetensors"))
    assert_equal(init(target()[0], tmp_path / "w.safetensors"), weights, weights)


@pytest.mark.parametrize("kind", ["class token", "registers, no_embed_class"])
def test_position_table_resampled_with_timms_function(tmp_path, kind):
    """A 32 px file (8x8 grid) into a 16 px model (4x4): the table is timm's resample of the file's,
    prefix tokens kept apart (and not in the table at all with no_embed_class)."""
    kw = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    if kind != "class token":
        kw.update(reg_tokens=2, no_embed_class=True)
    torch.manual_seed(1)
    weights = timm.create_model("vit_tiny_patch16_224", img_size=32, **kw).state_dict()
    save_file(weights, str(tmp_path / "w.safetensors"))
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, **kw)
    got = init(model, tmp_path / "w.safetensors")
    prefix = 0 if kind != "class token" else 1
    want = resample_abs_pos_embed(weights["pos_embed"], new_size=[4, 4], num_prefix_tokens=prefix)
    assert got["pos_embed"].shape == (1, 16 + prefix, 32)
    assert torch.equal(got["pos_embed"], want)
    assert_equal(got, weights, [k for k in weights if k != "pos_embed"])


def test_patch_embedding_resampled_with_timms_function(tmp_path):
    weights = source(seed=4, patch_size=8, img_size=32)      # 8 px patches, 4x4 grid: same table
    save_file(weights, str(tmp_path / "w.safetensors"))
    got = init(target()[0], tmp_path / "w.safetensors")
    want = resample_patch_embed(weights["patch_embed.proj.weight"], [4, 4])
    assert torch.allclose(got["patch_embed.proj.weight"], want, atol=1e-6)
    assert_equal(got, weights, [k for k in weights if k != "patch_embed.proj.weight"])


@pytest.mark.parametrize("file_head", ["5 classes", "none (a backbone)"])
def test_another_class_count_reinitialises_the_head_only(tmp_path, file_head):
    weights = source(seed=5, num_classes=5)
    if file_head.startswith("none"):
        weights = {k: v for k, v in weights.items() if not k.startswith("head.")}
    torch.save(weights, tmp_path / "w.pth")
    model, built = target(num_classes=10)
    got = init(model, tmp_path / "w.pth")
    head = {"head.weight", "head.bias"}
    assert_equal(got, built, head)                                   # as built
    assert_equal(got, weights, set(got) - head)                      # everything else: the file's


# ---------------------------------------------------------------- refusals
def test_a_pickled_object_is_refused_with_the_fix(tmp_path):
    torch.save({"model": source(), "args": argparse.Namespace(lr=1e-3)}, tmp_path / "train.pth")
    model, built = target()
    with pytest.raises(ConfigError) as e:
        init(model, tmp_path / "train.pth")
    assert "argparse.Namespace" in str(e.value)
    assert "re-save it with torch.save(model.state_dict()) or convert to safetensors" in str(e.value)
    assert_equal(model.state_dict(), built, built)                    # nothing loaded


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path):
    weights = source()
    del weights["blocks.1.norm2.bias"]
    weights["dist_token"] = torch.zeros(1, 1, 32)
    torch.save(weights, tmp_path / "w.pth")
    with pytest.raises(ConfigError) as e:
        init(target()[0], tmp_path / "w.pth")
    msg = str(e.value)
    assert "keys the model lacks: dist_token" in msg and "keys the file lacks: blocks.1.norm2.bias" in msg
    assert "model.init" in msg and "Fix:" in msg

    save_file(source(depth=3), str(tmp_path / "deep.safetensors"))
    with pytest.raises(ConfigError, match=r"keys the model lacks: blocks\.2\..*model\.depth=3"):
        init(target()[0], tmp_path / "deep.safetensors")
    save_file(source(embed_dim=64), str(tmp_path / "wide.safetensors"))
    with pytest.raises(ConfigError, match=r"shapes that differ: .*\(file \[.*model.embed_dim=64"):
        init(target()[0], tmp_path / "wide.safetensors")


def test_unknown_formats_and_folders_are_refused(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ConfigError, match="unknown weights format '.npz'"):
        init(target()[0], tmp_path / "w.npz")
    with pytest.raises(ConfigError, match="neither a dsvit run folder"):
        init(target()[0], tmp_path)


def test_config_validation_names_the_keys():
    cfg = C.load_config("tiny_test", ["model.init=/no/such/file.pth"])
    with pytest.raises(ConfigError, match=r"model.init '/no/such/file.pth' does not exist.*model.init=''"):
        C.validate(cfg)
    with pytest.raises(ConfigError, match=r"train.layer_decay must be in \[0, 1\]"):
        C.validate(C.load_config("tiny_test", ["train.layer_decay=1.5"]))
    C.validate(C.load_config("finetune", ["train.layer_decay=0.75"]))
    here = str(Path(__file__))
    with pytest.raises(ConfigError, match=r"plugins.growth: cannot start from model.init=.*enabled=false"):
        C.validate(C.load_config("growth", [f"model.init={here}"]))
    with pytest.raises(ConfigError, match=r"plugins.growth: train.layer_decay=0.75 cannot be used with gr"):
        C.validate(C.load_config("growth", ["train.layer_decay=0.75"]))
    C.validate(C.load_config("growth", [f"model.init={here}", "train.layer_decay=0.75",
                                        "plugins.growth.enabled=false"]))


# ---------------------------------------------------------------- layer decay
def layer_id(name: str, depth: int) -> int:
    """timm's ViT grouping (BEiT's rule): stem 0, block i -> i + 1, the final norm with the last
    block, the head (anything else) depth + 1."""
    if name.split(".")[0] in ("cls_token", "reg_token", "pos_embed", "patch_embed", "norm_pre"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth if name.startswith("norm.") else depth + 1


def schedule(t: int, lr: float, warmup_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up from warmup_lr, then half a cosine to min_lr over the remaining steps."""
    if t < warmup:
        return warmup_lr + t * (lr - warmup_lr) / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


DECAY, LR, TOTAL, PER_EPOCH, STEP_AT = 0.5, 0.01, 10, 4, 3
LD = [f"train.layer_decay={DECAY}", f"train.lr={LR}", "train.warmup_epochs=0.5", "train.min_lr=1e-4",
      "train.warmup_lr=1e-5", "train.weight_decay=0.05"]


def _zero_worker(out: Path) -> None:
    """Per ZeRO stage: the client optimizer's groups after the schedule's first steps, then one real
    engine step at step ``STEP_AT``'s LR: every parameter's fp32 master before and after."""
    from dsvit.cli import init_distributed
    from dsvit.engine import optimizer_state as opt_state
    from dsvit.engine.rebuild import release
    from dsvit.engine.setup import build_engine, complete_ds_config, lr_schedule
    init_distributed(None)
    results = {}
    for stage in (0, 1, 2, 3):
        cfg = C.load_config("tiny_test", [f"run.zero_stage={stage}", *LD])
        torch.manual_seed(0)
        model, _ = build_model(cfg.model, 10)
        engine, optimizer, weight_decay = build_engine(model, cfg.train, complete_ds_config(cfg, 1),
                                                       torch.device("cpu"))
        sched = lr_schedule(optimizer, cfg.train, TOTAL, PER_EPOCH)
        groups = []
        for t in range(6):
            sched.step_update(t)
            groups.append([[g["lr"], g.get("lr_scale"), g["weight_decay"]] for g in optimizer.param_groups])
        sched.step_update(STEP_AT)
        g = torch.Generator().manual_seed(1)
        images, labels = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
        before = opt_state.full_weights(engine)
        loss = torch.nn.functional.cross_entropy(engine(images), labels)
        engine.backward(loss)
        engine.step()
        after = opt_state.full_weights(engine)
        results[stage] = {"groups": groups, "weight_decay": weight_decay,
                          "no_weight_decay": sorted(model.no_weight_decay()),
                          "before": before, "after": after, "wrapper": type(engine.optimizer).__name__}
        release(engine)
    torch.save(results, out)


@pytest.fixture(scope="module")
def zero_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("layer_decay") / "zero.pt"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)   # a world of one, on a free port dsvit picks
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_layer_decay_groups_and_stepped_lrs_match_the_reference(zero_results, stage):
    r = zero_results[stage]
    depth, wd = TINY.depth, 0.05
    warmup = round(0.5 * PER_EPOCH)
    lr_at = [schedule(t, LR, 1e-5, 1e-4, warmup, TOTAL) for t in range(6)]
    scales = sorted({DECAY ** (depth + 1 - lid) for lid in range(depth + 2)}, reverse=True)
    for t, groups in enumerate(r["groups"]):
        assert sorted({g[1] for g in groups}, reverse=True) == pytest.approx(scales)
        assert groups[0][1] == 1.0                                    # the logged LR: the schedule's
        for lr, scale, _ in groups:
            assert lr == pytest.approx(lr_at[t] * scale, rel=1e-12), (t, scale)
    # the weight-decay map: timm's rule, whatever the layer groups
    for name, value in r["weight_decay"].items():
        no_decay = r["before"][name].ndim <= 1 or name in r["no_weight_decay"]
        assert value == (0.0 if no_decay else wd), name
    # the step DeepSpeed's wrapper took: AdamW's first update moves every element by
    # lr * g / (|g| + eps) after the decoupled decay, so its largest move is the parameter's own LR
    lr_now = schedule(STEP_AT, LR, 1e-5, 1e-4, warmup, TOTAL)
    for name, p0 in r["before"].items():
        lr_eff = lr_now * DECAY ** (depth + 1 - layer_id(name, depth))
        moved = (r["after"][name] - p0 * (1 - lr_eff * r["weight_decay"][name])).abs().max().item()
        assert moved == pytest.approx(lr_eff, rel=1e-3), (name, moved, lr_eff)


def test_restore_group_settings_puts_each_groups_lr_scale_back():
    """DeepSpeed's ZeRO-3 universal loader copies group 0's hyper-parameters into every group."""
    from dsvit.engine import resume
    model, _ = target()
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    built = [(g["lr_scale"], g["weight_decay"]) for g in opt.param_groups]
    settings = resume.group_settings(opt)
    for g in opt.param_groups:
        g.update({k: v for k, v in opt.param_groups[0].items() if k != "params"})
    resume.restore_group_settings(opt, settings)
    assert [(g["lr_scale"], g["weight_decay"]) for g in opt.param_groups] == built
    assert len(set(built)) > 2


# ---------------------------------------------------------------- through the launcher
@pytest.mark.slow
def test_toe_finetune_from_an_init_file_resumes_exactly(tmp_path):
    """A 32 px, 5-class timm file into tiny_test (16 px, 10 classes): ToE + layer decay under ZeRO-2,
    stopped at step 3 and resumed, equals the uninterrupted run; the run started from the file; the
    run's export, its folder and its tag folder load back as the checkpoint's weights."""
    from dsvit.engine.export import export, load_weights, resolve_tag
    from dsvit.model.pretrained import fit_to_model, read_file
    from plugin_harness import check_resume_equivalence
    weights = source(seed=7, num_classes=5, img_size=32)
    torch.save({"model": weights}, tmp_path / "init.pth")
    check_resume_equivalence(tmp_path, [f"model.init={tmp_path / 'init.pth'}", "plugins.toe.enabled=true",
                                        "train.layer_decay=0.75", "run.zero_stage=2"], world_size=1)
    run = tmp_path / "straight1"
    tag = run / "checkpoints" / "step00000003"
    trained = load_weights(tag)
    fitted, notes = fit_to_model(target()[0], read_file(tmp_path / "init.pth"), "init.pth")
    assert any("position table resampled" in n for n in notes) and any("head re-init" in n for n in notes)
    moved = max((trained[k] - v).abs().max().item() for k, v in fitted.items())
    assert moved < 0.02     # three Adam steps at lr <= 1e-3 from the file (a fresh init is ~0.1 away)

    def read_run(run_dir, tag_name):
        return load_weights(resolve_tag(run_dir, tag_name))
    final = load_weights(run / "checkpoints" / "step00000006")
    export(run, tmp_path / "export.safetensors", tag="step00000006")          # what `dsvit export` runs
    for where in (tmp_path / "export.safetensors", run, run / "checkpoints" / "step00000006"):
        assert_equal(init(target()[0], where, read_run), final, final)
    assert_equal(init(target()[0], tag, read_run), trained, trained)


if __name__ == "__main__":
    _zero_worker(Path(sys.argv[1]))
