"""A checkpoint write that runs out of space, told in one line.

torch reports a full disk while saving as a bare ``RuntimeError: basic_ios::clear: iostream error``
(or ``PytorchStreamWriter failed writing file ...: file write failed``), naming neither the file nor
the cause; safetensors and plain writes raise ``OSError(ENOSPC)``. ``no_space_line`` recognises both
(torch's only while less than a checkpoint's size is free, so an unrelated stream error is not
mistaken for a full disk) and says what the user needs: the tag, the path, the free space, about the
space a tag takes (the last complete tag's size) and that the last complete tag is intact.
``dsvit.engine.checkpoint.save`` calls it; this module imports nothing of the engine.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk); the message is the whole story."""


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def is_no_space(error: BaseException, free: int, needed: int) -> bool:
    """Whether a failed write ran out of space: the OS says so (anywhere in the exception's
    chain), or torch's stream writer failed while less than a checkpoint's size (at least 1 MiB)
    is free."""
    seen, hops = error, 0
    while seen is not None and hops < 8:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen).lower()
        if "no space left" in text or "storagefull" in text or "quota exceeded" in text:
            return True
        if ("iostream error" in text or "write failed" in text) and free < max(needed, 1 << 20):
            return True
        seen, hops = seen.__cause__ or seen.__context__, hops + 1
    return False


def no_space_line(error: BaseException, ckpt_dir: Path, tag_dir: Path, rank: int,
                  last_tag: Optional[Path], needed: int) -> Optional[str]:
    """The line for a write of ``tag_dir`` that ran out of space, or None for any other failure.
    ``last_tag``: the newest complete tag (``needed``: its size in bytes)."""
    free = free_bytes(ckpt_dir)
    if not is_no_space(error, free, needed):
        return None
    need = (f"a checkpoint of this run takes about {human(needed)}, the size of {last_tag.name}"
            if last_tag else "no complete checkpoint yet to tell a checkpoint's size")
    kept = (f"the last complete checkpoint {last_tag} is intact: free space and resume with "
            f"checkpoint.resume=auto" if last_tag else
            "no complete checkpoint was written yet: free space and start again")
    return (f"writing checkpoint {tag_dir.name} to {tag_dir} failed on rank {rank}: no space left on "
            f"device ({human(free)} free; {need}); {kept}")


def first_error(error: Optional[str]) -> Optional[str]:
    """Collective: the first rank's error line, or None when no rank failed (every rank learns of
    any rank's failure, so none waits for the others at a later barrier)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return error
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, error)
    return next((e for e in every if e), None)
