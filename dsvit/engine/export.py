"""Read trained weights out of a dsvit checkpoint as a plain timm state dict, and export them.

Every checkpoint holds the full fp32 weights (and the EMA's) as safetensors files, written by rank 0
whatever the ZeRO stage, so reading them needs neither DeepSpeed nor unpickling. The keys are timm's
own (the token stage adds no parameters), so ``timm.create_model(...,
pretrained_cfg_overlay=dict(file=...))`` loads the exported file.

The architecture comes from the checkpoint, not from ``RUN_DIR/config.yaml``: the ``COMPLETE``
marker records the model as it was at that step (a grown depth included), and a ``config.yaml``
beside the checkpoints may belong to another run. ``checkpoint_model`` takes every architecture
field the marker holds (markers before num_heads/mlp_ratio/global_pool were recorded fall back to
config.yaml for those) and names each field config.yaml disagrees on; ``check_fits`` then refuses
weights whose names or shapes the model built from that does not have, naming them, before anything
is written or evaluated.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from dsvit import config as C
from dsvit.engine import checkpoint as ckpt
from dsvit.errors import MissingFileError, RunStateError

# marker field -> model.* field: the architecture a checkpoint records (Trainer.fingerprint)
ARCH_FIELDS = {"model": "name", "img_size": "img_size", "patch_size": "patch_size",
               "embed_dim": "embed_dim", "depth": "depth", "num_heads": "num_heads",
               "mlp_ratio": "mlp_ratio", "global_pool": "global_pool", "num_classes": "num_classes"}


def resolve_tag(run_dir: Path, tag: str = "") -> Path:
    """The named tag, or the newest intact one (newer damaged ones are named on stderr)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if tag:
        tag_dir = ckpt_dir / tag
        ckpt.read_marker(tag_dir)
        wrong = ckpt.problems(tag_dir)
        if wrong:
            raise RunStateError(f"checkpoint {tag_dir} is damaged: {'; '.join(wrong)}; pick another --tag")
        return tag_dir
    tag_dir, skipped = ckpt.find_resumable(ckpt_dir)
    for line in skipped:
        print(f"dsvit: skipping a damaged checkpoint: {line}", file=sys.stderr)
    if tag_dir is None:
        raise MissingFileError(f"no intact checkpoint under {ckpt_dir}: train first (dsvit train "
                                f"run.dir={run_dir}) or name a tag with --tag")
    return tag_dir


def load_weights(tag_dir: Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """fp32 timm state dict of the model (or its EMA) saved in ``tag_dir``: a safetensors file,
    so a checkpoint from someone else runs no code here."""
    if ema and not (tag_dir / "ema.safetensors").is_file():
        raise C.ConfigError(f"{tag_dir} holds no EMA weights (the run had train.ema_decay=0); "
                         "export without --ema")
    return {k: v.float() for k, v in ckpt.read_weights(tag_dir, "ema" if ema else "weights").items()}


def checkpoint_model(tag_dir: Path, model: C.ModelConfig) -> tuple[C.ModelConfig, list[str]]:
    """``model`` (from config.yaml) with the architecture the checkpoint's marker records, and a
    line for every field where the two disagree (the checkpoint's value is the one used)."""
    marker = ckpt.read_marker(tag_dir)
    recorded = {field: marker[key] for key, field in ARCH_FIELDS.items() if key in marker}
    recorded.update(marker.get("architecture", {}))   # what the plugins declared (e.g. a grown depth)
    notes = [f"model.{k}: config.yaml has {getattr(model, k)!r}, the checkpoint {v!r}"
             for k, v in recorded.items() if getattr(model, k) != v]
    return dataclasses.replace(model, **recorded), notes


def check_fits(model: torch.nn.Module, weights: dict, tag_dir: Path, notes: list[str]) -> None:
    """Refuse weights the model built for them cannot hold, naming the first differences."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    diffs = [f"{k}: checkpoint {tuple(v.shape)}, model {want[k]}" for k, v in weights.items()
             if k in want and tuple(v.shape) != want[k]]
    diffs += [f"{k}: only in the checkpoint" for k in weights if k not in want]
    diffs += [f"{k}: missing from the checkpoint" for k in want if k not in weights]
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        why = f" (config.yaml disagrees with the checkpoint: {'; '.join(notes)})" if notes else ""
        raise RunStateError(f"the weights in {tag_dir} do not fit the model its marker and config.yaml "
                         f"describe: {shown}{why}; pass the right run directory")


def create_model_call(model: C.ModelConfig, out: Path) -> str:
    """The ``timm.create_model`` call that loads an exported file into this architecture."""
    from dsvit.model.vit import timm_kwargs
    kw = timm_kwargs(model, model.num_classes)
    kw.pop("drop_path_rate", None)
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    return (f"timm.create_model({model.name!r}, pretrained=True, pretrained_cfg_overlay=dict("
            f"file={str(out)!r}, num_classes={model.num_classes}), {args})")


def export(run_dir: Path, out: Path, tag: str = "", ema: bool = False) -> str:
    """Write the checkpoint's weights to ``out`` (after checking they fit the architecture the
    checkpoint records); returns what to print: the file and how to load it."""
    from dsvit.model.vit import meta_model
    tag_dir = resolve_tag(run_dir, tag)
    cfg_file = Path(run_dir) / "config.yaml"
    base = C.load_resolved(cfg_file).model if cfg_file.is_file() else C.ModelConfig()
    model_cfg, notes = checkpoint_model(tag_dir, base)
    weights = load_weights(tag_dir, ema=ema)
    check_fits(meta_model(model_cfg, model_cfg.num_classes), weights, tag_dir, notes)   # shapes only
    for line in notes:
        print(f"dsvit export: {line}; using the checkpoint's", file=sys.stderr)
    from safetensors.torch import save_file
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out))
    return (f"wrote {out} from {tag_dir}{' (EMA)' if ema else ''}\nload it with: "
            f"{create_model_call(model_cfg, out)}")
