"""Read trained weights out of a dsvit checkpoint as a plain timm state dict, and export them.

Every checkpoint holds the full fp32 weights (and the EMA's) as safetensors files, written by rank 0
whatever the ZeRO stage, so reading them needs neither DeepSpeed nor unpickling. The keys are timm's
own (the token stage adds no parameters), so ``timm.create_model(...,
pretrained_cfg_overlay=dict(file=...))`` loads the exported file.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from dsvit.engine import checkpoint as ckpt


def resolve_tag(run_dir: Path, tag: str = "") -> Path:
    """The named tag, or the newest intact one (newer damaged ones are named on stderr)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if tag:
        tag_dir = ckpt_dir / tag
        ckpt.read_marker(tag_dir)
        wrong = ckpt.problems(tag_dir)
        if wrong:
            raise ValueError(f"checkpoint {tag_dir} is damaged: {'; '.join(wrong)}; pick another --tag")
        return tag_dir
    tag_dir, skipped = ckpt.find_resumable(ckpt_dir)
    for line in skipped:
        print(f"dsvit: skipping a damaged checkpoint: {line}", file=sys.stderr)
    if tag_dir is None:
        raise FileNotFoundError(f"no intact checkpoint under {ckpt_dir}: train first (dsvit train "
                                f"run.dir={run_dir}) or name a tag with --tag")
    return tag_dir


def load_weights(tag_dir: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """fp32 timm state dict of the model (or its EMA) saved in ``tag_dir``: a safetensors file,
    so a checkpoint from someone else runs no code here."""
    if ema and not (tag_dir / "ema.safetensors").is_file():
        raise ValueError(f"{tag_dir} holds no EMA weights (the run had train.ema_decay=0); "
                         "export without --ema")
    return {k: v.float() for k, v in ckpt.read_weights(tag_dir, "ema" if ema else "weights").items()}


def export_safetensors(tag_dir: Path, out: Path, ema: bool = False) -> Path:
    from safetensors.torch import save_file
    weights = load_weights(tag_dir, ema=ema)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out))
    return out
