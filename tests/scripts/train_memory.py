"""Train on an in-memory dataset (engine tests): python train_memory.py OUT.json [overrides...].

Runs under the deepspeed launcher or alone; writes the per-step loss trace and, on rank 0, the final
weights and optimizer state digest to OUT.json / OUT.pt.
"""
import json
import sys

import torch

from dsvit import config as C
from dsvit.cli import _init_distributed
from dsvit.data.memory import MemoryEvalData, MemoryTrainData, random_dataset
from dsvit.engine.trainer import Trainer


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out, overrides = args[0], args[1:]
    cfg = C.load_config("tiny_test", overrides)
    world = _init_distributed(None)
    C.validate(cfg, world.world_size)
    images, labels = random_dataset(512, cfg.model.img_size, 10, seed=1)
    t = cfg.train
    micro = t.batch_size // (world.world_size * t.grad_accum)
    train = MemoryTrainData(images, labels, rank=world.rank, world_size=world.world_size,
                            local_batch=micro, seed=cfg.run.seed, batches_multiple=t.grad_accum)
    ev = MemoryEvalData(images[:100], labels[:100], rank=world.rank, world_size=world.world_size,
                        local_batch=t.eval_batch_size // world.world_size)
    trainer = Trainer(cfg, world, train_data=train, eval_data=ev, num_classes=10)
    metrics = trainer.fit()
    from dsvit.engine.export import load_weights  # noqa: F401  (import check)
    if world.rank == 0:
        json.dump({"metrics": metrics, "step": trainer.state.step}, open(out, "w"))


if __name__ == "__main__":
    main()
