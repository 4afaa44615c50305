"""The plugins' schedules of one run in optimizer steps, for ``dsvit train --check``
(``dsvit.engine.plan`` prints them): growth's stages, ToE's keep-rate stages, the token and attention
levels' keep-rate ramps and pruning blocks, PSS's drop schedule, the example level's epochs.

It lives with the tools because it names plugins (the engine names none: docs/architecture.md).
Every number comes from the plugin's own public code: growth's stage table
(``schedule.stage_table``, ``fraction_steps``) and momentum rescaling, ToE's ``stage_at`` and
``kept_patches``, the levels' ``keep_rate`` and ``pruning_blocks``, ``token_pruning.num_kept``. Where
a schedule is a step function of the step (ToE's stage, a level's rate), its boundaries are found by
bisection over that function, so what is printed is what the plugin will do at those steps. Growth's
stage starts follow ``ProgressiveGrowth`` (fraction: ``round(f * total)``; epoch: the first step of
that epoch; step: as given; tests/test_recipes_check.py compares them with the plugin's own).
"""
from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate
from typing import Callable, Optional

from dsvit.plugins.growth import schedule as S
from dsvit.plugins.growth.config import max_magnitude
from dsvit.plugins.growth.momentum import rescaled_decay
from dsvit.plugins.levels import keep_rate, pruning_blocks
from dsvit.plugins.toe import is_active
from dsvit.plugins.token_pruning import num_kept


def first_step(pred: Callable[[int], bool], total: int) -> Optional[int]:
    """The first step in [0, total) where the monotone ``pred`` holds (None: never)."""
    lo, hi = 0, total
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo if lo < total else None


def epoch_of(step: int, epoch_steps: list) -> int:
    return bisect_right(list(accumulate(epoch_steps)), step)


def growth_stages(g, cfg, total: int, epoch_steps: list) -> list:
    """Growth's stage table (``schedule.Stage`` rows: first step, depth, input size, RandAugment
    magnitude, drop-path, erasing) for a run of ``total`` steps."""
    steps = g.start_steps(total, epoch_steps)
    scale = (lambda v: v) if g.augreg else (lambda v: 1.0)
    return S.stage_table(steps, g.depth_list(cfg.model), g.resolution_list(cfg.model),
                         max_magnitude(cfg.data.auto_augment), cfg.model.drop_path_rate,
                         cfg.data.reprob, scale(g.aa_scale), scale(g.dp_scale), scale(g.re_scale))


def _span(a: int, b: int, epoch_steps: list) -> str:
    return f"steps {a:,}-{b - 1:,} (epochs {epoch_of(a, epoch_steps)}-{epoch_of(b - 1, epoch_steps)})"


def _growth(p, cfg, total: int, epoch_steps: list, patch: int) -> list[str]:
    g, t = p.cfg, cfg.train
    rows = growth_stages(g, cfg, total, epoch_steps)
    decays = [d if g.decay_rescale == "none" else rescaled_decay(
        d, g.decay_rescale, t.batch_size, g.decay_batch, total, g.reference_steps) for d in g.decays]
    out = [f"growth ({g.mode}, stage_unit={g.stage_unit}): {len(rows)} stages, MoGrow from momentum copies "
           f"at decays {[round(d, 6) for d in decays]}, Adam state {g.optimizer_state}"]
    ends = [r.start for r in rows[1:]] + [total]
    for i, (r, end) in enumerate(zip(rows, ends)):
        what = f"depth {r.depth}, {r.resolution} px ({(r.resolution // patch) ** 2} patches)"
        if g.mode == "auto":
            what = (f"starts at {what}, then as its search chooses" if i == 0 else
                    "depth and input size chosen by AutoProg's search (not known before training)")
        out.append(f"  stage {i + 1}: {_span(r.start, end, epoch_steps)}: {what}; RandAugment m{r.magnitude}, "
                   f"drop-path {r.drop_path:.3g}, erasing {r.reprob:.3g}")
    if g.mode == "manual":
        out.append(f"  engine rebuilds at steps {', '.join(f'{r.start:,}' for r in rows[1:])}")
    else:
        window = g.search_steps(total, epoch_steps)
        out.append(f"  each stage but the last starts with a {window:,}-step search over depths "
                   f"{g.depth_list(cfg.model)} x input sizes {g.resolution_list(cfg.model)}")
    return out


