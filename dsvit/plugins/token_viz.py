"""Which patches the blocks saw: an image grid logged every ``log.image_every_steps`` training steps.

Reads what the token stage recorded in the training forward that just ran: ``stage.positions`` (the
tokens that reached the last block, as indices into the full embedded sequence) and, when ToE merged,
``stage.last_merge`` (``TokenMerge``: merged positions and their hosts). Kept patches are shown as they are, patches merged by
ToE are tinted with a colour per host, and patches no block saw (dropped by PSS) are darkened.
Rank 0 only (the logger ignores other ranks); costs nothing on steps it does not log.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dsvit.engine.plugin import ORDER_OTHER, Plugin
from dsvit.plugins import register

PALETTE = torch.tensor([[0.90, 0.10, 0.10], [0.10, 0.60, 0.95], [0.95, 0.75, 0.10], [0.20, 0.80, 0.30],
                        [0.70, 0.30, 0.90], [0.95, 0.45, 0.10], [0.10, 0.85, 0.80], [0.90, 0.30, 0.60]])


def token_grid(images: torch.Tensor, positions: torch.Tensor, num_prefix: int, patch: int,
               mean, std, merged: Optional[torch.Tensor] = None, host: Optional[torch.Tensor] = None,
               pad: int = 2) -> torch.Tensor:
    """Images [B, 3, H, W] (normalised) -> one CHW float image in [0, 1], the B images side by side.
    positions/merged/host: [B, *] indices into the embedded sequence (prefix tokens first)."""
    b, _, h, w = images.shape
    gh, gw = h // patch, w // patch
    img = images.detach().float().cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    img = img.clamp(0, 1)
    shade = torch.full((b, gh * gw, 3), 0.25)                      # dropped: darkened
    tint = torch.zeros(b, gh * gw, 3)
    pos = positions.cpu() - num_prefix
    for i in range(b):
        p = pos[i][pos[i] >= 0]
        shade[i, p] = 1.0                                           # kept: as is
        if merged is not None and merged.shape[1]:
            m, hst = merged[i].cpu() - num_prefix, host[i].cpu() - num_prefix
            shade[i, m] = 0.5                                       # merged: half image, half host colour
            tint[i, m] = 0.5 * PALETTE[hst % len(PALETTE)]
    def up(t):   # [B, gh*gw, 3] -> [B, 3, H, W]
        t = t.view(b, gh, gw, 3).permute(0, 3, 1, 2)
        return t.repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    out = img[:, :, :gh * patch, :gw * patch] * up(shade) + up(tint)
    canvas = torch.ones(3, gh * patch, b * (gw * patch + pad) - pad)
    for i in range(b):
        x0 = i * (gw * patch + pad)
        canvas[:, :, x0:x0 + gw * patch] = out[i]
    return canvas


@dataclass(frozen=True)
class TokenVizConfig:
    enabled: bool = True
    order: int = 0
    num_images: int = 4


@register
class TokenViz(Plugin):
    name = "token_viz"
    config_class = TokenVizConfig
    order = ORDER_OTHER

    def on_after_forward(self, state) -> None:
        every = self.config.log.image_every_steps
        stage = state.token_stage
        if not every or state.step % every or state.logger is None or stage.positions is None:
            return
        n = self.cfg.num_images
        d = self.config.data
        patch = state.model.patch_embed.patch_size[0]
        merge = stage.last_merge
        grid = token_grid(state.batch.images[:n], stage.positions[:n], stage.num_prefix_tokens, patch,
                          d.mean, d.std, None if merge is None else merge.merged[:n],
                          None if merge is None else merge.host[:n])
        state.logger.image("tokens/kept", grid)

