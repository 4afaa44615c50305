"""Preemption: SIGTERM or SIGUSR1 end the run at a step boundary, with a checkpoint, and an exit
status that asks the scheduler to requeue the job.

What happens. ``StopSignals`` (installed by ``dsvit train`` before the trainer is built) only
records the first SIGTERM/SIGUSR1 the process receives. After every optimizer step -- and after an
epoch's end, its evaluation and checkpoint -- every rank calls ``stop_if_agreed``, which at agreed
steps ("Cost" below) all-reduces (MAX) the signal number each rank has seen, so all ranks take the
same decision at the same step even when the signal reached only some of them (the deepspeed
launcher signals its ranks one after the other; a process group signal may land between two
ranks' checks). When it is non-zero
the ranks write a checkpoint through the normal path (``Trainer.save_checkpoint``: exact resume,
plugin states, EMA, RNG; skipped when that step's checkpoint was just written), rank 0 prints

    dsvit: preempted by SIGTERM at step N: checkpoint TAG written (PATH); resume with checkpoint.resume=auto

and every rank exits with ``128 + signal`` (143 for SIGTERM, 138 for SIGUSR1): what a shell,
Slurm and Kubernetes report for a process the signal killed, so a wrapper that already treats
"killed by TERM" as preempted keeps working, and the same status whether the signal came during
start-up (no handler yet: the default action kills) or mid-run. The last step of the run does not
check: a run that ends anyway exits 0.

Why not work inside the handler. PyTorch Lightning's SLURM connector saves a checkpoint inside the
SIGUSR1 handler and rank 0 then runs ``scontrol requeue``; submitit does the same from rank 0 and
ignores the SIGTERM that the requeue sends. A handler runs between two bytecodes of the main
thread, possibly inside a collective or a DeepSpeed step, and a collective save started there on
some ranks only deadlocks; and a requeue issued by rank 0 kills the job while other ranks may still
be writing. Here the handler sets a flag, the save runs at an agreed step boundary, and the requeue
is left to the job script once every rank has exited (``launchers/slurm.sbatch``: ``srun`` returns
138/143 -> ``scontrol requeue``), which keeps scheduler commands out of the ranks.

Cost. A check is one all-reduce (MAX) of two int64 on a gloo group of its own: CPU tensors (NCCL
cannot reduce them, and a device flag would need a ``.item()``, a host sync, at every check). It is
started at one check and waited for at the next: done by then, so no rank waits for another here.
With more than one rank the checks come about every ``CHECK_EVERY_S`` (0.25 s), not every step: the
all-reduce also carries the number of steps to the next check, proposed from each rank's pace, so
the cadence is agreed too; a stop comes 1-2 checks after the signal. Measured with
``benchmarks/bench_preemption.py`` (2 gloo ranks on the 2-core CPU box under a load of ~5 from other
work, a 4.3 ms stand-in step with a gradient all-reduce): 12 us per step spent in the check, no
step time difference measurable; a check at every step cost +1.1 ms per step (the gloo thread
competes for the cores), one waited for at once +1.7 ms. A world of one checks its own flag.

Under DeepSpeed 0.19.8's launcher. ``deepspeed`` (runner.py) installs no SIGTERM handler on a
single node or with ``--no_ssh``: a SIGTERM to it kills only it, and its ``launch.py`` child and
the ranks train on unaware. ``launch.py`` on SIGTERM terminates each rank's process tree in turn
(SIGTERM, then SIGKILL after 30 s) and exits 1: the ranks get at most 30 s to finish the step and
the checkpoint, and the job's status is 1, not 143. Neither launcher handles SIGUSR1, whose default
action kills them. So signal the ranks (or the whole process group, as Slurm and
``kill -TERM -- -PGID`` do) and keep the launchers out of it: ``launchers/slurm.sbatch`` starts
them with SIGUSR1 and SIGTERM ignored (an ignored signal stays ignored across ``exec``; the ranks
install their own handlers; ``launch.py`` still forwards TERM) and asks Slurm for SIGUSR1 180 s
before the time limit on every process of the job step (``#SBATCH --signal=USR1@180``, no ``B:``).
When a rank that got the signal exits 138/143 first, ``launch.py`` exits with that status and
``srun`` reports it. The loader's workers ignore both signals (``dsvit.data.loader``): a scheduler
signals every process of the job, torch's workers die on a SIGTERM from anyone but their parent,
and the rank needs them to finish the step.
"""
from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Optional

