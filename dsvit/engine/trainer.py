"""The training loop: owns the DeepSpeed engine and fires plugin events.

One optimizer step (``train_step``): ``step_start``, then ``grad_accum`` micro-batches, each
``batch_start -> before_forward -> forward -> after_forward -> loss -> after_loss -> backward ->
engine.step``; at the accumulation boundary the step counter advances, the LR for the next step is
set (a pure function of the step, so a rebuilt engine or a resumed run gets the same curve), EMA
updates and ``after_step`` fires. A rebuild a plugin requested runs right after the event it was
requested in (``dsvit.engine.rebuild``). The only host syncs are at logging intervals.

The run length is known at start: ``epoch_steps`` comes from the data plugins' epoch plan (or the
data's own epoch length) and is identical on every rank and after a resume. The model is built from
the recipe plus what the plugins declare (``architecture()``), after a resume has restored their
states: a grown model is rebuilt first, then DeepSpeed's files are loaded into it.
"""
from __future__ import annotations

import dataclasses
import gc
import time
import uuid
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from dsvit import config as C
from dsvit.engine import checkpoint as ckpt
from dsvit.engine.compose import check_composition
from dsvit.engine import rebuild as rb
from dsvit.engine import resume
from dsvit.engine import run_folder
from dsvit.engine.ema import WeightEMA
from dsvit.engine.evaluate import evaluate_model
from dsvit.engine.logging import RunLogger, log
from dsvit.engine.meter import StepMeter, log_data_counters
from dsvit.engine.plugin import REBUILD_EVENTS, Batch, PluginSet, State
from dsvit.engine.setup import (World, build_engine, clear_stale_zero3_grads, complete_ds_config,
                                lr_schedule, model_dtype, seed_everything, soft_targets)
from dsvit.model import surgery
from dsvit.model.vit import build_model, create_vit

__all__ = ["Trainer", "World"]


