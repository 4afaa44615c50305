"""Model surgery on timm ViTs: block maps, parameter-name maps, remapped state dicts. Pure functions.

A *block map* ``src`` describes a new block list through an old one: new block ``i`` is a copy of old
block ``src[i]``. Growth by duplication, extraction of a sub-network and the identity are all block
maps, and everything that follows the model through a change (weights, optimizer moments, EMA
copies, token hooks keyed by block index) is remapped by the same map, never by name alone: after
6 -> 12 growth the new ``blocks.2`` is the old ``blocks.1``.

Parameters outside ``blocks`` (patch embedding, class token, position table, final norm, head) keep
their names. Nothing here forks timm: new models come from ``timm.create_model`` with another depth
and are filled from remapped state dicts.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


# ---------------------------------------------------------------- block maps
def identity_map(depth: int) -> list[int]:
    return list(range(depth))


def duplicate_last(old_depth: int, new_depth: int) -> list[int]:
    """MoGrow's growth map (Li et al., "Automated Progressive Learning for Efficient Training of
    Vision Transformers", CVPR 2022): with ``k = 2p - n`` the first ``k`` old blocks are kept singly
    and each of the last ``n - p`` old blocks becomes two adjacent copies. 6 -> 8: [0,1,2,3,4,4,5,5]."""
    p, n = old_depth, new_depth
    if not p <= n <= 2 * p:
        raise ValueError(f"duplication grows depth {p} to between {p} and {2 * p} blocks, not {n}")
    k = 2 * p - n
    return [i if i < k else (i + k) // 2 for i in range(n)]


def extraction_map(active: list[int], old_depth: int) -> list[int]:
    """Keep the blocks ``active`` (ascending, distinct) of an ``old_depth`` model, in order."""
    active = [int(i) for i in active]
    if not active or active != sorted(set(active)) or active[0] < 0 or active[-1] >= old_depth:
        raise ValueError(f"active blocks {active} must be ascending, distinct and in [0, {old_depth})")
    return active


def new_positions(src: list[int]) -> list[int]:
    """Blocks of the new list that are not the first copy of their source (the duplicates)."""
    seen, out = set(), []
    for i, j in enumerate(src):
        if j in seen:
            out.append(i)
        seen.add(j)
    return out


def supernet_active(base: int, max_depth: int, depth: int) -> list[int]:
    """Blocks of a ``base -> max_depth`` MoGrown supernet that form its depth-``depth`` sub-network
    (AutoProg's elastic supernet): every first copy plus the last ``depth - base`` duplicates. Read
    in order, their sources are ``duplicate_last(base, depth)``: the sub-network is "MoGrow from
    ``base`` straight to ``depth``", and ``depth = base`` is the pre-growth model."""
    if not base <= depth <= max_depth:
        raise ValueError(f"a sub-network of a {base} -> {max_depth} supernet has between {base} and "
                         f"{max_depth} blocks, not {depth}")
    dups = new_positions(duplicate_last(base, max_depth))
    skip = set(dups[:len(dups) - (depth - base)])
    return [i for i in range(max_depth) if i not in skip]


def hook_position(old_index: int, src: list[int]) -> Optional[int]:
    """Where a hook that ran before old block ``old_index`` runs in the new list: before the first new
    block copied from it, else (that block was removed) before the first block from a later one."""
    same = [i for i, j in enumerate(src) if j == old_index]
    if same:
        return same[0]
    later = [i for i, j in enumerate(src) if j > old_index]
    return later[0] if later else None


# ---------------------------------------------------------------- names and state dicts
def source_name(new_name: str, src: list[int]) -> str:
    """The old name a new parameter/buffer is copied from under block map ``src``."""
    m = BLOCK_KEY.match(new_name)
    if m is None:
        return new_name
    i = int(m.group(1))
    if i >= len(src):
        raise KeyError(f"{new_name}: block {i} is outside a block map of {len(src)} blocks")
    return f"blocks.{src[i]}.{m.group(2)}"


def param_map(new_names, src: list[int], old_names) -> dict:
    """new parameter name -> old parameter name (``None`` where the old model has no such tensor)."""
    old = set(old_names)
    out = {}
    for n in new_names:
        s = source_name(n, src)
        out[n] = s if s in old else None
    return out


def remap_state_dict(old: dict, src: list[int], like: dict) -> dict:
    """State dict of the new model: ``blocks.i.*`` copied from ``blocks.src[i].*``, the rest by name.
    ``like`` (the new model's own state dict) gives the keys, and the values the old one lacks."""
    return {k: (old[s] if s in old else v).detach().clone()
            for k, v in like.items() for s in [source_name(k, src)]}


def remap_blocks(old: dict, src: list[int]) -> dict:
    """State dict of the ``len(src)``-block model whose block ``i`` is old block ``src[i]``, the rest
    by name: ``remap_state_dict`` without a model to give the keys (every new key has a source)."""
    out = {k: v.detach().clone() for k, v in old.items() if BLOCK_KEY.match(k) is None}
    for i, j in enumerate(src):
        prefix = f"blocks.{j}."
        out.update({f"blocks.{i}.{k[len(prefix):]}": v.detach().clone()
                    for k, v in old.items() if k.startswith(prefix)})
    return out


def set_drop_path(model: torch.nn.Module, rate: float, span: Optional[int] = None) -> None:
    """Stochastic depth laid out linearly, ``rate * i / (span - 1)`` for block i (``span``: the
    depth the layout covers, default the model's; a supernet lays it over all its blocks). Only
    blocks built with a DropPath module (timm builds them where the build-time rate is > 0) change."""
    span = span or len(model.blocks)
    for i, blk in enumerate(model.blocks):
        for mod in (getattr(blk, "drop_path1", None), getattr(blk, "drop_path2", None)):
            if mod is not None and hasattr(mod, "drop_prob"):
                mod.drop_prob = rate * i / max(1, span - 1)
