"""Engine rebuild cost: seconds per phase and host memory per rebuild, on CPU.

    deepspeed --num_gpus N benchmarks/bench_rebuild.py [--zero 2] [--rebuilds 10]
              [--model vit_small_patch16_224] [--img 224] [--grow-to 0]

A Trainer with in-memory data (batch 2 per rank, fp32) trains one step, then alternates an identity
rebuild (same depth, fp32 masters and Adam state carried) and one training step, ``--rebuilds``
times; with ``--grow-to D`` the first rebuild grows the model to D blocks by duplication instead.
Rank 0 prints, per rebuild, the seconds of each phase (capture: read masters and moments through
DeepSpeed's helpers; destroy; build: new model + engine; prime: one lr-0 step; restore: write
them back) and the host RSS after it; then the median total, RSS after rebuild 10 vs 1 and the
process's peak RSS (ru_maxrss).
"""
from __future__ import annotations

import argparse
import itertools
import resource
import statistics
import sys
import tempfile

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--rebuilds", type=int, default=10)
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--grow-to", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from dsvit import config as C
    from dsvit.cli import init_distributed
    from dsvit.data.memory import MemoryEvalData, MemoryTrainData, random_dataset
    from dsvit.engine import rebuild as rb
    from dsvit.engine.plugin import Plugin
    from dsvit.engine.trainer import Trainer
    from dsvit.model import surgery

    world = init_distributed(None)
    overrides = [f"run.dir={tempfile.mkdtemp(prefix='bench_rebuild_')}", "run.ds_config=zero0",
                 f"run.zero_stage={args.zero}", "run.precision=fp32", f"model.name={args.model}",
                 f"model.img_size={args.img}", f"model.depth={args.depth}", f"model.embed_dim={args.width}",
                 f"model.num_heads={args.heads}", f"model.patch_size={args.patch}", "model.num_classes=10",
                 f"train.batch_size={2 * world.world_size}", f"train.eval_batch_size={2 * world.world_size}",
                 "train.epochs=100", "data.streams=1", "log.tensorboard=false", "log.progress=false"]
    cfg = C.load_config("default", overrides)
    C.validate(cfg, world.world_size)
    images, labels = random_dataset(8 * world.world_size, args.img, 10, seed=1)
    train = MemoryTrainData(images, labels, rank=world.rank, world_size=world.world_size, local_batch=2)
    ev = MemoryEvalData(images[:2], labels[:2], rank=world.rank, world_size=world.world_size, local_batch=2)
    class Depth(Plugin):   # declares the depth it asks for, as a growth plugin does
        name, depth = "bench", 0

        def architecture(self):
            return {"depth": self.depth} if self.depth else {}
    depth = Depth(None)
    trainer = Trainer(cfg, world, [depth], train_data=train, eval_data=ev, num_classes=10)
    trainer.engine.train()
    batches = itertools.cycle(list(train.epoch_batches(0)))
    trainer.train_step(lambda: next(batches))
    params = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.engine.module.parameters())
    if world.rank == 0:
        print(f"{args.model} depth {args.depth} img {args.img} ({params / 1e6:.1f}M params), ZeRO "
              f"{args.zero}, {world.world_size} rank(s), fp32, torch threads {torch.get_num_threads()}, "
              f"deepspeed {__import__('deepspeed').__version__}", flush=True)

    totals, rss = [], []
    for i in range(args.rebuilds):
        model = trainer.engine.module
        old_depth = len(model.blocks)
        new_depth = args.grow_to if (i == 0 and args.grow_to) else old_depth
        src = surgery.duplicate_last(old_depth, new_depth)
        if new_depth != old_depth:
            depth.depth = new_depth
        request = rb.RebuildRequest(block_map=src, arch=depth.architecture(), weights="masters",
                                    requested_by="bench")
        trainer.rebuild(request)
        times = trainer.last_rebuild_times
        totals.append(sum(times.values()))
        rss.append(rb.host_rss_mib())
        if world.rank == 0:
            print(f"rebuild {i + 1:2d} ({old_depth}->{new_depth} blocks): {totals[-1]:.3f} s = " +
                  "  ".join(f"{k} {v:.3f}" for k, v in times.items()) + f"   RSS {rss[-1]:.0f} MiB",
                  flush=True)
        trainer.train_step(lambda: next(batches))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if world.rank == 0:
        first = 1 if args.grow_to else 0   # a growth changes the model's size: compare after it
        print(f"median rebuild {statistics.median(totals[first:]):.3f} s (min {min(totals[first:]):.3f}, "
              f"max {max(totals[first:]):.3f}); RSS after rebuild {len(rss)} / after rebuild {first + 1}: "
              f"{rss[-1]:.0f} / {rss[first]:.0f} MiB = {rss[-1] / rss[first]:.3f}; peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