class Trainer:
    def __init__(self, cfg: C.Config, world: World, plugins: list, train_data=None, eval_data=None,
                 num_classes: Optional[int] = None):
        check_composition(plugins, cfg)   # before any setup: plugins that cannot work together
        from deepspeed.accelerator import get_accelerator

        self.cfg, self.world = cfg, world
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.accel = get_accelerator()
        self.device = torch.device(self.accel.device_name(world.local_rank))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        seed_everything(cfg.run.seed + world.rank)

        self.train_data, self.eval_data, num_classes = self._data(train_data, eval_data, num_classes)
        self.num_classes = num_classes
        cfg.model.num_classes = num_classes   # the data's class count is the effective one
        t = cfg.train
        self.plugins = PluginSet(plugins)
        self.plugins.configure(cfg)
        self.state = State(cfg=cfg, rank=world.rank, world_size=world.world_size, data=self.train_data,
                           num_classes=num_classes)
        self.base_steps_per_epoch = self.train_data.batches_per_epoch // t.grad_accum
        if self.base_steps_per_epoch < 1:
            raise C.ConfigError(
                f"an epoch has {self.train_data.batches_per_epoch} micro-batches per rank, fewer than "
                f"train.grad_accum={t.grad_accum}: lower train.batch_size or use more data")
        self.epoch_steps = self._plan_epochs()
        self.total_steps = cfg.run.max_steps if cfg.run.max_steps > 0 else sum(self.epoch_steps)
        # resume, part 1: progress and plugin states first, since they decide the architecture
        self.resume_tag = resume.find(cfg.checkpoint.resume, self.ckpt_dir, world.rank,
                                      [p.name for p in self.plugins])
        self.resume_point = resume.point(self.resume_tag, world.world_size)
        resumed_state = self._load_run_state(self.resume_point) if self.resume_tag else None
        self.ds_config = resume.with_universal_load(complete_ds_config(cfg, world.world_size),
                                                    self.resume_point)
        self.zero_stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        self.model_dtype = model_dtype(self.ds_config)
        self.arch = self.plugins.architecture()
        self.model_cfg = self._model_cfg(self.arch)
        if self.resume_tag:   # nothing in the run folder changes before this check passes
            marker = self.resume_point.marker   # read once, by resume.point
            ckpt.check_compatible(marker, self.fingerprint(), self.resume_tag)
            self.run_id = marker.get("run_id")
        else:
            run_folder.claim(self.run_dir, cfg.run.overwrite, cfg.checkpoint.resume, world.rank, log)
            self.run_id = ckpt.agree(uuid.uuid4().hex[:12])
        if world.rank == 0:
            C.save_resolved(cfg, self.run_dir / "config.yaml")

        torch.manual_seed(cfg.run.seed)   # identical initial weights on every rank
        model, self.stage = build_model(self.model_cfg, num_classes)
        seed_everything(cfg.run.seed + world.rank)
        self.engine, self.optimizer, self.lr_schedule = self._new_engine(model)
        self.ema = None
        if t.ema_decay > 0:
            self.ema = self._new_ema(create_vit(self.model_cfg, num_classes), copy=True)

        self.logger = RunLogger(self.run_dir / "tb", world.rank, cfg.log.tensorboard, cfg.log.progress)
        s = self.state
        s.model, s.token_stage, s.logger = self.engine.module, self.stage, self.logger
        s.total_steps, s.epoch_steps = self.total_steps, tuple(self.epoch_steps)
        s.steps_per_epoch = self.steps_in_epoch(0)
        self.meter = StepMeter(self.device, world.world_size, t.batch_size)
        self.best_top1 = 0.0
        self.last_checkpoint: Optional[Path] = self.resume_tag
        self.mixup = self._make_mixup()
        self.fit_start_time = time.perf_counter()   # reset when fit() starts
        if self.resume_tag:   # resume, part 2: DeepSpeed's files into the engine just built
            self._load_engine_state(self.resume_tag, resumed_state)

    # ------------------------------------------------------------ setup
    def _data(self, train_data, eval_data, num_classes):
        if train_data is not None:
            return train_data, eval_data, num_classes
        from dsvit.data.pipeline import stream_data
        return stream_data(self.cfg, self.world, self.run_dir)

    def _plan_epochs(self) -> list[int]:
        """Optimizer steps of every epoch: the data plugin's plan of active samples, or full epochs."""
        t = self.cfg.train
        plan = self.plugins.epoch_plan(self.train_data.num_samples, t.epochs)
        if plan is None:
            return [self.base_steps_per_epoch] * t.epochs
        if len(plan) != t.epochs:
            raise ValueError(f"the epoch plan has {len(plan)} epochs, train.epochs={t.epochs}")
        steps = [self.train_data.batches_for(int(n)) // t.grad_accum for n in plan]
        short = [e for e, n in enumerate(steps) if n < 1]
        if short:
            raise C.ConfigError(f"the data plugin's plan leaves epoch(s) {short} without a full step "
                                f"({[plan[e] for e in short]} samples); keep more samples per epoch")
        return steps

    def steps_in_epoch(self, epoch: int) -> int:
        return self.epoch_steps[epoch] if epoch < len(self.epoch_steps) else self.base_steps_per_epoch

    def _model_cfg(self, arch: dict) -> C.ModelConfig:
        known = {f.name for f in dataclasses.fields(C.ModelConfig)}
        unknown = set(arch) - known
        if unknown:
            raise ValueError(f"plugins declare model keys {sorted(unknown)} that model.* does not have")
        return dataclasses.replace(self.cfg.model, **arch)

    def _new_engine(self, model):
        engine, optimizer, self.weight_decay = build_engine(model, self.cfg.train, self.ds_config,
                                                            self.device)
        schedule = lr_schedule(optimizer, self.cfg.train, self.total_steps, self.base_steps_per_epoch)
        return engine, optimizer, schedule

    def _new_ema(self, shadow: torch.nn.Module, copy: bool) -> WeightEMA:
        ema = WeightEMA(self.engine.module, shadow.to(self.device), self.cfg.train.ema_decay,
                        self.zero_stage == 3, copy=copy)
        self.stage.attach(ema.model, primary=False)
        return ema

    def _make_mixup(self):
        t = self.cfg.train
        if t.mixup <= 0 and t.cutmix <= 0:
            return None
        from timm.data import Mixup
        return Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, prob=t.mixup_prob,
                     label_smoothing=t.label_smoothing, num_classes=self.num_classes)

    def fingerprint(self) -> dict:
        """What a checkpoint must match to be resumed by this run. The architecture is what the
        plugins declare at the checkpoint's step (their restored state), not the recipe's start."""
        m = self.model_cfg
        return {"model": m.name, "img_size": m.img_size, "patch_size": m.patch_size,
                "embed_dim": m.embed_dim, "depth": m.depth, "architecture": self.arch,
                "num_classes": self.num_classes,
                "plugins": sorted(p.name for p in self.plugins),
                # LR and plugin schedules are functions of the step and the run length
                "total_steps": self.total_steps, "epoch_steps": self.epoch_steps,
                "zero_stage": self.zero_stage}

    # ------------------------------------------------------------ events and rebuilds
    def _fire(self, event: str) -> None:
        s = self.state
        self.plugins.fire(event, s)
        if event in REBUILD_EVENTS and s.rebuild_request is not None:
            request, s.rebuild_request = s.rebuild_request, None
            self.rebuild(request)

    def rebuild(self, request: rb.RebuildRequest) -> None:
        """Rebuild the engine around ``request.model`` between two optimizer steps (every rank)."""
        s, clock = self.state, rb.PhaseClock()
        request.validate([n for n, _ in self.engine.module.named_parameters()])
        arch = {**self.arch, **request.arch}
        if "depth" in arch and arch["depth"] != len(request.model.blocks):
            raise ValueError(f"rebuild request by '{request.requested_by}': arch depth {arch['depth']} "
                             f"but its model has {len(request.model.blocks)} blocks")
        snap = rb.capture(self.engine)
        weights = rb.new_weights(request, snap)
        ema_state = self.ema.state_dict() if self.ema is not None else None
        clock.lap("capture")
        self._destroy_engine()
        clock.lap("destroy")

        self.arch, self.model_cfg = arch, self._model_cfg(arch)
        model = request.model
        model.load_state_dict(weights)
        model.set_grad_checkpointing(self.model_cfg.grad_checkpointing)
        self.stage.attach(model)
        if request.block_map is not None:
            self.stage.remap_blocks(request.block_map)
        self.engine, self.optimizer, self.lr_schedule = self._new_engine(model)
        clock.lap("build")
        rb.prime(self.engine, self.optimizer, self.stage, self.model_dtype, self.device,
                 self.zero_stage == 3)
        clock.lap("prime")
        rb.restore(self.engine, request, snap, weights)
        self.lr_schedule.step_update(s.step)
        self.engine.train(s.training)
        if ema_state is not None:
            shadow = surgery.build_plain(self.model_cfg, self.num_classes)
            src = request.block_map or surgery.identity_map(len(shadow.blocks))
            shadow.load_state_dict(surgery.remap_state_dict(ema_state, src, like=shadow.state_dict()))
            self.ema = self._new_ema(shadow, copy=False)
        clock.lap("restore")
        s.model, s.last_rebuild = self.engine.module, request
        self.last_rebuild_times = clock.laps
        self.meter.pause(clock.total)
        self.logger.scalar("engine/rebuild_s", clock.total)
        self.logger.scalar("engine/host_rss_mib", rb.host_rss_mib())
        self.logger.scalar("model/depth", len(model.blocks))
        self.logger.info("rebuilt the engine for '%s' (%s) at step %d in %.2f s (%s): %d blocks, "
                         "optimizer state %s", request.requested_by, request.reason or "no reason given",
                         s.step, clock.total, clock, len(model.blocks), request.optimizer_state)
        self.plugins.fire("after_rebuild", s)
        declared = self.plugins.architecture()
        if declared != self.arch:
            raise RuntimeError(f"after the rebuild by '{request.requested_by}' the plugins declare the "
                               f"architecture {declared}, but the model was built as {self.arch}: the "
                               f"plugin's architecture() must describe the model it requested")

    def _destroy_engine(self) -> None:
        rb.release(self.engine)
        self.engine = self.optimizer = self.lr_schedule = self.state.model = None
        gc.collect()
        self.accel.empty_cache()
        rb.trim_host_heap()

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        t0, s = time.perf_counter(), self.state
        self.plugins.fire("checkpoint_save", s)   # before the plugin states are captured
        replicated = self.plugins.state_dict("replicated")
        ckpt.check_replicated(replicated)
        run_state = {"step": s.step, "epoch": s.epoch, "step_in_epoch": s.step_in_epoch,
                     "best_top1": self.best_top1, "architecture": self.arch, "plugins": replicated}
        weights = {"weights": rb.full_weights(self.engine)}   # collective under ZeRO
        if self.ema is not None:
            weights["ema"] = self.ema.state_dict()
        path = ckpt.save(self.engine, self.ckpt_dir, s.step, {"config": C.to_dict(self.cfg)}, run_state,
                         {"plugins": self.plugins.state_dict("per_rank")},
                         weights if self.world.rank == 0 else {},
                         dict(self.fingerprint(), run_id=self.run_id, world_size=self.world.world_size,
                              data_streams=self.cfg.data.streams),
                         self.world.rank, self.cfg.checkpoint.keep_last)
        self.last_checkpoint = path
        self.logger.info("checkpoint %s", path)
        self.meter.pause(time.perf_counter() - t0)
        return path

    def _load_run_state(self, point: resume.ResumePoint) -> dict:
        run_state = ckpt.read_run_state(point.tag_dir)
        per_rank = resume.rank_plugin_states(point, self.plugins, self.world.rank, self.world.world_size)
        self.plugins.load_state_dict(run_state["plugins"], per_rank)
        return run_state

    def _load_engine_state(self, tag_dir: Path, run_state: dict) -> None:
        built_groups = resume.group_settings(self.optimizer)
        ckpt.load(self.engine, tag_dir, self.world.rank, universal=self.resume_point.universal)
        resume.restore_group_settings(self.optimizer, built_groups)
        s = self.state
        s.step, s.epoch, s.step_in_epoch = run_state["step"], run_state["epoch"], run_state["step_in_epoch"]
        if self.resume_point.world_size != self.world.world_size:   # no RNG state of this rank saved
            seed_everything(self.cfg.run.seed + 1_000_003 * s.step + self.world.rank)
        s.steps_per_epoch = self.steps_in_epoch(s.epoch)
        self.best_top1 = run_state.get("best_top1", 0.0)
        if self.ema is not None:
            self.ema.load_state_dict(ckpt.read_weights(tag_dir, "ema"))
        self.plugins.fire("checkpoint_load", s)
        self.logger.info("resumed from %s (step %d, epoch %d, %d steps into it)", tag_dir, s.step,
                         s.epoch, s.step_in_epoch)

    # ------------------------------------------------------------ training
    def _batch(self, images, labels, uids) -> Batch:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        targets = soft_targets(labels, self.num_classes, self.cfg.train.label_smoothing)
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        return Batch(images=images, targets=targets, labels=labels,
                     uids=None if uids is None else uids.to(self.device, non_blocking=True))

    def train_micro_batch(self, batch: Batch) -> torch.Tensor:
        s, engine = self.state, self.engine
        s.batch = batch
        self.plugins.fire("batch_start", s)
        self.plugins.fire("before_forward", s)
        logits = engine(s.batch.images.to(self.model_dtype))
        s.logits = logits
        self.plugins.fire("after_forward", s)
        s.loss_per_sample = -(s.batch.targets * logits.float().log_softmax(-1)).sum(-1)
        self.plugins.fire("after_loss", s)
        loss = s.loss_per_sample.mean()   # as the plugins left it: replaced or re-weighted
        engine.backward(loss)
        engine.step()
        s.micro_step += 1
        return loss.detach()

    def train_step(self, next_batch) -> None:
        """One optimizer step; ``next_batch()`` returns (images, labels, uids) of a micro-batch."""
        s = self.state
        self._fire("step_start")
        for _ in range(self.cfg.train.grad_accum):
            t0 = time.perf_counter()
            images, labels, uids = next_batch()
            wait = time.perf_counter() - t0
            self.meter.micro_batch(self.train_micro_batch(self._batch(images, labels, uids)), wait,
                                   self.stage.mean_block_tokens, self.stage.block_macs)
        if self.zero_stage == 3:
            clear_stale_zero3_grads(self.engine)
        s.step += 1
        s.step_in_epoch += 1
        self.lr_schedule.step_update(s.step)
        if self.ema is not None:
            self.ema.update()
        self._fire("after_step")

    def log_interval(self) -> None:
        s = self.state
        self.meter.log(self.logger, s.step, self.optimizer.param_groups[0]["lr"],
                       s.epoch + s.step_in_epoch / s.steps_per_epoch,
                       time.perf_counter() - self.fit_start_time)

    def _epoch_batches(self):
        """The current epoch's micro-batches from the resume point, after epoch_start has run (a
        data plugin may have set a new keep set: the planned length must still be available)."""
        s, ga = self.state, self.cfg.train.grad_accum
        s.steps_per_epoch = self.steps_in_epoch(s.epoch)
        need, have = s.steps_per_epoch * ga, self.train_data.batches_per_epoch
        if have < need:
            raise RuntimeError(f"epoch {s.epoch}: the data yields {have} micro-batches per rank with the "
                               f"current keep set, but the epoch plan has {need}; a data plugin's keep "
                               f"set must hold at least the samples its plan_epochs() declared")
        return iter(self.train_data.epoch_batches(s.epoch, skip_batches=s.step_in_epoch * ga,
                                                  num_batches=need))

    def fit(self) -> dict:
        cfg, s, t = self.cfg, self.state, self.cfg.train
        self.lr_schedule.step_update(s.step)
        self.engine.train()
        s.training = True
        self._fire("fit_start")
        self.logger.info("training %s: %d steps (%d per epoch), global batch %d on %d rank(s), ZeRO %d",
                         self.model_cfg.name, self.total_steps, s.steps_per_epoch, t.batch_size,
                         self.world.world_size, self.zero_stage)
        self.logger.start_progress(self.total_steps, s.step)
        metrics: dict = {}
        self.fit_start_time = time.perf_counter()
        self.meter.reset(s.step)
        while s.step < self.total_steps:
            self._fire("epoch_start")
            it = self._epoch_batches()
            while s.step_in_epoch < s.steps_per_epoch and s.step < self.total_steps:
                self.train_step(it.__next__)
                if s.step % cfg.log.every_steps == 0 or s.step == self.total_steps:
                    self.log_interval()
                if (self._step_checkpoint_due() and s.step_in_epoch < s.steps_per_epoch
                        and s.step < self.total_steps):
                    self.save_checkpoint()
            epoch_done = s.step_in_epoch >= s.steps_per_epoch
            if epoch_done:
                self._fire("epoch_end")
                log_data_counters(self.train_data, self.logger, self.device, s.epoch)
            last = s.step >= self.total_steps
            if (epoch_done and (s.epoch + 1) % t.eval_every_epochs == 0) or last:
                metrics = self.evaluate()
            if epoch_done:
                s.epoch += 1
                s.step_in_epoch = 0
                s.steps_per_epoch = self.steps_in_epoch(s.epoch)
            every_epochs = cfg.checkpoint.every_epochs
            epoch_due = epoch_done and every_epochs > 0 and s.epoch % every_epochs == 0
            if epoch_due or last or self._step_checkpoint_due():
                self.save_checkpoint()
        if not metrics:   # resumed at its end (a finished run): evaluate what it holds
            metrics = self.evaluate()
        self.plugins.fire("fit_end", s)
        self.logger.close()
        return metrics

    def _step_checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every_steps
        return every > 0 and self.state.step % every == 0

    # ------------------------------------------------------------ evaluation
    def evaluate(self, use_ema: Optional[bool] = None) -> dict:
        t0, s = time.perf_counter(), self.state
        use_ema = self.ema is not None if use_ema is None else use_ema
        model = self.ema.model if use_ema else self.engine
        self.engine.eval()
        s.training = False
        self.plugins.fire("eval_start", s)
        metrics = evaluate_model(model, self.eval_data.batches(), self.device,
                                 torch.float32 if use_ema else self.model_dtype)
        log_data_counters(self.eval_data, self.logger, self.device, s.epoch, "eval_data")
        self.best_top1 = max(self.best_top1, metrics["top1"])
        prefix = "eval_ema" if use_ema else "eval"
        for k in ("top1", "top5", "loss"):
            self.logger.scalar(f"{prefix}/{k}", metrics[k])
        self.logger.scalar("time/wall_s", time.perf_counter() - self.fit_start_time)
        self.logger.flush(s.step)
        self.logger.info("step %d %s: top1 %.2f top5 %.2f loss %.4f on %d samples", s.step, prefix,
                         metrics["top1"], metrics["top5"], metrics["loss"], metrics["samples"])
        self.plugins.fire("eval_end", s)
        s.training = True
        self.engine.train()
        self.meter.pause(time.perf_counter() - t0)
        return metrics
