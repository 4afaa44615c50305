"""Token and attention levels of Tri-Level E-ViT: training-step speed and what the attention level
costs, interleaved in one process (so drift on this box hits every variant alike).

    python benchmarks/bench_pruning.py steps   [--model M --img 32 --patch 4 --embed-dim 96 --depth 12
                                                --heads 3 --batch 128 --rounds 6 --threads 1]
    python benchmarks/bench_pruning.py kernels [--batch 128 --tokens 65 --heads 3 --dim 32 --keep 0.1]

``steps``: one training step (forward, cross-entropy, backward, AdamW) of the same model and batch
under each variant, at the levels' final rates (no schedule):

- ``base``: no hooks; ``tpR``: token pruning at rho = R/10 (CLS row next to fused SDPA);
- ``tpR-explicit``: the same pruning with the full attention matrix computed explicitly at the
  pruning blocks, as the released code does (what computing the CLS row separately saves);
- ``asA``: the attention level alone at alpha = A/10 (mask blocks explicit, later blocks masked SDPA);
- ``tri``: tp9 + as1 (the paper's DeiT-T setting: rho 0.9, alpha 0.1).

``kernels``: forward + backward of one attention call on [B, H, T, d]: fused SDPA, SDPA with an
additive mask, explicit softmax, and a gather kernel that computes only each query's kept keys (the
"skip the masked work" implementation): does skipping masked keys pay on this hardware?
Medians over interleaved rounds; the ratio column is against the first row.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F


def step_variants(names, model, stage, cfg):
    from dsvit.engine.plugin import State
    from dsvit.plugins import attention_sparsity as AS
    from dsvit.plugins import token_pruning as TP

    def plugins(name):
        out = []
        if name.startswith("tp"):
            rate = int(name[2]) / 10
            out.append(TP.TokenPruning(TP.TokenPruningConfig(keep_rate=rate, warmup=0, decay=0), cfg))
        if name.startswith("as"):
            out.append(AS.AttentionSparsity(AS.AttentionSparsityConfig(keep_rate=int(name[2]) / 10,
                                                                       warmup=0, decay=0), cfg))
        if name == "tri":
            out += [TP.TokenPruning(TP.TokenPruningConfig(keep_rate=0.9, warmup=0, decay=0), cfg),
                    AS.AttentionSparsity(AS.AttentionSparsityConfig(keep_rate=0.1, warmup=0, decay=0), cfg)]
        return out

    def explicit(x, attn, s):   # forces the full attention matrix at the block (the original)
        return x

    variants = {}
    for name in names:
        ps = plugins(name)

        def add(ps=ps, name=name):
            state = State(rank=0, world_size=1, model=model, token_stage=stage, total_steps=1)
            for p in ps:
                p.on_fit_start(state)
            if name.endswith("-explicit"):
                for b in ps[0].blocks:
                    stage.add_after_attention(b, explicit, need="probs")

        def remove(ps=ps):
            for p in ps:
                for fn in ("_hook", "_build", "_provide"):
                    if hasattr(p, fn):
                        stage.remove(getattr(p, fn))
            stage.remove(explicit)
        variants[name] = (add, remove)
    return variants


def timed(fn, names, rounds, warmup=1):
    for n in names:
        for _ in range(warmup):
            fn(n)
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in (order if r % 2 == 0 else order[::-1]):
            times[n].append(fn(n))
        print(f"round {r}: " + "  ".join(f"{n}={times[n][-1] * 1e3:.1f}ms" for n in names), flush=True)
    return {n: statistics.median(t) for n, t in times.items()}


def run_steps(args):
    from dsvit.config import Config, ModelConfig
    from dsvit.model.vit import build_model
    torch.manual_seed(0)
    mcfg = ModelConfig(name=args.model, img_size=args.img, patch_size=args.patch, embed_dim=args.embed_dim,
                       depth=args.depth, num_heads=args.heads)
    model, stage = build_model(mcfg, 10)
    cfg = Config(model=mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x, y = torch.randn(args.batch, 3, args.img, args.img), torch.randint(0, 10, (args.batch,))
    names = args.variants.split(",")
    variants = step_variants(names, model, stage, cfg)
    tokens = {}

    def step(name):
        add, remove = variants[name]
        add()
        try:
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            tokens[name] = stage.mean_block_tokens
        finally:
            remove()
        return dt
    med = timed(step, names, args.rounds)
    print(f"\n# {args.model} img {args.img} patch {args.patch} C={args.embed_dim} depth {args.depth} "
          f"batch {args.batch} threads {torch.get_num_threads()}, {args.rounds} interleaved rounds\n")
    print("| variant | tokens/block | median ms/step | images/s | speed vs base |\n|---|---|---|---|---|")
    for n in names:
        print(f"| {n} | {tokens[n]:.1f} | {med[n] * 1e3:.0f} | {args.batch / med[n]:.0f} | "
              f"{med[names[0]] / med[n]:.3f}x |")


def gather_attention(q, k, v, idx):
    """Attention of each query over its own keys ``idx`` [B, T, k] (shared by heads)."""
    b, h, t, d = q.shape
    flat = (idx + torch.arange(b).view(b, 1, 1) * t).reshape(-1)               # [B*T*k]
    ks = k.transpose(1, 2).reshape(b * t, h, d).index_select(0, flat).view(b, t, -1, h, d)
    vs = v.transpose(1, 2).reshape(b * t, h, d).index_select(0, flat).view(b, t, -1, h, d)
    logits = torch.einsum("bhtd,btkhd->bhtk", q * d ** -0.5, ks)
    return torch.einsum("bhtk,btkhd->bhtd", logits.softmax(-1), vs)


def run_kernels(args):
    from dsvit.plugins.attention_sparsity import build_mask
    torch.manual_seed(0)
    b, h, t, d = args.batch, args.heads, args.tokens, args.dim
    q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
    probs = torch.rand(b, t, t).softmax(-1)
    mask = build_mask(probs, args.keep)
    kk = math.ceil(args.keep * (t - 1))
    top = probs[:, :, 1:].topk(kk, dim=-1).indices + 1
    idx = torch.cat([torch.zeros(b, t, 1, dtype=torch.long), top], -1)        # CLS + top keys
    idx[:, 0] = torch.arange(kk + 1).clamp(max=t - 1)   # (the CLS query's keys: any kk+1, for shape)

    def explicit(m):
        return ((q @ k.transpose(-2, -1)) * d ** -0.5 + m).softmax(-1) @ v
    kernels = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
               "sdpa+mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
               "explicit+mask": lambda: explicit(mask),
               f"gather top-{kk + 1}": lambda: gather_attention(q, k, v, idx)}
    names = list(kernels)

    def once(name):
        t0 = time.perf_counter()
        kernels[name]().sum().backward()
        return time.perf_counter() - t0
    med = timed(once, names, args.rounds, warmup=2)
    print(f"\n# attention fwd+bwd, B={b} H={h} T={t} d={d}, keep {args.keep} ({kk} patch keys + CLS), "
          f"threads {torch.get_num_threads()}\n")
    print("| kernel | median ms | vs sdpa |\n|---|---|---|")
    for n in names:
        print(f"| {n} | {med[n] * 1e3:.2f} | {med[n] / med[names[0]]:.2f}x |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("steps", "kernels"))
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--img", type=int, default=32)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--embed-dim", type=int, default=96)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="base,tp9,tp7,tp7-explicit,as1,as3,tri")
    ap.add_argument("--tokens", type=int, default=65)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--keep", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run_steps(args) if args.what == "steps" else run_kernels(args)


if __name__ == "__main__":
    main()
