"""Reading and writing a DeepSpeed engine's fp32 masters and Adam state, for engine rebuilds.

1. ``capture``: the full fp32 master and ``exp_avg``/``exp_avg_sq`` of every parameter, read through
   DeepSpeed's public helpers (``deepspeed.utils.safe_get_full_fp32_param`` and
   ``safe_get_full_optimizer_state``; collectives under ZeRO 1-3) or, where those return nothing
   (ZeRO-0: the plain torch optimizer, or the unfused bf16/fp16 wrapper), from the optimizer itself.
   Adam's ``step`` counter is not exposed by the helpers: it is read on the base optimizer.
2. ``prime``: optimizer state only exists after a first ``step()``. Under ZeRO-0 fp32 and ZeRO-1/2
   the empty Adam state is created directly (what torch's AdamW creates at its first step); for the
   others one step runs at lr 0 on a zero loss (eval mode, token hooks suspended, RNG untouched):
   weights do not move.
3. ``restore``: every new parameter gets its fp32 master (never a stale master: under bf16 the
   engine builds masters from the bf16-cast module) and its moments from its source in the
   parameter map. Engine counters (global steps/samples) are put back.

``dsvit.engine.rebuild`` decides what goes where; this module only moves the numbers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


class OptimizerView:
    """Uniform access to fp32 masters, Adam moments and step counters of a DeepSpeed engine."""

    def __init__(self, engine):
        self.engine = engine
        self.params = list(engine.module.named_parameters())
        first = self.params[0][1]
        opt = engine.optimizer
        if hasattr(first, "ds_id") or hasattr(first, "_hp_mapping"):
            self.kind, self.base = "hp", opt.optimizer          # ZeRO 1-3, BF16_Optimizer
        elif hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):
            self.kind, self.base = "unfused", opt.optimizer     # ZeRO-0 with bf16/fp16 (unfused)
            self.master = {id(lp): hp for lg, hg in zip(opt.fp16_groups, opt.fp32_groups)
                           for lp, hp in zip(lg, hg)}
        elif isinstance(opt, torch.optim.Optimizer):
            self.kind, self.base = "plain", opt                  # ZeRO-0 fp32: the torch optimizer
        else:
            raise NotImplementedError(
                f"engine rebuild does not support DeepSpeed's {type(opt).__name__} (ZeRO-0 with the "
                f"fused fp16 optimizer); use ZeRO 1-3 or bf16/fp32")
        self.relink()

    def has_state(self) -> bool:
        return len(self.base.state) > 0

    def relink(self) -> None:
        """Point every parameter's optimizer-state fragments at the flat group's state.

        DeepSpeed 0.19.8's ZeRO-1/2 optimizer steps its param groups one at a time and links the
        fragments after the first group's step, once: parameters of later groups (with timm's
        weight-decay grouping, every weight matrix) keep an empty fragment, and
        ``safe_get_full_optimizer_state`` fails with "exp_avg not found in optimizer state
        fragment". Linking again after the state exists is what DeepSpeed itself does lazily."""
        opt = self.engine.optimizer
        if self.kind != "hp" or not hasattr(opt, "single_partition_of_fp32_groups") or not self.has_state():
            return
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state
        for lp_group, flat in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(lp_group, flat, self.base.state)

    def _local(self, p):
        return p if self.kind == "plain" else self.master[id(p)]

    def get(self, p) -> tuple:
        """(fp32 master, exp_avg, exp_avg_sq) as full tensors; moments None without state."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        if self.kind == "hp":
            master = safe_get_full_fp32_param(p)
            moments = [safe_get_full_optimizer_state(p, k) if self.has_state() else None for k in MOMENTS]
            return master, *moments
        local = self._local(p)
        st = self.base.state.get(local, {})
        return local.detach().float(), *[st.get(k) for k in MOMENTS]

    def get_master(self, p) -> torch.Tensor:
        if self.kind == "hp":
            from deepspeed.utils import safe_get_full_fp32_param
            return safe_get_full_fp32_param(p)
        return self._local(p)

    def set(self, p, master: torch.Tensor, moments: tuple) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        if self.kind == "hp":
            safe_set_full_fp32_param(p, master)
            for k, v in zip(MOMENTS, moments):
                safe_set_full_optimizer_state(p, v, k)
            return
        local = self._local(p)
        with torch.no_grad():
            local.copy_(master)
            for k, v in zip(MOMENTS, moments):
                self.base.state[local][k].copy_(v)

    def step_of(self, p) -> Optional[float]:
        """Adam's step count for ``p`` (ZeRO: the count of its flat group; all groups share it)."""
        states = self.base.state.values() if self.kind == "hp" else [self.base.state.get(self._local(p), {})]
        steps = [float(st["step"]) for st in states if "step" in st]
        return max(steps) if steps else None

    def set_step(self, p, value: float) -> None:
        """Set ``p``'s step count; ZeRO keeps one per flat group, so there ``p`` is ignored and every
        group gets ``value`` (call it once)."""
        states = self.base.state.values() if self.kind == "hp" else [self.base.state[self._local(p)]]
        for st in states:
            old = st["step"]
            st["step"] = old.fill_(value) if torch.is_tensor(old) else type(old)(value)


@dataclass
class Snapshot:
    masters: dict        # name -> fp32 CPU tensor
    moments: dict        # name -> (exp_avg, exp_avg_sq) CPU tensors, or None
    steps: dict          # name -> step count or None
    counters: dict       # engine counters to put back


COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


def capture(engine) -> Snapshot:
    """Collective: every rank, same parameter order (named_parameters is identical everywhere)."""
    view = OptimizerView(engine)
    masters, moments, steps = {}, {}, {}
    shared_step = view.step_of(None) if view.kind == "hp" else None   # one count for all groups
    for name, p in view.params:
        master, m1, m2 = view.get(p)
        masters[name] = master.detach().float().cpu().clone()
        moments[name] = None if m1 is None else (m1.detach().float().cpu().clone(),
                                                 m2.detach().float().cpu().clone())
        steps[name] = shared_step if view.kind == "hp" else view.step_of(p)
    return Snapshot(masters, moments, steps, {k: getattr(engine, k) for k in COUNTERS})


def full_weights(engine) -> dict:
    """The model's full fp32 state dict: every parameter's master (collective under ZeRO) and the
    module's buffers; on every rank."""
    view = OptimizerView(engine)
    out = {name: view.get_master(p).detach().float().cpu().clone() for name, p in view.params}
    for name, b in engine.module.named_buffers():
        out[name] = b.detach().cpu().clone()
    return out


@contextlib.contextmanager
def _lr_zero(optimizer):
    saved = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    try:
        yield
    finally:
        for g, lr in zip(optimizer.param_groups, saved):
            g["lr"] = lr


def _adam_state(param: torch.Tensor, amsgrad: bool) -> dict:
    """What torch's Adam/AdamW creates for a parameter at its first step (non-fused, non-capturable)."""
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    state = {"step": torch.tensor(0.0, dtype=scalar),
             "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
             "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}
    if amsgrad:
        state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


def _create_state(engine) -> bool:
    """Create empty Adam state where its tensors are plain to reach: ZeRO-0 fp32 (the torch optimizer
    itself) and ZeRO-1/2 (one state per flat fp32 partition, then the fragments are linked). Returns
    False for the others (ZeRO-3, the bf16 optimizers), which are primed with a step instead.

    Why not always a step: on ViT-S/16 (21.7M parameters, ZeRO-2, one CPU thread) the lr-0 step was
    0.56-1.2 s of a 1.3-2.1 s rebuild (the ``prime`` column of ``benchmarks/bench_rebuild.py``),
    nearly all of it Adam arithmetic whose result ``restore`` overwrites (a one-off cProfile)."""
    view = OptimizerView(engine)
    opt = engine.optimizer
    if view.kind == "plain":
        targets = [(p, g) for g in view.base.param_groups for p in g["params"]]
    elif view.kind == "hp" and hasattr(opt, "single_partition_of_fp32_groups"):
        targets = list(zip(opt.single_partition_of_fp32_groups, view.base.param_groups))
    else:
        return False
    if any(not isinstance(view.base, (torch.optim.Adam, torch.optim.AdamW)) for _ in targets[:1]):
        return False
    for p, group in targets:
        view.base.state[p] = _adam_state(p, group.get("amsgrad", False))
    OptimizerView(engine)   # links the fragments (relink) now that the state exists
    return True


def prime(engine, optimizer, stage, dtype: torch.dtype, device, zero3: bool) -> None:
    """Make the optimizer state of a new engine exist, without moving weights. Collective.

    Where ``_create_state`` cannot, one optimizer step runs at lr 0 on a zero loss (eval mode, token
    hooks suspended, RNG untouched): outside ZeRO-3 the zero gradients come from ``sum(p * 0)`` over
    the parameters; ZeRO-3 gathers parameters only inside the module's forward, so there the model
    runs on a blank image."""
    if _create_state(engine):
        return
    model = engine.module
    example = torch.zeros(1, 3, *tuple(model.patch_embed.img_size), device=device, dtype=dtype)
    was_training = model.training
    engine.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            stage.suspended(), _lr_zero(optimizer):
        for _ in range(engine.gradient_accumulation_steps()):   # one whole accumulation window
            loss = engine(example).float().sum() * 0.0 if zero3 else \
                sum((p * 0.0).sum() for p in model.parameters()).float()
            engine.backward(loss)
            engine.step()
    engine.train(was_training)
    if not OptimizerView(engine).has_state():
        raise RuntimeError("priming the rebuilt engine created no optimizer state")


def restore(engine, request, param_map: dict, fresh: set, snap: Snapshot, weights: dict) -> None:
    """Write masters, moments and steps into the primed engine, per ``request``'s policies; ``fresh``:
    parameters without a source or whose source an earlier one took. Each rank writes its own shard."""
    view = OptimizerView(engine)
    device = next(engine.module.parameters()).device
    carried_step = max([s for s in snap.steps.values() if s is not None], default=0.0)
    keep = request.optimizer_state == "carry" and request.step == "carry"
    for name, p in view.params:
        master = weights[name].to(device)
        src = param_map[name]
        carried = snap.moments.get(src) if src is not None else None
        zero = (request.optimizer_state == "reset" or carried is None
                or (name in fresh and request.new_param_state == "zero"))
        if zero:
            moments = (torch.zeros_like(master), torch.zeros_like(master))
        else:
            moments = tuple(m.to(device) for m in carried)
        view.set(p, master, moments)
        if view.kind != "hp":
            step = snap.steps.get(src) if src is not None else None
            view.set_step(p, (carried_step if step is None else step) if keep else 0.0)
    if view.kind == "hp":
        view.set_step(None, carried_step if keep else 0.0)
    for k, v in snap.counters.items():
        setattr(engine, k, v)
