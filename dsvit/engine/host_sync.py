"""Finding host syncs in a training step, on a machine without a GPU.

A device-to-host synchronisation inside a step (``.item()``, ``.cpu()``, ``.tolist()``,
``bool(tensor)``, ``nonzero``, boolean-mask indexing, ...) makes the host wait for the device and
empties the GPU's queue of kernels: on a GPU each one costs the whole queue's latency. On a CPU
nothing waits, so timing cannot find them; ``HostSyncGuard`` finds them by the operation instead:
a ``TorchFunctionMode`` that raises ``HostSyncError`` naming the operation and the line of dsvit that
called it.

The places where dsvit syncs on purpose are named with ``allowed(reason)``: logging intervals, epoch
boundaries, evaluation, checkpoints, rebuilds, the data iterator (host data by design) and a few
plugin decisions (an AutoProg search's scoring points). Only calls made from dsvit's own code count:
torch's and DeepSpeed's internals (e.g. torch's Adam reads its CPU step counter) are theirs.

``allowed`` is a no-op unless a guard is active, so the engine marks its points unconditionally.
Used by ``tests/test_host_sync.py`` over every shipped recipe.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

PACKAGE = str(Path(__file__).resolve().parent.parent)   # .../dsvit
_REASONS: contextvars.ContextVar = contextvars.ContextVar("dsvit_host_sync_allowed", default=())

SYNCS = {
    torch.Tensor.item: "Tensor.item()", torch.Tensor.tolist: "Tensor.tolist()",
    torch.Tensor.cpu: "Tensor.cpu()", torch.Tensor.numpy: "Tensor.numpy()",
    torch.Tensor.__bool__: "bool(tensor)", torch.Tensor.__int__: "int(tensor)",
    torch.Tensor.__float__: "float(tensor)", torch.Tensor.__index__: "tensor as a Python index",
    torch.Tensor.nonzero: "Tensor.nonzero()", torch.nonzero: "torch.nonzero",
    torch.masked_select: "torch.masked_select", torch.Tensor.masked_select: "Tensor.masked_select",
    torch.unique: "torch.unique", torch.Tensor.unique: "Tensor.unique",
}


class HostSyncError(RuntimeError):
    pass


@contextlib.contextmanager
def allowed(reason: str):
    """Host syncs inside are intended (``reason`` says why)."""
    token = _REASONS.set(_REASONS.get() + (reason,))
    try:
        yield
    finally:
        _REASONS.reset(token)


def allows(reason: str):
    """Decorator: the whole function is an ``allowed`` region."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with allowed(reason):
                return fn(*args, **kwargs)
        return inner
    return wrap


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts)


def _caller() -> str | None:
    """``file:line`` of the innermost dsvit frame outside this module, if dsvit made the call."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(PACKAGE) and not path.endswith("host_sync.py"):
            return f"{Path(path).relative_to(Path(PACKAGE).parent)}:{frame.f_lineno}"
        if "/torch/" not in path and "/dsvit/" not in path:
            return None      # another library (DeepSpeed, timm) or the caller's own code
        frame = frame.f_back
    return None


class HostSyncGuard(TorchFunctionMode):
    """Raise on a host sync made by dsvit's code outside an ``allowed`` region."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []      # allowed syncs, "reason: op at file:line" (for a report)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        what = SYNCS.get(func)
        if what is None and func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _bool_index(args):
            what = "boolean-mask indexing"
        if what is not None:
            where = _caller()
            if where is not None:
                reasons = _REASONS.get()
                if not reasons:
                    raise HostSyncError(f"host sync inside a training step: {what} at {where}; keep the "
                                        f"value on the device, or move it to a logging interval")
                self.seen.append(f"{reasons[-1]}: {what} at {where}")
        return func(*args, **(kwargs or {}))
