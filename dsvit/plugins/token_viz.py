"""Which patches the blocks saw: an image grid logged every ``log.image_every_steps`` training steps.

Reads what the token stage recorded in the training forward that just ran: ``stage.positions`` (the
tokens that reached the last block, as indices into the full embedded sequence) and, when ToE merged,
``stage.last_merge`` (``TokenMerge``: merged positions and their hosts). Legend (also logged once
as a line, ``LEGEND``): kept patches are shown as they are; patches merged by ToE are half image,
half their host's colour, and the host (a kept patch) is framed in that colour, so one colour is
one merge group (8 colours, reused: two groups far apart may share one); patches no block saw
(dropped by PSS) are darkened. Built by ``log.image_every_steps`` > 0 alone (``requested_by``);
``plugins.token_viz.enabled=false`` turns it off. The grid of step S's batch is logged at step S.
Rank 0 only (the logger ignores other ranks); costs nothing on steps it does not log.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dsvit.engine import host_sync
from dsvit.engine.plugin import ORDER_OTHER, Plugin
from dsvit.plugins import register

LEGEND = ("token image grid: as is = kept, darkened = dropped (no block saw it), half tinted = merged "
          "into the patch framed in the same colour")
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
    if merged is not None and merged.shape[1] and patch > 2:        # frame each host in its colour
        for i in range(b):
            for hp in (host[i].cpu() - num_prefix).unique().tolist():
                y, x = divmod(hp, gw)
                cell = out[i, :, y * patch:(y + 1) * patch, x * patch:(x + 1) * patch]
                colour = PALETTE[hp % len(PALETTE)].view(3, 1)
                cell[:, 0], cell[:, -1], cell[:, :, 0], cell[:, :, -1] = colour, colour, colour, colour
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

    @classmethod
    def requested_by(cls, config) -> bool:
        return config.log.image_every_steps > 0

    def on_fit_start(self, state) -> None:
        if state.logger is not None and self.config.log.image_every_steps:
            state.logger.info(LEGEND)

    def on_after_forward(self, state) -> None:
        every = self.config.log.image_every_steps
        stage = state.token_stage
        step = state.step + 1          # the step this forward belongs to (state.step: steps done)
        first_micro_batch = state.micro_step % self.config.train.grad_accum == 0
        if not every or step % every or not first_micro_batch or state.logger is None:
            return
        n = self.cfg.num_images
        d = self.config.data
        patch = state.model.patch_embed.patch_size[0]
        merge = stage.last_merge
        images = state.batch.images[:n]
        positions = stage.positions     # None: no plugin dropped or merged a token, every one was seen
        if positions is None:
            seen = stage.num_prefix_tokens + (images.shape[-2] // patch) * (images.shape[-1] // patch)
            positions = torch.arange(seen).expand(images.shape[0], seen)
        with host_sync.allowed("a token image grid (every log.image_every_steps steps)"):
            grid = token_grid(images, positions[:n], stage.num_prefix_tokens, patch,
                              d.mean, d.std, None if merge is None else merge.merged[:n],
                              None if merge is None else merge.host[:n])
        state.logger.image("tokens/kept", grid, step=step)

