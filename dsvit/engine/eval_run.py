"""``dsvit eval RUN_DIR``: evaluate a checkpoint without DeepSpeed, on one or many ranks.

The weights are read as a plain timm state dict (engine.export), so a run trained on any world size
and ZeRO stage evaluates anywhere. Plugins of the run are rebuilt so that inference-time behaviour
(e.g. PSS dynamic inference at ``--keep-rate``) applies; ``--keep-rate`` with several values sweeps
and prints accuracy and images/s for each.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from dsvit import config as C
from dsvit.engine.evaluate import evaluate_model
from dsvit.engine.export import load_weights, resolve_tag
from dsvit.engine.plugin import PluginSet, State
from dsvit.model.vit import build_model
from dsvit.plugins import build_plugins

KEEP_RATE_KEY = "eval_keep_rate"


def _keep_rate_plugin(cfg: C.Config):
    """The config of the enabled plugin that offers an inference keep rate (PSS), if any."""
    from dsvit.plugins import REGISTRY
    for name, plugin in REGISTRY.items():
        if hasattr(plugin.config_class, KEEP_RATE_KEY):
            if name not in cfg.plugins:
                cfg.plugins[name] = plugin.config_class()
                if hasattr(cfg.plugins[name], "enabled"):
                    cfg.plugins[name].enabled = True
            return cfg.plugins[name]
    raise C.ConfigError("--keep-rate needs a plugin with an inference keep rate (pss); none is installed")


def run_eval(run_dir: Path, overrides: list[str], world, tag: str = "", ema: bool = False,
             keep_rates: str = "") -> int:
    from deepspeed.accelerator import get_accelerator
    from dsvit.data import pipeline

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        raise C.ConfigError(f"{cfg_file} not found: is {run_dir} a dsvit run directory?")
    cfg = C.from_dict(yaml.safe_load(cfg_file.read_text()))
    for item in overrides:
        C.apply_override(cfg, item)
    device = torch.device(get_accelerator().device_name(world.local_rank))
    tag_dir = resolve_tag(run_dir, tag)

    root = cfg.data.root
    if root == "synthetic":
        root = str(run_dir / "data")
    info = pipeline.read_info(root)
    num_classes = pipeline.num_classes(info)
    model, stage = build_model(cfg.model, num_classes)
    model.load_state_dict(load_weights(tag_dir, ema=ema))
    model.to(device).eval()
    eval_data = pipeline.EvalData(cfg.data, info, img_size=cfg.model.img_size, rank=world.rank,
                                  world_size=world.world_size,
                                  local_batch=max(1, cfg.train.eval_batch_size // world.world_size))

    rates = [float(r) for r in keep_rates.split(",") if r.strip()] if keep_rates else [None]
    rate_cfg = _keep_rate_plugin(cfg) if rates != [None] else None
    rows = []
    for rate in rates:
        if rate is not None:
            setattr(rate_cfg, KEEP_RATE_KEY, rate)
        plugins = PluginSet(build_plugins(cfg.plugins))
        state = State(cfg=cfg, rank=world.rank, world_size=world.world_size, model=model,
                      token_stage=stage, training=False)
        plugins.fire("fit_start", state)
        plugins.fire("eval_start", state)
        metrics = evaluate_model(model, eval_data.batches(), device)
        plugins.fire("eval_end", state)
        plugins.fire("fit_end", state)     # plugins remove their hooks: the next rate starts clean
        rows.append((rate, metrics))
    if world.rank == 0:
        print(f"checkpoint {tag_dir}{' (EMA)' if ema else ''}")
        print(f"{'keep_rate':>9} {'top1':>7} {'top5':>7} {'loss':>7} {'img/s':>8} {'samples':>8}")
        for rate, m in rows:
            label = "model" if rate is None else f"{rate:.2f}"
            print(f"{label:>9} {m['top1']:7.2f} {m['top5']:7.2f} {m['loss']:7.4f} "
                  f"{m['images_per_s']:8.1f} {m['samples']:8d}")
    return 0
