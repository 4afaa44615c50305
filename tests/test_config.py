"""Config: recipes + overrides -> validated dataclasses; errors name the key and what to change."""
import pytest

from dsvit import config as C
from dsvit.cli import build_parser, main


def test_default_recipe_loads_and_validates():
    cfg = C.load_config()
    C.validate(cfg, world_size=1)
    assert cfg.model.img_size == 32 and cfg.data.root == "synthetic"


def test_overrides_are_typed():
    cfg = C.load_config("default", ["train.lr=5e-4", "model.grad_checkpointing=true",
                                    "data.mean=[0.5,0.5,0.5]", "model.depth=None"])
    assert cfg.train.lr == 5e-4 and cfg.model.grad_checkpointing is True
    assert cfg.data.mean == (0.5, 0.5, 0.5) and cfg.model.depth is None


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(C.ConfigError, match=r"unknown key 'train.lrr'.*did you mean lr.*valid keys"):
        C.load_config("default", ["train.lrr=1"])
    with pytest.raises(C.ConfigError, match=r"unknown key 'trian'.*did you mean train"):
        C.load_config("default", ["trian.lr=1"])
    with pytest.raises(C.ConfigError, match=r"unknown key 'plugins.nope'"):
        C.load_config("default", ["plugins.nope.enabled=true"])


def test_bad_values_say_what_to_change():
    with pytest.raises(C.ConfigError, match=r"train.lr must be a finite number > 0, got -0.1"):
        C.validate(C.load_config("default", ["train.lr=-0.1"]))
    with pytest.raises(C.ConfigError, match=r"not divisible by world size 3.*multiple of 3"):
        C.validate(C.load_config("default", ["train.batch_size=128"]), world_size=3)
    with pytest.raises(C.ConfigError, match=r"cannot read 'abc' as int"):
        C.load_config("default", ["train.epochs=abc"])
    with pytest.raises(C.ConfigError, match=r"run.ds_config 'zero9' not found.*zero2"):
        C.validate(C.load_config("default", ["run.ds_config=zero9"]))


def test_unknown_model_lists_close_matches():
    with pytest.raises(C.ConfigError, match=r"not a timm model; close matches: .*deit_tiny_patch16_224"):
        C.validate(C.load_config("default", ["model.name=deit_tiny_patch16_22"]))


def test_cli_reports_config_errors(capsys):
    assert main(["train", "train.nope=1"]) == 2
    assert "unknown key 'train.nope'" in capsys.readouterr().err


def test_help_lists_recipes_and_sections(capsys):
    assert "recipes shipped:" in build_parser().format_help()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    recipes = next(l for l in text.splitlines() if l.startswith("recipes shipped:"))
    assert "default" in recipes and "cifar10-bench" in recipes
    assert "\n  train:\n" in text and "\n  checkpoint:\n" in text and "  plugins.toe: " in text


def test_resolved_config_round_trips(tmp_path):
    cfg = C.load_config("default", ["train.lr=3e-4"])
    C.save_resolved(cfg, tmp_path / "config.yaml")
    import yaml
    again = C.from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert C.to_dict(again) == C.to_dict(cfg)


def test_recipe_base_inheritance(tmp_path):
    toe = C.load_config("toe")
    default = C.load_config("default")
    assert toe.model == default.model and toe.train == default.train
    assert toe.run.dir == "runs/toe" and "toe" in toe.plugins and "toe" not in default.plugins
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(C.ConfigError, match="names itself as a base"):
        C.load_config(str(loop))


def test_infinite_lr_and_broken_yaml_are_config_errors(tmp_path):
    cfg = C.load_config("tiny_test", ["train.lr=inf"])
    with pytest.raises(C.ConfigError, match="train.lr must be a finite number > 0, got inf"):
        C.validate(cfg)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\nmodel: x\n")
    with pytest.raises(C.ConfigError, match=r"bad.yaml is not valid YAML at line \d+"):
        C.load_config(str(bad))


def test_a_named_model_brings_its_own_architecture_unless_the_same_layer_sets_a_field():
    """``--config stack model.name=vit_small_patch16_224`` trains ViT-S/16 at 224, not the recipe's
    4-block toy under that name; a field set beside the name wins; a recipe's own shape stays."""
    from dsvit.config import load_config
    small = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0)
    m = load_config("stack", ["model.name=vit_small_patch16_224"]).model
    assert {k: getattr(m, k) for k in small} == small
    m = load_config("stack", ["model.name=vit_small_patch16_224", "model.depth=6", "model.img_size=64"]).model
    assert (m.depth, m.img_size, m.embed_dim, m.patch_size) == (6, 64, 384, 16)
    m = load_config("stack", ["model.depth=6"]).model       # no new name: the recipe's shape, one change
    assert (m.name, m.depth, m.embed_dim, m.patch_size, m.img_size) == ("vit_tiny_patch16_224", 6, 128, 4, 32)
    assert load_config("stack", ["model.name=vit_base_patch16_384"]).model.img_size == 384
