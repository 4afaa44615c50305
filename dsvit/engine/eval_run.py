"""``dsvit eval RUN_DIR``: evaluate a checkpoint without DeepSpeed, on one or many ranks.

The weights are read as a plain timm state dict (engine.export), so a run trained on any world size
and ZeRO stage evaluates anywhere, into the architecture the checkpoint records. Plugins of the run
are rebuilt (by the command line, which passes ``make_plugins``) so that inference-time behaviour
applies; a plugin may declare evaluation options (``Plugin.eval_options``, e.g. PSS's
``--keep-rate``) whose comma-separated values sweep and print accuracy and images/s for each.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from dsvit import config as C
from dsvit.engine.evaluate import evaluate_model
from dsvit.engine.export import check_fits, checkpoint_model, load_weights, resolve_tag
from dsvit.engine.plugin import State
from dsvit.engine.plugin_set import PluginSet
from dsvit.model.vit import build_model


def run_eval(run_dir: Path, overrides: list[str], world, make_plugins, tag: str = "", ema: bool = False,
             sweep: tuple = ()) -> int:
    """Evaluate; ``sweep = (plugin, key, flag, values)`` evaluates once per value of a plugin's
    declared evaluation option (e.g. PSS's keep rate), the plugin switched on."""
    from deepspeed.accelerator import get_accelerator
    from dsvit.data import pipeline

    cfg_file = run_dir / "config.yaml"
    if not cfg_file.exists():
        raise C.ConfigError(f"{cfg_file} not found: is {run_dir} a dsvit run directory?")
    cfg = C.apply_overrides(C.load_resolved(cfg_file), overrides)
    device = torch.device(get_accelerator().device_name(world.local_rank))
    tag_dir = resolve_tag(run_dir, tag)
    # the model as it was at that checkpoint (a plugin may have grown it), whatever config.yaml says
    model_cfg, notes = checkpoint_model(tag_dir, cfg.model)
    if world.rank == 0:
        for line in notes:
            print(f"dsvit eval: {line}; using the checkpoint's", file=sys.stderr)

    root = cfg.data.root
    if root == "synthetic":
        root = str(run_dir / "data")
    info = pipeline.read_info(root)
    num_classes = pipeline.num_classes(info)
    if num_classes != model_cfg.num_classes:
        raise C.ConfigError(f"{tag_dir} was trained on {model_cfg.num_classes} classes, the data at "
                            f"data.root={root} has {num_classes}: evaluate on the run's own data")
    model, stage = build_model(model_cfg, num_classes)
    weights = load_weights(tag_dir, ema=ema)
    check_fits(model, weights, tag_dir, notes)
    model.load_state_dict(weights)
    model.to(device).eval()
    eval_data = pipeline.EvalData(cfg.data, info, img_size=model_cfg.img_size, rank=world.rank,
                                  world_size=world.world_size,
                                  local_batch=max(1, cfg.train.eval_batch_size // world.world_size))

    plugin, key, flag, values = sweep if sweep else (None, None, None, [None])
    rows = []
    for value in values:
        run_cfg = cfg   # one new config per swept value; the loaded one is never changed
        if value is not None:
            try:
                run_cfg = C.apply_overrides(cfg, [f"plugins.{plugin}.enabled=true",
                                                  f"plugins.{plugin}.{key}={value}"])
                C.validate(run_cfg, world.world_size)
            except C.ConfigError as e:
                raise C.ConfigError(f"{flag} {value}: {e}") from None
        plugins = PluginSet(make_plugins(run_cfg))
        state = State(rank=world.rank, world_size=world.world_size, model=model,
                      token_stage=stage, training=False, num_classes=num_classes)
        plugins.fire("fit_start", state)
        plugins.fire("eval_start", state)
        metrics = evaluate_model(model, eval_data.batches(), device)
        plugins.fire("eval_end", state)
        plugins.fire("fit_end", state)     # plugins remove their hooks: the next value starts clean
        rows.append((value, metrics))
    if world.rank == 0:
        print(f"checkpoint {tag_dir}{' (EMA)' if ema else ''}")
        label = (flag or "model").lstrip("-")
        print(f"{label:>10} {'top1':>7} {'top5':>7} {'loss':>7} {'img/s':>8} {'samples':>8}")
        for value, m in rows:
            print(f"{_label(value):>10} {m['top1']:7.2f} {m['top5']:7.2f} "
                  f"{m['loss']:7.4f} {m['images_per_s']:8.1f} {m['samples']:8d}")
    return 0


def _label(value) -> str:
    if value is None:
        return "model"
    try:
        return f"{float(value):.2f}"
    except ValueError:
        return str(value)
