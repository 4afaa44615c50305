"""Checkpoints: DeepSpeed save/load with tags, a completeness marker, keep-last-N, auto resume.

Layout under ``RUN_DIR/checkpoints/``::

    step00001200/            one DeepSpeed tag (model + optimizer shards, client_state)
        rng_rank{r}.pt       each rank's RNG states (client_state is written by rank 0 only)
        COMPLETE             written by rank 0 after every rank finished writing (a barrier)
    latest                   name of the newest complete tag (atomic replace)

A run killed at any moment leaves at worst a tag without ``COMPLETE``; ``find_latest`` never picks
it, and the next successful save removes it. DeepSpeed's own ``latest`` file is not used because it
is written before the other ranks are known to have finished.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_tags(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if (p / MARKER).is_file())


def find_latest(ckpt_dir: Path) -> Optional[Path]:
    tags = complete_tags(ckpt_dir)
    return ckpt_dir / tags[-1] if tags else None


def read_marker(tag_dir: Path) -> dict:
    marker = tag_dir / MARKER
    if not marker.is_file():
        raise FileNotFoundError(
            f"{tag_dir} is not a complete dsvit checkpoint (no {MARKER} marker: it was interrupted "
            f"while being written, or is not a dsvit checkpoint); resume from an earlier tag or "
            f"checkpoint.resume=auto")
    return json.loads(marker.read_text())


def save(engine, ckpt_dir: Path, step: int, client_state: dict, meta: dict, rank: int, keep_last: int) -> Path:
    """Collective: every rank calls it at the same step."""
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():   # a leftover from a killed save of this very step
        shutil.rmtree(tag_dir)
    _barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), tag_dir / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        _atomic_write(tag_dir / MARKER, json.dumps(dict(meta, step=step, tag=tag), indent=1))
        _atomic_write(ckpt_dir / "latest", tag)
        _prune(ckpt_dir, keep_last, keep=tag)
    _barrier()
    return tag_dir


def _prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    complete = complete_tags(ckpt_dir)
    doomed = complete[:-keep_last]
    doomed += [p.name for p in ckpt_dir.iterdir()
               if p.is_dir() and p.name not in complete and p.name != keep]   # interrupted saves
    for name in doomed:
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)


def check_compatible(meta: dict, expected: dict, tag_dir: Path) -> None:
    """Refuse a checkpoint written by a run with another model/world layout, naming the difference."""
    diffs = [f"{k}: checkpoint has {meta.get(k)!r}, this run has {v!r}"
             for k, v in expected.items() if meta.get(k) != v]
    if diffs:
        raise RuntimeError(
            f"checkpoint {tag_dir} does not belong to this run's setup:\n  " + "\n  ".join(diffs) +
            "\nresume with the same model/plugins/world size, or start a new run directory")


def load(engine, tag_dir: Path, rank: int) -> dict:
    """Collective: load model/optimizer into the engine; returns client_state; restores this rank's RNG."""
    _, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                             load_optimizer_states=True, load_lr_scheduler_states=False)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    rng_file = tag_dir / f"rng_rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
