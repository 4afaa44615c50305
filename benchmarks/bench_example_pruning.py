"""Bookkeeping cost of plugins.example_pruning against a training step, in one process.

    python benchmarks/bench_example_pruning.py [--n 50000] [--batch 128] [--threads 1] [--reps 20]
                                               [--device cpu|cuda]

The model is cifar10-bench's (ViT, 12 blocks of width 96, 32 px, patch 4) at its batch, trained with
AdamW on random data. Printed, in ms (medians):
- step: one forward + backward + optimizer step without the plugin;
- step+hook: the same with the CLS-variance hook on the last block (tie_break=clsvar: that block
  runs as two halves and computes the CLS attention row), interleaved with the plain step;
- record: the plugin's per-micro-batch work (``on_after_loss``: argmax, compare, one row copy into
  the event buffer) for forgetting and for InfoBatch (record + loss re-weighting);
- epoch end: gathering an epoch's events (world 1: the device-to-host copy and the time-order
  layout) and the vectorized state update, for N examples (forgetting: keep_fraction 0.8);
- round / decision: a forgetting round (rank, drop, restore, reset) and an InfoBatch prune decision
  (mean, draw, weights upload).
Ratios: per-step cost / step time, and per-epoch cost / (steps per epoch x step time).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)

    from dsvit.config import ModelConfig, load_config, validate
    from dsvit.data.memory import MemoryTrainData
    from dsvit.engine.plugin import Batch, State
    from dsvit.engine.plugin_set import PluginSet
    from dsvit.model.vit import build_model
    from dsvit.plugins.example_pruning import ExamplePruning

    mc = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=96, depth=12,
                     num_heads=3, num_classes=10)
    model, stage = build_model(mc, 10)
    model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b, n = args.batch, args.n
    x, y = torch.randn(b, 3, 32, 32, device=dev), torch.randint(0, 10, (b,), device=dev)

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    class Log:
        def scalar(self, *a): pass
        def info(self, *a): pass
        def histogram(self, *a): pass
        writer = None

    def plugin(policy):
        cfg = load_config("cifar10-bench", ["train.epochs=10", "plugins.example_pruning.enabled=true",
                                             f"plugins.example_pruning.policy={policy}",
                                             "plugins.example_pruning.log_images=0"])
        validate(cfg)
        p = ExamplePruning(cfg.plugins["example_pruning"], cfg)
        ps = PluginSet([p])
        data = MemoryTrainData(torch.zeros(n, 1, 1, 1), torch.zeros(n, dtype=torch.long), rank=0,
                               world_size=1, local_batch=b)
        plan = p.plan_epochs(n, 10)
        steps = tuple(data.batches_for(k) for k in plan)
        s = State(rank=0, world_size=1, model=model, token_stage=stage, logger=Log(), data=data,
                  num_classes=10, epoch_steps=steps, total_steps=sum(steps))
        ps.fire("fit_start", s)
        return p, ps, s

    # ---- step time, with and without the CLS-variance hook (interleaved against drift)
    p, ps, s = plugin("forgetting")
    for _ in range(3):
        step()
    plain, hooked = [], []
    for _ in range(args.reps):
        plain.append(timed(step, 1))
        ps.fire("epoch_start", s)            # registers the hook at the last block
        hooked.append(timed(step, 1))
        p._remove_hook()
        p.buffer = None
    t_step, t_hook = statistics.median(plain), statistics.median(hooked)

    # ---- per micro-batch recording
    logits = torch.randn(b, 10, device=dev)
    res = {}
    for policy in ("forgetting", "infobatch"):
        p, ps, s = plugin(policy)
        s.epoch = 1 if policy == "forgetting" else 0
        ps.fire("epoch_start", s)
        if policy == "infobatch":            # a pruned epoch: record and re-weight
            p._weights = torch.ones(n, device=dev)
        rows = p.buffer.rows
        uids = torch.randperm(n, device=dev)[:b]
        s.batch, s.logits = Batch(x, torch.zeros(b, 10, device=dev), y, uids), logits
        loss = torch.rand(b, device=dev)

        def record():
            s.loss_per_sample = loss
            if p.buffer.filled == rows:
                p.buffer.filled = 0
            p._row = p.buffer.filled
            ps.fire("after_loss", s)
        for _ in range(10):
            record()
        res[f"record {policy}"] = timed(lambda: [record() for _ in range(100)], args.reps) / 100

        # ---- epoch end: an epoch of events, gathered and applied
        ev = torch.randperm(n)[: rows * b].view(rows, b)
        def fill():
            p.buffer.data[..., 0] = ev.double().to(dev)
            p.buffer.data[..., 1] = (torch.rand(rows, b).double().round() if policy == "forgetting"
                                     else torch.rand(rows, b).double()).to(dev)
            p.buffer.filled = rows
        def epoch_end():
            buf = p.buffer
            ps.fire("epoch_end", s)
            p.buffer = buf
        timings = []
        for _ in range(max(3, args.reps // 4)):
            fill()
            timings.append(timed(epoch_end, 1))
        res[f"epoch end {policy}"] = statistics.median(timings)
        res[f"steps/epoch {policy}"] = rows
        if policy == "forgetting":
            rng_state = p.rng.bit_generator.state
            saved = p.core.state_dict()
            def one_round():
                p.core.load_state_dict(saved)
                p.rng.bit_generator.state = rng_state
                p.rounds_done = 0
                p._round(s)
            res["round forgetting"] = timed(one_round, max(3, args.reps // 4))
        else:
            p.core.update(ev.reshape(-1).numpy(), np.random.default_rng(0).random(rows * b))
            def decide():
                p.decided_epoch = -1
                s.epoch = 1
                p._infobatch_epoch(s)
            res["decision infobatch"] = timed(decide, max(3, args.reps // 4))

    print(f"N={n} batch={b} device={dev} threads={args.threads} reps={args.reps}")
    print(f"step            {t_step:9.2f} ms")
    print(f"step+hook       {t_hook:9.2f} ms   hook {t_hook - t_step:+.2f} ms = "
          f"{100 * (t_hook - t_step) / t_step:+.2f} % of a step")
    for pol in ("forgetting", "infobatch"):
        r = res[f"record {pol}"]
        per_epoch = res[f"epoch end {pol}"] + res.get(f"round {pol}", res.get(f"decision {pol}", 0))
        steps = res[f"steps/epoch {pol}"]
        print(f"record {pol:11s}{r:8.3f} ms = {100 * r / t_step:.3f} % of a step")
        print(f"epoch end {pol:8s}{res[f'epoch end {pol}']:8.2f} ms, "
              f"{'round' if pol == 'forgetting' else 'decision'} "
              f"{res.get(f'round {pol}', res.get(f'decision {pol}', 0)):.2f} ms: "
              f"{100 * per_epoch / (steps * t_step):.3f} % of an epoch ({steps} steps)")


if __name__ == "__main__":
    main()
