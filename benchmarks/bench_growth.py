"""Progressive growth's stages: training-step speed of each (depth, resolution) stage vs the full model.

    python benchmarks/bench_growth.py [--model vit_small_patch16_224] [--img 224] [--patch 16]
                                      [--depth 12] [--batch 16] [--rounds 4] [--threads 2]
                                      [--budget 900] [--search]

The default stage table of ``plugins.growth`` for the model (depths linspace(0.5, 1, 4) x depth,
resolutions linspace(0.5, 1, 4) x img to multiples of twice the patch, as AutoProg's 224/16 table:
128/160/192/224 and 6/8/10/12), each stage a model of that depth built by dsvit (``dynamic_img_size``,
one position table) fed a batch resized to the stage's resolution. ``--search`` adds the AutoProg
supernet's average sub-network (a 12-block model, one sampled candidate per step). A step is forward
+ cross-entropy + backward + AdamW on one pre-made batch, timed round-robin with the order rotating
(the protocol of bench_tokens.py), after one warm-up step each. Per stage: median step time,
images/s, speed-up vs the full model, the analytic MAC reduction (``schedule.candidate_macs``: blocks
only) and efficiency = speed-up / MAC reduction. Engine overhead is measured separately
(bench_engine.py) and is the same for every stage.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time

import torch
import torch.nn.functional as F

from dsvit.config import ModelConfig
from dsvit.model import surgery
from dsvit.model.vit import build_model
from dsvit.plugins.growth import schedule as S


def step_fn(model, stage, images, labels, res, active=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        stage.active_blocks = active
        x = images if res == images.shape[-1] else F.interpolate(images, size=(res, res), mode="bilinear",
                                                               align_corners=False)
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--embed-dim", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=900)
    ap.add_argument("--search", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    depths = S.default_depths(a.depth, 0.5, 4)
    res = S.default_resolutions(a.img, 0.5, 4, 2 * a.patch)
    base = ModelConfig(name=a.model, img_size=a.img, patch_size=a.patch, embed_dim=a.embed_dim,
                       num_heads=a.heads, depth=a.depth, dynamic_img_size=True)
    images, labels = torch.randn(a.batch, 3, a.img, a.img), torch.randint(0, 1000, (a.batch,))
    variants, macs = {}, {}
    for i, (d, r) in enumerate(zip(depths, res)):
        model, stage = build_model(dataclasses.replace(base, depth=d), 1000)
        variants[f"stage {i}: depth {d}, {r} px"] = step_fn(model, stage, images, labels, r)
        macs[f"stage {i}: depth {d}, {r} px"] = S.candidate_macs(r, d, a.patch, 1, a.embed_dim, 4.0)
    if a.search:   # AutoProg's stage-0 supernet: 9 candidates, one drawn per step
        cands = S.candidates(0, res[0], depths[0], res, depths)
        model, stage = build_model(dataclasses.replace(base, depth=max(depths)), 1000)
        steps = {c: step_fn(model, stage, images, labels, c[0], surgery.supernet_active(depths[0], max(depths), c[1]))
                 for c in cands}
        rng = random.Random(0)
        variants["search 0: supernet, sampled candidate"] = lambda: steps[rng.choice(cands)]()
        macs["search 0: supernet, sampled candidate"] = statistics.mean(
            S.candidate_macs(r, d, a.patch, 1, a.embed_dim, 4.0) for r, d in cands)
    names = list(variants)
    for n in names:
        variants[n]()
    times = {n: [] for n in names}
    t_end = time.perf_counter() + a.budget
    for k in range(a.rounds):
        for n in names[k % len(names):] + names[:k % len(names)]:
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
        if time.perf_counter() > t_end:
            break
    full = names[len(depths) - 1]
    ref_t, ref_m = statistics.median(times[full]), macs[full]
    print(f"{a.model} {a.img}px batch {a.batch}, {a.threads} threads, {len(times[full])} rounds")
    print("| stage | median s/step (min-max) | images/s | speed-up | MAC reduction | efficiency |")
    print("|---|---|---|---|---|---|")
    for n in names:
        med = statistics.median(times[n])
        sp, red = ref_t / med, ref_m / macs[n]
        print(f"| {n} | {med:.2f} ({min(times[n]):.2f}-{max(times[n]):.2f}) | {a.batch / med:.1f} | "
              f"{sp:.2f}x | {red:.2f}x | {sp / red:.2f} |")


if __name__ == "__main__":
    main()
