"""Finding the checkpoint to resume from, and resuming on another number of ranks.

A run checkpointed on ``R`` ranks resumes on ``R'`` ranks with ``checkpoint.resume=auto`` and nothing
else to do:

* model and optimizer: a tag whose optimizer state is partitioned (ZeRO 1-3, DeepSpeed's bf16
  optimizer) is converted once to DeepSpeed's universal format by DeepSpeed's own ``ds_to_universal``
  (kept inside the tag, ``universal/``) and loaded with ``checkpoint.load_universal``; an unpartitioned
  one (ZeRO 0, fp32) loads as it is. DeepSpeed's ZeRO-3 universal loader gives every parameter group
  the first group's hyper-parameters (``stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``,
  DeepSpeed 0.19.8): the no-decay group would get weight decay. ``restore_group_settings`` puts each
  group's own weight decay (and layer decay's ``lr_scale``) back (tested).
* progress and replicated plugin states: rank 0's files, as on the same world size. The run length
  and the batches do not depend on the world size (``dsvit.data.pipeline``: the global batch is made
  of ``data.streams`` streams), so the run continues with the very samples it would have trained on:
  the global sample count and order are preserved, only which rank decodes which stream changes.
* per-rank plugin states (e.g. example pruning's events of the unfinished epoch, AutoProg's scoring
  batches): the plugin's ``reshard_rank_state`` maps every old rank's state to the new rank's; a plugin
  with per-rank state and no such method is refused by name.
* RNG: each rank is reseeded from (run.seed, rank, step): the augmentation does not use these RNGs
  (it is seeded per stream and batch), but dropout and drop-path draw other numbers than the
  uninterrupted run would have.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dsvit.engine import checkpoint as ckpt
from dsvit.errors import RunStateError

log = logging.getLogger("dsvit")


@dataclass(frozen=True)
class ResumePoint:
    tag_dir: Path
    marker: dict
    world_size: int           # the world size that wrote the tag
    universal: bool           # load through DeepSpeed's universal format


def find(where: str, ckpt_dir: Path, rank: int, plugin_names: list) -> Optional[Path]:
    """The tag to resume from, decided on rank 0: the newest intact one for ``auto`` (newer damaged
    ones are skipped with a warning), or the path given (refused if damaged)."""
    if not where:
        return None
    if where == "auto":
        tag_dir, skipped = ckpt.find_resumable(ckpt_dir) if rank == 0 else (None, [])
        for line in skipped:
            log.warning("checkpoint.resume=auto skips a damaged checkpoint: %s", line)
        tag_dir = ckpt.agree(tag_dir)
        if tag_dir is None:
            log.info("no intact checkpoint in %s: starting fresh", ckpt_dir)
            return None
    else:
        tag_dir = Path(where)
        wrong = ckpt.problems(tag_dir)
        if wrong:
            raise RunStateError(f"checkpoint {tag_dir} is damaged: {'; '.join(wrong)}; resume from "
                               f"another tag, or use checkpoint.resume=auto (the newest intact one)")
    ckpt.check_compatible(ckpt.read_marker(tag_dir), {"plugins": sorted(plugin_names)}, tag_dir)
    return tag_dir


def point(tag_dir: Optional[Path], world_size: int) -> Optional[ResumePoint]:
    if tag_dir is None:
        return None
    marker = ckpt.read_marker(tag_dir)
    then = int(marker.get("world_size", world_size))
    return ResumePoint(tag_dir, marker, then, then != world_size and ckpt.needs_universal(tag_dir))


def with_universal_load(ds_config: dict, resume: Optional[ResumePoint]) -> dict:
    """The DeepSpeed config to build the first engine with: ``checkpoint.load_universal`` when the
    resume goes through the universal format (DeepSpeed reads it when loading, not when saving)."""
    if resume is None or not resume.universal:
        return ds_config
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def rank_plugin_states(resume: ResumePoint, plugins, rank: int, world_size: int) -> dict:
    """This rank's per-rank plugin states: its own file on the same world size, else every old
    rank's states resharded by the plugins."""
    if resume.world_size == world_size:
        return ckpt.read_rank_state(resume.tag_dir, rank)["plugins"]
    every = [ckpt.read_rank_state(resume.tag_dir, r)["plugins"] for r in range(resume.world_size)]
    log.info("resuming %s, written on %d rank(s), on %d: per-rank plugin states resharded%s",
             resume.tag_dir, resume.world_size, world_size,
             ", optimizer state through DeepSpeed's universal format" if resume.universal else "")
    return plugins.reshard_rank_states(every, rank, world_size)


GROUP_SETTINGS = ("weight_decay", "lr_scale")   # what dsvit sets per group (lr_scale: layer decay)


def group_settings(optimizer) -> list:
    """Each parameter group's weight decay and LR scale, as dsvit built them (see
    ``restore_group_settings``)."""
    return [{k: g[k] for k in GROUP_SETTINGS if k in g} for g in optimizer.param_groups]


def restore_group_settings(optimizer, settings: list) -> None:
    """Undo two flaws of DeepSpeed's ZeRO-3 universal loader (0.19.8): every group gets the first
    group's hyper-parameters, and every group's Adam state gets the *same* ``step`` tensor object,
    which torch's Adam then increments once per group and step (bias corrections drift)."""
    for g, built in zip(optimizer.param_groups, settings):
        g.update(built)
    for st in optimizer.state.values():
        if torch.is_tensor(st.get("step")):
            st["step"] = st["step"].clone()


def reslice_batch(parts: list, rank: int, world_size: int, dim: int = 0):
    """Rank ``rank``'s share (of ``world_size``) of the global batch that ``parts`` (every old rank's
    share, in rank order) make along ``dim``: rank r's micro-batch is the r-th slice of the global one
    (``dsvit.data.pipeline``), so per-batch state reshards by concatenating and slicing again."""
    whole = torch.cat(list(parts), dim)
    if whole.shape[dim] % world_size:
        raise ValueError(f"a global batch of {whole.shape[dim]} does not split over {world_size} ranks")
    k = whole.shape[dim] // world_size
    return whole.narrow(dim, rank * k, k).clone()


# keys that say how to start this launch, not what the run is
LAUNCH_KEYS = ("checkpoint.resume", "run.overwrite")


def changed_settings(recorded: dict, now: dict) -> list[str]:
    """``section.key: recorded -> now`` for every setting this launch changes against the run's
    recorded config (RUN_DIR/config.yaml, ``config.to_dict`` form). The checkpoint's marker already
    refused what would make the resume wrong (architecture, batch, run length, streams, plugins);
    the rest (learning rate, augmentation, evaluation, logging) may change on purpose, so it is said
    once, in a warning, rather than refused."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    a, b = flat(recorded), flat(now)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in LAUNCH_KEYS and a.get(k) != b.get(k)]
