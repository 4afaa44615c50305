"""Checkpoints: DeepSpeed save/load with tags, a completeness marker, keep-last-N, auto resume.

Layout under ``RUN_DIR/checkpoints/``::

    step00001200/            one DeepSpeed tag (model + optimizer shards, client_state: EMA)
        dsvit_state.pt       rank 0: progress, the model's architecture and the replicated plugin
                             states; read before the engine is built, so a resume builds the
                             right (e.g. grown) model first and then loads DeepSpeed's files into it
        rank{r}_state.pt     each rank's RNG states and per-rank plugin states
        weights.safetensors  the model's full fp32 weights (and ema.safetensors): what eval/export read
        universal/           made on the first resume on another world size: the tag in DeepSpeed's
                             universal format (``ds_to_universal``), which any number of ranks loads
        COMPLETE             written by rank 0 after every rank finished writing (a barrier): the
                             fingerprint of the run, its run id, and every file's size
    latest                   name of the newest complete tag (atomic replace)

A run killed at any moment leaves at worst a tag without ``COMPLETE``; ``find_resumable`` never picks
it, and the next successful save removes it (also one of the very step it saves: another live run's
save in progress cannot be behind it, since a run holds ``RUN_DIR/run.lock`` for its whole life,
``dsvit.engine.run_folder``). DeepSpeed's own ``latest`` file is not used because it
is written before the other ranks are known to have finished. A tag whose files do not have the sizes
its marker recorded (truncated, half copied) is skipped by ``resume=auto`` with a warning.

A write that fails for lack of space (``ENOSPC``, or torch's bare ``basic_ios::clear: iostream
error`` while the disk has less free space than a checkpoint takes) ends the run with one line: the
tag, the path, the free space, about what a tag needs (the last complete tag's size) and that the last
complete tag is intact -- it is, since a tag counts only once ``COMPLETE`` is written after all its
files; the unfinished tag is removed to give its space back. Every rank learns of any rank's failure
in the collective that follows our own writes (a failure inside DeepSpeed's writer is reported the
same way when every rank fails there, as on one shared full disk).

The marker's fields other than the run's fingerprint (``Trainer.fingerprint``, compared on resume)
are listed in ``MAY_DIFFER`` with the reason a resume may differ in them.

Trust: dsvit's own files hold tensors, numbers and strings only and load with
``torch.load(weights_only=True)``; ``dsvit eval``/``export`` read only those and the safetensors
files, so evaluating someone else's checkpoint runs none of its code. Resuming goes through
DeepSpeed's loader, which unpickles its optimizer files: resume only from checkpoints you trust.
Keep-last pruning only removes tags of this run (same run id).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from dsvit.engine import disk_space as space
from dsvit.errors import MissingFileError, RunStateError

MARKER = "COMPLETE"
RUN_STATE = "dsvit_state.pt"
UNIVERSAL = "universal"
# marker fields a resume may differ in, and why; every other field is the fingerprint, compared
MAY_DIFFER = {
    "run_id": "the run's identity: a resume adopts it",
    "world_size": "a run resumes on any number of ranks (dsvit.engine.resume: the batches do not "
                  "depend on it)",
    "step": "where the run stands, not what it is",
    "tag": "where the run stands, not what it is",
    "files": "what the tag holds, checked by problems()",
}
# the setting that changes each fingerprint field, for the refusal's fix
SETTING = {"model": "model.name", "img_size": "model.img_size", "patch_size": "model.patch_size",
           "embed_dim": "model.embed_dim", "depth": "model.depth", "num_heads": "model.num_heads",
           "mlp_ratio": "model.mlp_ratio", "global_pool": "model.global_pool",
           "data_streams": "data.streams", "batch_size": "train.batch_size",
           "zero_stage": "run.zero_stage"}


def rank_file(rank: int) -> str:
    return f"rank{rank}_state.pt"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    """Every RNG's state as tensors, numbers and strings (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
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


def read_marker(tag_dir: Path) -> dict:
    marker = tag_dir / MARKER
    if not marker.is_file():
        raise MissingFileError(
            f"{tag_dir} is not a complete dsvit checkpoint (no {MARKER} marker: it was interrupted "
            f"while being written, or is not a dsvit checkpoint); resume from an earlier tag or "
            f"checkpoint.resume=auto")
    return json.loads(marker.read_text())


