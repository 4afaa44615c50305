"""Build a timm VisionTransformer from a ModelConfig and attach the token stage."""
from __future__ import annotations

import dataclasses

import torch
import timm

from dsvit.config import ModelConfig
from dsvit.model import surgery
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


def compile_blocks(model: torch.nn.Module) -> None:
    """``torch.compile`` every block in place, with dynamic shapes: the token counts the plugins
    produce change with their schedules (ToE stages, growth's input sizes, the token level's
    annealing), and symbolic sequence lengths keep the recompiles to a few per block instead of one
    per count. The token stage's Python loop and its hooks stay eager (they are between blocks).
    Measured on CPU (inductor, default model): 1.00x per step after a 10 s compile, so off by
    default; on GPUs the fused element-wise ops are where it can pay (not measured yet)."""
    for blk in model.blocks:
        blk.compile(dynamic=True)


def meta_model(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    """The model on the meta device: shapes and parameter count, no memory, no initialisation."""
    with torch.device("meta"):
        return create_vit(cfg, num_classes)


def num_patches(model: torch.nn.Module) -> int:
    return int(model.patch_embed.num_patches)


def build_plain(model_cfg, num_classes: int, **overrides) -> torch.nn.Module:
    """A fresh plain timm model from ``model_cfg`` with ``overrides`` (e.g. depth=6), built without
    touching the training RNG (timm's initialisation draws from it; a rebuild must not shift dropout
    or augmentation streams)."""
    with torch.random.fork_rng(devices=[]):
        return create_vit(dataclasses.replace(model_cfg, **overrides), num_classes)


def remapped_model(model_cfg, num_classes: int, old_state: dict, src: list[int],
                   **overrides) -> torch.nn.Module:
    """A ``len(src)``-block plain model whose weights are ``old_state`` remapped through ``src``."""
    model = build_plain(model_cfg, num_classes, depth=len(src), **overrides)
    model.load_state_dict(surgery.remap_state_dict(old_state, src, like=model.state_dict()))
    return model


def describe_model(cfg: ModelConfig, model: torch.nn.Module) -> str:
    """One line: the architecture that trains now (depth, width, heads, patch, input size) and its
    parameter count (ZeRO-3's partitioned parameters counted whole); where a plugin starts it
    smaller (growth), the configured full depth too."""
    blocks = model.blocks
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    line = (f"{cfg.name}: {len(blocks)} blocks x {model.embed_dim} ({blocks[0].attn.num_heads} heads), "
            f"patch {model.patch_embed.patch_size[0]}, {cfg.img_size} px, {params / 1e6:.2f}M parameters")
    if cfg.depth is not None and cfg.depth != len(blocks):
        line += f" (grows to {cfg.depth} blocks)"
    return line
