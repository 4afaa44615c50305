"""One engine rebuild: a plugin's request declares the new architecture and the block map; everything
else follows from them here, between two optimizer steps, on every rank in the same order.

``rebuild_engine(trainer, request)`` derives from ``request.arch`` and ``request.block_map``:

- the new model: a plain timm model built from the run's model config with ``arch`` applied
  (``dsvit.model.vit.build_plain``, outside the training RNG);
- its weights: ``weights="masters"``, each parameter from its source's old fp32 master, or a state
  dict of the new model the plugin supplies (MoGrow: its slow momentum copy remapped through the map);
- the parameter map (new name -> old name, ``surgery.param_map``: block indices through the block
  map, never by name alone);
- the optimizer state: captured from the old engine, carried by the parameter map into a new engine
  built with the same DeepSpeed config and timm's weight-decay groups on the new model
  (``dsvit.engine.optimizer_state``);
- the EMA: remapped through the block map;
- the token-stage hooks: moved by the block map (``TokenStage.remap_blocks``).

Policies (``RebuildRequest``):
- ``optimizer_state``: ``carry`` (default) or ``reset`` (zero moments and step 0: a fresh optimizer,
  what AutoProg's released code does at every stage).
- ``new_param_state`` for *new* parameters (a duplicate's second copy, or no source): ``copy`` the
  source's moments (default) or ``zero``. Zero moments under a carried step give oversized first
  updates: Adam's bias correction assumes the moments have been averaging for ``step`` steps, so
  the update is (1 - b1^k) / sqrt(1 - b2^k) times too large (3.2x at k = 1, 1.8x at k = 300).
- ``step``: ``carry`` the old count (default; ZeRO keeps one count per flat group, so old and new
  parameters must share it) or ``reset`` to 0.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Union

import torch

from dsvit.engine import optimizer_state as opt_state
from dsvit.engine.setup import schedule_step
from dsvit.model import surgery
from dsvit.model.vit import build_plain, compile_blocks

POLICIES = {"optimizer_state": ("carry", "reset"), "new_param_state": ("copy", "zero"),
            "step": ("carry", "reset")}


@dataclass
class RebuildRequest:
    block_map: list                   # new block i <- old block block_map[i] (identity: same depth)
    arch: dict = field(default_factory=dict)   # model-config overrides of the new model, e.g. depth
    weights: Union[str, dict] = "masters"      # "masters" | a state dict of the new model
    optimizer_state: str = "carry"
    new_param_state: str = "copy"
    step: str = "carry"
    reason: str = ""                  # for the log line
    requested_by: str = ""            # set by State.request_rebuild

    def validate(self, old_depth: int) -> None:
        for key, allowed in POLICIES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"rebuild request by '{self.requested_by}': {key}="
                                 f"{getattr(self, key)!r}, expected one of {allowed}")
        bad = [j for j in self.block_map if not 0 <= j < old_depth]
        if not self.block_map or bad:
            raise ValueError(f"rebuild request by '{self.requested_by}': block map {self.block_map} "
                             f"names blocks outside the old model's {old_depth}")
        if "depth" in self.arch and self.arch["depth"] != len(self.block_map):
            raise ValueError(f"rebuild request by '{self.requested_by}': arch depth "
                             f"{self.arch['depth']} but its block map has {len(self.block_map)} blocks")
        if not isinstance(self.weights, dict) and self.weights != "masters":
            raise ValueError(f"rebuild request by '{self.requested_by}': weights must be 'masters' or "
                             f"a state dict of the new model, got {self.weights!r}")


def fresh_params(names, param_map: dict) -> set:
    """Parameters without a source, or whose source an earlier parameter already took."""
    seen, out = set(), set()
    for n in names:
        s = param_map[n]
        if s is None or s in seen:
            out.add(n)
        seen.add(s)
    return out


def new_weights(model: torch.nn.Module, request: RebuildRequest, param_map: dict,
                snap: opt_state.Snapshot) -> dict:
    """fp32 value of every parameter and buffer of the new model, per ``request.weights``."""
    if isinstance(request.weights, dict):
        given = request.weights
        missing = sorted(set(model.state_dict()) ^ set(given))
        if missing:
            raise ValueError(f"rebuild request by '{request.requested_by}': its weights and the new "
                             f"model differ in {missing[:3]}")
        return {n: t.detach().float().clone() if t.is_floating_point() else t.clone()
                for n, t in given.items()}
    out = {n: t.detach().float().clone() if t.is_floating_point() else t.clone()
           for n, t in model.state_dict().items()}
    for n, _ in model.named_parameters():
        if param_map[n] is not None:
            out[n] = snap.masters[param_map[n]].clone()
    return out


class PhaseClock:
    """Seconds per phase of a rebuild (capture, destroy, build, prime, restore)."""

    def __init__(self):
        self.laps: dict = {}
        self._t = self._t0 = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self._t = now - self._t, now

    @property
    def total(self) -> float:
        return self._t - self._t0

    def __str__(self) -> str:
        return " ".join(f"{k} {v:.2f}" for k, v in self.laps.items())


def release(engine) -> None:
    """Destroy an engine so that its model and optimizer can be freed.

    Besides ``engine.destroy()``: DeepSpeed 0.19.8's ZeRO-3 puts the top module on the module-level
    ``parameter_offload.FWD_MODULE_STACK`` when it sets up parameter offload and never takes it off,
    so the first engine stays reachable (module -> forward hooks -> engine -> optimizer); found by
    walking ``gc.get_referrers`` from an old engine. This is not the whole ZeRO-3 story: host RSS
    still grows by about 420 MiB per ViT-S/16 rebuild (2.15x after 8 rebuilds,
    ``benchmarks/bench_rebuild.py --zero 3 --rebuilds 8``, 2026-12-05; ZeRO-2: 1.002x). Narrowed
    down (2026-12-05, weakrefs and ``gc`` on a 4-block ViT-S): the old engine, its optimizer and the
    old module *are* freed; what stays are two flat fp32 buffers of the model's size per rebuild (the
    stage-3 optimizer's flat partition and its gradient, 7.4M elements each there), which no Python
    object refers to (no path from any module's globals): they are held from C++, by a hook or the
    communication backend, not found further. DeepSpeed issue 7204 reports the same growth. Bound
    it by rebuilding rarely under ZeRO-3 (growth rebuilds 3-4 times a run), or use ZeRO-1/2."""
    module = engine.module
    engine.destroy()
    try:
        from deepspeed.runtime.zero import parameter_offload
        stack = parameter_offload.FWD_MODULE_STACK
        stack[:] = [m for m in stack if m is not module]
    except (ImportError, AttributeError):
        pass


def trim_host_heap() -> None:
    """Give the freed old engine's host memory back to the OS (glibc keeps freed heap pages
    otherwise, and RSS keeps the high-water mark of every rebuild); a no-op without glibc."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def host_rss_mib() -> float:
    """This process's resident memory (DeepSpeed engines are known to leak host memory when
    re-created in one process, DeepSpeed issue 7204: the trainer logs it after every rebuild)."""
    import psutil
    return psutil.Process().memory_info().rss / 2**20




