"""Token-stage hook points on a timm VisionTransformer, without forking timm.

``TokenStage.attach(model)`` replaces ``model.forward_features`` on the *instance* with a block loop
that runs exactly timm's ops (patch_embed -> _pos_embed -> patch_drop -> norm_pre -> blocks -> norm)
and calls registered hooks in between:

- ``after_embed``: ``fn(x, stage) -> x`` after the position embedding (PSS samples here);
- ``before_block[i]``: ``fn(x, stage) -> x`` on the input of block i (ToE selects/merges before
  block 1; token pruning; growth may change the block list itself);
- ``attn_mask[i]``: ``fn(x, stage) -> additive float mask or None`` passed to block i's attention;
- ``after_attention[i]``: ``fn(x, attn, stage) -> x`` inside block i, after its attention residual
  and before its MLP (``dsvit.model.attention``): ``attn`` holds the block's head-averaged CLS row
  (``need="cls"``) or full attention (``need="probs"``). Token pruning drops tokens here, so the MLP
  runs on the kept ones; ``stage.gather`` inside such a hook also restricts ``attn`` to the kept
  tokens, so a later hook of the same block (the attention mask) sees them only.

Elastic depth: ``stage.active_blocks`` (ascending block indices, ``None`` = all) runs only those
blocks; the others act as the identity (a supernet's sub-network, AutoProg). Hooks keyed to an
inactive block run before the next active one, so a token selection before block 1 still happens
when block 1 is skipped. Checkpointing stays per active block: timm's ``checkpoint_seq`` would run
every block regardless of a skip set.

Hooks run *outside* activation checkpointing (only each block's own forward is checkpointed; a block
with ``after_attention`` hooks is checkpointed as two halves with the hooks between), so a token
selection is never recomputed during the backward, and it acts whether or not checkpointing is
on (the original ToE silently did nothing under timm's checkpoint_seq).

Per forward, ``stage.positions`` holds for every current token its index in the full embedded
sequence (``[B, N]``; ``None`` while it is the identity) so later hooks and visualisations know where
kept tokens came from. Hooks change it only through the stage's operations: ``gather(x, idx)``
(tokens and positions in step), ``keep_positions(idx)`` (a hook that builds its own output, e.g.
ToE's merge), ``append_position(source)`` (a fused token appended). ``note_merge`` records which
positions were merged into which (``stage.last_merge``, read by the token visualiser), and
``scratch(owner)`` is a per-forward dict private to one plugin (e.g. the attention level's mask,
built in one hook and used by later blocks). Everything per-forward is cleared at every forward.
``stage.primary`` is true while the forward is the engine's own model (not an EMA or scoring copy):
hooks that record statistics of the training forward gate on it.

The stage is a plain object, not an nn.Module: the model's state_dict, parameter list and ZeRO
partitioning are unchanged, so checkpoints stay plain timm weights. With no hooks the loop is
bit-identical to timm's forward_features.
"""
from __future__ import annotations

import contextlib
import types
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

TokenFn = Callable[[torch.Tensor, "TokenStage"], torch.Tensor]


@dataclass(frozen=True)
class TokenMerge:
    """What a merging hook did in the last forward: global positions [B, M] of the merged tokens and
    of their hosts (the kept tokens they were added to)."""
    merged: torch.Tensor
    host: torch.Tensor


