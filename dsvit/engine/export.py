"""Read trained weights out of a dsvit checkpoint as a plain timm state dict, and export them.

ZeRO 0 checkpoints hold the full module in ``mp_rank_00_model_states.pt``; ZeRO 1-3 hold the fp32
master weights in per-rank optimizer shards, which DeepSpeed's ``zero_to_fp32`` consolidates. The
EMA weights live in the checkpoint's client state. Either way the keys are timm's own (the token
stage adds no parameters), so ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))`` loads
the exported file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dsvit.engine import checkpoint as ckpt


def resolve_tag(run_dir: Path, tag: str = "") -> Path:
    ckpt_dir = Path(run_dir) / "checkpoints"
    tag_dir = ckpt_dir / tag if tag else ckpt.find_latest(ckpt_dir)
    if tag_dir is None:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt_dir}: train first (dsvit train "
                                f"run.dir={run_dir}) or name a tag with --tag")
    ckpt.read_marker(tag_dir)
    return tag_dir


def load_client_state(tag_dir: Path) -> dict:
    """Rank 0's model-states file: the module (ZeRO 0-2) and the client state (ZeRO-3 names it
    per data-parallel rank)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return torch.load(tag_dir / name, map_location="cpu", weights_only=False)
    raise FileNotFoundError(f"{tag_dir} has no DeepSpeed model-states file; is it a dsvit checkpoint?")


def load_weights(tag_dir: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """fp32 timm state dict of the model (or its EMA) saved in ``tag_dir``."""
    states = load_client_state(tag_dir)
    if ema:
        if states.get("ema") is None:
            raise ValueError(f"{tag_dir} holds no EMA weights (the run had train.ema_decay=0); "
                             "export without --ema")
        return {k: v.float() for k, v in states["ema"].items()}
    if ckpt.read_marker(tag_dir).get("zero_stage", 0) == 0:
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def export_safetensors(tag_dir: Path, out: Path, ema: bool = False) -> Path:
    from safetensors.torch import save_file
    weights = load_weights(tag_dir, ema=ema)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out))
    return out
