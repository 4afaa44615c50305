"""What a plugin may call on the objects the engine hands it (``State.data``, ``State.token_stage``,
``State.logger``), as typed Protocols. Anything else on those objects is the engine's business.

Implemented by ``dsvit.data.pipeline.TrainData`` (and the in-memory ``dsvit.data.memory``),
``dsvit.model.token_stage.TokenStage`` and ``dsvit.engine.logging.RunLogger``.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainData(Protocol):
    num_samples: int                # training samples (uids 0..num_samples-1)

    def set_keep_set(self, keep) -> None:
        """Train on the uids whose ``keep[uid]`` is true from the next epoch on (None: all)."""

    def set_augmentation(self, auto_augment: str, reprob: float) -> None:
        """Another RandAugment policy string and random-erasing probability from the next epoch on."""

    def set_decode_size(self, size: int) -> None:
        """Crop training images to ``size`` px (at most the model's input size) from the next epoch on."""

    def images_by_uid(self, uids) -> torch.Tensor:
        """The stored (unaugmented) images of ``uids``, float [n, 3, H, W]."""


@runtime_checkable
class TokenStageOps(Protocol):
    """Hook points and per-forward token bookkeeping of the model's token stage."""
    num_prefix_tokens: int
    training: bool                  # the running forward's model is in train mode
    primary: bool                   # the running forward is the engine's own model (not a copy)
    positions: Optional[torch.Tensor]   # [B, N]: every current token's index in the embedded sequence
    active_blocks: Optional[list]   # elastic depth, read-only here: set_active_blocks changes it

    def attach(self, model: torch.nn.Module, primary: bool = True): ...
    def add_after_embed(self, fn: Callable) -> None: ...
    def add_before_block(self, index: int, fn: Callable) -> None: ...
    def set_attn_mask(self, index: int, fn: Callable) -> None: ...
    def add_after_attention(self, index: int, fn, need: str = "cls", order: int = 0) -> None: ...
    def remove(self, fn) -> None: ...
    def set_active_blocks(self, blocks: Optional[list]) -> None: ...
    def current_positions(self, x: torch.Tensor) -> torch.Tensor: ...
    def gather(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor: ...
    def keep_positions(self, x: torch.Tensor, idx: torch.Tensor) -> None: ...
    def append_position(self, position: torch.Tensor) -> None: ...
    def note_merge(self, merged: torch.Tensor, host: torch.Tensor) -> None: ...
    def scratch(self, owner) -> dict: ...


@runtime_checkable
class RunLog(Protocol):
    """Rank 0 writes; the others accept and drop."""

    # written at the next logging interval's step, or at ``step`` when given (then a python number)
    def scalar(self, name: str, value, step: Optional[int] = None) -> None: ...
    def image(self, name: str, img: torch.Tensor, step: Optional[int] = None) -> None: ...
    def histogram(self, name: str, values) -> None: ...
    def info(self, msg: str, *args) -> None: ...
