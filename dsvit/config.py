"""Typed run configuration: YAML recipe + dotted ``key=value`` overrides -> validated dataclasses.

Configuration flows one way: ``load_config`` builds a :class:`Config` once at start, ``validate``
checks it (errors name the key and say what to change), and components receive their own section.
Every section is a frozen dataclass (``dsvit.config_sections``) and ``Config.plugins`` a read-only mapping: a value is never
changed after loading; a derived one (the data's class count) makes a new config with
``dataclasses.replace`` (``dsvit.engine.build.resolve``), and ``apply_override`` returns a new config.
Plugin sections are declared by the plugins themselves (``dsvit.registry``) so this module
names no plugin.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Optional

import yaml

# the sections (re-exported: C.ModelConfig, ...) and ConfigError (C.ConfigError)
from dsvit.config_sections import (DATA_ROOT_UNSET, SECTIONS, CheckpointConfig, Config,  # noqa: F401
                                   DataConfig, LogConfig, ModelConfig, RunConfig, TrainConfig)
from dsvit.errors import ConfigError  # noqa: F401
from dsvit.typed_fields import FrozenDict, set_fields, unknown_key

PACKAGE_DIR = Path(__file__).resolve().parent
RECIPE_DIR = PACKAGE_DIR / "recipes"
DS_CONFIG_DIR = PACKAGE_DIR.parent / "ds_configs"


# ---------------------------------------------------------------- building
def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = RECIPE_DIR / f"{name_or_path}.yaml"
    if cand.exists():
        return cand
    raise ConfigError(f"recipe '{name_or_path}' not found: give a YAML path or one of {list_recipes()}")


def _plugin_registry() -> dict:
    from dsvit.registry import plugin_registry
    return plugin_registry()


def _set_plugin(cfg: Config, name: str, values: dict) -> Config:
    registry = _plugin_registry()
    if name not in registry:
        raise unknown_key(name, sorted(registry), "plugins.")
    if not isinstance(values, dict):
        raise ConfigError(f"plugins.{name} must be a mapping of keys, got {values!r}")
    section = cfg.plugins[name] if name in cfg.plugins else registry[name].config_class()
    section = set_fields(section, values, f"plugins.{name}.")
    return dataclasses.replace(cfg, plugins=FrozenDict({**cfg.plugins, name: section}))


@functools.lru_cache(maxsize=None)
def timm_architecture(name: str) -> dict:
    """The shape of timm's model ``name`` as ModelConfig fields, read off the model built on the meta
    device (no memory, no initialisation); {} for a name timm does not know (validate reports it)."""
    import timm
    import torch
    if not timm.is_model(name):
        return {}
    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False)
    blocks = getattr(m, "blocks", None)
    if blocks is None or not hasattr(m, "patch_embed"):
        return {}
    embed = m.embed_dim
    return dict(img_size=int(m.patch_embed.img_size[0]), patch_size=int(m.patch_embed.patch_size[0]),
                embed_dim=int(embed), depth=len(blocks), num_heads=int(blocks[0].attn.num_heads),
                mlp_ratio=blocks[0].mlp.fc1.out_features / embed)


def name_architecture(before: Config, after: Config, keys_set) -> Config:
    """A layer of configuration (a recipe, or the command line's overrides) that names another
    ``model.name`` gets that timm model's own architecture: the shape fields earlier layers set
    (a base recipe's depth, width, patch, input size) become the model's, unless this same layer
    sets them too. Otherwise ``--config stack model.name=vit_small_patch16_224`` would silently
    train the recipe's 4-block toy under a new name. The values are filled in, so config.yaml and
    the plugins (growth needs the depth) see the architecture that trains."""
    if after.model.name == before.model.name:
        return after
    own = {k: v for k, v in timm_architecture(after.model.name).items() if k not in keys_set}
    return dataclasses.replace(after, model=dataclasses.replace(after.model, **own))


def apply_mapping(cfg: Config, data: dict) -> Config:
    """A new config: ``cfg`` with a recipe-shaped mapping ``{section: {key: value}}`` applied."""
    model_keys = (data or {}).get("model")
    out = _apply_sections(cfg, data)
    return name_architecture(cfg, out, set(model_keys)) if isinstance(model_keys, dict) else out


def _apply_sections(cfg: Config, data: dict) -> Config:
    for section, values in (data or {}).items():
        if section not in SECTIONS:
            raise unknown_key(section, SECTIONS, "")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"section '{section}' must be a mapping of keys, got {values!r}")
        if section == "plugins":
            for name, pv in values.items():
                cfg = _set_plugin(cfg, name, pv or {})
        else:
            cfg = dataclasses.replace(cfg, **{section: set_fields(getattr(cfg, section), values,
                                                                   section + ".")})
    return cfg


def apply_override(cfg: Config, item: str) -> Config:
    """A new config: ``cfg`` with one ``section.key=value`` override applied."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    key, value = item.split("=", 1)
    parts = key.split(".")
    if parts[0] not in SECTIONS:
        raise unknown_key(parts[0], SECTIONS, "")
    if parts[0] == "plugins":
        if len(parts) != 3:
            raise ConfigError(f"'{key}': plugin overrides look like plugins.NAME.KEY=VALUE")
        return _set_plugin(cfg, parts[1], {parts[2]: yaml.safe_load(value) if value else value})
    if len(parts) != 2:
        raise ConfigError(f"'{key}': overrides look like section.key=value, e.g. train.lr=5e-4")
    parsed = yaml.safe_load(value) if value != "" else ""
    section = set_fields(getattr(cfg, parts[0]), {parts[1]: parsed if parsed is not None else value},
                          parts[0] + ".")
    return dataclasses.replace(cfg, **{parts[0]: section})


def apply_overrides(cfg: Config, items) -> Config:
    """``cfg`` with command-line overrides applied, one layer (``name_architecture``)."""
    before, model_keys = cfg, set()
    for item in items or []:
        cfg = apply_override(cfg, item)   # raises on a malformed item before the key is read below
        section, _, key = item.split("=", 1)[0].partition(".")
        if section == "model":
            model_keys.add(key)
    return name_architecture(before, cfg, model_keys)


def _apply_recipe(cfg: Config, name_or_path: str, seen: tuple = ()) -> Config:
    """Apply a recipe; a top-level ``base: NAME`` is applied first, so recipes state only changes."""
    path = recipe_path(name_or_path)
    if path in seen:
        raise ConfigError(f"recipe {path} names itself as a base (via {' -> '.join(map(str, seen))})")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise ConfigError(f"recipe {path} is not valid YAML{line}: "
                          f"{getattr(e, 'problem', None) or e}; fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections (run:, model:, ...), got "
                          f"{type(data).__name__}")
    base = data.pop("base", None)
    if base:
        cfg = _apply_recipe(cfg, base, seen + (path,))
    return apply_mapping(cfg, data)


def load_config(recipe: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    return with_requested_plugins(apply_overrides(_apply_recipe(Config(), recipe or "default"), overrides))


def with_requested_plugins(cfg: Config) -> Config:
    """Default sections for plugins another key asks for (``Plugin.requested_by``: e.g.
    ``log.image_every_steps`` > 0 asks for the image grid); a section the user wrote stays as is."""
    for name, cls in sorted(_plugin_registry().items()):
        if name not in cfg.plugins and cls.requested_by(cfg):
            cfg = _set_plugin(cfg, name, {})
    return cfg


def to_dict(cfg: Config) -> dict:
    out = {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS if name != "plugins"}
    out["plugins"] = {k: dataclasses.asdict(v) for k, v in cfg.plugins.items()}
    return out


def from_dict(data: dict) -> Config:
    return apply_mapping(Config(), data)


def save_resolved(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_resolved(path: Path) -> Config:
    """The config a run recorded (``save_resolved``'s ``RUN_DIR/config.yaml``)."""
    return from_dict(yaml.safe_load(Path(path).read_text()))


# ---------------------------------------------------------------- validation
def ds_config_path(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".json" and p.exists():
        return p
    cand = DS_CONFIG_DIR / f"{name}.json"
    if cand.exists():
        return cand
    known = sorted(q.stem for q in DS_CONFIG_DIR.glob("*.json"))
    raise ConfigError(f"run.ds_config '{name}' not found: give a JSON path or one of {known}")


def check_model_name(name: str) -> None:
    import timm
    if timm.is_model(name):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else "; see timm.list_models('vit_*')"
    raise ConfigError(f"model.name '{name}' is not a timm model{hint}")


def check_streams(streams: int, world_size: int, global_micro_batch: int) -> None:
    """data.streams must split into ranks and the global micro-batch into equal chunks."""
    if streams < 1 or streams % world_size:
        raise ConfigError(f"data.streams={streams} must be a positive multiple of the world size "
                         f"{world_size}: set data.streams={math.lcm(max(streams, 1), world_size)} "
                         f"(a multiple of every world size you will run or resume this run on, e.g. 8 for 1/2/4/8 ranks)")
    if global_micro_batch % streams:
        raise ConfigError(f"the global micro-batch ({global_micro_batch} = train.batch_size / train.grad_accum) "
                         f"is not divisible by data.streams={streams}: each stream gives every micro-batch "
                         f"the same number of samples; use a train.batch_size that is a multiple of "
                         f"{streams} x train.grad_accum, or another data.streams")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Check values once at start; raise ConfigError saying what to change."""
    t, r = cfg.train, cfg.run
    check_model_name(cfg.model.name)
    if r.ds_config != "auto":
        ds_config_path(r.ds_config)
    positive = {"train.lr": t.lr, "train.epochs": t.epochs, "train.batch_size": t.batch_size,
                "train.grad_accum": t.grad_accum, "train.eval_batch_size": t.eval_batch_size,
                "model.img_size": cfg.model.img_size, "log.every_steps": cfg.log.every_steps,
                "run.collective_timeout_s": r.collective_timeout_s}
    for key, v in positive.items():
        if not 0 < v < math.inf:
            raise ConfigError(f"{key} must be a finite number > 0, got {v}")
    for key, v in {"train.min_lr": t.min_lr, "train.warmup_lr": t.warmup_lr,
                   "train.weight_decay": t.weight_decay, "train.warmup_epochs": t.warmup_epochs,
                   "train.clip_grad": t.clip_grad, "model.drop_path_rate": cfg.model.drop_path_rate}.items():
        if not 0 <= v < math.inf:
            raise ConfigError(f"{key} must be a finite number >= 0, got {v}")
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0 = off), got {t.ema_decay}")
    if not 0 <= t.layer_decay <= 1:
        raise ConfigError(f"train.layer_decay must be in [0, 1] (0 = off; fine-tuning uses 0.65-0.75), "
                          f"got {t.layer_decay}")
    if cfg.model.init and not Path(cfg.model.init).exists():
        raise ConfigError(f"model.init '{cfg.model.init}' does not exist: give a .safetensors/.pth/.pt/.bin "
                          f"file or a dsvit run/checkpoint folder, or model.init='' (random init; a resume needs none)")
    per = world_size * t.grad_accum
    if t.batch_size % per:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by world size {world_size} x "
            f"train.grad_accum {t.grad_accum} = {per}; use a multiple of {per}")
    check_streams(cfg.data.streams, world_size, t.batch_size // t.grad_accum)
    if t.eval_batch_size % world_size:
        raise ConfigError(f"train.eval_batch_size={t.eval_batch_size} is not divisible by world "
                          f"size {world_size}; use a multiple of {world_size}")
    if r.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"run.precision must be auto, fp32, bf16 or fp16, got '{r.precision}'")
    if r.zero_stage not in (-1, 0, 1, 2, 3):
        raise ConfigError(f"run.zero_stage must be -1 (from the JSON) or 0..3, got {r.zero_stage}")
    if cfg.data.mode not in ("resampled", "partitioned"):
        raise ConfigError(f"data.mode must be resampled or partitioned, got '{cfg.data.mode}'")
    if cfg.data.corrupt not in ("skip", "raise"):
        raise ConfigError(f"data.corrupt must be skip or raise, got '{cfg.data.corrupt}'")
    if cfg.data.root == DATA_ROOT_UNSET:
        raise ConfigError(
            "data.root is not set: this recipe trains on your copy of the dataset. Convert it once with "
            "`dsvit shards imagefolder SRC OUT` (SRC/train/<class>/*.JPEG, SRC/val/<class>/*.JPEG) and "
            "pass data.root=OUT")
    if cfg.data.train_samples < 0:
        raise ConfigError(f"data.train_samples must be >= 0 (0: from _info.json), got {cfg.data.train_samples}")
    if cfg.data.repeated_aug < 1:
        raise ConfigError(f"data.repeated_aug must be an integer >= 1 (1 = off, 3 = DeiT's repeated "
                          f"augmentation), got {cfg.data.repeated_aug}; set data.repeated_aug=1 or 3")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")
    if t.eval_every_epochs < 1 or t.eval_samples < 0:
        raise ConfigError(f"train.eval_every_epochs must be >= 1 and train.eval_samples >= 0 (0: every "
                          f"evaluation reads the whole split), got {t.eval_every_epochs} and {t.eval_samples}")
    for name, pcfg in cfg.plugins.items():
        check = getattr(pcfg, "validate", None)
        if check is not None:
            try:
                check(cfg)
            except ConfigError as e:
                raise ConfigError(f"plugins.{name}: {e}") from None


def read_ds_config(name: str) -> dict:
    """The DeepSpeed JSON ``name`` (a ds_configs/ name or a path)."""
    with open(ds_config_path(name)) as f:
        return json.load(f)


def load_ds_config(cfg: Config) -> dict:
    return read_ds_config(cfg.run.ds_config)
