"""The training loop: owns the DeepSpeed engine and fires plugin events.

One optimizer step: ``grad_accum`` micro-batches, each ``batch_start -> before_forward -> forward ->
after_forward -> loss -> after_loss -> engine.backward -> engine.step``; at the accumulation boundary
the step counter advances, the LR for the next step is set (a pure function of the step, so a
rebuilt engine or a resumed run gets the same curve), EMA updates, ``after_step`` fires, and
logging/checkpointing happen at their intervals. The only host syncs are at logging intervals.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from dsvit import config as C
from dsvit.engine import checkpoint as ckpt
from dsvit.engine.ema import WeightEMA
from dsvit.engine.evaluate import evaluate_model
from dsvit.engine.logging import RunLogger
from dsvit.engine.plugin import Batch, PluginSet, State
from dsvit.model.vit import build_model, create_vit
from dsvit.plugins import build_plugins


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def seed_everything(seed: int) -> None:
    import random
    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def complete_ds_config(cfg: C.Config, world_size: int) -> dict:
    """The recipe's DeepSpeed JSON, completed with batch sizes, clipping and precision."""
    ds = C.load_ds_config(cfg)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise C.ConfigError(f"{C.ds_config_path(cfg.run.ds_config)} has an '{key}' section: dsvit "
                                f"builds the {key} from train.*; remove it from the JSON")
    t = cfg.train
    ds["train_batch_size"] = t.batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_micro_batch_size_per_gpu"] = t.batch_size // (world_size * t.grad_accum)
    if t.clip_grad > 0:
        ds["gradient_clipping"] = t.clip_grad
    if cfg.run.precision != "auto":
        ds["bf16"] = {"enabled": cfg.run.precision == "bf16"}
        ds["fp16"] = dict(ds.get("fp16", {}), enabled=cfg.run.precision == "fp16")
    if cfg.run.zero_stage >= 0:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.run.zero_stage
    ds.setdefault("steps_per_print", 10**9)
    return ds


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((labels.numel(), num_classes), off, device=labels.device).scatter_(
        1, labels.view(-1, 1), 1.0 - smoothing + off)


