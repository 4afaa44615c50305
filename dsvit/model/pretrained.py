"""Starting a run from pretrained weights (``model.init``): read them, fit them to the model built
here, load them, on every rank.

Every rank builds the model from the same seed and loads the same bytes, so the weights are identical
everywhere without a broadcast; DeepSpeed partitions them (ZeRO-3) only later, at ``initialize``.
A resumed run does not come here: its weights are the checkpoint's (``dsvit.engine.build``).

Sources (``read_source``):

- a weights file: ``.safetensors`` (``dsvit export``'s output, timm's hub files) read without running
  any code; ``.pth``/``.pt``/``.bin`` read with ``torch.load(weights_only=True)``, so a file whose
  pickle holds more than tensors and plain containers (an ``argparse.Namespace`` of a training
  checkpoint, a whole pickled model) is refused with what to do, rather than unpickled. Common
  wrappers are unwrapped (``{"model": ...}`` of DeiT/MAE/BEiT releases, ``{"state_dict": ...}``,
  ``{"module": ...}`` of DeepSpeed) and a ``module.`` / ``_orig_mod.`` prefix shared by every key
  (DDP, ``torch.compile``) is removed;
- a dsvit run folder (its newest intact checkpoint) or one checkpoint tag folder: read by the
  engine's export path, passed in as ``read_run`` (the model layer imports nothing from the engine).

Fitting (``fit_to_model``), as timm does when it loads its own pretrained weights:

- timm's ``vision_transformer.checkpoint_filter_fn`` converts the layouts it knows (OpenAI CLIP,
  OpenCLIP, DINOv2, ...), resamples the position table to this model's patch grid with
  ``resample_abs_pos_embed`` (bicubic, the prefix tokens kept apart, ``no_embed_class`` honoured) and
  the patch-embedding kernel to this patch size with ``resample_patch_embed`` (FlexiViT's
  pseudo-inverse resize: Beyer et al., "FlexiViT: One Model for All Patch Sizes", CVPR 2023);
- the classifier head is left as built (timm's initialisation) when the file's class count differs
  or the file has no head (a self-supervised backbone: MAE, BEiT, DINO), as timm's ``load_pretrained``
  does for another ``num_classes``;
- everything else must fit exactly: keys the model lacks, keys the file lacks and shapes that differ
  are named in the error, with the architecture keys to set.

The token stage is a plain object, not a module (``dsvit.model.token_stage``), so the model's
``state_dict`` has timm's own names, and those are what the file is matched against.
"""
from __future__ import annotations

import logging
import math
import pickle
import re
from pathlib import Path
from typing import Callable

import torch

from dsvit.errors import ConfigError

log = logging.getLogger("dsvit")

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
WRAPPERS = ("model", "state_dict", "module")      # DeiT/MAE/BEiT, Lightning/timm, DeepSpeed
PREFIXES = ("module.", "_orig_mod.")               # DDP, torch.compile
RunReader = Callable[[Path, str], dict]            # (run dir, tag or "") -> fp32 timm state dict


def read_file(path: Path) -> dict:
    """The tensors of a weights file (wrappers and prefixes removed)."""
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ConfigError(f"model.init {path}: unknown weights format '{path.suffix}'; give a "
                          f"{'/'.join(WEIGHT_SUFFIXES)} file or a dsvit run/checkpoint folder")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return unwrap(load_file(str(path)), path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed|\. |$)", str(e), re.M)
        reason = found.group(1) if found else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"model.init {path}: the file holds more than weights (torch.load(weights_only=True) "
            f"refused it: {reason}), and unpickling more could run code from the file: re-save it "
            f"with torch.save(model.state_dict()) or convert to safetensors") from None
    return unwrap(obj, path)


def unwrap(obj, path: Path) -> dict:
    """The state dict inside common checkpoint wrappers, with a prefix every key shares removed."""
    while isinstance(obj, dict):
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)} if isinstance(obj, dict) else {}
    if not tensors:
        raise ConfigError(f"model.init {path}: no tensors found (looked inside {list(WRAPPERS)}); "
                          f"give a state dict saved with torch.save(model.state_dict())")
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def read_source(path: Path, read_run: RunReader) -> dict:
    """The state dict ``model.init`` names: a weights file, a run folder or a checkpoint tag."""
    if path.is_dir():
        if (path / "checkpoints").is_dir():        # RUN: its newest intact checkpoint
            return read_run(path, "")
        if path.parent.name == "checkpoints":      # RUN/checkpoints/TAG
            return read_run(path.parent.parent, path.name)
        raise ConfigError(f"model.init {path} is a folder but neither a dsvit run folder (with "
                          f"checkpoints/) nor a checkpoint tag (RUN/checkpoints/stepNNNNNNNN)")
    if not path.is_file():
        raise ConfigError(f"model.init {path} does not exist")
    return read_file(path)


