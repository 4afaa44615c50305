"""Build a timm VisionTransformer from a ModelConfig and attach the token stage."""
from __future__ import annotations

import torch
import timm

from dsvit.config import ModelConfig
from dsvit.model.token_stage import TokenStage


def timm_kwargs(cfg: ModelConfig, num_classes: int) -> dict:
    kw = dict(img_size=cfg.img_size, num_classes=num_classes, drop_path_rate=cfg.drop_path_rate,
              global_pool=cfg.global_pool)
    for key in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        value = getattr(cfg, key)
        if value is not None:
            kw[key] = value
    if cfg.dynamic_img_size:   # resampled per forward from the one full-size table (never replaced)
        kw["dynamic_img_size"] = True
    return kw


def create_vit(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    """A plain timm model (random init), exactly what ``dsvit export`` produces weights for."""
    model = timm.create_model(cfg.name, pretrained=False, **timm_kwargs(cfg, num_classes))
    if not hasattr(model, "blocks") or not hasattr(model, "_pos_embed"):
        raise TypeError(f"model.name '{cfg.name}' is not a timm VisionTransformer-style model "
                        "(needs patch_embed, _pos_embed, blocks); pick a vit_*/deit_* model")
    return model


def build_model(cfg: ModelConfig, num_classes: int) -> tuple[torch.nn.Module, TokenStage]:
    model = create_vit(cfg, num_classes)
    # The token stage checkpoints each block itself; timm's flag just switches it on.
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    stage = TokenStage().attach(model)
    return model, stage


def num_patches(model: torch.nn.Module) -> int:
    return int(model.patch_embed.num_patches)