def save(engine, ckpt_dir: Path, step: int, client_state: dict, run_state: dict, rank_state: dict,
         weights: dict, meta: dict, rank: int, keep_last: int, engine_saved=None) -> Path:
    """Collective: every rank calls it at the same step. ``weights`` (rank 0): name -> tensor dict
    per safetensors file, e.g. {"weights": fp32 state dict, "ema": ...}. ``engine_saved(tag_dir)``
    runs right after DeepSpeed wrote its files, before ours and the marker (tests kill a run there)."""
    from safetensors.torch import save_file
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():
        old = read_marker(tag_dir) if (tag_dir / MARKER).is_file() else {}
        if old and old.get("run_id") != meta.get("run_id"):
            raise RunStateError(f"{tag_dir} holds a checkpoint of another run (run id {old.get('run_id')}); "
                               f"this run ({meta.get('run_id')}) will not overwrite it: use another run.dir")
        # a leftover from a killed save of this very step (not another run's save in progress:
        # the run folder's lock keeps other runs out)
        shutil.rmtree(tag_dir)
    _barrier()
    error = None
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        if engine_saved is not None:
            engine_saved(tag_dir)
        torch.save(dict(rank_state, rng=rng_state()), tag_dir / rank_file(rank))
        if rank == 0:
            torch.save(run_state, tag_dir / RUN_STATE)
            for name, tensors in weights.items():
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tag_dir / f"{name}.safetensors"))
    except (OSError, RuntimeError) as e:
        error = write_failure(e, ckpt_dir, tag_dir, rank)
        if error is None:
            raise
    _raise_on_any(space.first_error(error), tag_dir, rank)   # collective: in place of a barrier
    if rank == 0:
        try:
            files = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file()}
            _atomic_write(tag_dir / MARKER, json.dumps(dict(meta, step=step, tag=tag, files=files), indent=1))
            _atomic_write(ckpt_dir / "latest", tag)
            _prune(ckpt_dir, keep_last, keep=tag, run_id=meta.get("run_id"))
        except OSError as e:
            error = write_failure(e, ckpt_dir, tag_dir, rank)
            if error is None:
                raise
    _raise_on_any(agree(error), tag_dir, rank)   # collective: in place of a barrier
    return tag_dir


def tag_bytes(tag_dir: Path) -> int:
    """A complete tag's size as its marker recorded it (DeepSpeed's files and ours, every rank's)."""
    return sum(read_marker(tag_dir).get("files", {}).values())


def write_failure(error: BaseException, ckpt_dir: Path, tag_dir: Path, rank: int):
    """The one line for a checkpoint write that failed for lack of space (None for any other
    failure: the caller re-raises it as it is)."""
    last = [ckpt_dir / t for t in complete_tags(ckpt_dir) if t != tag_dir.name]
    return space.no_space_line(error, ckpt_dir, tag_dir, rank, last[-1] if last else None,
                               tag_bytes(last[-1]) if last else 0)


def _raise_on_any(error, tag_dir: Path, rank: int) -> None:
    if not error:
        return
    unfinished = not (tag_dir / MARKER).is_file()
    if rank == 0 and unfinished:   # never resumed from: give its space back
        shutil.rmtree(tag_dir, ignore_errors=True)
    raise space.CheckpointWriteError(error + (f"; the unfinished {tag_dir.name} was removed" if unfinished else ""))


def problems(tag_dir: Path) -> list[str]:
    """What is wrong with a complete-marked tag's files (missing, or not the size recorded)."""
    out = []
    for name, size in read_marker(tag_dir).get("files", {}).items():
        f = tag_dir / name
        if not f.is_file():
            out.append(f"{name} is missing")
        elif f.stat().st_size != size:
            out.append(f"{name} has {f.stat().st_size} bytes, {size} were written (truncated or "
                       f"partly copied)")
    return out


def find_resumable(ckpt_dir: Path) -> tuple[Optional[Path], list[str]]:
    """The newest complete tag whose files are intact, and a line for every newer one skipped."""
    skipped = []
    for tag in reversed(complete_tags(ckpt_dir)):
        wrong = problems(ckpt_dir / tag)
        if not wrong:
            return ckpt_dir / tag, skipped
        skipped.append(f"{ckpt_dir / tag}: {'; '.join(wrong)}")
    return None, skipped


def agree(obj):
    """Rank 0's ``obj`` on every rank (a decision made once). Collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def read_run_state(tag_dir: Path) -> dict:
    """Progress, architecture and replicated plugin states: read before any engine exists."""
    return torch.load(tag_dir / RUN_STATE, map_location="cpu", weights_only=True)


def read_rank_state(tag_dir: Path, rank: int) -> dict:
    return torch.load(tag_dir / rank_file(rank), map_location="cpu", weights_only=True)


def _digest(obj, h) -> None:
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        h.update(f"{obj.dtype}{obj.shape}".encode() + np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for x in obj:
            _digest(x, h)
    else:
        h.update(repr(obj).encode())


def state_digest(obj) -> str:
    h = hashlib.sha256()
    _digest(obj, h)
    return h.hexdigest()


def check_replicated(states: dict) -> None:
    """Collective: every plugin's ``state_dict`` (replicated by contract) must be identical on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = {name: state_digest(st) for name, st in states.items()}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    for name in mine:
        ranks = [r for r, d in enumerate(every) if d[name] != every[0][name]]
        if ranks:
            raise RuntimeError(
                f"plugin '{name}' declares its state replicated, but rank(s) {ranks} hold a different "
                f"state than rank 0; make the plugin's decisions identical on every rank (all-reduce "
                f"or broadcast them) or keep what is per rank in rank_state_dict()")