@dataclass(frozen=True)
class Derived:
    """What a rebuild derived from its request: every new parameter's source, and the new ones."""
    param_map: dict
    fresh: frozenset


def rebuild_engine(trainer, request: RebuildRequest) -> Derived:
    """Rebuild ``trainer``'s engine around the model ``request`` declares (every rank)."""
    s, clock = trainer.state, PhaseClock()
    old_model = trainer.engine.module
    request.validate(len(old_model.blocks))
    arch = {**trainer.arch, **request.arch}
    model_cfg = trainer.model_config(arch)
    model = build_plain(model_cfg, trainer.num_classes)
    param_map = surgery.param_map([n for n, _ in model.named_parameters()], request.block_map,
                                  [n for n, _ in old_model.named_parameters()])
    snap = opt_state.capture(trainer.engine)
    weights = new_weights(model, request, param_map, snap)
    ema_state = trainer.ema.state_dict() if trainer.ema is not None else None
    clock.lap("capture")
    trainer.destroy_engine()
    clock.lap("destroy")

    trainer.arch, trainer.model_cfg = arch, model_cfg
    model.load_state_dict(weights)
    model.set_grad_checkpointing(model_cfg.grad_checkpointing)
    if trainer.cfg.run.compile:
        compile_blocks(model)
    trainer.stage.attach(model)
    trainer.stage.remap_blocks(request.block_map)
    trainer.engine, trainer.optimizer, trainer.lr_schedule = trainer.new_engine(model)
    clock.lap("build")
    opt_state.prime(trainer.engine, trainer.optimizer, trainer.stage, trainer.model_dtype,
                    trainer.device, trainer.zero_stage == 3)
    clock.lap("prime")
    fresh = fresh_params([n for n, _ in model.named_parameters()], param_map)
    opt_state.restore(trainer.engine, request, param_map, fresh, snap, weights)
    trainer.lr_schedule.step_update(schedule_step(s))
    trainer.engine.train(s.training)
    if ema_state is not None:
        shadow = build_plain(model_cfg, trainer.num_classes)
        shadow.load_state_dict(surgery.remap_state_dict(ema_state, request.block_map,
                                                        like=shadow.state_dict()))
        trainer.ema = trainer.new_ema(shadow, copy=False)
    clock.lap("restore")
    s.model, s.last_rebuild = trainer.engine.module, request
    trainer.last_rebuild_times = clock.laps
    trainer.meter.pause(clock.total, "rebuild")
    # at the rebuild's own step, not the next logging interval's
    trainer.logger.scalar("engine/rebuild_s", clock.total, step=s.step)
    trainer.logger.scalar("engine/host_rss_mib", host_rss_mib(), step=s.step)
    trainer.logger.scalar("engine/device_mem_mib", trainer.accel.memory_allocated() / 2**20,   # CPU: RSS
                          step=s.step)
    trainer.logger.scalar("model/depth", len(model.blocks), step=s.step)
    trainer.logger.info("rebuilt the engine for '%s' (%s) at step %d in %.2f s (%s): %d blocks, "
                        "optimizer state %s", request.requested_by, request.reason or "no reason given",
                        s.step, clock.total, clock, len(model.blocks), request.optimizer_state)
    trainer.plugins.fire("after_rebuild", s)
    return Derived(param_map, frozenset(fresh))


def collect(accelerator) -> None:
    """Give a released engine's memory back (device cache, host heap), once nothing holds it."""
    gc.collect()
    accelerator.empty_cache()
    trim_host_heap()
