"""Engine overhead: dsvit's training step vs a hand-written minimal DeepSpeed loop.

    python benchmarks/bench_engine.py [--rounds 30] [--steps 1] [--warmup 3] [--batch 32]
                                      [--img 64] [--patch 16] [--threads 1] [--profile]

Both variants live in one process (two DeepSpeed engines, ZeRO 0, fp32, world of one) and train the
same timm ViT (identical initial weights) on the same pre-made batches:

- dsvit:   ``Trainer.train_step`` (events, micro-batch, loss accumulation, step counters,
           ``lr_schedule.step_update``, EMA) and ``Trainer.log_interval`` at ``log.every_steps``,
           exactly what ``fit()`` calls per step, no plugins;
- minimal: ``engine(images)``, ``F.cross_entropy(..., label_smoothing)``, ``engine.backward``,
           ``engine.step`` on a vanilla timm model.

They are timed alternately (rounds of ``--steps`` steps; the order flips every round, ABBA) after a
warm-up, so CPU contention from other work hits both alike. Reported: per-round throughput of each,
the per-round ratio dsvit/minimal and its median (target >= 0.97). ``--profile`` adds a
torch.profiler table of the dsvit step's Python-side extras.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F


def build(args):
    from dsvit import config as C
    from dsvit.cli import init_distributed
    from dsvit.data.memory import MemoryEvalData, MemoryTrainData, random_dataset
    from dsvit.engine.trainer import Trainer

    run_dir = tempfile.mkdtemp(prefix="bench_engine_")
    overrides = [
        f"run.dir={run_dir}", "run.ds_config=zero0", "run.precision=fp32",
        "model.name=vit_tiny_patch16_224", f"model.img_size={args.img}", f"model.patch_size={args.patch}",
        "model.embed_dim=192", "model.depth=12", "model.num_heads=3", "model.num_classes=100",
        f"train.batch_size={args.batch}", f"train.eval_batch_size={args.batch}", "train.label_smoothing=0.1",
        "train.warmup_epochs=0.5", "train.epochs=100",
        "log.tensorboard=false", "log.progress=false", "log.every_steps=10",
    ]
    cfg = C.load_config("default", overrides)
    world = init_distributed(None)
    C.validate(cfg, world.world_size)
    n = args.batch * 4
    images, labels = random_dataset(n, args.img, 100, seed=1)
    train = MemoryTrainData(images, labels, rank=0, world_size=1, local_batch=args.batch)
    ev = MemoryEvalData(images[:args.batch], labels[:args.batch], rank=0, world_size=1,
                        local_batch=args.batch)
    trainer = Trainer(cfg, world, [], train_data=train, eval_data=ev, num_classes=100)

    # The minimal loop: same architecture and initial weights (Trainer seeds with run.seed before
    # building), a vanilla timm model (no token stage), same optimizer factory, same DS config.
    import deepspeed
    import timm.optim
    from dsvit.model.vit import create_vit
    torch.manual_seed(cfg.run.seed)
    model = create_vit(cfg.model, 100)
    model.load_state_dict(trainer.engine.module.state_dict())
    t = cfg.train
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=t.lr, weight_decay=t.weight_decay,
                                         betas=tuple(t.betas), foreach=False)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=dict(trainer.ds_config))
    engine.train()

    # Pre-made batches (as the data loader would hand them over), shared by both variants.
    batches = [b for b in train.epoch_batches(0)]
    return cfg, trainer, engine, batches


class DsvitStepper:
    """Everything fit() does per optimizer step (``Trainer.train_step`` plus the logging interval),
    minus fetching the batch from the data iterator."""

    def __init__(self, trainer):
        from dsvit.engine.setup import schedule_step
        self.tr = trainer
        tr, s = trainer, trainer.state
        tr.engine.train()
        s.training = True
        tr.plugins.fire("fit_start", s)
        tr.lr_schedule.step_update(schedule_step(s))   # as fit(): after fit_start (State.lr_clock)
        tr.meter.reset(s.step)

    def step(self, batch):
        tr = self.tr
        tr.train_step(lambda: batch)
        if tr.state.step % tr.cfg.log.every_steps == 0:       # fit()'s logging interval (host sync)
            tr.log_interval()


class MinimalStepper:
    def __init__(self, engine, smoothing):
        self.engine, self.smoothing = engine, smoothing

    def step(self, batch):
        images, labels, _ = batch
        logits = self.engine(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.smoothing)
        self.engine.backward(loss)
        self.engine.step()


def run_round(stepper, batches, steps, offset):
    t0 = time.perf_counter()
    for i in range(steps):
        stepper.step(batches[(offset + i) % len(batches)])
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--img", type=int, default=64)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads; 1 by default: on a shared 2-core machine, 2 OpenMP "
                         "threads stall at every barrier when another process holds a core")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg, trainer, engine, batches = build(args)
    variants = {"dsvit": DsvitStepper(trainer), "minimal": MinimalStepper(engine, cfg.train.label_smoothing)}
    params = sum(p.numel() for p in engine.module.parameters())
    tokens = (args.img // args.patch) ** 2 + 1
    print(f"model vit_tiny (192d x 12, {params / 1e6:.2f}M params), img {args.img}/patch {args.patch} "
          f"({tokens} tokens), batch {args.batch}, fp32, ZeRO 0, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, deepspeed {__import__('deepspeed').__version__}", flush=True)

    for name, v in variants.items():
        run_round(v, batches, args.warmup, 0)
        print(f"warm-up {name} done", flush=True)

    times = {k: [] for k in variants}
    ratios = []
    for r in range(args.rounds):
        order = ["dsvit", "minimal"] if r % 2 == 0 else ["minimal", "dsvit"]
        dt = {k: run_round(variants[k], batches, args.steps, r * args.steps) for k in order}
        for k in dt:
            times[k].append(dt[k])
        # throughput ratio dsvit/minimal = t_minimal / t_dsvit
        ratios.append(dt["minimal"] / dt["dsvit"])
        print(f"round {r}: " + "  ".join(
            f"{k} {args.steps * args.batch / dt[k]:6.1f} img/s ({1e3 * dt[k] / args.steps:6.1f} ms/step)"
            for k in ("dsvit", "minimal")) + f"  ratio {ratios[-1]:.3f}", flush=True)

    med = statistics.median(ratios)
    total = sum(times["minimal"]) / sum(times["dsvit"])
    for k in times:
        ms = [1e3 * t / args.steps for t in times[k]]
        print(f"{k:8s} median {statistics.median(ms):6.1f} ms/step, "
              f"{args.batch / (statistics.median(ms) / 1e3):6.1f} img/s")
    print(f"median throughput ratio dsvit/minimal: {med:.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}) "
          f"-> {'OK' if med >= 0.97 else 'BELOW'} target 0.97; ratio of summed times {total:.3f}")

    if args.profile:
        # Where the dsvit step's extra wall time goes: cumulative time of the trainer's own
        # functions (everything outside engine forward/backward/step) over a few steps.
        import cProfile
        import pstats
        for name in ("dsvit", "minimal"):
            prof = cProfile.Profile()
            prof.enable()
            run_round(variants[name], batches, 5, 0)
            prof.disable()
            print(f"\n== cProfile {name} (5 steps), by cumulative time ==")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
