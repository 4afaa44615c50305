"""Run N benchmark variants interleaved on K cores, so that machine drift hits all of them equally.

This box's speed drifts by tens of percent within an hour (benchmarks/RESULTS.md), so runs made one
after another are not comparable at the few-percent level. ``benchmarks/side_by_side.sh`` solved it
for two runs (one core each, same hour). Here it is generalised to any number of runs on any number
of cores: every run is started as its own process group, and every ``quantum_s`` the scheduler lets
the K runs with the least active time so far continue (SIGCONT, each pinned to its own core, its
loader worker with it) and stops the rest (SIGSTOP). All runs therefore progress through the same
stretch of wall-clock time at the same rate, and each run's clock is its *active* time: wall-clock
from its start to its exit minus the intervals it was stopped, which are recorded in ``bench.json``
(time.time(), the clock of the runs' metrics.jsonl). The report subtracts them from every interval a
run measured itself.

Resumable: ``bench.json`` is rewritten at every quantum. A benchmark that is interrupted (Ctrl-C, a
killed shell, a reboot) kills its runs; started again with the same spec it kills any leftovers,
restarts every unfinished run with ``checkpoint.resume=auto`` (it continues from its last
checkpoint) and keeps adding to its active time. Work redone after an interruption therefore
counts, and the report marks such runs.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from dsvit.errors import RunStateError


@dataclass
class RunRecord:
    name: str
    status: str = "pending"          # pending | running | done | failed
    active_s: float = 0.0
    segments: list = field(default_factory=list)    # [start, end] of each launch (time.time())
    pauses: list = field(default_factory=list)      # [stop, cont] intervals while launched
    restarts: int = 0
    returncode: Optional[int] = None
    pgid: Optional[int] = None
    settings: str = ""               # the run's fingerprint (spec.RunSpec.fingerprint)


def pick_active(records: list[RunRecord], slots: int, devices: int = 0) -> list[str]:
    """The runs to keep going this quantum: unfinished ones with the least active time (ties: the
    spec's order). With ``devices`` accelerators, run ``i`` of the spec is bound to accelerator
    ``i % devices`` for its whole life (a CUDA process cannot move, and a stopped one keeps its
    memory there), and each accelerator takes ``max(1, slots // devices)`` of its own runs. Pure,
    so the policy is tested without processes."""
    todo = sorted((r.active_s, i, r.name) for i, r in enumerate(records) if r.status in ("pending", "running"))
    if not devices:
        return [name for _, _, name in todo[:slots]]
    per_device, taken, chosen = max(1, slots // devices), {}, []
    for _, i, name in todo:
        if len(chosen) == slots:   # fewer slots than accelerators: some stay idle, as asked
            break
        if taken.get(i % devices, 0) < per_device:
            taken[i % devices] = taken.get(i % devices, 0) + 1
            chosen.append(name)
    return chosen


def core_groups(cores: list[int], slots: int) -> list[list[int]]:
    """``slots`` groups of cores, one per run going at once: the cores split evenly (a run on an
    accelerator gets its share of the host for its data workers), cycled when runs outnumber cores."""
    k = max(1, len(cores) // max(1, slots))
    return [cores[(j * k) % len(cores):(j * k) % len(cores) + k] for j in range(slots)]


def default_slots(device_type: str, device_count: int, cores: int) -> int:
    """Runs going at once unless ``--slots`` says: one per accelerator where the runs train on
    accelerators (a run wants a whole device: 16 runs on one GPU would share it), else one per core."""
    return max(1, device_count if device_type != "cpu" else cores)


def process_group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:   # field 5: pgrp
                pids.append(int(entry.name))
    return pids


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


class Interleaver:
    """Drives the runs of one benchmark folder; ``command(name)`` gives a run's argv (the same on a restart:
    the runs resume from their own last checkpoint)."""

    def __init__(self, folder: Path, names: list[str], command: Callable[[str], list],
                 slots: int, quantum_s: float = 60.0, settings: Optional[dict] = None, env: Optional[dict] = None,
                 cores: Optional[list[int]] = None, log=print, devices: int = 0,
                 legacy_fingerprint: Optional[Callable[[list], str]] = None):
        self.folder, self.command, self.slots, self.quantum_s = Path(folder), command, slots, quantum_s
        self.env, self.log, self.devices = env, log, devices
        if devices and env is None:
            raise ValueError("Interleaver: runs bound to accelerators need the environment to extend")
        self.cores = cores if cores is not None else sorted(os.sched_getaffinity(0))
        self.state_path = self.folder / "bench.json"
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopped_at: dict[str, float] = {}
        self.kept: list[RunRecord] = []   # runs of this folder not asked for this time: kept as they are
        self.records = self._load(names, settings or {}, legacy_fingerprint)
        self.by_name = {r.name: r for r in self.records}

    # ------------------------------------------------------------ state
    def _load(self, names: list[str], settings: dict, legacy_fingerprint) -> list[RunRecord]:
        """This folder's records of ``names`` (new ones pending). A folder grows: runs may be added to it
        (another --only, a variant or seed added to the spec), but a run it holds must keep its settings
        (``settings``: name -> the run's fingerprint)."""
        old = {}
        if self.state_path.exists():
            saved = json.loads(self.state_path.read_text())
            old = {r["name"]: RunRecord(**r) for r in saved["runs"]}
            if saved.get("fingerprint"):   # written before each run kept its own: one check of them all
                if legacy_fingerprint is None or legacy_fingerprint(list(old)) != saved["fingerprint"]:
                    raise RunStateError(f"{self.folder} holds a benchmark made with another spec (or other "
                                        f"overrides); use another --dir, or delete {self.state_path} and "
                                        f"{self.folder / 'runs'} to start over")
            for r in old.values():   # checked above, or from a file that had no fingerprint at all
                r.settings = r.settings or settings.get(r.name, "")
            changed = [n for n in names if n in old and old[n].settings and old[n].settings != settings.get(n, "")]
            if changed:
                raise RunStateError(f"{self.folder} holds run(s) {changed} made with other settings than the spec "
                                    f"gives them now (a changed variant, recipe or override); use another --dir, "
                                    f"or delete {self.state_path} and {self.folder / 'runs'} to start over")
        self.kept = [r for n, r in old.items() if n not in names]
        records = [old.get(n) or RunRecord(n, settings=settings.get(n, "")) for n in names]
        for r in records + self.kept:
            if r.pgid is not None and r.status == "running":   # left over from an interrupted bench
                _signal_group(r.pgid, signal.SIGCONT)
                _signal_group(r.pgid, signal.SIGKILL)
                r.status, r.pgid = "pending", None
                if r.segments and r.segments[-1][1] is None:
                    r.segments[-1][1] = r.pauses[-1][0] if r.pauses and r.pauses[-1][1] is None else time.time()
                if r.pauses and r.pauses[-1][1] is None:
                    r.pauses[-1][1] = r.segments[-1][1]
        return records

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"slots": self.slots, "quantum_s": self.quantum_s,
                                   "runs": [vars(r) for r in self.records + self.kept]}, indent=1))
        os.replace(tmp, self.state_path)

    # ------------------------------------------------------------ processes
    def _start(self, r: RunRecord) -> None:
        resume = bool(r.segments)
        if resume:
            r.restarts += 1
        log_path = self.folder / "logs" / f"{r.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "a")
        env = self.env
        if self.devices:   # the run sees only its accelerator (as device 0)
            env = dict(env, CUDA_VISIBLE_DEVICES=str(self.records.index(r) % self.devices))
        self.procs[r.name] = subprocess.Popen(self.command(r.name), stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True, env=env)
        out.close()
        r.pgid, r.status = self.procs[r.name].pid, "running"
        r.segments.append([time.time(), None])
        self.log(f"bench: {'resumed' if resume else 'started'} {r.name} (log {log_path})")

    def _pin(self, r: RunRecord, cores: list[int]) -> None:
        for pid in process_group_pids(r.pgid):
            try:
                os.sched_setaffinity(pid, set(cores))
            except OSError:
                pass

    def _stop(self, r: RunRecord, now: float) -> None:
        if r.name in self.procs and r.name not in self.stopped_at:
            _signal_group(r.pgid, signal.SIGSTOP)
            self.stopped_at[r.name] = now
            r.pauses.append([now, None])

    def _cont(self, r: RunRecord, now: float) -> None:
        if r.name in self.stopped_at:
            _signal_group(r.pgid, signal.SIGCONT)
            del self.stopped_at[r.name]
            r.pauses[-1][1] = now

    def _reap(self, now: float) -> None:
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            r = self.by_name[name]
            r.returncode, r.pgid = proc.returncode, None
            r.status = "done" if proc.returncode == 0 else "failed"
            r.segments[-1][1] = now
            del self.procs[name]
            self.stopped_at.pop(name, None)
            self.log(f"bench: {name} {r.status} (exit {proc.returncode}) after {r.active_s:.0f} s active")

    # ------------------------------------------------------------ the loop
    def run(self, tick_s: float = 1.0) -> list[RunRecord]:
        last = time.time()
        next_switch = 0.0
        try:
            while any(r.status in ("pending", "running") for r in self.records):
                now = time.time()
                for name in self.procs:
                    if name not in self.stopped_at:
                        self.by_name[name].active_s += now - last
                last = now
                self._reap(now)
                going = len([n for n in self.procs if n not in self.stopped_at])
                # a run ended: its slot is taken at once (not when the policy cannot fill it, e.g. the
                # last runs all bound to one GPU: they switch every quantum, as the others do)
                if now >= next_switch or going < len(pick_active(self.records, self.slots, self.devices)):
                    self._schedule(now)
                    next_switch = now + self.quantum_s
                    self.save()
                time.sleep(tick_s)
            self.save()
        except BaseException:
            self.shutdown()
            raise
        return self.records

    def _schedule(self, now: float) -> None:
        chosen = pick_active(self.records, self.slots, self.devices)
        for r in self.records:
            if r.name not in chosen:
                self._stop(r, now)
        for cores, name in zip(core_groups(self.cores, len(chosen)), chosen):
            r = self.by_name[name]
            if name not in self.procs:
                self._start(r)
            self._cont(r, now)
            self._pin(r, cores)

    def shutdown(self) -> None:
        """Kill every run (an interrupted benchmark); bench.json keeps what they had done."""
        now = time.time()
        for name, proc in self.procs.items():
            r = self.by_name[name]
            if name in self.stopped_at:
                r.pauses[-1][1] = now
            _signal_group(proc.pid, signal.SIGCONT)
            _signal_group(proc.pid, signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
            r = self.by_name[name]
            r.segments[-1][1], r.pgid, r.status = now, None, "pending"
        self.procs.clear()
        self.stopped_at.clear()
        self.save()
