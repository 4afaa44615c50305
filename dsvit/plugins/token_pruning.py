"""Token level of Tri-Level E-ViT: EViT-style pruning of inattentive patch tokens, as a plugin.

Papers: Kong et al., "Peeling the Onion: Hierarchical Reduction of Data Redundancy for Efficient
Vision Transformer Training" (AAAI 2023), token level; Liang et al., "Not All Patches are What You
Need: Expediting Vision Transformers via Token Reorganizations" (EViT, ICLR 2022) for the fused token.

At each pruning block (default 1/4, 1/2 and 3/4 of the depth: blocks 3, 6, 9 of 12), after the
attention residual and before the MLP (``TokenStage.add_after_attention``), keep the prefix tokens
and the ``K = ceil(rho * N)`` patch tokens with the largest head-averaged CLS attention (N = the
current patch count, so the ratio compounds over blocks; fp64 ceil as the original). The kept tokens
go in descending score order (positions are already embedded). Dropped tokens are discarded
(Tri-Level E-ViT) or, with ``fuse: true``, averaged into one extra token weighted by their CLS
attention (EViT's fuse). The MLP of the pruning block then runs on the kept tokens only.

Keep-rate schedule, a pure function of the optimizer step (``keep_rate``): 1 for the first
``warmup`` fraction of the run, then a cosine from 1 to ``keep_rate`` over the next ``decay``
fraction, then ``keep_rate``. The paper's 300-epoch recipe (dense to epoch 10, cosine to epoch 110)
is warmup = 10/300, decay = 100/300: the defaults. Evaluation runs at the final rate (the published
method: the deployed model is the sparse one) or with every token (``eval_keep: full``).

Where our setting departs, and why:
- The CLS row comes from one extra [B, H, 1, T] product next to fused SDPA (``dsvit.model.attention``):
  the released code computes the whole attention matrix explicitly at pruning blocks. That is for
  GPUs (no T x T matrix, flash kernels kept). On CPU it does not pay: the explicit matrix was as fast
  or 2-9 % faster per step (``bench_pruning.py steps``, tp7 vs tp7-explicit, benchmarks/RESULTS.md).
- Selection runs outside activation checkpointing (the block is checkpointed as two halves), so the
  backward reuses the forward's choice instead of recomputing it.
- Pruning blocks follow the depth: recomputed from the fractions after an engine rebuild (growth).
  Under elastic depth (an AutoProg sub-network) a skipped pruning block's hook runs in the next
  active block.
- After ToE (before block 1) or PSS (after the embedding) N is already smaller: K follows it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dsvit.engine.compose import Footprint, TokenSite
from dsvit.engine.plugin import ORDER_TOKENS
from dsvit.errors import ConfigError
from dsvit.plugins import register
from dsvit.plugins.levels import ScheduledLevel, keep_rate, pruning_blocks, validate_level  # noqa: F401


# ---------------------------------------------------------------- pure functions
def num_kept(num_patches: int, rate: float) -> int:
    """K = ceil(rate * N) in float64 (the original's rounding), at least 1."""
    return max(1, min(num_patches, math.ceil(rate * num_patches)))


@torch.no_grad()
def top_patches(cls_row: torch.Tensor, k: int, num_prefix: int = 1) -> torch.Tensor:
    """Token indices [B, prefix + k]: the prefix, then the k patches of largest CLS attention."""
    b = cls_row.shape[0]
    idx = cls_row.topk(k, dim=1, sorted=True).indices + num_prefix
    prefix = torch.arange(num_prefix, device=idx.device).expand(b, -1)
    return torch.cat([prefix, idx], 1)


def fused_token(x: torch.Tensor, cls_row: torch.Tensor, keep: torch.Tensor,
                num_prefix: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT's fused token [B, 1, C]: the dropped patches averaged with their CLS-attention weights
    (differentiable in x), and the index [B] of the heaviest dropped patch (its position stands in)."""
    with torch.no_grad():
        w = cls_row.clone()
        w.scatter_(1, keep[:, num_prefix:] - num_prefix, 0.0)
        heaviest = w.argmax(1) + num_prefix
        w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
    fused = torch.einsum("bn,bnc->bc", w.to(x.dtype), x[:, num_prefix:])
    return fused.unsqueeze(1), heaviest


def prune_tokens(x: torch.Tensor, cls_row: torch.Tensor, rate: float, stage=None, fuse: bool = False,
                 num_prefix: int = 1) -> torch.Tensor:
    """x [B, T, C] with the patch tokens pruned to ceil(rate * N) by ``cls_row`` [B, N]; unchanged
    (no reordering) when every token is kept. ``stage`` keeps positions and attention in step."""
    n = x.shape[1] - num_prefix
    k = num_kept(n, rate)
    if k >= n:
        return x
    keep = top_patches(cls_row, k, num_prefix)
    fused, heaviest = fused_token(x, cls_row, keep, num_prefix) if fuse else (None, None)
    if stage is not None:
        pos = stage.current_positions(x)
        out = stage.gather(x, keep)
    else:
        pos, out = None, torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[2]))
    if fuse:
        out = torch.cat([out, fused], 1)
        if stage is not None:
            stage.append_position(pos.gather(1, heaviest[:, None]))
    return out


# ---------------------------------------------------------------- the plugin
@dataclass(frozen=True)
class TokenPruningConfig:
    enabled: bool = True
    order: int = 0
    keep_rate: float = 0.7               # rho*: patch tokens kept at each pruning block
    block_fractions: list = field(default_factory=lambda: [0.25, 0.5, 0.75])
    blocks: list = field(default_factory=list)   # explicit block indices (override the fractions)
    warmup: float = 10 / 300             # share of the run with every token
    decay: float = 100 / 300             # share of the run for the cosine to keep_rate
    fuse: bool = False                   # EViT: dropped tokens averaged into one
    eval_keep: str = "target"            # target (prune at keep_rate) | full (every token)

    def validate(self, cfg) -> None:
        validate_level(self, cfg)
        if not self.blocks and not self.block_fractions:
            raise ConfigError("set block_fractions (e.g. [0.25, 0.5, 0.75]) or blocks")
        if any(not 0 <= f < 1 for f in self.block_fractions):
            raise ConfigError(f"block_fractions {self.block_fractions} must be in [0, 1)")


class TokenPruning(ScheduledLevel):
    name = "token_pruning"
    config_class = TokenPruningConfig
    order = ORDER_TOKENS
    metric = "tokens/keep_rate"

    eval_options = (("--token-keep-rate", "keep_rate",
                     "token-pruning keep rates to evaluate, e.g. 1.0,0.9,0.7"),)

    def _unregister(self) -> None:
        if self._stage is not None:
            self._stage.remove(self._hook)

    def _register(self, state) -> None:
        stage = state.token_stage
        self._unregister()
        c = self.cfg
        self.blocks = pruning_blocks(len(state.model.blocks), c.block_fractions, c.blocks, strict=False)
        for b in self.blocks:
            stage.add_after_attention(b, self._hook, need="cls", order=self.order)
        self._stage = stage

    def footprint(self) -> Footprint:
        rate, blocks = self.cfg.keep_rate, self.declared_blocks()
        kept = None if rate >= 1 else (lambda n: num_kept(n, rate))   # the schedule ends at keep_rate
        return Footprint(sites=(TokenSite(
            "after_attention", blocks, kept, ("keep_rate",), needs=1, needs_keys=(blocks.key,),
            why="its top-k keeps ceil(keep_rate x N) >= 1 patch"),))

    def _hook(self, x, attn, stage):
        return prune_tokens(x, attn.cls, self.current_rate(stage), stage, self.cfg.fuse,
                            stage.num_prefix_tokens)


register(TokenPruning)
