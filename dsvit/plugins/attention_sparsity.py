"""Attention level of Tri-Level E-ViT: per-query top-k key masks, as a plugin.

Paper: Kong et al., "Peeling the Onion: Hierarchical Reduction of Data Redundancy for Efficient
Vision Transformer Training" (AAAI 2023), attention level.

At each of its blocks (default 1/4, 1/2, 3/4 of the depth, the token level's blocks), after the
attention residual (``TokenStage.add_after_attention`` with ``need="probs"``: the head-averaged fp32
attention), each patch query keeps its ``k_a = ceil(alpha * K)`` strongest patch keys (K = current
patch count; ties at the k_a-th value keep more); prefix (CLS) rows and columns are never masked, nor
is an appended fused token. The mask is shared across heads, computed without gradient, and is
used by the attention of the following blocks up to and including the next mask block, which builds
a fresh one from its own (masked) attention. When the token level prunes in the same block it runs
first (its role orders before this one) and ``stage.gather`` restricts the attention to the kept
tokens, so the mask is over the tokens that survive, as in the paper.

The mask goes to timm as an additive float bias [B, 1, T, T] (0 kept, -inf masked) in the query
dtype: timm versions differ in how they read boolean masks. This is the masked softmax
``softmax(L + log M)``; the released code instead renormalises ``exp(L - max) * M`` with an epsilon,
which gives masked keys a tiny weight and collapses a row to uniform when its maximum is masked. We
implement the -inf form and do not reproduce the epsilon's numbers.

Keep-rate schedule: ``levels.keep_rate`` (1, cosine to ``keep_rate``, then constant; shares of
the run). ``keep_rate = 1`` (or the warm-up) adds no mask at all, so the blocks keep fused attention.

Cost: the published method saves no compute: the QK^T and AV products stay dense and the mask adds
work (the mask block's explicit attention, top-k, and SDPA leaving its fastest kernel). What this
costs here, and whether a kernel that skips masked keys helps on CPU, is measured in
``benchmarks/bench_pruning.py`` (benchmarks/RESULTS.md); the level is off by default, an accuracy
regulariser.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from dsvit.engine.compose import Footprint, TokenSite
from dsvit.engine.plugin import ORDER_ATTENTION
from dsvit.plugins import register
from dsvit.plugins.levels import ScheduledLevel, pruning_blocks, validate_level

MASK_KEY = "attention_sparsity.mask"


@torch.no_grad()
def topk_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool [B, Q, N]: per row the entries >= the row's k-th largest value (ties keep more)."""
    k = max(1, min(k, scores.shape[-1]))
    tau = scores.topk(k, dim=-1, sorted=True).values[..., -1:]
    return scores >= tau


@torch.no_grad()
def build_mask(probs: torch.Tensor, rate: float, num_prefix: int = 1, extra: int = 0,
               dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """Additive mask [B, 1, T + extra, T + extra] from head-averaged attention ``probs`` [B, T, T]:
    patch rows keep their top ceil(rate * K) patch keys; prefix and the ``extra`` appended tokens'
    rows and columns stay open. None when every key is kept."""
    b, t, _ = probs.shape
    k_patches = t - num_prefix
    k_a = math.ceil(rate * k_patches)
    if k_a >= k_patches:
        return None
    total = t + extra
    keep = torch.ones(b, total, total, dtype=torch.bool, device=probs.device)
    keep[:, num_prefix:t, num_prefix:t] = topk_keep(probs[:, num_prefix:, num_prefix:], k_a)
    mask = torch.zeros(b, 1, total, total, dtype=dtype, device=probs.device)
    return mask.masked_fill_(~keep.unsqueeze(1), float("-inf"))


@dataclass(frozen=True)
class AttentionSparsityConfig:
    enabled: bool = True
    order: int = 0
    keep_rate: float = 0.3               # alpha*: share of patch keys each patch query keeps
    block_fractions: list = field(default_factory=lambda: [0.25, 0.5, 0.75])
    blocks: list = field(default_factory=list)
    warmup: float = 10 / 300
    decay: float = 100 / 300
    eval_keep: str = "target"            # target (masked at keep_rate) | full (dense attention)

    def validate(self, cfg) -> None:
        validate_level(self, cfg)


class AttentionSparsity(ScheduledLevel):
    name = "attention_sparsity"
    config_class = AttentionSparsityConfig
    order = ORDER_ATTENTION
    metric = "attention/keep_rate"

    def _unregister(self) -> None:
        if self._stage is not None:
            self._stage.remove(self._build)
            self._stage.remove(self._provide)

    def _register(self, state) -> None:
        self._unregister()
        stage, depth = state.token_stage, len(state.model.blocks)
        self.blocks = pruning_blocks(depth, self.cfg.block_fractions, self.cfg.blocks, strict=False)
        for b in self.blocks:
            stage.add_after_attention(b, self._build, need="probs", order=self.order)
        for b in range(self.blocks[0] + 1 if self.blocks else depth, depth):
            stage.set_attn_mask(b, self._provide)
        self._stage = stage

    def footprint(self) -> Footprint:
        blocks = self.declared_blocks()
        masks = blocks if self.cfg.keep_rate < 1 else None     # keep_rate 1 adds no mask at all
        return Footprint(sites=(TokenSite("after_attention", blocks, needs=1, needs_keys=(blocks.key,),
                                          why="each patch query keeps ceil(keep_rate x K) >= 1 patch key"),),
                         mask_blocks=masks, mask_keys=(blocks.key,))

    def _build(self, x, attn, stage):
        rate = self.current_rate(stage)
        stage.scratch(self)[MASK_KEY] = build_mask(attn.probs, rate, attn.num_prefix, attn.extra, x.dtype)
        return x

    def _provide(self, x, stage):
        mask = stage.scratch(self).get(MASK_KEY)
        if mask is not None and mask.shape[-1] != x.shape[1]:
            raise RuntimeError(f"the attention mask covers {mask.shape[-1]} tokens but the block gets "
                               f"{x.shape[1]}: a token hook changed the tokens between mask blocks; "
                               f"put the attention level's blocks at the token-changing blocks")
        return mask


register(AttentionSparsity)
