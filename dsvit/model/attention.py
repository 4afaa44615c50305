"""A timm ``Block`` run in two halves, with the attention statistics token and attention plugins read.

``attention_half(blk, x, mask, need)`` is ``x + drop_path1(ls1(attn(norm1(x), attn_mask=mask)))``
computed with the block's own submodules (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``proj`` ...:
ZeRO-3 gathers parameters in their module hooks, so no ``F.linear(x, attn.qkv.weight)``), and it
also returns the head-averaged post-softmax attention as a ``BlockAttention``:

- ``need="cls"``: only the CLS query row. The output still comes from fused SDPA; the row is one extra
  [B, H, 1, T] product (q of the prefix token against every key), so the full T x T matrix is never
  materialised (EViT's and Tri-Level E-ViT's released code switch the block to explicit attention).
- ``need="probs"``: the full [B, T, T] head mean (the attention level needs patch-to-patch rows),
  with explicit attention: logits and softmax in fp32 (the published method's top-k runs on fp32
  probabilities), the product with V in the value dtype.

``mlp_half(blk, x)`` is the block's second residual. Between the two, hooks may drop tokens: the MLP
then runs on the kept ones only, as EViT and Tri-Level E-ViT do (a hook before the next block would
leave this block's MLP on every token).

Statistics are taken without gradient: token selection and masks are not differentiable; the block's
output keeps its gradient. The CLS row is taken before attention dropout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

NEEDS = ("cls", "probs")


@dataclass
class BlockAttention:
    """Head-averaged fp32 attention of one block over the current tokens (prefix first)."""
    cls: torch.Tensor                       # [B, N_patch]: CLS query -> patch keys
    probs: Optional[torch.Tensor] = None    # [B, T, T] (need="probs"), T = prefix + N_patch
    num_prefix: int = 1
    extra: int = 0                          # tokens appended after the last gather (EViT's fused)

    def take(self, idx: torch.Tensor) -> None:
        """Follow a token gather: ``idx`` [B, K] indices into the token axis, the prefix tokens first
        and in place (as ``token_pruning.top_patches`` builds them). Not checked on the values: that
        would be a host sync per pruning block per forward."""
        p = self.num_prefix
        if idx.shape[1] < p:
            raise ValueError(f"a token gather inside a block must keep the {p} prefix token(s) first")
        patches = idx[:, p:] - p
        self.cls = torch.gather(self.cls, 1, patches)
        if self.probs is not None:
            rows = torch.gather(self.probs, 1, idx.unsqueeze(-1).expand(-1, -1, self.probs.shape[2]))
            self.probs = torch.gather(rows, 2, idx.unsqueeze(1).expand(-1, idx.shape[1], -1))


def check_block(blk) -> None:
    attn = getattr(blk, "attn", None)
    missing = [a for a in ("qkv", "q_norm", "k_norm", "proj", "num_heads", "head_dim", "scale")
               if not hasattr(attn, a)]
    if missing or not all(hasattr(blk, a) for a in ("norm1", "ls1", "drop_path1", "norm2", "mlp")):
        raise TypeError(f"token/attention pruning needs timm Blocks with timm Attention; "
                        f"{type(blk).__name__}.attn lacks {missing or 'the Block layout'}")
    if getattr(attn, "gate", None) is not None:
        raise TypeError("token/attention pruning does not support gated attention (attn.gate)")


def attention_half(blk, x: torch.Tensor, mask: Optional[torch.Tensor], need: str,
                   num_prefix: int = 1) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(x after the attention residual, CLS row [B, N_patch], probs [B, T, T] or None)."""
    attn = blk.attn
    h = blk.norm1(x)
    b, t, _ = h.shape
    qkv = attn.qkv(h).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = None
    if need == "probs":
        logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)
        if mask is not None:
            logits = logits + mask.float()
        p = logits.softmax(-1)
        with torch.no_grad():
            probs = p.mean(1)
            cls = probs[:, 0, num_prefix:].clone()
        out = attn.attn_drop(p).to(v.dtype) @ v
    elif need == "cls":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
        with torch.no_grad():
            row = (q[:, :, :1].float() * attn.scale) @ k.float().transpose(-2, -1)   # [B, H, 1, T]
            if mask is not None:
                row = row + mask[:, :, :1].float()
            cls = row.softmax(-1).mean(1)[:, 0, num_prefix:]
    else:
        raise ValueError(f"need must be one of {NEEDS}, got '{need}'")
    out = out.transpose(1, 2).reshape(b, t, -1)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    out = attn.proj_drop(attn.proj(out))
    return x + blk.drop_path1(blk.ls1(out)), cls, probs


def mlp_half(blk, x: torch.Tensor) -> torch.Tensor:
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
