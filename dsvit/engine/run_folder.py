"""A run folder belongs to one run.

A fresh run (no checkpoint to resume) refuses a folder that already holds another run's
checkpoints, logs or config: their tags would be pruned together and their logs mixed. The choices
the error offers: continue that run (``checkpoint.resume=auto``), start elsewhere (``run.dir``), or
replace it (``run.overwrite=true``), which moves the old run's files into
``RUN_DIR/replaced-YYYYmmdd-HHMMSS/`` (nothing is deleted). With ``checkpoint.resume=auto`` and no
intact checkpoint, what an interrupted attempt left is moved aside the same way, with a warning.
The embedded dataset (``RUN_DIR/data``) is not part of a run and stays.

Two runs started together in one fresh folder would both pass that check (the files it looks for
appear later), so a run also holds ``RUN_DIR/run.lock`` for its whole life, fresh or resumed
(``checkpoint.resume=auto`` on a folder whose run is still live is refused too). Rank 0 creates it
with ``O_CREAT | O_EXCL`` (atomic, also on NFS v3+) holding its host, pid and the pid's start time,
before anything else touches the folder; every rank gets rank 0's verdict in one broadcast, so all
ranks run the same collectives. A lock whose owner is on this host and gone (no such pid, a zombie,
or the pid reused by a later process) is stale, as a SIGKILL leaves it: it is taken over with a
warning. One from another host cannot be checked from here: the error names it and says to delete
the file if that run is gone. The lock lives as long as the process: it is removed at interpreter
exit (``atexit``: the end of training, errors, ``sys.exit``); a process ended by SIGKILL or
``os._exit`` leaves it stale.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from dsvit.engine.checkpoint import agree
from dsvit.errors import ConfigError

RUN_FILES = ("checkpoints", "tb", "config.yaml")
LOCK = "run.lock"


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


def _proc_stat(pid: int) -> Optional[list[str]]:
    """The fields of /proc/PID/stat after the command name (None where there is no /proc entry)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> Optional[str]:
    stat = _proc_stat(pid)
    return stat[19] if stat and len(stat) > 19 else None   # field 22: start time in clock ticks


def _alive(pid: int, started: Optional[str]) -> bool:
    """Whether ``pid`` on this host is still the process that wrote a lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, another user's
        pass
    stat = _proc_stat(pid)
    if stat and stat[0] in ("Z", "X"):   # killed, not yet reaped by its parent
        return False
    now = stat[19] if stat and len(stat) > 19 else None
    return not (started and now and now != started)   # the pid reused since


class RunLock:
    """``RUN_DIR/run.lock``, held by rank 0 (on other ranks it holds nothing)."""

    def __init__(self, path: Path):
        self.path = path
        self.mine: Optional[dict] = None

    def _read(self) -> Optional[dict]:
        for _ in range(20):   # its owner may be between creating and writing it
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return {}
            if text.strip():
                try:
                    return json.loads(text)
                except ValueError:
                    return None
            time.sleep(0.05)
        return None

    def acquire(self, log) -> Optional[str]:
        """Take the lock; the reason it cannot be taken otherwise."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid()),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": uuid.uuid4().hex}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read()
                if owner == {}:
                    continue   # released meanwhile
                refusal = self._judge(owner, mine, log)
                if refusal:
                    return refusal
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(mine))
            self.mine = mine
            atexit.register(self.release)
            return None
        return (f"run.dir={self.path.parent}: could not take {self.path} (other runs keep taking it); "
                f"start one run per run.dir")

    def _judge(self, owner: Optional[dict], mine: dict, log) -> Optional[str]:
        """The refusal for a held lock; None after taking a stale one over (its file moved away)."""
        where = self.path.parent
        if owner is None:
            return (f"run.dir={where} is locked by {self.path}, which cannot be read; if no run uses "
                    f"this folder any more, delete {self.path}")
        who = f"pid {owner.get('pid')} on host {owner.get('host')}, since {owner.get('since')}"
        if owner.get("host") != mine["host"]:
            return (f"run.dir={where} is in use by another run ({who}); wait for it to finish or use "
                    f"another run.dir; if that run is gone (its host cannot be checked from here), "
                    f"delete {self.path}")
        if owner.get("pid") != mine["pid"] and _alive(int(owner.get("pid", 0)), owner.get("started")):
            return (f"run.dir={where} is in use by a live run ({who}); wait for it to finish or use "
                    f"another run.dir (checkpoint.resume=auto continues it only once it has stopped)")
        # stale: moved aside atomically, so of two runs taking it over at once only one succeeds
        aside = self.path.with_name(f"{LOCK}.stale-{mine['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None   # another run took it over first: try again
        if json.loads(aside.read_text() or "{}") != owner:   # it was taken over and re-created meanwhile
            try:
                os.link(aside, self.path)   # put it back unless yet another one was created
            except FileExistsError:
                pass
        else:
            log.warning("run.dir=%s: taking over the stale lock of a run that is gone (%s)", where, who)
        aside.unlink(missing_ok=True)
        return None

    def release(self) -> None:
        """Remove the lock if this process still holds it (idempotent)."""
        if self.mine is None:
            return
        atexit.unregister(self.release)
        try:
            if json.loads(self.path.read_text()).get("token") == self.mine["token"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.mine = None


def lock(run_dir: Path, rank: int, log) -> RunLock:
    """Collective: rank 0 takes ``RUN_DIR/run.lock``; every rank raises the same refusal."""
    held = RunLock(run_dir / LOCK)
    refusal = None
    if rank == 0:
        try:
            refusal = held.acquire(log)
        except OSError as e:
            refusal = f"run.dir={run_dir} cannot be written ({e.strerror or e}); choose a writable run.dir"
    refusal = agree(refusal)
    if refusal:
        held.release()
        raise ConfigError(refusal)
    return held
