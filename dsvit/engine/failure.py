"""A rank that dies or hangs ends the run within ``run.collective_timeout_s``, with a line naming it.

``set_collective_timeout`` bounds every collective once all ranks have joined: the default group's
and those DeepSpeed creates later (``torch.distributed.new_group`` without a timeout takes torch's
default, 30 min for gloo and 10 min for NCCL, and DeepSpeed's gradient all-reduce runs on such a
clone of the world group). The rendezvous keeps DeepSpeed's 10 min ($DEEPSPEED_TIMEOUT): nodes may
come up at different times. On gloo a peer that is killed usually fails the collective at once
(connection reset); one that hangs (a stopped process, a frozen or unreachable node) fails it at
the timeout. On NCCL the timeout is enforced by torch's watchdog, which aborts the process.

``Peers`` names the rank(s) gone. Each rank bumps its own counter in the rendezvous store (the
TCPStore rank 0 hosts at ``MASTER_ADDR:MASTER_PORT``) once per ``interval_s`` from a daemon thread
over its own connection; a rank blocked in a collective keeps beating (collectives release the
GIL), a killed, crashed or frozen one stops. When a collective raises, ``lost()`` records that this
rank saw the failure, watches the counters for 2.5 intervals and returns the ranks whose counter
stood still and that did not see the failure themselves. The store lives in rank 0's process: when
it cannot be reached, rank 0 is the one gone (``None``).
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Optional


def set_collective_timeout(seconds: float) -> None:
    """Collectives on every existing and future process group raise after ``seconds``."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d
    timeout = timedelta(seconds=seconds)
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):   # read by new_group at call time
        if isinstance(getattr(c10d, name, None), timedelta):
            setattr(c10d, name, timeout)
    if dist.is_initialized():
        set_timeout = getattr(dist, "set_timeout", None) or c10d._set_pg_timeout   # torch < 2.6
        for group in list(getattr(getattr(c10d, "_world", None), "pg_map", None) or [None]):
            set_timeout(timeout, group)


class Peers:
    def __init__(self, world, interval_s: float = 0.5):
        import torch.distributed as dist
        self.rank, self.world_size = world.rank, world.world_size
        self.interval_s = max(interval_s, world.world_size / 512)   # at most ~512 store updates a second
        self.address = f"{world.master_addr}:{world.master_port}"
        self._store = dist.TCPStore(world.master_addr, int(world.master_port),
                                    is_master=False, wait_for_workers=False,
                                    timeout=timedelta(seconds=max(10.0, 3 * self.interval_s)))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="dsvit-heartbeat", daemon=True)
        self._thread.start()

    def _add(self, key: str, n: int) -> int:
        with self._lock:
            return self._store.add(f"dsvit/{key}", n)

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self._add(f"beat/{self.rank}", 1)
            except Exception:   # the store went away with rank 0: nobody left to tell
                return
            self._stop.wait(self.interval_s)

    def _read(self, what: str) -> list[int]:
        return [self._add(f"{what}/{r}", 0) for r in range(self.world_size)]

    def lost(self) -> Optional[list[int]]:
        """The other ranks that stopped answering ([]: none), or None when rank 0's store is gone."""
        try:
            self._add(f"failed/{self.rank}", 1)
            before = self._read("beat")
            time.sleep(2.5 * self.interval_s)
            after, failed = self._read("beat"), self._read("failed")
        except Exception:
            return None
        return [r for r in range(self.world_size)
                if r != self.rank and after[r] == before[r] and not failed[r]]

    def stop(self) -> None:
        """End the heartbeat before the interpreter exits (no thread left inside a store call)."""
        self._stop.set()
        self._thread.join(timeout=15)


def explain(error: BaseException, peers: Optional[Peers], cfg, rank: int) -> Optional[str]:
    """One line for a collective that failed because a rank is gone or hung, naming it, the
    collective and the checkpoint to resume from; None for any other error (raise it as it is)."""
    from dsvit import config as C
    from dsvit.engine.checkpoint import find_resumable
    lost = peers.lost() if peers is not None else []
    reason = re.sub(r"^\[[^\]]*\]\s*", "", (str(error).strip().splitlines() or [""])[0])
    reason = reason.split(". ")[0][:200]   # gloo: "[file:line] Read error [addr]: Connection reset. ..."
    timed_out = "timed out" in reason.lower()
    if lost == [] and not timed_out:
        return None
    frames = traceback.extract_tb(error.__traceback__)
    op = next((f.name for f in reversed(frames) if f.filename.endswith("distributed_c10d.py")), "a collective")
    package = Path(C.__file__).parent
    caller = next((f" in {Path(f.filename).relative_to(package.parent)}:{f.lineno}" for f in reversed(frames)
                   if Path(f.filename).is_relative_to(package)), "")
    what = (f"{op} timed out after {cfg.run.collective_timeout_s:g} s (run.collective_timeout_s)" if timed_out
            else f"{op} failed ({reason})")
    tag, _ = find_resumable(Path(cfg.run.dir) / "checkpoints")
    last = f"the last complete checkpoint is {tag}" if tag else "no complete checkpoint was written yet"
    if lost is None:
        what = f"rank 0 is gone (its rendezvous store at {peers.address} cannot be reached): {what}{caller}"
    elif lost:
        what = (f"rank{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} stopped answering (killed, "
                f"crashed or hung): {what}{caller}")
    else:
        what = (f"{what}{caller} while every rank is alive: one was busy or stuck that long (raise "
                f"run.collective_timeout_s if its work takes longer)")
    return f"dsvit: rank {rank}: {what}; {last}; resume with checkpoint.resume=auto"


def exit_now(line: str) -> None:
    """Print ``line`` and end the process with status 1, skipping the interpreter's teardown:
    destroying a process group whose peer is gone takes seconds on gloo and can block for good on
    NCCL, and the launcher ends the job only when this process has exited."""
    import logging
    print(line, file=sys.stderr, flush=True)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(1)
