"""Cost of the per-step preemption check (``dsvit.engine.preemption.StopSignals.agreed``).

    python benchmarks/bench_preemption.py [--ranks 2] [--steps 200] [--rounds 9] [--size 192]

Starts ``--ranks`` local gloo processes (as ``deepspeed --num_gpus N`` does on the CPU accelerator).
A stand-in step: a ``--size`` square matmul chain (~a few ms on one thread) and a blocking all-reduce
of 30k floats (the gradients; it keeps the ranks in step, as DeepSpeed's does). Variants, timed in
rotating order (rounds of ``--steps`` steps, so load from other work hits all alike):

- none:       the step alone;
- check:      the step + ``StopSignals.agreed()`` as dsvit runs it: an all-reduce of two int64 on
              its own gloo group about every ``CHECK_EVERY_S`` (0.25 s), started at one check and
              waited for at the next;
- every step: the same with a check at every step boundary (still overlapped with a step);
- blocking:   an all-reduce of one int64 at every step boundary, waited for at once (the ranks meet
              at every step).

Prints, on rank 0, the median step time of each, the median per-round overhead against none (noisy
on a shared machine: the rounds' spread is ~0.3 ms) and the median time spent inside the check.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, args, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    from dsvit.engine import preemption
    stop = preemption.StopSignals(args.ranks)
    every_step = preemption.StopSignals(args.ranks)
    group = dist.new_group(backend="gloo")
    a = torch.randn(args.size, args.size)
    grads = torch.zeros(30_000)

    def step():
        x = a
        for _ in range(8):
            x = torch.tanh(x @ a)
        dist.all_reduce(grads)

    def blocking():
        flag = torch.zeros(1, dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return int(flag.item())

    def check_every_step():
        preemption.CHECK_EVERY_S, saved = 0.0, preemption.CHECK_EVERY_S   # every proposal: 1 step
        try:
            return every_step.agreed()
        finally:
            preemption.CHECK_EVERY_S = saved

    variants = {"none": lambda: None, "check": stop.agreed, "every step": check_every_step,
                "blocking": blocking}
    times = {k: [] for k in variants}
    inside = {k: [] for k in variants}      # time spent in the check itself, per step
    try:
        for r in range(args.rounds + 1):                 # round 0: warm-up
            names = list(variants)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                check = variants[name]
                dist.barrier()
                in_check = 0.0
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                    t1 = time.perf_counter()
                    check()
                    in_check += time.perf_counter() - t1
                if r:
                    times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
                    inside[name].append(in_check / args.steps * 1e6)
        if rank == 0:
            base = times["none"]
            for name, ts in times.items():
                over = statistics.median((t - b) * 1e3 for t, b in zip(ts, base))
                print(f"{name:10s} {statistics.median(ts):7.3f} ms per step"
                      + ("" if name == "none" else f"   overhead {over:+7.1f} us per step, "
                         f"{statistics.median(inside[name]):6.1f} us of it in the check"))
    finally:
        every_step.restore()
        stop.restore()
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--size", type=int, default=192)
    args = p.parse_args()
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=args.ranks)


if __name__ == "__main__":
    main()
