"""``dsvit bench throughput``: training-step speed of every stage of each efficient-training method.

    dsvit bench throughput [--model vit_small_patch16_224 --model vit_base_patch16_224] [--batch B]
                           [--rounds R] [--methods baseline toe pss token_pruning growth stack]
                           [--device cpu|cuda] [--ds-config auto|NAME] [--dtype fp32|bf16]
                           [--peak-tflops F] [--out FILE.md] [--json FILE]

What it measures: for each model and each stage of each method, one training step of the DeepSpeed
engine a run builds (``setup.build_engine`` on the recipe's DeepSpeed JSON, resolved for the device
as a run resolves it: ``zero1-bf16`` on a GPU with bf16, ``zero0`` fp32 on CPU; ``--ds-config`` and
``--dtype`` override): forward in the engine's dtype, fp32 cross-entropy, ``engine.backward``,
``engine.step`` (timm's AdamW groups), on one random batch of a real model built by dsvit
(``build_model``: timm ViT + token stage), the method's own plugin hooks on the token stage: ToE
(``TokenExpansion`` fixed at a stage), PSS (``pss.inference_hook`` at each keep rate of its
schedule), the token level (``TokenPruning`` at its final keep rate), growth (an engine of the stage's
depth, ``dynamic_img_size``, the batch resized to the stage's resolution inside the step, as the plugin
does). The settings come from a recipe (``--recipe``, default ``stack``: growth 4 stages 6/8/10/12 of
12 blocks at 112/144/192/224 px for a 224/16 model, ToE keep 0.5/0.75/1.0 from 0/0.625/0.875 of the
run, token level 0.9); a method the recipe leaves out (PSS) runs at its plugin defaults. ``stack`` is
growth x ToE x token level as that recipe combines them: one variant per stretch of the run over which
the growth stage and the ToE stage stay the same.

How: all variants of one model share the process and are timed round-robin (every round times every
variant once, the order rotating and reversing between rounds) after one untimed warm-up round; the
median over rounds is kept, so drift of the machine hits every variant alike. Variants that are the
same computation (ToE's last stage with keep 1.0 = baseline) are measured once. Per variant: median
s/step, images/s, speed-up vs baseline, forward GMACs per image = the token stage's ``block_macs`` of
the timed forward (blocks, at the real token counts) + patch embed + head (ToE's similarity products
and the token level's CLS row are not counted), MAC reduction vs baseline, efficiency = speed-up / MAC
reduction. The "whole run" row of a method weights its stages by their share of the run's steps
(growth's stage starts, ToE's stage_starts, PSS's cyclic schedule): speed-up = baseline time / the
share-weighted mean step time, the per-step speed-up a full run would see.

On CUDA the table also gives model FLOPs utilisation = 3 x 2 x MACs x images/s / peak. The peak is ``--peak-tflops`` if given (any dtype), else, for bf16, the
dense bf16 peak of the device's exact name in ``PEAK_BF16_TFLOPS`` (NVIDIA's datasheets: an H100 PCIe
or NVL is not an SXM part); a name not in the table gets no MFU and a note asking for
``--peak-tflops``. The device name, the peak and where it came from, torch and timm versions and the
dtype head the table. The CUDA path has not been run yet (no GPU lent to dsvit's development so far).

What it does not do: train to convergence or say anything about accuracy (``dsvit bench run`` does);
the token level is timed at its final rate (its warm-up and anneal over the first ~37 % of a run are
ignored, so the whole-run rows of token_pruning and stack slightly overstate); data loading,
logging and rebuilds are left out (``dsvit bench run`` times runs end to end). One process, a world
of one: gradient reduction across ranks is not in the step. Never required by tests or CI.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from bisect import bisect_right
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dsvit.bench.peaks import device_info
from dsvit.errors import ConfigError

MODELS = ("vit_small_patch16_224", "vit_base_patch16_224")
METHODS = ("baseline", "toe", "pss", "token_pruning", "growth", "stack")



class Key(NamedTuple):
    """One distinct computation: a model (depth, dynamic size) at an input size with token hooks."""
    depth: int
    res: int
    dynamic: bool = False
    toe: int = 0            # ToE stage (0: none)
    pss: float = 1.0        # PSS keep rate (1: none)
    tp: float = 1.0         # token-level keep rate (1: none)


def shares(starts: list, end: float = 1.0) -> list[float]:
    return [b - a for a, b in zip(starts, list(starts[1:]) + [end])]


def plugin_configs(recipe: str) -> dict:
    from dsvit import config as C
    from dsvit.registry import plugin_registry
    have = C.load_config(recipe).plugins
    return {n: have.get(n) or cls.config_class() for n, cls in plugin_registry().items()}


def plan(methods: list[str], pc: dict, mcfg) -> dict:
    """method -> [(stage label, share of the run, Key)] for a model config with depth and patch set."""
    from dsvit.plugins.pss import drop_ratio
    from dsvit.plugins.growth import schedule as S
    from dsvit.plugins.toe import is_active
    d, img = mcfg.depth, mcfg.img_size
    g, toe, tp, pss = pc["growth"], pc["toe"], pc["token_pruning"], pc["pss"]
    depths, res = g.depth_list(mcfg), g.resolution_list(mcfg)
    dyn = len(set(res)) > 1
    g_starts = list(g.stage_starts) or S.linspace(0, 1, g.stages + 1)[:-1]
    if g.stage_unit != "fraction" or toe.stage_unit != "fraction":
        raise SystemExit("throughput: growth and ToE stage starts must be fractions of the run")

    def toe_stage(t):   # stage at run fraction t; the last stage at keep 1.0 is ToE switched off
        s = bisect_right(list(toe.stage_starts), t)
        return s if is_active(s, toe.keep_rates) else 0
    out = {}
    for m in methods:
        if m == "baseline":
            out[m] = [("full model", 1.0, Key(d, img))]
        elif m == "toe":
            out[m] = [(f"stage {s + 1}: keep {toe.keep_rates[s]}", w, Key(d, img, toe=toe_stage(f)))
                      for s, (f, w) in enumerate(zip(toe.stage_starts, shares(toe.stage_starts)))]
        elif m == "pss":   # one period of its schedule: the share of steps at each quantised keep rate
            n = 1000
            keeps = [round(1 - drop_ratio(t, pss.schedule, pss.drop_start, pss.drop_end, 10 * n, n,
                                          0, pss.levels), 6) for t in range(n)]
            out[m] = [(f"keep {k}", keeps.count(k) / n, Key(d, img, pss=k)) for k in sorted(set(keeps))]
        elif m == "token_pruning":
            out[m] = [(f"keep {tp.keep_rate} (final rate)", 1.0, Key(d, img, tp=tp.keep_rate))]
        elif m == "growth":
            out[m] = [(f"stage {i + 1}: depth {dd}, {r} px", w, Key(dd, r, dyn))
                      for i, (dd, r, w) in enumerate(zip(depths, res, shares(g_starts)))]
        elif m == "stack":
            cuts = sorted(set(g_starts) | set(toe.stage_starts) | {0.0})
            rows = []
            for a, w in zip(cuts, shares(cuts)):
                i, s = S.stage_of(a, g_starts), bisect_right(list(toe.stage_starts), a)
                rows.append((f"growth {i + 1} ({depths[i]}, {res[i]} px) x ToE {s} (keep "
                             f"{toe.keep_rates[s - 1]}) x tokens {tp.keep_rate}", w,
                             Key(depths[i], res[i], dyn, toe_stage(a), 1.0, tp.keep_rate)))
            out[m] = rows
        else:
            raise SystemExit(f"throughput: unknown method '{m}' (choose from {', '.join(METHODS)})")
    return out


class Runner:
    """One DeepSpeed engine per model (depth, dynamic size), built as a run builds it
    (``setup.build_engine`` on the completed DeepSpeed JSON: timm's AdamW groups, the JSON's ZeRO
    stage and precision); a Key's training step is the trainer's: the input cast to the engine's
    dtype, fp32 log-softmax loss, ``engine.backward``, ``engine.step``."""

    def __init__(self, mcfg, pc: dict, cfg, classes: int, device):
        from dsvit.engine.setup import complete_ds_config, model_dtype
        self.mcfg, self.pc, self.cfg, self.classes, self.device = mcfg, pc, cfg, classes, device
        self.ds_config = complete_ds_config(cfg, world_size=1)
        self.dtype = model_dtype(self.ds_config)
        self.engines: dict = {}
        self.toe: dict = {}
        g = torch.Generator().manual_seed(0)
        batch = cfg.train.batch_size
        self.x = torch.randn(batch, 3, mcfg.img_size, mcfg.img_size, generator=g).to(device)
        self.y = torch.randint(0, classes, (batch,), generator=g).to(device)

    def engine(self, depth: int, dynamic: bool):
        from dsvit.engine.setup import build_engine
        from dsvit.model.vit import build_model
        if (depth, dynamic) not in self.engines:
            torch.manual_seed(0)
            cfg = dataclasses.replace(self.mcfg, depth=depth, dynamic_img_size=dynamic)
            model, stage = build_model(cfg, self.classes)
            engine, _, _ = build_engine(model.to(self.device), self.cfg.train, self.ds_config, self.device)
            engine.train()
            self.engines[(depth, dynamic)] = (engine, stage)
        return self.engines[(depth, dynamic)]

    def close(self) -> None:
        """Destroy every engine (the next model's are built in the same process)."""
        from dsvit.engine.rebuild import release
        for engine, _ in self.engines.values():
            release(engine)
        self.engines.clear()

    def hooks(self, k: Key, model, stage):
        """Register the Key's plugin hooks on ``stage``; returns a function that removes them."""
        from dsvit.engine.plugin import State
        from dsvit.plugins.pss import inference_hook
        from dsvit.plugins.toe import TokenExpansion
        from dsvit.plugins.token_pruning import TokenPruning
        undo = []
        if k.pss < 1:
            h = inference_hook(k.pss, self.pc["pss"].sampler)
            stage.add_after_embed(h)
            undo.append(lambda: stage.remove(h))
        if k.toe:
            if k.toe not in self.toe:   # one plugin per stage, kept (its seed cache, as in a run)
                self.toe[k.toe] = TokenExpansion(self.pc["toe"])
            toe = self.toe[k.toe]
            toe.stage = k.toe
            stage.add_before_block(toe.cfg.insert_before_block, toe)
            undo.append(lambda: stage.remove(toe))
        if k.tp < 1:
            st = State(rank=0, world_size=1, model=model, token_stage=stage)
            lvl = TokenPruning(dataclasses.replace(self.pc["token_pruning"], keep_rate=k.tp, warmup=0, decay=0))
            lvl.on_fit_start(st)
            undo.append(lambda: lvl.on_fit_end(st))
        return lambda: [u() for u in undo]

    def step(self, k: Key) -> tuple[float, float, float]:
        """One training step: (seconds, mean tokens per block, forward MACs per image)."""
        engine, stage = self.engine(k.depth, k.dynamic)
        model = engine.module
        remove = self.hooks(k, model, stage)
        cuda = self.device.type == "cuda"
        try:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            x = self.x if k.res == self.x.shape[-1] else F.interpolate(   # growth resizes on the device
                self.x, size=(k.res, k.res), mode="bilinear", align_corners=False)
            loss = F.cross_entropy(engine(x.to(self.dtype)).float(), self.y)
            engine.backward(loss)
            engine.step()
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        finally:
            remove()
        c, p = model.embed_dim, model.patch_embed.patch_size[0]
        fixed = (k.res // p) ** 2 * 3 * p * p * c + c * self.classes   # patch embed + head
        return dt, stage.mean_block_tokens, stage.block_macs + fixed


def measure(model_name: str, args, device, peak_tflops) -> dict:
    """Time every variant of one model interleaved; returns {"header", "rows", "peak_tflops"}."""
    from dsvit.config import ModelConfig, timm_architecture
    own = timm_architecture(model_name)   # the timm model's depth and patch where not given
    mcfg = ModelConfig(name=model_name, img_size=args.img, patch_size=args.patch or own.get("patch_size"),
                       embed_dim=args.embed_dim, depth=args.depth or own.get("depth"), num_heads=args.heads)
    pc = plugin_configs(args.recipe)
    runner = Runner(mcfg, pc, args.cfg, args.classes, device)
    methods = ["baseline"] + [m for m in args.methods if m != "baseline"]
    stages = plan(methods, pc, mcfg)
    keys = list(dict.fromkeys(k for rows in stages.values() for _, _, k in rows))
    times = {k: [] for k in keys}
    info: dict = {}
    try:
        for r in range(args.rounds + 1):   # round 0: warm-up, not kept
            order = keys[r % len(keys):] + keys[:r % len(keys)]
            for k in (order if r % 2 == 0 else order[::-1]):
                dt, tokens, macs = runner.step(k)
                info[k] = (tokens, macs)
                if r:
                    times[k].append(dt)
            if args.verbose:
                print(f"round {r}{' (warm-up)' if r == 0 else ''}: {time.strftime('%X')}", flush=True)
    finally:
        runner.close()
    med = {k: statistics.median(t) for k, t in times.items()}
    base = stages["baseline"][0][2]
    peak = peak_tflops * 1e12 if peak_tflops else None

    def row(method, label, share, t, tokens, macs):
        sp, red, ips = med[base] / t, info[base][1] / macs, args.batch / t
        return dict(method=method, stage=label, share=share, tokens=tokens, s_per_step=t, images_s=ips,
                    speedup=sp, gmacs=macs / 1e9, mac_reduction=red, efficiency=sp / red,
                    mfu=6 * macs * ips / peak if peak else None)
    rows = []
    for m in methods:
        for label, share, k in stages[m]:
            rows.append(row(m, label, share, med[k], *info[k]))
        if m != "baseline":
            mix = [(w, med[k], *info[k]) for _, w, k in stages[m]]
            rows.append(row(m, "whole run", 1.0, *(sum(w * v[i] for w, *v in mix) for i in range(3))))
    header = (f"{model_name} {args.img} px, batch {args.batch}, {args.rounds} interleaved rounds "
              f"(+1 warm-up), medians; settings from recipe '{args.recipe}'")
    return dict(header=header, rows=rows, peak_tflops=peak_tflops)


def table(result: dict, device_line: str) -> str:
    mfu = result["peak_tflops"] is not None
    cols = ["method", "stage", "share of run", "tokens/block", "median s/step", "images/s", "speed-up",
            "fwd GMACs/img", "MAC reduction", "efficiency"] + ([f"MFU (peak {result['peak_tflops']:g} "
                                                              "TFLOP/s)"] if mfu else [])
    out = [f"### {result['header']}", f"device: {device_line}", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        name = f"**{r['stage']}**" if r["stage"] == "whole run" else r["stage"]
        cells = [r["method"], name, f"{r['share']:.3f}", f"{r['tokens']:.1f}", f"{r['s_per_step']:.4f}",
                 f"{r['images_s']:.1f}", f"{r['speedup']:.2f}x", f"{r['gmacs']:.3f}",
                 f"{r['mac_reduction']:.2f}x", f"{r['efficiency']:.2f}"]
        if mfu:
            cells.append(f"{100 * r['mfu']:.1f} %")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dsvit bench throughput", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--model", action="append", help=f"timm ViT, repeatable (default: {' and '.join(MODELS)})")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help=f"subset of {' '.join(METHODS)}")
    ap.add_argument("--batch", type=int, default=64 if cuda else 8)
    ap.add_argument("--rounds", type=int, default=10 if cuda else 3, help="timed rounds (after one warm-up)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                    help="engine precision (default: as --ds-config says; auto: bf16 on a GPU with bf16, else fp32)")
    ap.add_argument("--ds-config", default="auto",
                    help="DeepSpeed JSON (ds_configs/ name or path; auto: zero1-bf16 on a GPU with bf16, else zero0)")
    ap.add_argument("--json", default="", help="also write the rows as JSON to this file")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="device peak in TFLOP/s for MFU (default: the bf16 table, by exact device name)")
    ap.add_argument("--recipe", default="stack", help="recipe whose plugins section sets the methods")
    ap.add_argument("--out", default="", help="append the markdown table(s) to this file")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--verbose", action="store_true", help="print a line per round")
    for flag, typ in (("--img", int), ("--classes", int), ("--patch", int), ("--embed-dim", int),
                      ("--depth", int), ("--heads", int)):   # model overrides (tests: a tiny model)
        ap.add_argument(flag, type=typ, default={"--img": 224, "--classes": 1000}.get(flag))
    return ap


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = parser().parse_args(argv)
    args.methods = [m for a in args.methods for m in a.split(",") if m]
    bad = sorted(set(args.methods) - set(METHODS))
    if bad:
        raise SystemExit(f"throughput: unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("throughput: --device cuda but torch sees no GPU")
    if args.rounds < 1 or args.batch < 1:
        raise SystemExit("throughput: --rounds and --batch must be >= 1")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise SystemExit(f"throughput: --peak-tflops must be > 0 (the device's dense peak in TFLOP/s), "
                         f"got {args.peak_tflops}")
    try:
        args.cfg = run_config(args, torch.device(args.device))
    except ConfigError as e:
        raise SystemExit(f"throughput: {e}") from None
    args.ds_config, args.dtype = args.cfg.run.ds_config, args.cfg.run.precision   # concrete from here on
    return args


def run_config(args, device):
    """The recipe's config as a run on ``device`` would resolve it (``ds_config``/``precision``
    auto made concrete), with the benchmark's batch as one micro-batch of one rank."""
    from dsvit import config as C
    from dsvit.engine.setup import resolve_run
    cfg = C.load_config(args.recipe)
    run = dataclasses.replace(cfg.run, ds_config=args.ds_config, precision=args.dtype or "auto")
    train = dataclasses.replace(cfg.train, batch_size=args.batch, grad_accum=1)
    return dataclasses.replace(cfg, run=resolve_run(run, device), train=train)


def main(argv: list[str], start_world) -> int:
    """``start_world()``: the command line's distributed start-up (``dsvit.cli.init_distributed``)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from dsvit.engine.setup import use_device_numerics
    start_world()   # DeepSpeed engines need a process group: a world of one
    use_device_numerics(args.cfg.run, device)   # TF32 as a run has it
    line, peak = device_info(device, args.dtype, args.peak_tflops)
    line += f"; DeepSpeed engine, {args.ds_config}"
    text, results = "", []
    for name in args.model or MODELS:
        res = measure(name, args, device, peak)
        results.append(dict(res, device=line))
        t = table(res, line)
        print(t, flush=True)
        text += t + "\n"
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0
