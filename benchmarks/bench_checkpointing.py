"""Activation checkpointing on CPU: ViT-S/16 at 224, batch 32, fp32 -- peak memory and step time.

    python benchmarks/bench_checkpointing.py [--batch 32] [--rounds 2] [--skip-time] [--skip-memory]

Variants (fwd + CE loss + bwd + AdamW step; plain torch, no DeepSpeed engine -- checkpointing is a
property of the module's forward, and ZeRO 0 adds no activation memory):

  none        dsvit model (token stage), no checkpointing
  timm-none   vanilla timm model, no checkpointing (should equal `none`: same ops)
  dsvit       (a) token stage, per-block torch.utils.checkpoint, use_reentrant=False (the default)
  timm        (b) vanilla timm ``set_grad_checkpointing()`` -> ``checkpoint_seq`` (per block,
              non-reentrant in timm 1.0.x)
  fairscale   (c) token stage with ``TokenStage.checkpoint_fn`` = fairscale ``checkpoint_wrapper``
              around each block (fairscale's own reentrant-style autograd Function)

Memory: one fresh subprocess per variant, glibc told to serve big blocks with mmap
(MALLOC_MMAP_THRESHOLD_=65536, so freed activations go back to the OS and RSS tracks live memory).
A sampler thread reads /proc/self/statm every 2 ms; reported is the peak RSS during the first step
minus the RSS at its start (model and data only: the peak -- end of forward / start of backward, or
the end of the backward -- comes before AdamW allocates its state), cross-checked by ``ru_maxrss``
minus the same start RSS. Growth = saved activations + gradients (88 MiB for ViT-S) + temporaries.
Time: one more subprocess holding one model per timed variant, stepping the variants alternately
(order reversed every round) so contention from other work on the machine hits all alike.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

VARIANTS = ("none", "timm-none", "dsvit", "timm", "fairscale")
TIMED = ("none", "dsvit", "timm", "fairscale")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux


class Sampler:
    def __init__(self, period=0.002):
        self.period, self.peak, self._stop = period, 0, threading.Event()

    def __enter__(self):
        self.peak = rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())


def make(variant: str, seed: int = 0):
    """(model, optimizer) for a variant; identical initial weights across variants."""
    import timm
    from dsvit.model.token_stage import TokenStage
    torch.manual_seed(seed)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=1000)
    if variant in ("none", "dsvit", "fairscale"):
        stage = TokenStage().attach(model)
        model.set_grad_checkpointing(variant != "none")
        if variant == "fairscale":
            from fairscale.nn.checkpoint import checkpoint_wrapper
            wrapped = {}

            def fairscale_fn(blk, x, mask):
                w = wrapped.get(id(blk))
                if w is None:
                    # checkpoint_wrapper patches blk.forward in place and returns blk (fine
                    # here: this model's blocks only ever run checkpointed).
                    w = wrapped[id(blk)] = checkpoint_wrapper(blk)
                return w(x) if mask is None else w(x, attn_mask=mask)

            stage.checkpoint_fn = fairscale_fn
    else:
        model.set_grad_checkpointing(variant == "timm")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, foreach=False)
    return model, opt


def step(model, opt, images, labels):
    loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def batch(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 224, 224, generator=g), torch.randint(0, 1000, (n,), generator=g)


def child_memory(variant: str, bs: int) -> dict:
    images, labels = batch(bs)
    model, opt = make(variant)
    out = {"variant": variant}
    for i in range(1):
        start = rss()
        t0 = time.perf_counter()
        with Sampler() as s:
            loss = step(model, opt, images, labels)
        out[f"step{i}"] = {"time_s": time.perf_counter() - t0, "start_rss": start,
                           "peak_growth": s.peak - start, "maxrss_growth": maxrss() - start,
                           "loss": loss}
    return out


def child_time(bs: int, rounds: int) -> dict:
    images, labels = batch(bs)
    models = {v: make(v) for v in TIMED}
    for v in TIMED:                                   # warm-up (allocates AdamW state)
        step(*models[v], images, labels)
        print(f"  warm-up {v} done", file=sys.stderr, flush=True)
    times = {v: [] for v in TIMED}
    for r in range(rounds):
        order = TIMED if r % 2 == 0 else TIMED[::-1]
        for v in order:
            t0 = time.perf_counter()
            step(*models[v], images, labels)
            times[v].append(time.perf_counter() - t0)
        print(f"  round {r}: " + " ".join(f"{v} {times[v][-1]:.2f}s" for v in TIMED),
              file=sys.stderr, flush=True)
    return times


def theory(bs: int) -> dict:
    """Activations saved for backward by one ViT-S block (fp32, fused SDPA; floats per token x D)."""
    n, d = 197, 384
    # LN1 in (1), qkv in = LN1 out (1), q/k/v (3, views of the qkv output), SDPA out (1) +
    # logsumexp (~0), proj in (1, the transposed copy), LN2 in (1), fc1 in (1), fc1 out (4, GELU in),
    # GELU out (4, fc2 in)  -> 17 x B x N x D floats
    per_block = 17 * bs * n * d * 4
    boundary = bs * n * d * 4
    return {"per_block_MiB": per_block / 2**20, "no_ckpt_blocks_MiB": 12 * per_block / 2**20,
            "ckpt_blocks_MiB": (12 * boundary + per_block) / 2**20}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine 2 OpenMP threads stall on "
                         "barriers whenever another process holds a core)")
    ap.add_argument("--child", choices=("memory", "time"))
    ap.add_argument("--variant")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.child == "memory":
        print(json.dumps(child_memory(args.variant, args.batch)))
        return 0
    if args.child == "time":
        print(json.dumps(child_time(args.batch, args.rounds)))
        return 0

    import fairscale
    import timm
    print(f"ViT-S/16 @224, batch {args.batch}, fp32, CPU, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), timm {timm.__version__}, fairscale {fairscale.__version__}",
          flush=True)
    th = theory(args.batch)
    print(f"theory (block activations only): {th['per_block_MiB']:.0f} MiB/block; 12 blocks without "
          f"checkpointing {th['no_ckpt_blocks_MiB']:.0f} MiB, with per-block checkpointing "
          f"{th['ckpt_blocks_MiB']:.0f} MiB (12 block inputs + one block recomputed)", flush=True)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONWARNINGS="ignore")
    me = [sys.executable, os.path.abspath(__file__), "--batch", str(args.batch), "--threads", str(args.threads)]
    mib = 2**20
    if not args.skip_memory:
        print("\nmemory (fresh process per variant; first step; growth over the RSS at its start = "
              "activations + gradients)")
        print(f"{'variant':10s} {'start RSS':>10s} {'peak growth':>12s} {'ru_maxrss gr.':>14s} "
              f"{'step time':>10s} {'loss':>8s}")
        for v in VARIANTS:
            r = subprocess.run(me + ["--child", "memory", "--variant", v], env=env, capture_output=True,
                               text=True)
            if r.returncode != 0:
                print(f"{v:10s} FAILED\n{r.stderr[-2000:]}")
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])["step0"]
            print(f"{v:10s} {res['start_rss'] / mib:8.0f}Mi {res['peak_growth'] / mib:10.0f}Mi "
                  f"{res['maxrss_growth'] / mib:12.0f}Mi {res['time_s']:9.2f}s {res['loss']:8.4f}",
                  flush=True)
    if not args.skip_time:
        print(f"\nstep time (one process, variants alternated, {args.rounds} rounds after a warm-up)")
        r = subprocess.run(me + ["--child", "time", "--rounds", str(args.rounds)], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"FAILED\n{r.stderr[-3000:]}")
            return 1
        times = json.loads(r.stdout.strip().splitlines()[-1])
        base = statistics.median(times["none"])
        for v in TIMED:
            m = statistics.median(times[v])
            print(f"{v:10s} median {m:6.2f} s/step ({' '.join(f'{t:.2f}' for t in times[v])})  "
                  f"x{m / base:.2f} vs none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
