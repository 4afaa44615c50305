"""A run folder belongs to one run.

A fresh run (no checkpoint to resume) refuses a folder that already holds another run's
checkpoints, logs or config: their tags would be pruned together and their logs mixed. The choices
the error offers: continue that run (``checkpoint.resume=auto``), start elsewhere (``run.dir``), or
replace it (``run.overwrite=true``), which moves the old run's files into
``RUN_DIR/replaced-YYYYmmdd-HHMMSS/`` (nothing is deleted). With ``checkpoint.resume=auto`` and no
intact checkpoint, what an interrupted attempt left is moved aside the same way, with a warning.
The embedded dataset (``RUN_DIR/data``) is not part of a run and stays.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch.distributed as dist

from dsvit.errors import ConfigError

RUN_FILES = ("checkpoints", "tb", "config.yaml")


def previous_run(run_dir: Path) -> list[str]:
    """The run files present (an empty folder does not count)."""
    found = []
    for name in RUN_FILES:
        p = run_dir / name
        if p.is_file() or (p.is_dir() and any(p.iterdir())):
            found.append(name)
    return found


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def claim(run_dir: Path, overwrite: bool, resume: str, rank: int, log) -> None:
    """Collective: make ``run_dir`` this fresh run's folder, or refuse saying what to do."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{rank}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.dir={run_dir} cannot be written ({e.strerror or e}); choose a "
                          f"writable run.dir") from None
    found = previous_run(run_dir)
    _barrier()   # every rank looked before anything moves
    if found and not (overwrite or resume == "auto"):
        raise ConfigError(
            f"run.dir={run_dir} already holds a run ({', '.join(found)}) and this one starts fresh; "
            f"to continue that run: checkpoint.resume=auto; to start a new one: another run.dir; to "
            f"replace it: run.overwrite=true (moves its files to {run_dir}/replaced-<time>/)")
    if found and rank == 0:
        aside = run_dir / time.strftime("replaced-%Y%m%d-%H%M%S")
        aside.mkdir()
        for name in found:
            os.replace(run_dir / name, aside / name)
        why = "run.overwrite=true" if overwrite else "checkpoint.resume=auto found no intact checkpoint"
        log.warning("%s: moved the previous run's %s to %s", why, ", ".join(found), aside)
    _barrier()