class Trainer:
    def __init__(self, cfg: C.Config, world: World, plugins: Optional[list] = None,
                 train_data=None, eval_data=None, num_classes: Optional[int] = None):
        from deepspeed.accelerator import get_accelerator

        self.cfg, self.world = cfg, world
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        accel = get_accelerator()
        self.device = torch.device(accel.device_name(world.local_rank))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        seed_everything(cfg.run.seed + world.rank)

        self.train_data, self.eval_data, num_classes = self._data(train_data, eval_data, num_classes)
        self.num_classes = num_classes
        cfg.model.num_classes = num_classes   # the data's class count is the effective one
        if world.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            C.save_resolved(cfg, self.run_dir / "config.yaml")
        t = cfg.train
        self.micro_batch = t.batch_size // (world.world_size * t.grad_accum)
        self.steps_per_epoch = self.train_data.batches_per_epoch // t.grad_accum
        if self.steps_per_epoch < 1:
            raise C.ConfigError(
                f"an epoch has {self.train_data.batches_per_epoch} micro-batches per rank, fewer than "
                f"train.grad_accum={t.grad_accum}: lower train.batch_size or use more data")
        self.total_steps = (cfg.run.max_steps if cfg.run.max_steps > 0
                            else t.epochs * self.steps_per_epoch)

        torch.manual_seed(cfg.run.seed)   # identical initial weights on every rank
        model, self.stage = build_model(cfg.model, num_classes)
        seed_everything(cfg.run.seed + world.rank)
        self.plugins = PluginSet(build_plugins(cfg.plugins) + list(plugins or []))
        self.ds_config = complete_ds_config(cfg, world.world_size)
        self.zero_stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        self.engine = self._build_engine(model)

        self.ema = None
        if t.ema_decay > 0:
            self.ema = WeightEMA(self.engine.module, create_vit(cfg.model, num_classes).to(self.device),
                                 t.ema_decay, self.zero_stage == 3)
            self.stage.attach(self.ema.model, primary=False)

        self.logger = RunLogger(self.run_dir / "tb", world.rank, cfg.log.tensorboard, cfg.log.progress)
        self.state = State(cfg=cfg, rank=world.rank, world_size=world.world_size,
                           model=self.engine.module, token_stage=self.stage, logger=self.logger,
                           data=self.train_data, steps_per_epoch=self.steps_per_epoch,
                           total_steps=self.total_steps)
        self.best_top1 = 0.0
        self.fit_start_time = time.perf_counter()   # reset when fit() starts
        self.paused_s = 0.0   # eval/checkpoint time inside a logging interval: not step time

    # ------------------------------------------------------------ setup
    def _data(self, train_data, eval_data, num_classes):
        if train_data is not None:
            return train_data, eval_data, num_classes
        from dsvit.data import pipeline
        d, w = self.cfg.data, self.world
        root = d.root
        if root == "synthetic":
            from dsvit.data.synthetic import ensure_synthetic
            root = str(self.run_dir / "data")
            if w.rank == 0:   # the others wait, then read what rank 0 wrote
                ensure_synthetic(root, d.synthetic_train, d.synthetic_val, seed=0)
            if dist.is_initialized():
                dist.barrier()
        info = pipeline.read_info(root)
        common = dict(img_size=self.cfg.model.img_size, rank=w.rank, world_size=w.world_size)
        t = self.cfg.train
        train = pipeline.TrainData(d, info, local_batch=t.batch_size // (w.world_size * t.grad_accum),
                                   seed=self.cfg.run.seed, batches_multiple=t.grad_accum, **common)
        ev = pipeline.EvalData(d, info, local_batch=t.eval_batch_size // w.world_size, **common)
        return train, ev, pipeline.num_classes(info)

    def _build_engine(self, model):
        import deepspeed
        import timm.optim
        t = self.cfg.train
        optimizer = timm.optim.create_optimizer_v2(
            model, "adamw", lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas),
            foreach=self.device.type == "cuda")
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.optimizer = optimizer
        self.lr_schedule = self._lr_schedule(optimizer)
        return engine

    def _lr_schedule(self, optimizer):
        from timm.scheduler import CosineLRScheduler
        t = self.cfg.train
        warmup = min(int(round(t.warmup_epochs * self.steps_per_epoch)), self.total_steps - 1)
        return CosineLRScheduler(optimizer, t_initial=max(1, self.total_steps - warmup), lr_min=t.min_lr,
                                 warmup_t=warmup, warmup_lr_init=t.warmup_lr, warmup_prefix=True,
                                 t_in_epochs=False)

    def rebuild(self, request) -> None:
        raise NotImplementedError("engine rebuild around a changed model lands with progressive growth "
                                  "(engine/rebuild.py); no shipped plugin requests it yet")

    @property
    def model_dtype(self) -> torch.dtype:
        if self.ds_config.get("bf16", {}).get("enabled"):
            return torch.bfloat16
        if self.ds_config.get("fp16", {}).get("enabled"):
            return torch.float16
        return torch.float32

    def fingerprint(self) -> dict:
        """What a checkpoint must match to be resumed by this run."""
        m = self.cfg.model
        return {"model": m.name, "img_size": m.img_size, "patch_size": m.patch_size,
                "embed_dim": m.embed_dim, "depth": m.depth, "num_classes": self.num_classes,
                "plugins": sorted(p.name for p in self.plugins), "world_size": self.world.world_size,
                # LR and plugin schedules are functions of the step and the run length
                "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "zero_stage": self.zero_stage}

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        t0, s = time.perf_counter(), self.state
        client = {"step": s.step, "epoch": s.epoch, "step_in_epoch": s.step_in_epoch,
                  "plugins": self.plugins.state_dict(), "best_top1": self.best_top1,
                  "ema": self.ema.state_dict() if self.ema else None, "config": C.to_dict(self.cfg)}
        self.plugins.fire("checkpoint_save", s)
        path = ckpt.save(self.engine, self.ckpt_dir, s.step, client, self.fingerprint(),
                         self.world.rank, self.cfg.checkpoint.keep_last)
        self.logger.info("checkpoint %s", path)
        self.paused_s += time.perf_counter() - t0
        return path

    def resume(self, where: str) -> bool:
        tag_dir = ckpt.find_latest(self.ckpt_dir) if where == "auto" else Path(where)
        if tag_dir is None:
            self.logger.info("no complete checkpoint in %s: starting fresh", self.ckpt_dir)
            return False
        ckpt.check_compatible(ckpt.read_marker(tag_dir), self.fingerprint(), tag_dir)
        client = ckpt.load(self.engine, tag_dir, self.world.rank)
        s = self.state
        s.step, s.epoch, s.step_in_epoch = client["step"], client["epoch"], client["step_in_epoch"]
        self.best_top1 = client.get("best_top1", 0.0)
        self.plugins.load_state_dict(client["plugins"])
        if self.ema is not None and client.get("ema") is not None:
            self.ema.load_state_dict(client["ema"])
        self.plugins.fire("checkpoint_load", s)
        self.logger.info("resumed from %s (step %d, epoch %d, %d steps into it)", tag_dir, s.step,
                         s.epoch, s.step_in_epoch)
        return True

    # ------------------------------------------------------------ training
    def _batch(self, images, labels, uids) -> Batch:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        targets = soft_targets(labels, self.num_classes, self.cfg.train.label_smoothing)
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        return Batch(images=images, targets=targets, labels=labels,
                     uids=None if uids is None else uids.to(self.device, non_blocking=True))

    def _make_mixup(self):
        t = self.cfg.train
        if t.mixup <= 0 and t.cutmix <= 0:
            return None
        from timm.data import Mixup
        return Mixup(mixup_alpha=t.mixup, cutmix_alpha=t.cutmix, prob=t.mixup_prob,
                     label_smoothing=t.label_smoothing, num_classes=self.num_classes)

    def train_micro_batch(self, batch: Batch) -> torch.Tensor:
        s, engine = self.state, self.engine
        s.batch = batch
        self.plugins.fire("batch_start", s)
        self.plugins.fire("before_forward", s)
        logits = engine(s.batch.images.to(self.model_dtype))
        s.logits = logits
        self.plugins.fire("after_forward", s)
        loss_per_sample = -(s.batch.targets * logits.float().log_softmax(-1)).sum(-1)
        s.loss_per_sample = loss_per_sample
        self.plugins.fire("after_loss", s)
        loss = loss_per_sample.mean()
        engine.backward(loss)
        engine.step()
        return loss.detach()

    def fit(self) -> dict:
        cfg, s, t = self.cfg, self.state, self.cfg.train
        self.mixup = self._make_mixup()
        if cfg.checkpoint.resume:
            self.resume(cfg.checkpoint.resume)
        self.lr_schedule.step_update(s.step)
        self.engine.train()
        s.training = True
        self.plugins.fire("fit_start", s)
        self.logger.info("training %s: %d steps (%d per epoch), global batch %d on %d rank(s), ZeRO %d",
                         cfg.model.name, self.total_steps, self.steps_per_epoch, t.batch_size,
                         self.world.world_size, self.zero_stage)
        self.logger.start_progress(self.total_steps, s.step)
        metrics: dict = {}
        loss_sum = torch.zeros((), device=self.device)
        loss_count, data_wait, tokens = 0, 0.0, 0.0
        t_last, step_last = time.perf_counter(), s.step
        self.fit_start_time = t_last
        while s.step < self.total_steps:
            self.plugins.fire("epoch_start", s)
            batches = self.train_data.epoch_batches(s.epoch, skip_batches=s.step_in_epoch * t.grad_accum)
            it = iter(batches)
            while s.step_in_epoch < self.steps_per_epoch and s.step < self.total_steps:
                for _ in range(t.grad_accum):
                    t0 = time.perf_counter()
                    images, labels, uids = next(it)
                    data_wait += time.perf_counter() - t0
                    loss_sum += self.train_micro_batch(self._batch(images, labels, uids))
                    loss_count += 1
                    tokens += self.stage.mean_block_tokens
                s.step += 1
                s.step_in_epoch += 1
                self.lr_schedule.step_update(s.step)
                if self.ema is not None:
                    self.ema.update(self.engine.module)
                self.plugins.fire("after_step", s)
                if s.rebuild_request is not None:
                    self.rebuild(s.rebuild_request)
                    s.rebuild_request = None
                if s.step % cfg.log.every_steps == 0 or s.step == self.total_steps:
                    dt = time.perf_counter() - t_last - self.paused_s
                    n_steps = s.step - step_last
                    if dist.is_initialized() and self.world.world_size > 1:
                        dist.all_reduce(loss_sum)
                    loss = loss_sum.item() / (loss_count * self.world.world_size)
                    lg = self.logger
                    lg.scalar("train/loss", loss)
                    lg.scalar("train/lr", self.optimizer.param_groups[0]["lr"])
                    lg.scalar("train/images_per_s", n_steps * t.batch_size / dt)
                    lg.scalar("train/step_time_s", dt / n_steps)
                    lg.scalar("train/data_wait_s", data_wait / n_steps)
                    lg.scalar("train/data_wait_fraction", data_wait / dt)
                    lg.scalar("train/tokens_per_image", tokens / loss_count)
                    lg.scalar("train/epoch", s.epoch + s.step_in_epoch / self.steps_per_epoch)
                    lg.scalar("time/wall_s", time.perf_counter() - self.fit_start_time)
                    lg.flush(s.step)
                    lg.advance(n_steps, loss=f"{loss:.3f}", img_s=f"{n_steps * t.batch_size / dt:.0f}")
                    loss_sum.zero_()
                    loss_count, data_wait, tokens = 0, 0.0, 0.0
                    t_last, step_last, self.paused_s = time.perf_counter(), s.step, 0.0
                if (self._step_checkpoint_due() and s.step_in_epoch < self.steps_per_epoch
                        and s.step < self.total_steps):
                    self.save_checkpoint()
            epoch_done = s.step_in_epoch >= self.steps_per_epoch
            if epoch_done:
                self.plugins.fire("epoch_end", s)
                self._log_data_counters()
            last = s.step >= self.total_steps
            if (epoch_done and (s.epoch + 1) % t.eval_every_epochs == 0) or last:
                metrics = self.evaluate()
            if epoch_done:
                s.epoch += 1
                s.step_in_epoch = 0
            every_epochs = cfg.checkpoint.every_epochs
            epoch_due = epoch_done and every_epochs > 0 and s.epoch % every_epochs == 0
            if epoch_due or last or self._step_checkpoint_due():
                self.save_checkpoint()
        self.plugins.fire("fit_end", s)
        self.logger.close()
        return metrics

    def _step_checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every_steps
        return every > 0 and self.state.step % every == 0

    def _log_data_counters(self) -> None:
        counters = getattr(self.train_data, "counters", lambda: {})()
        if counters:
            values = torch.tensor([float(v) for v in counters.values()], device=self.device)
            if dist.is_initialized() and self.world.world_size > 1:
                dist.all_reduce(values)
            for name, v in zip(counters, values.tolist()):
                self.logger.scalar(f"data/{name}", v)
            self.logger.info("epoch %d data: %s", self.state.epoch,
                             ", ".join(f"{k}={int(v)}" for k, v in zip(counters, values.tolist())))

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
        self.paused_s += time.perf_counter() - t0
        return metrics
