"""Token-reduction speed: training step of a ViT with ToE / PSS hooks vs full tokens.

    python benchmarks/bench_tokens.py [--model vit_small_patch16_224] [--img 224] [--batch 16]
                                      [--patch P] [--embed-dim C] [--depth D] [--heads H]
                                      [--rounds 4] [--steps 1] [--warmup 1] [--threads 2]
                                      [--budget 600] [--variants base,toe1,...]

One model (timm ViT through dsvit's ``build_model``, random init, fp32, CPU) and one AdamW optimizer;
each variant only changes which hooks sit on the model's token stage:

- ``base``:       no hooks, full tokens (1 + P);
- ``toe1/toe2``:  the ``TokenExpansion`` plugin (DeiT defaults: rho 0.25, keep_rates [0.5, 0.75, 1.0],
                  repeats 2, before block 1) fixed at stage 1 (98 patches) / stage 2 (147 patches);
- ``cut1/cut2``:  the same token counts as toe1/toe2 from the same block, by keeping the first tokens:
                  ToE without its selection and merge work (toeN vs cutN is ToE's own overhead);
- ``pssK``:       ``pss.inference_hook(K/10, "magnitude")`` after the embedding
                  (keep 0.2/0.4/0.6/0.8 = drop 0.8/0.6/0.4/0.2; prefix tokens counted, as in PSS).

A training step is forward + cross-entropy + backward + AdamW step on one pre-made batch. After a
warm-up (``--warmup`` steps per variant) the variants are timed round-robin, ``--steps`` steps each per
round, the order rotating every round (so concurrent load on the box hits all variants alike); rounds
stop at ``--rounds`` or when ``--budget`` seconds have passed. Per variant: median step time -> images/s,
speedup vs the base median, and the analytic forward-FLOP reduction from the token counts per block:

    block MACs = 12 N C^2 (qkv 3, proj 1, mlp 2 * mlp_ratio) + 2 N^2 C (q k^T and attn @ v)
    patch embed (P * 3 p^2 * C) and head (C * classes) are fixed; ToE's own similarity bmms are
    counted separately (``hook MACs``) and included in the total.

efficiency = measured speedup / FLOP reduction (1.0: time scales exactly with the FLOPs). Contention
from other work only ever adds time, so the table also gives the best-of (min step time) speedup, the
more robust estimate on a shared box.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- analytic FLOPs (MACs)
def block_macs(n: int, c: int, mlp_ratio: float = 4.0) -> int:
    from dsvit.model.token_stage import vit_block_macs
    return int(vit_block_macs(n, c, mlp_ratio))


def toe_hook_macs(p: int, c: int, seeds: int, chunks: list[int]) -> int:
    """The similarity bmms of ToE's expand (one per chunk) and merge (one)."""
    sel, macs = seeds, 0
    for n in chunks:
        macs += (p - sel) * sel * c
        sel += n
    return macs + (p - sel) * sel * c


def forward_macs(tokens: list[int], c: int, p: int, patch: int, classes: int, mlp_ratio: float,
                 extra: int = 0) -> int:
    embed = p * 3 * patch * patch * c
    return embed + sum(block_macs(n, c, mlp_ratio) for n in tokens) + c * classes + extra


