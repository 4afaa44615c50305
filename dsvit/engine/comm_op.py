"""DeepSpeed's CPU communication op (shared-memory all-reduce): say it was built once, not on every run.

``deepspeed.comm.torch.build_shm_op`` prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op
built successfully" with a bare ``print`` (no logger to quiet) every time it loads the op, also
when torch's JIT loader only picks the compiled library out of its extension cache, so every run
seemed to rebuild it. ``quiet_when_cached`` runs a call that may load the op with stdout captured
and passes everything through except that line when the library was compiled before the call;
the first build is announced and keeps the line. Errors are untouched (the captured text is
replayed whatever happens).
"""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Callable, Optional


def shm_op_cached() -> Optional[bool]:
    """Whether the op is compiled already in torch's extension cache (None: no such op here, or
    a torch/DeepSpeed layout this does not know: then DeepSpeed's line is shown as it is)."""
    try:
        from deepspeed.accelerator import get_accelerator
        from torch.utils.cpp_extension import _get_build_directory   # the folder torch's load() uses
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None:
            return None
        return any(Path(_get_build_directory(builder.name, verbose=False)).glob(f"{builder.name}*.so"))
    except Exception:
        return None


def quiet_when_cached(load: Callable, announce: bool = True):
    """``load()`` (e.g. ``deepspeed.init_distributed``), without the "op built" line when the op
    was only loaded from the cache; ``announce``: say so before a first build (one rank per host)."""
    cached = shm_op_cached()
    if cached is False and announce:
        print("dsvit: compiling DeepSpeed's CPU communication op once (about a minute; cached in "
              "torch's extension folder)", file=sys.stderr, flush=True)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            return load()
    finally:
        for line in printed.getvalue().splitlines():
            if not (cached and line.startswith("DeepSpeed ") and line.endswith(" built successfully")):
                print(line, flush=True)