import torch

from dsvit.engine import checkpoint as ckpt
from dsvit.engine import host_sync

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
CHECK_EVERY_S = 0.25        # time between two checks of a multi-rank run (a stop comes 1-2 of them late)
MAX_CHECK_INTERVAL = 1000   # steps


def exit_status(signum: int) -> int:
    """What a shell reports for a process ``signum`` killed (128 + n): 143 for TERM, 138 for USR1."""
    return 128 + int(signum)


class Preempted(Exception):
    """Raised out of ``Trainer.fit`` on every rank once the stop checkpoint is complete."""

    def __init__(self, signum: int, step: int, tag_dir: Path):
        self.signum, self.step, self.tag_dir = int(signum), step, Path(tag_dir)
        super().__init__(self.line)

    @property
    def line(self) -> str:
        return (f"dsvit: preempted by {signal.Signals(self.signum).name} at step {self.step}: checkpoint "
                f"{self.tag_dir.name} written ({self.tag_dir}); resume with checkpoint.resume=auto")

    @property
    def exit_status(self) -> int:
        return exit_status(self.signum)


class StopSignals:
    """Records the first SIGTERM/SIGUSR1 this process receives (the handler does nothing else) and
    agrees with the other ranks on whether to stop. Install in the main thread; ``restore`` puts
    the previous handlers back."""

    def __init__(self, world_size: int, signals: tuple = STOP_SIGNALS):
        self.world_size = world_size
        self.received: Optional[int] = None
        self._group = None
        self._pending = None      # (work, [signal, next interval]) of the all-reduce in flight
        self._calls = 0           # step boundaries seen
        self._next_check = 1      # the boundary of the next check (agreed at the previous one)
        self._last_check, self._last_calls = 0.0, 0
        self._previous = {s: signal.signal(s, self._record) for s in signals}

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def finish(self) -> None:
        """On a clean end, every rank: wait for the check in flight (every rank started it) and put
        the handlers back, so the process groups can be destroyed with no collective pending."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
        self.restore()

    def agreed(self) -> int:
        """The largest signal number any rank had received at the previous check (0: none), the
        same on every rank. A collective: every rank calls it at every step boundary; it checks at
        the boundaries the previous check agreed on (about every ``CHECK_EVERY_S``). A check waits
        for the all-reduce the previous one started (long done by then: steps ran in between) and
        starts the next, so the ranks never wait for each other here."""
        if self.world_size == 1:
            return self.received or 0
        self._calls += 1
        if self._calls < self._next_check:
            return 0
        import torch.distributed as dist
        if self._group is None:   # its own gloo group, made at the first check (the same step everywhere)
            self._group = dist.new_group(backend="gloo")
        agreed, interval = 0, 1
        if self._pending is not None:
            work, flags = self._pending
            work.wait()
            with host_sync.allowed("the preemption flag (a CPU tensor: no device sync)"):
                agreed, interval = flags.tolist()
        self._pending = None
        now = time.perf_counter()
        pace = (now - self._last_check) / (self._calls - self._last_calls) if self._last_check else 0.0
        proposal = min(MAX_CHECK_INTERVAL, max(1, int(CHECK_EVERY_S / pace))) if pace > 0 else 1
        self._last_check, self._last_calls = now, self._calls
        self._next_check = self._calls + max(1, interval)
        if not agreed:   # the same on every rank: all start the next one or none does
            flags = torch.tensor([self.received or 0, proposal], dtype=torch.int64)   # MAX: any rank's pace
            self._pending = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group, async_op=True),
                             flags)
        return agreed


def stop_if_agreed(trainer) -> None:
    """At a step boundary, on every rank: when any rank received a stop signal, write a checkpoint
    at this step (unless it was just written) and raise ``Preempted``."""
    stop: Optional[StopSignals] = trainer.stop_signals
    if stop is None:
        return
    signum = stop.agreed()
    if not signum:
        return
    step, tag_dir = trainer.state.step, trainer.last_checkpoint
    if tag_dir is None or Path(tag_dir).name != ckpt.tag_for(step):
        tag_dir = trainer.save_checkpoint()
    trainer.meter.finish(trainer.logger, step)   # this launch's wall-time split, the stop checkpoint included
    trainer.logger.close()
    raise Preempted(signum, step, tag_dir)