def _toe(p, total: int, epoch_steps: list, patches: int) -> list[str]:
    c, parts = p.cfg, []
    for s in range(1, len(c.keep_rates) + 1):
        start = first_step(lambda k: p.stage_at(k, epoch_of(k, epoch_steps), total) >= s, total)
        if start is None:
            continue
        rate = c.keep_rates[s - 1]
        kept = (f"{patches} -> {p.kept_patches(patches, s)} patches before block {c.insert_before_block}"
                if is_active(s, c.keep_rates) else "off: every token")
        parts.append(f"keep {rate} from step {start:,} ({kept})")
    return [f"toe (stage_unit={c.stage_unit}): " + "; ".join(parts),
            "  (patch counts at the full input size; growth's smaller inputs keep the same shares)"]


def _level(p, total: int, depths: list, patches: int) -> list[str]:
    c = p.cfg

    def rate(k):
        return keep_rate(k, total, c.keep_rate, c.warmup, c.decay)
    dense_end = first_step(lambda k: rate(k) < 1.0, total)
    reached = first_step(lambda k: rate(k) <= c.keep_rate, total)
    if dense_end is None:
        ramp = "keep 1 throughout"
    elif reached == 0:
        ramp = f"keep {c.keep_rate} from step 0"
    else:
        dense = f"keep 1 to step {dense_end - 1:,}, cosine" if dense_end else "cosine from 1"
        ramp = f"{dense} to {c.keep_rate} by step {reached:,}, then {c.keep_rate}"
    blocks = "; ".join(f"depth {d}: {pruning_blocks(d, c.block_fractions, c.blocks, strict=False)}"
                       for d in sorted(set(depths)))
    out = [f"{p.name} (warmup {c.warmup:.4g}, decay {c.decay:.4g} of the run): {ramp}",
           f"  blocks at {blocks}"]
    if p.name == "token_pruning":
        counts = [patches]
        for _ in pruning_blocks(depths[-1], c.block_fractions, c.blocks, strict=False):
            counts.append(num_kept(counts[-1], c.keep_rate))
        out.append(f"  final model at keep {c.keep_rate}, every token into block 1: "
                   f"{' -> '.join(map(str, counts))} patches")
    return out


def _pss(p, epoch_steps: list) -> list[str]:
    c = p.cfg
    period = c.period_steps or epoch_steps[0]
    return [f"pss: {c.schedule} drop ratio {c.drop_start} -> {c.drop_end} ({c.levels} levels), period "
            f"{period:,} steps ({'period_steps' if c.period_steps else 'an epoch'}), all tokens for the "
            f"last {c.cooldown_epochs:g} epochs (cooldown_epochs)"]


def _examples(p) -> list[str]:
    c = p.cfg
    what = (f"forgetting: keep {c.keep_fraction}, swap {c.remove_fraction} at round epochs "
            f"{list(c.round_epochs) or f'{c.rounds} rounds every {c.round_every} of the run'}"
            if c.policy == "forgetting" else
            f"infobatch: ratio {c.ratio}, the last {c.anneal_fraction} of the epochs on every example")
    return [f"example_pruning ({what}): the epoch lengths above are its declared plan; which examples "
            f"each epoch keeps depends on training (losses, forgetting events): not known before it"]


def describe(cfg, plugins: list, total: Optional[int], epoch_steps: Optional[list],
             final_depth: int) -> list[str]:
    """Lines describing every enabled plugin's schedule (``total``/``epoch_steps`` None: the run
    length is unknown, so only the plugins are listed)."""
    if not plugins:
        return []
    if total is None:
        return [f"{p.name}: its schedule needs the run length (unknown: see data)" for p in plugins]
    patch = cfg.model.patch_size or 16
    patches = (cfg.model.img_size // patch) ** 2
    growth = next((p for p in plugins if p.name == "growth"), None)
    depths = growth.cfg.depth_list(cfg.model) if growth is not None else [final_depth]
    out = []
    for p in sorted(plugins, key=lambda q: q.name != "growth"):   # growth's stages first: they frame the rest
        if p.name == "growth":
            out += _growth(p, cfg, total, epoch_steps, patch)
        elif p.name == "toe":
            out += _toe(p, total, epoch_steps, patches)
        elif p.name in ("token_pruning", "attention_sparsity"):
            out += _level(p, total, depths, patches)
        elif p.name == "pss":
            out += _pss(p, epoch_steps)
        elif p.name == "example_pruning":
            out += _examples(p)
        elif p.name == "efficienttrain":
            out += p.describe(total, epoch_steps)
        elif p.name == "token_viz":
            out.append("token_viz: visualisation only, no schedule")
        else:
            out.append(f"{p.name}: enabled (--check does not describe its schedule)")
    return out