def head_keys(model: torch.nn.Module) -> set:
    """The classifier's state-dict keys (timm names the classifier modules in its pretrained_cfg)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    names = (names,) if isinstance(names, str) else tuple(names)
    return {k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)}


def _names(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _depth(keys) -> int:
    return 1 + max((int(k.split(".")[1]) for k in keys if k.startswith("blocks.")), default=-1)


def _architecture_hint(state: dict, own: dict) -> str:
    hints = []
    blocks = _depth(state)
    if blocks != _depth(own):
        hints.append(f"the file has {blocks} blocks, the model {_depth(own)}: model.depth={blocks}")
    width = [t.shape[-1] for t in (state.get("cls_token"), own.get("cls_token")) if t is not None]
    if len(width) == 2 and width[0] != width[1]:
        hints.append(f"the file's width is {width[0]}, the model's {width[1]}: model.embed_dim={width[0]} "
                     f"(and model.num_heads)")
    if ("fc_norm.weight" in state) != ("fc_norm.weight" in own):
        hints.append("one pools with fc_norm, the other with norm: set model.global_pool as the file was "
                     "trained (avg for fc_norm, token for norm)")
    return "; ".join(hints) or ("set model.name / depth / embed_dim / num_heads / mlp_ratio / "
                                "global_pool to the architecture the file was trained as")


def fit_to_model(model: torch.nn.Module, state: dict, where: str) -> tuple[dict, list[str]]:
    """``state`` converted and resampled for ``model`` (head left out where it does not fit), and a
    line per change; raises ConfigError naming every key that does not fit."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    own, heads = model.state_dict(), head_keys(model)
    before = {k: tuple(v.shape) for k, v in state.items()}
    state = checkpoint_filter_fn(state, model)
    notes = []
    pos = "pos_embed"
    if pos in state and before.get(pos) != tuple(state[pos].shape):
        grid = "x".join(str(g) for g in model.patch_embed.grid_size)
        notes.append(f"position table resampled from {before[pos][1]} to {state[pos].shape[1]} "
                     f"positions ({grid} patches, timm.layers.resample_abs_pos_embed)")
    kernel = "patch_embed.proj.weight"
    if kernel in state and before.get(kernel) != tuple(state[kernel].shape):
        notes.append(f"patch embedding resampled from {before[kernel][-2]}x{before[kernel][-1]} to "
                     f"{state[kernel].shape[-2]}x{state[kernel].shape[-1]} pixels "
                     f"(timm.layers.resample_patch_embed)")
    file_heads = heads & set(state)
    if file_heads and any(state[k].shape != own[k].shape for k in file_heads):
        classes = [state[k].shape[0] for k in sorted(file_heads) if k.endswith("weight")]
        notes.append(f"classifier head re-initialised: the file has {classes[0] if classes else '?'} "
                     f"classes, the model {model.num_classes}")
        state = {k: v for k, v in state.items() if k not in heads}
    elif not file_heads and heads:
        notes.append("the file has no classifier head (a backbone): the model's head is left as built")
    unexpected = set(state) - set(own)
    missing = set(own) - set(state) - heads
    shapes = [f"{k} (file {list(state[k].shape)}, model {list(own[k].shape)})"
              for k in sorted(set(state) & set(own)) if state[k].shape != own[k].shape]
    if unexpected or missing or shapes:
        problems = ([f"keys the model lacks: {_names(unexpected)}"] if unexpected else []) + \
                   ([f"keys the file lacks: {_names(missing)}"] if missing else []) + \
                   ([f"shapes that differ: {_names(shapes, 4)}"] if shapes else [])
        raise ConfigError(f"model.init {where} does not fit this model: {'; '.join(problems)}. "
                          f"Fix: {_architecture_hint(state, own)}; or re-save the file with only "
                          f"the timm model's own weights (a state dict of the same timm model)")
    return state, notes


def load_pretrained(model: torch.nn.Module, init: str, rank: int, read_run: RunReader) -> None:
    """Load ``model.init`` into the freshly built ``model`` (every rank; logged on rank 0)."""
    path = Path(init)
    state, notes = fit_to_model(model, read_source(path, read_run), str(path))
    full = model.state_dict()
    full.update(state)                 # the head, where it did not fit, stays as built
    model.load_state_dict(full)
    if rank == 0:
        count = sum(math.prod(v.shape) for v in state.values())
        log.info("model.init: %d tensors (%.2fM values) from %s%s", len(state), count / 1e6, path,
                 "".join(f"; {n}" for n in notes))
