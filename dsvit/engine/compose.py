"""The start-time composition check: plugin combinations that cannot work are refused before any
setup (data, model, DeepSpeed), with the reason, both plugins and the keys to change.

The contract: every plugin declares a ``Footprint`` from the config alone (``Plugin.footprint()``,
defined here): the hook points where it changes the token set and the fewest patch
tokens it leaves there, what a hook needs arriving, the blocks whose attention masks need the token
set unchanged up to the next of them, and, for a depth/input-size plugin, the depths the model
takes, the block map of a rebuild and the smallest input. This module names no plugin: it walks the
footprints in the plugins' order (``PluginSet``) at every depth the model may take, from the
smallest input (patch size from ``cfg.model``), and refuses

1. an explicit block index the model does not have at its initial depth (a depth plugin's first
   depth, else ``model.depth``). Refused, not deferred until the model has grown (the levels'
   ``pruning_blocks(strict=False)`` skips such blocks silently): the plugin would do less than
   configured, or nothing, in the early stages, and an index of a shallower model names another
   block than the final model's (growth duplicates the last blocks), so "block 9 of the final
   model" means nothing at depth 6. Fractions of the depth are the way to follow it.
2. a hook that needs more patch tokens than arrive in the worst case (every plugin at its
   strongest at once: a lower bound, schedules are not intersected).
3. a token change strictly inside an attention mask's span (after the mask block's earlier-ordered
   hooks, before the attention of a later block using the mask): the mask would not fit the tokens.
4. two plugins providing attention masks, or two changing the depth (``TokenStage.set_attn_mask``
   and ``PluginSet.architecture`` refuse them only later), or two changing the input size.

Counts assume one prefix (class) token. Elastic depth (an AutoProg search's sub-networks, which run
a subset of the supernet's blocks, hooks of skipped blocks in the next active one) is not modelled;
the runtime checks (e.g. the attention level's mask size) stay for it and for undeclared plugins.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Callable, Optional

from dsvit.engine.plugin_set import PluginSet
from dsvit.errors import ConfigError
from dsvit.model.surgery import hook_position

@dataclass(frozen=True)
class Blocks:
    """Blocks a plugin acts at: absolute ``indices`` (the same at every depth, or, with ``moves``,
    indices at the initial depth that each rebuild's block map moves: a hook registered once), or
    blocks derived from the current depth by ``of_depth`` (e.g. fractions of it)."""
    key: str                                       # the config key that sets them (messages)
    indices: tuple = ()
    of_depth: Optional[Callable[[int], list]] = None
    moves: bool = False


@dataclass(frozen=True)
class TokenSite:
    """One token-stage hook point of a plugin, in training (the worst case over its schedule).
    ``where``: after_embed | before_block | after_attention (``TokenStage``'s hook points). Counts
    are of patch tokens (the class token aside)."""
    where: str
    blocks: Optional[Blocks] = None                # None for after_embed
    kept: Optional[Callable[[int], int]] = None    # n patch tokens in -> fewest left (None: unchanged)
    kept_keys: tuple = ()                          # config keys that set ``kept``
    needs: int = 0                                 # patch tokens it needs arriving here
    needs_keys: tuple = ()
    why: str = ""                                  # what the need is for, e.g. "one ToE seed"


@dataclass(frozen=True)
class Footprint:
    """What a plugin declares about itself for the start-time composition check."""
    sites: tuple = ()                              # TokenSite, one per hook point
    # attention masks built after the attention of each of these blocks (after earlier-ordered hooks
    # there) and used by every later block up to the next of them: the token set must not change
    # in between
    mask_blocks: Optional[Blocks] = None
    mask_keys: tuple = ()
    # a depth / input-size plugin: every depth the model may take (ascending, the initial first),
    # the block map a rebuild from one to another applies, the smallest input side it feeds
    depths: tuple = ()
    depth_keys: tuple = ()
    block_map: Optional[Callable[[int, int], list]] = None
    min_resolution: int = 0
    resolution_keys: tuple = ()
    # every input side it trains at, when it changes the model's input size (one plugin may: two
    # schedules of it would fight over the batch; declared as (), a plugin keeps model.img_size)
    input_sizes: tuple = ()
    # it sets State.lr_clock in fit_start (the learning rate follows its own progress, as a pure
    # function of the step, not the step itself): one plugin may
    lr_clock: bool = False
    # it sets the loader's augmentation each epoch (State.data.set_augmentation, e.g. a RandAugment
    # magnitude schedule): one plugin may, or the later one silently replaces the earlier's
    augmentation: bool = False
    augmentation_keys: tuple = ()


PHASES = ("after_embed", "before_block", "after_attention")   # their order within a block


def check_composition(plugins, cfg) -> None:
    """Raise ConfigError if the plugins (a PluginSet or a list) cannot work together on ``cfg``."""
    plugins = list(plugins if isinstance(plugins, PluginSet) else PluginSet(list(plugins)))
    prints = [(p, p.footprint() or Footprint()) for p in plugins]
    _one_input_size(prints, cfg)
    _only_one(prints, "lr_clock", "set the learning rate's clock (State.lr_clock)")
    _only_one(prints, "augmentation", "schedule the loader's augmentation per epoch",
              lambda p, f: f"plugins.{p.name}.{'/'.join(f.augmentation_keys)}",
              fix="switch all but one schedule off (" + ", ".join(
                  f"plugins.{p.name}.{f.augmentation_keys[0]}=false" for p, f in prints
                  if f.augmentation and f.augmentation_keys) + ") or ")
    if not any(f.sites or f.mask_blocks or f.depths for _, f in prints):
        return                      # nothing declared: no model lookup either
    _only_one(prints, "mask_blocks", "provide attention masks (one provider per block)")
    _only_one(prints, "depths", "change the model's depth")
    plan = _depth_plan(prints, cfg)
    _check_blocks_exist(prints, plan)
    res, res_keys = cfg.model.img_size, ["model.img_size"]
    res_from = f"model.img_size={res}"
    for p, f in prints:
        if f.min_resolution and f.min_resolution < res:
            res, res_keys = f.min_resolution, [f"plugins.{p.name}.{k}" for k in f.resolution_keys]
            res_from = f"plugins.{p.name}'s smallest input, {_keys(p, f.resolution_keys)}"
    patch = cfg.model.patch_size or _timm_default(cfg, "patch")
    n = (res // patch) ** 2
    source = n, f"{n} patches of a {res} px input ({res_from}, patch {patch})", res_keys
    for depth in plan["depths"]:
        for layout in _layouts(prints, depth, plan):
            _walk(layout, depth, source, plan)


# ---------------------------------------------------------------- the depth and where hooks land
def _depth_plan(prints, cfg) -> dict:
    for p, f in prints:
        if f.depths:
            depths = sorted(set(f.depths))
            return {"depths": depths, "initial": f.depths[0], "map": f.block_map, "owner": p,
                    "keys": f.depth_keys, "says": f"{_keys(p, f.depth_keys)}, depths {depths}"}
    depth = cfg.model.depth or _timm_default(cfg, "depth")
    return {"depths": [depth], "initial": depth, "map": None, "owner": None, "keys": (),
            "says": f"model.depth={depth}" if cfg.model.depth else f"{cfg.model.name}'s depth {depth}"}


def _moved(index: int, plan: dict) -> dict:
    """Where a hook registered before block ``index`` at the initial depth may be at every depth:
    each rebuild moves it by its block map (``TokenStage.remap_blocks``); every ascending path."""
    depths, at = plan["depths"], {plan["depths"][0]: {index}}
    for i, d in enumerate(depths[1:], 1):
        at[d] = set()
        for e in depths[:i]:
            try:
                src = plan["map"](e, d)
            except ValueError:          # not one rebuild (e.g. more than doubling)
                continue
            at[d] |= {q for q in (hook_position(b, src) for b in at[e]) if q is not None}
    return at


def _placements(blocks: Blocks, depth: int, plan: dict) -> list:
    """Alternative block tuples ``blocks`` stands for at ``depth`` (several only for moved hooks)."""
    if blocks.of_depth is not None and not blocks.indices:
        return [tuple(blocks.of_depth(depth))]
    if blocks.moves and plan["map"] is not None:
        return list(itertools.product(*[sorted(_moved(i, plan)[depth]) for i in blocks.indices]))
    return [tuple(blocks.indices)]


def _layouts(prints, depth: int, plan: dict):
    """Every placement of the hooks at ``depth``: sorted events (block, phase, rank, plugin, site)
    and the mask blocks [(rank, plugin, footprint, blocks)]."""
    sites = [(r, p, s) for r, (p, f) in enumerate(prints) for s in f.sites]
    masks = [(r, p, f) for r, (p, f) in enumerate(prints) if f.mask_blocks is not None]
    choices = [[(-1,)] if s.where == "after_embed" else _placements(s.blocks, depth, plan)
               for _, _, s in sites]
    choices += [_placements(f.mask_blocks, depth, plan) for _, _, f in masks]
    for pick in itertools.product(*choices):
        events = sorted(((b, PHASES.index(s.where), r, p, s) for (r, p, s), blocks in zip(sites, pick)
                         for b in blocks), key=lambda e: e[:3])
        yield events, [(r, p, f, sorted(m)) for (r, p, f), m in zip(masks, pick[len(sites):])]


# ---------------------------------------------------------------- the checks
def _only_one(prints, field: str, what: str, detail=None, fix: str = "") -> None:
    """At most one plugin may declare ``field``; ``detail(p, f)`` says what each owner declared."""
    owners = [(p, f) for p, f in prints if getattr(f, field)]
    if len(owners) > 1:
        said = ": " + "; ".join(detail(p, f) for p, f in owners) if detail else ""
        raise ConfigError(f"plugins {', '.join(p.name for p, _ in owners)} all {what}{said}; only one may: "
                          f"{fix}disable all but one (plugins.{owners[1][0].name}.enabled=false)")


def _one_input_size(prints, cfg) -> None:
    _only_one(prints, "input_sizes", "set the model's input size",
              lambda p, f: f"plugins.{p.name} trains at {list(f.input_sizes)} px ({_keys(p, f.resolution_keys)})",
              f"all but one must keep the full input size, model.img_size={cfg.model.img_size}, through the "
              f"keys named, or ")


def _check_blocks_exist(prints, plan: dict) -> None:
    depth = plan["initial"]
    for p, f in prints:
        declared = [s.blocks for s in f.sites if s.blocks is not None]
        for blocks in declared + ([f.mask_blocks] if f.mask_blocks is not None else []):
            bad = [b for b in blocks.indices if not 0 <= b < depth]
            if not bad:
                continue
            owner = plan["owner"]
            grows = (f", fractions of the depth where the plugin has them (they follow it), or a deeper "
                     f"first stage in plugins.{owner.name}.{'/'.join(plan['keys'])}" if owner else "")
            raise ConfigError(
                f"plugins.{p.name}.{blocks.key}={_show(getattr(p.cfg, blocks.key, bad))} names block(s) "
                f"{bad}, but the model starts with {depth} blocks (0..{depth - 1}), set by {plan['says']}; "
                f"the block does not exist when the run starts: use blocks below {depth}{grows}")


def _walk(layout, depth: int, source: tuple, plan: dict) -> None:
    """Token flow (check 2) and mask spans (check 3) at one depth and placement of the hooks."""
    events, masks = layout
    n, cuts = source[0], []
    at_depth = f" at depth {depth} ({plan['says']})" if plan["owner"] else ""
    for block, phase, rank, p, site in events:
        if site.needs and n < site.needs:
            _refuse_flow(p, site, block, n, cuts, source, at_depth)
        if site.kept is not None:
            for r, a, f, mask in masks:
                if a is not p and mask:
                    _check_span(p, site, block, rank, a, f, r, mask, depth, at_depth)
            m = site.kept(n)
            if m < n:
                cuts.append((p, site, block))
            n = m


def _refuse_flow(p, site, block, n, cuts, source, at_depth) -> None:
    cut_by = "".join(f", cut by plugins.{q.name} {_where(s, b)} ({_keys(q, s.kept_keys)})"
                     for q, s, b in cuts)
    upstream = [f"plugins.{q.name}.{k}" for q, s, _ in cuts for k in s.kept_keys] + source[2]
    raise ConfigError(
        f"plugins.{p.name} needs at least {site.needs} patch tokens {_where(site, block)} ({site.why}; "
        f"{_keys(p, site.needs_keys)}), but as few as {n} arrive{at_depth}: {source[1]}{cut_by}; keep "
        f"more tokens there ({' or '.join(upstream)}) or change "
        f"{', '.join(f'plugins.{p.name}.{k}' for k in site.needs_keys)}")


def _check_span(p, site, block, rank, a, f, a_rank, mask, depth, at_depth) -> None:
    first, where = mask[0], _where(site, block)
    if site.where == "after_embed" or block < first or (site.where == "before_block" and block == first):
        return
    if site.where == "after_attention" and (block == depth - 1 or (block in mask and rank < a_rank)):
        return   # no later attention, or before the mask is built from the kept tokens
    head = (f"plugins.{p.name} changes the token set {where} ({_keys(p, (site.blocks.key,))}), inside "
            f"the span of plugins.{a.name}'s attention masks: built at blocks {mask}{at_depth} "
            f"from {_keys(a, f.mask_keys)}, each used by the blocks after it up to the next, which would get "
            f"a mask that does not fit their tokens (refused at the first masked forward). ")
    if site.where == "after_attention" and block in mask:
        raise ConfigError(head + f"plugins.{p.name} runs after plugins.{a.name} in block {block} (order "
                          f"{p.order} > {a.order}): set plugins.{p.name}.order below {a.order}")
    if site.where == "before_block":
        raise ConfigError(head + f"Move plugins.{p.name}.{site.blocks.key} to block {first} or earlier, "
                          f"or plugins.{a.name}.{'/'.join(f.mask_keys)} so its first mask block is {block} "
                          f"or later")
    raise ConfigError(head + f"Make block {block} one of plugins.{a.name}'s mask blocks (the same "
                      f"plugins.{a.name}.{'/'.join(f.mask_keys)} as plugins.{p.name}.{site.blocks.key}), or "
                      f"move it before block {first}")


# ---------------------------------------------------------------- helpers
def _where(site, block: int) -> str:
    return {"after_embed": "after the embedding", "before_block": f"before block {block}",
            "after_attention": f"inside block {block}"}[site.where]


def _show(v):
    if isinstance(v, float):
        return round(v, 4)
    return [_show(x) for x in v] if isinstance(v, (list, tuple)) else v


def _keys(p, keys) -> str:
    return ", ".join(f"plugins.{p.name}.{k}={_show(getattr(p.cfg, k, '?'))}" for k in keys)


def _timm_default(cfg, what: str) -> int:
    """The timm model's own depth or patch size where ``cfg.model`` leaves it unset."""
    named = re.search(r"patch(\d+)", cfg.model.name)
    if what == "patch" and named:
        return int(named.group(1))
    import torch
    from dsvit.model.vit import create_vit
    with torch.device("meta"):     # no memory, no init: only the structure is read
        model = create_vit(cfg.model, cfg.model.num_classes)
    return len(model.blocks) if what == "depth" else int(model.patch_embed.patch_size[0])
