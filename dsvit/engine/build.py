"""Building a run, in the order a recipe reads: the plugins' composition, the data, the resolved
config, the epoch plan, the resume point, the architecture, the engine, the EMA, the logger.

``build(trainer, ...)`` fills a ``Trainer`` (``dsvit.engine.trainer``) with everything it runs on;
each step below is one function, so a newcomer reads the whole start-up here. Two rules shape the
order: nothing in the run folder changes before a resumed checkpoint was found compatible, and the
model is built from the recipe plus what the plugins declare (``Plugin.architecture``) *after* a
resume restored their states (a grown model is rebuilt first, then DeepSpeed's files are loaded).
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path
from typing import Optional

import torch
import yaml

from dsvit import config as C
from dsvit.engine import checkpoint as ckpt
from dsvit.engine import export
from dsvit.engine import resume
from dsvit.engine import run_folder
from dsvit.engine.compose import check_composition
from dsvit.engine.evaluate import intermediate_eval_batches
from dsvit.engine.logging import RunLogger, log
from dsvit.engine.meter import StepMeter
from dsvit.engine.plugin import State
from dsvit.engine.plugin_set import PluginSet
from dsvit.engine.setup import (complete_ds_config, model_dtype, resolve_run, seed_everything,
                                use_device_numerics)
from dsvit.model.pretrained import load_pretrained
from dsvit.model.vit import build_model, compile_blocks, create_vit


def build(t, cfg: C.Config, world, plugins: list, train_data=None, eval_data=None,
          num_classes: Optional[int] = None) -> None:
    check_composition(plugins, cfg)   # before any setup: plugins that cannot work together
    from deepspeed.accelerator import get_accelerator
    t.world, t.accel = world, get_accelerator()
    t.device = torch.device(t.accel.device_name(world.local_rank))
    if t.device.type == "cuda":
        torch.cuda.set_device(t.device)
    # ds_config/precision "auto" made concrete for this device, once: config.yaml records them
    cfg = dataclasses.replace(cfg, run=resolve_run(cfg.run, t.device))
    use_device_numerics(cfg.run, t.device)
    seed_everything(cfg.run.seed + world.rank)
    # the run folder is this process's from here on (released at exit); another live run's is refused
    t.run_lock = run_folder.lock(Path(cfg.run.dir), world.rank, log)

    if train_data is None:
        from dsvit.data.pipeline import stream_data
        train_data, eval_data, num_classes = stream_data(cfg, world, Path(cfg.run.dir))
    t.train_data, t.eval_data, t.num_classes = train_data, eval_data, num_classes
    t.eval_part_batches = intermediate_eval_batches(cfg.train.eval_samples, cfg.train.eval_batch_size,
                                                    eval_data.num_batches)   # None: every evaluation reads all
    if num_classes != cfg.model.num_classes and world.rank == 0:
        log.warning("model.num_classes=%d replaced by the data's %d classes (%s): the head has one output "
                    "per class of the data", cfg.model.num_classes, num_classes, cfg.data.root)
    # the data's class count is the effective one: filled once, into a new (frozen) config
    t.cfg = cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes))
    t.run_dir = Path(cfg.run.dir)
    t.ckpt_dir = t.run_dir / "checkpoints"
    t.plugins = PluginSet(plugins)
    t.state = State(rank=world.rank, world_size=world.world_size, data=train_data,
                    num_classes=num_classes)

    t.base_steps_per_epoch, t.epoch_steps = epoch_plan(cfg, train_data, t.plugins)
    t.total_steps = cfg.run.max_steps if cfg.run.max_steps > 0 else sum(t.epoch_steps)

    # resume, part 1: progress and plugin states first, since they decide the architecture
    t.resume_tag = resume.find(cfg.checkpoint.resume, t.ckpt_dir, world.rank, [p.name for p in t.plugins])
    t.resume_point = resume.point(t.resume_tag, world.world_size)
    run_state = load_run_state(t.plugins, t.resume_point, world) if t.resume_tag else None
    t.ds_config = resume.with_universal_load(complete_ds_config(cfg, world.world_size), t.resume_point)
    t.zero_stage = t.ds_config.get("zero_optimization", {}).get("stage", 0)
    t.model_dtype = model_dtype(t.ds_config)
    t.arch = t.plugins.architecture()
    t.model_cfg = t.model_config(t.arch)
    if t.resume_tag:   # nothing in the run folder changes before this check passes
        marker = t.resume_point.marker   # read once, by resume.point
        ckpt.check_compatible(marker, t.fingerprint(), t.resume_tag)
        t.run_id = marker.get("run_id")
    else:
        run_folder.claim(t.run_dir, cfg.run.overwrite, cfg.checkpoint.resume, world.rank, log)
        t.run_id = ckpt.agree(uuid.uuid4().hex[:12])
    recorded = t.run_dir / "config.yaml"
    if world.rank == 0 and t.resume_tag and recorded.is_file():
        now = yaml.safe_load(yaml.safe_dump(C.to_dict(cfg), sort_keys=False))   # as recorded: lists, not tuples
        changed = resume.changed_settings(yaml.safe_load(recorded.read_text()), now)
        if changed:
            log.warning("resuming with settings that differ from the run's (%s): %s", recorded, "; ".join(changed))
    if world.rank == 0:
        C.save_resolved(cfg, recorded)

    torch.manual_seed(cfg.run.seed)   # identical initial weights on every rank
    model, t.stage = build_model(t.model_cfg, num_classes)
    if cfg.model.init and not t.resume_tag:   # a resumed run's weights are its checkpoint's
        load_pretrained(model, cfg.model.init, world.rank,
                        read_run=lambda run, tag: export.load_weights(export.resolve_tag(run, tag)))
    if cfg.run.compile:
        compile_blocks(model)
    seed_everything(cfg.run.seed + world.rank)
    t.engine, t.optimizer, t.lr_schedule = t.new_engine(model)
    t.ema = None
    if cfg.train.ema_decay > 0:
        t.ema = t.new_ema(create_vit(t.model_cfg, num_classes), copy=True)

    t.logger = RunLogger(t.run_dir / "tb", world.rank, cfg.log.tensorboard, cfg.log.progress)
    s = t.state
    s.model, s.token_stage, s.logger = t.engine.module, t.stage, t.logger
    s.total_steps, s.epoch_steps = t.total_steps, tuple(t.epoch_steps)
    s.steps_per_epoch = t.steps_in_epoch(0)
    t.meter = StepMeter(t.device, world.world_size, cfg.train.batch_size)
    t.best_top1 = 0.0
    t.last_checkpoint = t.resume_tag
    t.mixup = make_mixup(cfg.train, num_classes)
    t.fit_start_time = time.perf_counter()   # reset when fit() starts
    if t.resume_tag:   # resume, part 2: DeepSpeed's files into the engine just built
        t.load_engine_state(t.resume_tag, run_state)


def epoch_plan(cfg: C.Config, train_data, plugins: PluginSet) -> tuple[int, list[int]]:
    """(optimizer steps of a full epoch, steps of every epoch): the data plugin's plan of active
    samples, or full epochs."""
    t = cfg.train
    base = train_data.batches_per_epoch // t.grad_accum
    if base < 1:
        raise C.ConfigError(
            f"an epoch has {train_data.batches_per_epoch} micro-batches per rank, fewer than "
            f"train.grad_accum={t.grad_accum}: lower train.batch_size or use more data")
    plan = plugins.epoch_plan(train_data.num_samples, t.epochs)
    if plan is None:
        return base, [base] * t.epochs
    if len(plan) != t.epochs:
        raise ValueError(f"the epoch plan has {len(plan)} epochs, train.epochs={t.epochs}")
    steps = [train_data.batches_for(int(n)) // t.grad_accum for n in plan]
    short = [e for e, n in enumerate(steps) if n < 1]
    if short:
        raise C.ConfigError(f"the data plugin's plan leaves epoch(s) {short} without a full step "
                            f"({[plan[e] for e in short]} samples); keep more samples per epoch")
    return base, steps


def load_run_state(plugins: PluginSet, point: resume.ResumePoint, world) -> dict:
    """The checkpoint's progress; the plugins' replicated and per-rank states loaded into them."""
    run_state = ckpt.read_run_state(point.tag_dir)
    per_rank = resume.rank_plugin_states(point, plugins, world.rank, world.world_size)
    plugins.load_state_dict(run_state["plugins"], per_rank)
    return run_state


def model_config(model: C.ModelConfig, arch: dict) -> C.ModelConfig:
    """``model`` with the plugins' architecture overrides (e.g. a grown depth)."""
    unknown = set(arch) - {f.name for f in dataclasses.fields(C.ModelConfig)}
    if unknown:
        raise ValueError(f"plugins declare model keys {sorted(unknown)} that model.* does not have")
    return dataclasses.replace(model, **arch)


def make_mixup(train: C.TrainConfig, num_classes: int):
    if train.mixup <= 0 and train.cutmix <= 0:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=train.mixup, cutmix_alpha=train.cutmix, prob=train.mixup_prob,
                 label_smoothing=train.label_smoothing, num_classes=num_classes)