def _prune(ckpt_dir: Path, keep_last: int, keep: str, run_id) -> None:
    complete = [t for t in complete_tags(ckpt_dir) if read_marker(ckpt_dir / t).get("run_id") == run_id]
    doomed = complete[:-keep_last]
    doomed += [p.name for p in ckpt_dir.iterdir()   # interrupted saves
               if p.is_dir() and not (p / MARKER).is_file() and p.name != keep]
    for name in doomed:
        shutil.rmtree(ckpt_dir / name, ignore_errors=True)


def check_compatible(meta: dict, expected: dict, tag_dir: Path) -> None:
    """Refuse a checkpoint written by a run with another model, data layout or run length, naming
    each difference and the setting that gives the checkpoint's value."""
    diffs = []
    for k, v in expected.items():
        then = meta.get(k)
        if then == v:
            continue
        fix = (f" (set {SETTING[k]}={'null' if then is None else then})" if k in SETTING and k in meta
               else " (run length: train.epochs, run.max_steps, train.batch_size)"
               if k in ("total_steps", "epoch_steps") else "")
        diffs.append(f"{k}: checkpoint has {then!r}, this run has {v!r}{fix}")
    if diffs:
        raise RunStateError(
            f"checkpoint {tag_dir} does not belong to this run's setup: " + "; ".join(diffs) +
            "; resume with the checkpoint's settings (the world size may differ), or start a new run "
            "directory")


def needs_universal(tag_dir: Path) -> bool:
    """Whether the tag's optimizer state is partitioned over the ranks that wrote it (ZeRO 1-3, or
    DeepSpeed's bf16 optimizer): then another world size loads it through the universal format."""
    return any(tag_dir.glob("*optim_states.pt"))


def universal_copy(tag_dir: Path, rank: int) -> str:
    """Collective: the tag converted to DeepSpeed's universal checkpoint format (one file per
    parameter and state, loadable on any number of ranks), made once by rank 0 with DeepSpeed's own
    ``ds_to_universal`` and kept as ``tag_dir/universal``; returns its tag name relative to tag_dir."""
    out = tag_dir / UNIVERSAL
    error = None
    if rank == 0 and not (out / MARKER).is_file():
        import argparse
        from deepspeed.checkpoint import ds_to_universal
        tmp = tag_dir / f"{UNIVERSAL}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            # inject_missing_state: dsvit is not Megatron and has no universal-checkpoint metadata
            # of its own; one process each, as the extraction pools would fight over a few cores
            ds_to_universal.main(argparse.Namespace(
                input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
            (tmp / MARKER).write_text("converted by deepspeed.checkpoint.ds_to_universal\n")
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        except Exception as e:   # every rank must learn of it, not wait at the barrier
            error = f"{type(e).__name__}: {e}"
    error = agree(error)
    if error:
        raise RuntimeError(f"converting checkpoint {tag_dir} to DeepSpeed's universal format (to resume "
                           f"on another number of ranks) failed: {error}; resume on the world size that "
                           f"wrote it, or convert it by hand with `ds_to_universal --inject_missing_state`")
    return f"{tag_dir.name}/{UNIVERSAL}"


def load(engine, tag_dir: Path, rank: int, universal: bool = False) -> None:
    """Collective: load model/optimizer into the engine; restores this rank's RNG, unless the tag
    was written on another world size (``universal``: loaded through DeepSpeed's universal format;
    the caller reseeds). The engine must have been built with ``checkpoint.load_universal``."""
    tag = universal_copy(tag_dir, rank) if universal else tag_dir.name
    try:
        _, client_state = engine.load_checkpoint(str(tag_dir.parent), tag=tag,
                                                 load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
    except Exception as e:
        raise RuntimeError(f"loading checkpoint {tag_dir} failed ({type(e).__name__}: {e}); its files "
                           f"are damaged: resume from an earlier tag (checkpoint.resume=PATH) or "
                           f"delete this one and use checkpoint.resume=auto") from e
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    if not universal:
        set_rng_state(read_rank_state(tag_dir, rank)["rng"])


def read_weights(tag_dir: Path, name: str = "weights") -> dict:
    """A safetensors file of the tag (no code runs while loading it)."""
    from safetensors.torch import load_file
    f = tag_dir / f"{name}.safetensors"
    if not f.is_file():
        raise MissingFileError(f"{f} not found: {tag_dir} was not written by this dsvit version "
                                f"or is incomplete")
    return load_file(str(f))
