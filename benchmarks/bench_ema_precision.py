"""EMA of bf16 module weights vs EMA of the fp32 masters, under a bf16 DeepSpeed engine.

    python benchmarks/bench_ema_precision.py [--steps 300] [--decay 0.99 0.999] [--ds-config zero1-bf16]

dsvit's ``WeightEMA`` (and MoGrow's momentum copies) average the module's parameters, which under a
bf16 engine are the bf16 copies of the fp32 masters: each step's value is rounded to 8 mantissa
bits before it enters the average. This trains a small ViT with a bf16 engine (DeepSpeed's CPU
accelerator has bf16) and keeps, beside dsvit's EMA, a reference EMA over the fp32 masters
(``deepspeed.utils.safe_get_full_fp32_param``, world of one). Reported per decay: the relative L2
distance of the two averages, and their evaluation loss / top-1 on held-out data.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--decay", type=float, nargs="+", default=[0.99, 0.999])
    ap.add_argument("--ds-config", default="zero1-bf16")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils import safe_get_full_fp32_param
    from dsvit import config as C
    from dsvit.cli import init_distributed
    from dsvit.data.memory import MemoryEvalData, MemoryTrainData, random_dataset
    from dsvit.engine.ema import WeightEMA
    from dsvit.engine.evaluate import evaluate_model
    from dsvit.engine.trainer import Trainer
    from dsvit.model.vit import create_vit

    world = init_distributed(None)
    cfg = C.load_config("tiny_test", [f"run.dir={tempfile.mkdtemp(prefix='ema_bf16_')}",
                                      f"run.ds_config={args.ds_config}", "run.precision=bf16",
                                      "train.epochs=1000", "log.tensorboard=false", "log.progress=false"])
    images, labels = random_dataset(1024, cfg.model.img_size, 10, seed=1)
    held_x, held_y = random_dataset(512, cfg.model.img_size, 10, seed=2)
    train = MemoryTrainData(images, labels, rank=0, world_size=1, local_batch=cfg.train.batch_size)
    ev = MemoryEvalData(held_x, held_y, rank=0, world_size=1, local_batch=128)
    trainer = Trainer(cfg, world, [], train_data=train, eval_data=ev, num_classes=10)
    module = trainer.engine.module
    emas = {d: WeightEMA(module, create_vit(trainer.model_cfg, 10), d, zero3=False) for d in args.decay}
    params = list(module.named_parameters())
    ref = {d: {n: safe_get_full_fp32_param(p).detach().clone() for n, p in params} for d in args.decay}
    batches = iter([b for _ in range(100) for b in train.epoch_batches(0)])
    for step in range(args.steps):
        trainer.train_step(lambda: next(batches))
        masters = {n: safe_get_full_fp32_param(p).detach() for n, p in params}
        for d in args.decay:
            emas[d].update()
            for n in masters:
                ref[d][n].lerp_(masters[n], 1.0 - d)
    print(f"{args.ds_config}, bf16, {args.steps} steps, vit {cfg.model.embed_dim}x{cfg.model.depth}, "
          f"lr {cfg.train.lr}", flush=True)
    for d in args.decay:
        got = dict(emas[d].model.named_parameters())
        num = sum(((got[n].float() - ref[d][n]) ** 2).sum() for n in ref[d])
        den = sum((ref[d][n] ** 2).sum() for n in ref[d])
        ref_model = create_vit(trainer.model_cfg, 10)
        ref_model.load_state_dict({**ref_model.state_dict(), **ref[d]})
        m_bf16 = evaluate_model(emas[d].model.eval(), ev.batches(), torch.device("cpu"))
        m_fp32 = evaluate_model(ref_model.eval(), ev.batches(), torch.device("cpu"))
        print(f"decay {d}: relative L2 distance {float((num / den).sqrt()):.3e}; eval loss bf16-EMA "
              f"{m_bf16['loss']:.5f} vs fp32-master EMA {m_fp32['loss']:.5f}; top-1 {m_bf16['top1']:.2f} vs "
              f"{m_fp32['top1']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