class TokenStage:
    def __init__(self):
        self.after_embed: list[TokenFn] = []
        self.before_block: dict[int, list[TokenFn]] = defaultdict(list)
        self.attn_mask: dict[int, TokenFn] = {}
        self.after_attention: dict[int, list] = defaultdict(list)   # index -> [(fn, need, order)]
        self.block_attn = None         # the running block's BlockAttention, inside after_attention
        self.checkpoint_fn: Optional[Callable] = None   # None: torch.utils.checkpoint (non-reentrant)
        self.positions: Optional[torch.Tensor] = None
        self.last_merge: Optional[TokenMerge] = None
        self._scratch: dict = {}
        self.primary = True            # the running forward is the engine's model (not a copy)
        self.num_prefix_tokens = 1
        self.model = None
        self.training = True           # the running model's mode; hooks gate on it
        self.mean_block_tokens = 0.0   # mean sequence length over blocks in the last forward
        self.block_macs = 0.0          # multiply-accumulates per image in the blocks, last forward
        self.enabled = True            # False: the plain timm loop (suspended())
        self.active_blocks = None      # elastic depth: block indices to run (None: all); set it
                                       # with set_active_blocks

    # ------------------------------------------------------------ wiring
    def attach(self, model: torch.nn.Module, primary: bool = True) -> "TokenStage":
        """Route ``model``'s forward_features through this stage. ``primary=False`` serves a second
        model (the EMA copy) with the same hooks."""
        for attr in ("patch_embed", "_pos_embed", "blocks", "norm", "norm_pre", "patch_drop"):
            if not hasattr(model, attr):
                raise TypeError(f"TokenStage needs a timm VisionTransformer; {type(model).__name__} "
                                f"has no '{attr}'")
        if primary:
            self.model = model
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        model.forward_features = types.MethodType(_forward_features, model)
        model.token_stage = self
        return self

    def add_after_embed(self, fn: TokenFn) -> None:
        self.after_embed.append(fn)

    def add_before_block(self, index: int, fn: TokenFn) -> None:
        self.before_block[index].append(fn)

    def set_attn_mask(self, index: int, fn: TokenFn) -> None:
        if index in self.attn_mask:
            raise ValueError(f"block {index} already has an attention-mask provider")
        self.attn_mask[index] = fn

    def add_after_attention(self, index: int, fn, need: str = "cls", order: int = 0) -> None:
        """Hooks of one block run by ``order`` (plugins pass their role order), then by when they
        were added: a selection must not depend on whether a plugin registered at fit start or later
        (after a resume or a rebuild)."""
        from dsvit.model.attention import NEEDS
        if need not in NEEDS:
            raise ValueError(f"need must be one of {NEEDS}, got '{need}'")
        if self.model is not None:
            from dsvit.model.attention import check_block
            check_block(self.model.blocks[index])
        hooks = self.after_attention[index]
        hooks.append((fn, need, order))
        hooks.sort(key=lambda h: h[2])   # stable: equal orders keep their registration order

    def remove(self, fn) -> None:
        """Unregister ``fn`` from every hook point."""
        if fn in self.after_embed:
            self.after_embed.remove(fn)
        for fns in self.before_block.values():
            if fn in fns:
                fns.remove(fn)
        for i, pairs in self.after_attention.items():
            self.after_attention[i] = [h for h in pairs if h[0] != fn]
        for i in [i for i, f in self.attn_mask.items() if f == fn]:
            del self.attn_mask[i]

    def remap_blocks(self, src: list) -> None:
        """After the block list changed (new block i <- old block src[i]): a hook that ran before
        old block j runs before the first new block copied from j (``surgery.hook_position``)."""
        from dsvit.model.surgery import hook_position

        def moved(index, what):
            new = hook_position(index, src)
            if new is None:
                raise ValueError(f"the {what} hook before block {index} has no block to follow: the new "
                                 f"model keeps old blocks {sorted(set(src))}")
            return new
        before, masks, inside = defaultdict(list), {}, defaultdict(list)
        for i, fns in self.before_block.items():
            if fns:
                before[moved(i, "token")].extend(fns)
        for i, pairs in self.after_attention.items():
            if pairs:
                inside[moved(i, "after-attention")].extend(pairs)
        for hooks in inside.values():
            hooks.sort(key=lambda h: h[2])
        for i, fn in self.attn_mask.items():
            j = moved(i, "attention-mask")
            if j in masks:
                raise ValueError(f"two attention-mask providers land on block {j} after the rebuild")
            masks[j] = fn
        self.before_block, self.attn_mask, self.after_attention = before, masks, inside

    @contextlib.contextmanager
    def suspended(self):
        """Run the plain timm block loop inside (no hooks): the engine's priming step."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def set_active_blocks(self, blocks) -> None:
        """Run only ``blocks`` (ascending indices; None: all) from the next forward on."""
        self.active_blocks = None if blocks is None else list(blocks)

    # ------------------------------------------------------------ helpers for hooks
    def keep_positions(self, x: torch.Tensor, idx: torch.Tensor) -> None:
        """The tokens now are those at ``idx`` ([B, K]) of ``x``'s (the hook builds its output)."""
        self.positions = torch.gather(self.current_positions(x), 1, idx)

    def append_position(self, position: torch.Tensor) -> None:
        """A token appended to every row, shown at global ``position`` ([B, 1]), e.g. a fused token
        at its heaviest source's place."""
        self.positions = torch.cat([self.positions, position], 1)
        if self.block_attn is not None:
            self.block_attn.extra += 1

    def note_merge(self, merged: torch.Tensor, host: torch.Tensor) -> None:
        """Global positions of merged tokens and of the tokens they were merged into ([B, M])."""
        self.last_merge = TokenMerge(merged=merged, host=host)

    def scratch(self, owner) -> dict:
        """A per-forward dict private to ``owner`` (cleared at every forward)."""
        return self._scratch.setdefault(id(owner), {})

    def current_positions(self, x: torch.Tensor) -> torch.Tensor:
        if self.positions is None:
            n = x.shape[1]
            self.positions = torch.arange(n, device=x.device).expand(x.shape[0], n)
        return self.positions

    def gather(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Differentiable gather of tokens ``idx`` ([B, K] indices into x's token axis)."""
        pos = self.current_positions(x)
        self.positions = torch.gather(pos, 1, idx)
        if self.block_attn is not None:
            self.block_attn.take(idx)
        return take_tokens(x, idx)

    # ------------------------------------------------------------ the loop
    def run_blocks(self, model, x: torch.Tensor) -> torch.Tensor:
        ckpt = model.grad_checkpointing and torch.is_grad_enabled()
        tokens, macs, run, done = 0, 0.0, self._block_order(len(model.blocks)), 0
        for i in run:
            mask, inside = None, []
            if self.enabled:
                for j in range(done, i + 1):        # hooks of skipped blocks run here too
                    for fn in self.before_block.get(j, ()):
                        x = fn(x, self)
                    inside.extend(self.after_attention.get(j, ()))
                done = i + 1
                mask_fn = self.attn_mask.get(i)
                mask = mask_fn(x, self) if mask_fn is not None else None
            blk = model.blocks[i]
            if inside:
                x = self._split_block(blk, x, mask, inside, ckpt)
            elif ckpt:
                if self.checkpoint_fn is not None:
                    x = self.checkpoint_fn(blk, x, mask)
                else:
                    x = checkpoint(_block_forward, blk, x, mask, use_reentrant=False)
            else:
                x = _block_forward(blk, x, mask)
            tokens += x.shape[1]
            macs += block_macs(blk, x.shape[1], x.shape[-1])
        self.mean_block_tokens = tokens / max(1, len(run))
        self.block_macs = macs
        return x

    def _split_block(self, blk, x, mask, hooks, ckpt: bool) -> torch.Tensor:
        """One block as attention half -> hooks -> MLP half; each half checkpointed on its own, so
        the hooks (a token selection) run once and the backward reuses what they chose."""
        from dsvit.model.attention import BlockAttention, attention_half, mlp_half
        need = "probs" if any(h[1] == "probs" for h in hooks) else "cls"
        p = self.num_prefix_tokens
        if ckpt:
            x, cls, probs = checkpoint(attention_half, blk, x, mask, need, p, use_reentrant=False)
        else:
            x, cls, probs = attention_half(blk, x, mask, need, p)
        self.block_attn = BlockAttention(cls=cls, probs=probs, num_prefix=p)
        try:
            for fn, _, _ in hooks:
                x = fn(x, self.block_attn, self)
        finally:
            self.block_attn = None
        return checkpoint(mlp_half, blk, x, use_reentrant=False) if ckpt else mlp_half(blk, x)

    def _block_order(self, depth: int) -> list:
        if self.active_blocks is None:
            return range(depth)
        bad = [i for i in self.active_blocks if not 0 <= i < depth]
        if bad or list(self.active_blocks) != sorted(set(self.active_blocks)):
            raise ValueError(f"active blocks {self.active_blocks} must be ascending, distinct and in "
                             f"[0, {depth})")
        return list(self.active_blocks)


def block_macs(blk, tokens: int, width: int) -> float:
    """Forward multiply-accumulates per image of a pre-norm ViT block on ``tokens`` tokens: qkv and
    projection (4 d^2 per token), the MLP (2 d h), QK^T and AV (2 T^2 d). Counted at the block's output
    length, so a block whose attention runs before a token level prunes inside it is slightly
    undercounted (its attention half only). Attention stays dense: a mask saves nothing here."""
    fc1 = getattr(getattr(blk, "mlp", None), "fc1", None)
    hidden = fc1.out_features if fc1 is not None else 4 * width
    return tokens * (4 * width * width + 2 * width * hidden) + 2 * tokens * tokens * width


def vit_block_macs(tokens: int, dim: int, mlp_ratio: float) -> float:
    """Multiply-accumulates of one ViT block on ``tokens`` tokens from its shape alone: qkv + proj +
    MLP + attention (``block_macs`` reads the hidden width off a built block)."""
    return tokens * dim * dim * (4 + 2 * mlp_ratio) + 2 * tokens * tokens * dim


def take_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Tokens ``idx`` [B, K] of ``x`` [B, N, C]. One flat index_select rather than ``torch.gather``
    with an expanded index: the same values and gradients, half the time of ToE's hook on CPU
    (``benchmarks/bench_tokens.py``'s hook timing, benchmarks/RESULTS.md)."""
    b, n, c = x.shape
    return x.reshape(b * n, c).index_select(0, _flat(idx, n)).view(b, idx.shape[1], c)


def add_tokens(x: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``x`` [B, N, C] with ``src[b, j]`` added to token ``idx[b, j]`` (repeats accumulate, in order)."""
    b, n, c = x.shape
    return x.reshape(b * n, c).index_add(0, _flat(idx, n), src.reshape(-1, c)).view(b, n, c)


def _flat(idx: torch.Tensor, n: int) -> torch.Tensor:
    """[B, K] per-row token indices -> indices into the [B * N] flattened token axis."""
    return (idx + torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * n).reshape(-1)


def _block_forward(blk, x, mask):
    return blk(x) if mask is None else blk(x, attn_mask=mask)


def _forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    if attn_mask is not None or is_causal:
        raise ValueError("dsvit's token stage provides attention masks through TokenStage.attn_mask")
    stage: TokenStage = self.token_stage
    stage.positions = None
    stage.last_merge = None
    stage._scratch = {}
    stage.training = self.training
    stage.primary = self is stage.model
    x = self.patch_embed(x)
    x = self._pos_embed(x)
    x = self.patch_drop(x)
    x = self.norm_pre(x)
    for fn in stage.after_embed if stage.enabled else ():
        x = fn(x, stage)
    x = stage.run_blocks(self, x)
    return self.norm(x)