# ---------------------------------------------------------------- variants
def make_variants(names, stage, depth, p, npt, c):
    from dsvit.plugins.pss import inference_hook, num_keep
    from dsvit.plugins.toe import ToEConfig, TokenExpansion

    full = npt + p
    out = {}
    for name in names:
        if name == "base":
            out[name] = dict(add=lambda: None, remove=lambda: None, tokens=[full] * depth, extra=0,
                             label="full tokens")
        elif name[:3] in ("toe", "cut"):
            s = int(name[3:])
            plug = TokenExpansion(ToEConfig())
            plug.stage = s
            seeds, chunks = plug.plan(p, npt, "cpu")
            kept, ib = npt + len(seeds) + sum(chunks), plug.cfg.insert_before_block
            tokens = [full] * ib + [kept] * (depth - ib)
            if name.startswith("toe"):
                hook, extra = plug, toe_hook_macs(p, c, len(seeds), chunks)
                label = f"ToE stage {s} (keep {plug.cfg.keep_rates[s - 1]}: {kept - npt} patches from block {ib})"
            else:   # the ideal stage: same counts from the same block, no ToE work (keep the first tokens)
                hook, extra = (lambda x, st, kept=kept: x[:, :kept]), 0
                label = f"first {kept} tokens from block {ib} (ideal ToE stage {s})"
            out[name] = dict(add=lambda hook=hook, ib=ib: stage.add_before_block(ib, hook),
                             remove=lambda hook=hook: stage.remove(hook),
                             tokens=tokens, extra=extra, plugin=plug, label=label)
        elif name.startswith("pss"):
            keep = int(name[3:]) / 10
            hook = inference_hook(keep, "magnitude")
            k = num_keep(full, 1.0 - keep, npt)
            out[name] = dict(add=lambda hook=hook: stage.add_after_embed(hook),
                             remove=lambda hook=hook: stage.remove(hook),
                             tokens=[k] * depth, extra=0,
                             label=f"PSS keep {keep:.1f} (drop {1 - keep:.1f}; {k} tokens)")
        else:
            raise SystemExit(f"unknown variant {name}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before the rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=600.0, help="stop starting rounds after this many s")
    ap.add_argument("--variants", default="base,toe1,toe2,pss2,pss4,pss6,pss8")
    ap.add_argument("--patch", type=int, default=None, help="model overrides (default: the timm model's)")
    ap.add_argument("--embed-dim", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from dsvit.config import ModelConfig
    from dsvit.model.vit import build_model

    model, stage = build_model(ModelConfig(name=args.model, img_size=args.img, patch_size=args.patch,
                                              embed_dim=args.embed_dim, depth=args.depth,
                                              num_heads=args.heads), args.classes)
    model.train()
    c = model.embed_dim
    depth = len(model.blocks)
    p = int(model.patch_embed.num_patches)
    npt = stage.num_prefix_tokens
    patch = model.patch_embed.patch_size[0]
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / c
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
    x = torch.randn(args.batch, 3, args.img, args.img)
    y = torch.randint(0, args.classes, (args.batch,))

    names = args.variants.split(",")
    variants = make_variants(names, stage, depth, p, npt, c)

    def step(v):
        v["add"]()
        try:
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            got = stage.mean_block_tokens
        finally:
            v["remove"]()
        want = sum(v["tokens"]) / depth
        assert abs(got - want) < 1e-6, f"{v['label']}: mean tokens/block {got} != expected {want}"
        assert math.isfinite(loss.item())
        return dt

    print(f"# {args.model} img {args.img} batch {args.batch} fp32 threads {torch.get_num_threads()} "
          f"C={c} depth={depth} P={p} prefix={npt} mlp_ratio={mlp_ratio}", flush=True)
    t_start = time.perf_counter()
    for name in names:
        for _ in range(args.warmup):
            dt = step(variants[name])
        print(f"warmup {name:5s} {dt:6.2f} s/step", flush=True)

    times = {n: [] for n in names}
    rounds_run = 0
    t_rounds = time.perf_counter()
    for r in range(args.rounds):
        if r > 0 and time.perf_counter() - t_rounds > args.budget:
            break
        k = r % len(names)
        order = names[k:] + names[:k]
        if r % 2:
            order = order[::-1]
        for name in order:
            for _ in range(args.steps):
                times[name].append(step(variants[name]))
        rounds_run += 1
        print(f"round {r}: " + "  ".join(f"{n}={times[n][-1]:.2f}s" for n in names), flush=True)

    base = statistics.median(times[names[0]])
    base_min = min(times[names[0]])
    base_macs = forward_macs(variants[names[0]]["tokens"], c, p, patch, args.classes, mlp_ratio)
    print(f"\n{rounds_run} rounds x {args.steps} step(s) per variant; total {time.perf_counter() - t_start:.0f} s;"
          f" medians; speedup/FLOP reduction vs '{names[0]}'\n")
    hdr = ("| variant | tokens/block (mean) | median s/step (min-max) | images/s | speedup | fwd GMACs "
           "| FLOP reduction | efficiency | best-of speedup | best-of efficiency |")
    print(hdr)
    print("|" + "---|" * 10)
    for name in names:
        v = variants[name]
        med = statistics.median(times[name])
        macs = forward_macs(v["tokens"], c, p, patch, args.classes, mlp_ratio, v["extra"])
        speed, red = base / med, base_macs / macs
        print(f"| {v['label']} | {sum(v['tokens']) / depth:.1f} | {med:.2f} ({min(times[name]):.2f}-"
              f"{max(times[name]):.2f}) | {args.batch / med:.2f} | {speed:.2f}x | {macs / 1e9:.2f} | "
              f"{red:.2f}x | {speed / red:.2f} | {base_min / min(times[name]):.2f}x | "
              f"{base_min / min(times[name]) / red:.2f} |")
    for name in [n for n in names if n.startswith("toe")]:
        print(f"\n{variants[name]['label']}: the hook alone (forward + backward of its output's sum on a "
              f"[{args.batch}, {npt + p}, {c}] input), median of 30: "
              f"{hook_ms(variants[name]['plugin'], args.batch, npt + p, c):.2f} ms")


def hook_ms(plugin, batch: int, tokens: int, dim: int, reps: int = 30) -> float:
    from dsvit.model.token_stage import TokenStage
    stage, x = TokenStage(), torch.randn(batch, tokens, dim, requires_grad=True)
    times = []
    for _ in range(reps + 3):
        stage.positions, stage.record = None, {}
        t0 = time.perf_counter()
        plugin(x, stage).sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[3:]) * 1e3


if __name__ == "__main__":
    main()
