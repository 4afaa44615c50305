"""The training loop: owns the DeepSpeed engine and fires plugin events.

One optimizer step (``train_step``): ``step_start``, then ``grad_accum`` micro-batches, each
``batch_start -> before_forward -> forward -> after_forward -> loss -> after_loss -> backward ->
engine.step``; at the accumulation boundary the step counter advances, the LR for the next step is
set (a pure function of the step, so a rebuilt engine or a resumed run gets the same curve), EMA
updates and ``after_step`` fires. A rebuild a plugin requested runs right after the event it was
requested in (``dsvit.engine.rebuild.rebuild_engine``). The only host syncs are at logging intervals.

Start-up (data, epoch plan, resume point, architecture, engine, logger) is ``dsvit.engine.build``;
the run length is known there and is identical on every rank and after a resume.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from dsvit import config as C
from dsvit.data.device import finish_on_device
from dsvit.engine import build as B
from dsvit.engine import checkpoint as ckpt
from dsvit.engine import host_sync
from dsvit.engine import optimizer_state as opt_state
from dsvit.engine import preemption
from dsvit.engine import rebuild as rb
from dsvit.engine import resume
from dsvit.engine.ema import WeightEMA
from dsvit.engine.evaluate import evaluate_model
from dsvit.engine.meter import log_data_counters
from dsvit.engine.plugin import REBUILD_EVENTS, STEP_EVENTS, Batch
from dsvit.engine.setup import (World, build_engine, clear_stale_zero3_grads, lr_schedule,
                                schedule_step, seed_everything, soft_targets)
from dsvit.model.vit import describe_model

__all__ = ["RunObserver", "Trainer", "World"]


class RunObserver:
    """Extension points for tools and tests, beside the plugins' events: what a plugin may not see
    (the engine around a rebuild, a checkpoint's files). No-ops here; override what you need."""

    def rebuilding(self, trainer: "Trainer", request: rb.RebuildRequest) -> None: ...
    def rebuilt(self, trainer: "Trainer", request: rb.RebuildRequest, derived: rb.Derived) -> None: ...
    def engine_files_saved(self, trainer: "Trainer", tag_dir: Path) -> None: ...
    def checkpointed(self, trainer: "Trainer", tag_dir: Path) -> None: ...


class Trainer:
    def __init__(self, cfg: C.Config, world: World, plugins: list, train_data=None, eval_data=None,
                 num_classes: Optional[int] = None, observer: Optional[RunObserver] = None,
                 stop_signals: Optional[preemption.StopSignals] = None):
        self.observer = observer or RunObserver()
        self.stop_signals = stop_signals   # SIGTERM/SIGUSR1: checkpoint and stop (engine/preemption.py)
        B.build(self, cfg, world, plugins, train_data, eval_data, num_classes)

    # ------------------------------------------------------------ what the builder and rebuilds use
    def steps_in_epoch(self, epoch: int) -> int:
        return self.epoch_steps[epoch] if epoch < len(self.epoch_steps) else self.base_steps_per_epoch

    def model_config(self, arch: dict) -> C.ModelConfig:
        return B.model_config(self.cfg.model, arch)

    def new_engine(self, model):
        engine, optimizer, self.weight_decay = build_engine(model, self.cfg.train, self.ds_config,
                                                            self.device)
        schedule = lr_schedule(optimizer, self.cfg.train, self.total_steps, self.base_steps_per_epoch)
        return engine, optimizer, schedule

    def new_ema(self, shadow: torch.nn.Module, copy: bool) -> WeightEMA:
        ema = WeightEMA(self.engine.module, shadow.to(self.device), self.cfg.train.ema_decay,
                        self.zero_stage == 3, copy=copy)
        self.stage.attach(ema.model, primary=False)
        return ema

    def destroy_engine(self) -> None:
        rb.release(self.engine)
        self.engine = self.optimizer = self.lr_schedule = self.state.model = None
        rb.collect(self.accel)

    def fingerprint(self) -> dict:
        """What a checkpoint must match to be resumed by this run. The architecture is what the
        plugins declare at the checkpoint's step (their restored state), not the recipe's start."""
        m = self.model_cfg
        return {"model": m.name, "img_size": m.img_size, "patch_size": m.patch_size,
                "embed_dim": m.embed_dim, "depth": m.depth, "num_heads": m.num_heads,
                "mlp_ratio": m.mlp_ratio, "global_pool": m.global_pool, "architecture": self.arch,
                "num_classes": self.num_classes, "plugins": sorted(p.name for p in self.plugins),
                # the batches depend on the next two (dsvit.data.pipeline), the schedules on the run length
                "data_streams": self.cfg.data.streams, "batch_size": self.cfg.train.batch_size,
                "total_steps": self.total_steps, "epoch_steps": self.epoch_steps, "zero_stage": self.zero_stage}

    # ------------------------------------------------------------ events and rebuilds
    def _fire(self, event: str) -> None:
        s = self.state
        if event in STEP_EVENTS:      # inside a step: no host sync (tests/test_host_sync.py)
            self.plugins.fire(event, s)
        else:
            with host_sync.allowed(f"event {event}"):
                self.plugins.fire(event, s)
        if event in REBUILD_EVENTS and s.rebuild_request is not None:
            request, s.rebuild_request = s.rebuild_request, None
            self.rebuild(request)

    @host_sync.allows("engine rebuild")
    def rebuild(self, request: rb.RebuildRequest) -> rb.Derived:
        """Rebuild the engine around the model ``request`` declares, between two optimizer steps."""
        self.observer.rebuilding(self, request)
        derived = rb.rebuild_engine(self, request)
        self.observer.rebuilt(self, request, derived)
        return derived

    # ------------------------------------------------------------ checkpoints
    @host_sync.allows("checkpoint")
    def save_checkpoint(self) -> Path:
        t0, s = time.perf_counter(), self.state
        replicated = self.plugins.state_dict()
        ckpt.check_replicated(replicated)
        run_state = {"step": s.step, "epoch": s.epoch, "step_in_epoch": s.step_in_epoch,
                     "best_top1": self.best_top1, "architecture": self.arch, "plugins": replicated}
        weights = {"weights": opt_state.full_weights(self.engine)}   # collective under ZeRO
        if self.ema is not None:
            weights["ema"] = self.ema.state_dict()
        path = ckpt.save(self.engine, self.ckpt_dir, s.step, {"config": C.to_dict(self.cfg)}, run_state,
                         {"plugins": self.plugins.rank_state_dict()},
                         weights if self.world.rank == 0 else {},
                         dict(self.fingerprint(), run_id=self.run_id, world_size=self.world.world_size),
                         self.world.rank, self.cfg.checkpoint.keep_last,
                         engine_saved=lambda tag_dir: self.observer.engine_files_saved(self, tag_dir))
        self.last_checkpoint = path
        self.logger.info("checkpoint %s", path)
        self.meter.pause(time.perf_counter() - t0, "checkpoint")
        self.observer.checkpointed(self, path)
        return path

    def load_engine_state(self, tag_dir: Path, run_state: dict) -> None:
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
        self.logger.info("resumed from %s (step %d, epoch %d, %d steps into it)", tag_dir, s.step,
                         s.epoch, s.step_in_epoch)

    # ------------------------------------------------------------ training
    def _batch(self, images, labels, uids) -> Batch:
        images = finish_on_device(images, self.device)   # uint8 from the shards: normalised (and erased) here
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
            with host_sync.allowed("the data iterator (host data)"):
                images, labels, uids = next_batch()
            wait = time.perf_counter() - t0
            self.meter.micro_batch(self.train_micro_batch(self._batch(images, labels, uids)), wait,
                                   self.stage.mean_block_tokens, self.stage.block_macs)
        if self.zero_stage == 3:
            clear_stale_zero3_grads(self.engine)
        s.step += 1
        s.step_in_epoch += 1
        self.lr_schedule.step_update(schedule_step(s))
        if self.ema is not None:
            self.ema.update()
        self._fire("after_step")

    @host_sync.allows("logging interval")
    def log_interval(self) -> None:
        s = self.state
        if self.cfg.run.compile:   # graphs compiled so far: recompiles show as steps up
            from torch._dynamo.utils import counters
            self.logger.scalar("compile/graphs", counters["stats"]["unique_graphs"])
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
        self.engine.train()
        s.training = True
        self._fire("fit_start")
        self.lr_schedule.step_update(schedule_step(s))   # after fit_start: it may set State.lr_clock
        self.logger.info("training %s: %d steps (%d per epoch), global batch %d on %d rank(s), ZeRO %d",
                         self.model_cfg.name, self.total_steps, s.steps_per_epoch, t.batch_size,
                         self.world.world_size, self.zero_stage)
        self.logger.info("model: %s", describe_model(self.cfg.model, self.engine.module))
        self.logger.start_progress(self.total_steps, s.step)
        metrics: dict = {}
        self.fit_start_time = time.perf_counter()
        self.meter.started(s.step)   # start-up ends here
        while s.step < self.total_steps:
            self._fire("epoch_start")
            it = self._epoch_batches()
            while s.step_in_epoch < s.steps_per_epoch and s.step < self.total_steps:
                self.train_step(it.__next__)
                if s.step % cfg.log.every_steps == 0 or s.step == self.total_steps:
                    self.log_interval()
                mid_epoch = s.step_in_epoch < s.steps_per_epoch and s.step < self.total_steps
                if self._step_checkpoint_due() and mid_epoch:
                    self.save_checkpoint()
                if mid_epoch:   # SIGTERM/SIGUSR1 on any rank: all stop at one agreed step
                    preemption.stop_if_agreed(self)
            epoch_done = s.step_in_epoch >= s.steps_per_epoch
            if epoch_done:
                self._fire("epoch_end")
                with host_sync.allowed("epoch end"):
                    log_data_counters(self.train_data, self.logger, self.device, s.epoch)
            last = s.step >= self.total_steps
            if (epoch_done and (s.epoch + 1) % t.eval_every_epochs == 0) or last:
                metrics = self.evaluate(final=last)
            if epoch_done:
                s.epoch += 1
                s.step_in_epoch = 0
                s.steps_per_epoch = self.steps_in_epoch(s.epoch)
            every_epochs = cfg.checkpoint.every_epochs
            epoch_due = epoch_done and every_epochs > 0 and s.epoch % every_epochs == 0
            if epoch_due or last or self._step_checkpoint_due():
                self.save_checkpoint()
            if not last:   # a signal during the epoch's last step, evaluation or checkpoint
                preemption.stop_if_agreed(self)
        if not metrics:   # resumed at its end (a finished run): evaluate what it holds
            metrics = self.evaluate()
        self.meter.finish(self.logger, s.step)   # where the wall time went: TensorBoard and a line
        self.plugins.fire("fit_end", s)
        self.logger.close()
        return metrics

    def _step_checkpoint_due(self) -> bool:
        return self.cfg.checkpoint.every_steps > 0 and self.state.step % self.cfg.checkpoint.every_steps == 0

    # ------------------------------------------------------------ evaluation
    @host_sync.allows("evaluation")
    def evaluate(self, use_ema: Optional[bool] = None, final: bool = True) -> dict:   # not final: eval_samples
        t0, s, part = time.perf_counter(), self.state, self.eval_part_batches is not None and not final
        use_ema = self.ema is not None if use_ema is None else use_ema
        model = self.ema.model if use_ema else self.engine
        self.engine.eval()
        s.training = False
        self.plugins.fire("eval_start", s)
        batches = self.eval_data.batches(self.eval_part_batches if part else None)
        metrics = evaluate_model(model, batches, self.device, torch.float32 if use_ema else self.model_dtype)
        log_data_counters(self.eval_data, self.logger, self.device, s.epoch, "eval_data")
        prefix = ("eval_ema" if use_ema else "eval") + ("_part" if part else "")   # a part: a curve, not a result
        self.best_top1 = self.best_top1 if part else max(self.best_top1, metrics["top1"])
        for k in ("top1", "top5", "loss"):
            self.logger.scalar(f"{prefix}/{k}", metrics[k])
        self.logger.scalar("time/wall_s", time.perf_counter() - self.fit_start_time)
        self.logger.flush(s.step)
        self.logger.info("step %d %s: top1 %.2f top5 %.2f loss %.4f on %d samples", s.step, prefix,
                         metrics["top1"], metrics["top5"], metrics["loss"], metrics["samples"])
        self.plugins.fire("eval_end", s)
        s.training = True
        self.engine.train()
        self.meter.pause(time.perf_counter() - t0, "eval")
        return metrics
