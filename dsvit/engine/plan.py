"""``dsvit train --check``: the plan of a run from its config alone, before anything is started.

No training, no DeepSpeed initialisation, no distributed world and no data needed: the recipe and
overrides are validated for the intended world size (``config.validate``, then the plugins'
composition check, as a run starts), and the plan is computed with the code a run uses:
``build.epoch_plan`` (with the data plugin's declared epoch plan), ``setup.lr_schedule`` (stepped on
a one-parameter optimizer), ``setup.resolve_run`` and ``setup.complete_ds_config`` (precision and
ZeRO stage), and the timm model built on the meta device (parameter count, shapes).

Sample counts: from data.root's ``_info.json`` when it is readable here, with the real
``TrainData`` sizing when the shards are too (exact in either data mode); else from
``data.train_samples`` (or ``data.synthetic_train`` for the embedded dataset) by the resampled
rule (``SizedData``; in partitioned mode an upper bound, said so). A stated size that disagrees with
the data's is reported; the data's count is what a run trains on.

Memory per rank is the ZeRO paper's model-state formula (Rajbhandari et al., "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models", SC 2020, section 5): Ψ parameters take
2 + 2 + 12 bytes each in mixed precision (16-bit weights and gradients; fp32 master, Adam m and v)
and 4 + 4 + 8 in fp32; ZeRO-1 divides the optimizer part by the world size, ZeRO-2 the gradients too,
ZeRO-3 everything. DeepSpeed 0.19.8 holds somewhat different amounts (docs/scaling.md measures
them). Activations: the tensors one ViT block saves for its backward with fused attention,
(9 + 2 x mlp_ratio) x tokens x width values per image (17 at ratio 4: ``benchmarks/
bench_checkpointing.py``, within 2 % of the measured 1844 MiB for ViT-S/16 at batch 32 in fp32),
for the final model at its full token count; per-block checkpointing keeps one block input per
block plus one block's. Buffers, reduce buckets and the allocator's slack are not included.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from dsvit import config as C
from dsvit.engine.build import epoch_plan, model_config
from dsvit.engine.compose import check_composition
from dsvit.engine.plugin_set import PluginSet
from dsvit.engine.setup import complete_ds_config, lr_schedule, resolve_run
from dsvit.data.pipeline import resampled_batches
from dsvit.model.vit import meta_model

MiB = 2 ** 20


class SizedData:
    """``TrainData``'s epoch sizing from a sample count alone (its resampled-mode rule), for a plan
    without the shards: micro-batches per rank of an epoch of ``active`` samples."""

    def __init__(self, num_samples: int, global_micro_batch: int, multiple: int, steps_per_epoch: int):
        self.num_samples, self.global_micro = num_samples, global_micro_batch
        self.multiple, self.steps_per_epoch = max(1, multiple), steps_per_epoch
        self.batches_per_epoch = self.batches_for(num_samples)
        if self.batches_per_epoch < 1:
            raise C.ConfigError(f"not enough training data for one step: {num_samples} samples / global "
                                f"micro-batch {global_micro_batch}; lower train.batch_size or use more data")

    def batches_for(self, active_samples: int) -> int:
        m = self.multiple
        return resampled_batches(active_samples, self.global_micro, self.steps_per_epoch, m) // m * m


@dataclass(frozen=True)
class Plan:
    world_size: int
    train_samples: Optional[int]       # None: unknown here (no data, no data.train_samples)
    samples_from: str
    num_classes: int
    micro_batch: int                   # per rank
    grad_accum: int
    base_steps_per_epoch: Optional[int]
    epoch_steps: Optional[list]
    total_steps: Optional[int]
    warmup_steps: Optional[int]
    peak_lr: float
    ds_config: str
    precision: str
    zero_stage: int
    params: int                        # final model
    first_params: int                  # the architecture the plugins start from
    model_states: dict                 # name -> bytes per rank on the device ("host": offloaded)
    activations: int                   # bytes per rank, final model at full tokens
    notes: list = field(default_factory=list)
    lines: list = field(default_factory=list)
    lr_clock: str = ""                 # the plugin whose clock the LR schedule reads ("": the step)


# ---------------------------------------------------------------- data
def train_size(cfg: C.Config) -> tuple[Optional[int], int, str, Optional[dict], list]:
    """(train samples or None, classes, where the count comes from, _info.json or None, notes)."""
    d = cfg.data
    if d.root == "synthetic":
        from dsvit.data.synthetic import CLASSES
        return d.synthetic_train, len(CLASSES), "data.synthetic_train (the embedded dataset)", None, []
    from dsvit.data.pipeline import num_classes, read_info
    try:
        info = read_info(d.root)
    except (OSError, ValueError) as e:
        why = f"no readable dataset at data.root={d.root} here ({str(e).split(':')[0]})"
        if d.train_samples:
            return d.train_samples, cfg.model.num_classes, f"data.train_samples; {why}", None, []
        return None, cfg.model.num_classes, why, None, [
            "the run length is unknown: set data.train_samples=N (the train split's size) to plan "
            "without the data"]
    if d.train_split not in info["splits"]:
        raise C.ConfigError(f"data.train_split '{d.train_split}' is not a split of {d.root} (has "
                            f"{sorted(info['splits'])}); set data.train_split")
    n = int(info["splits"][d.train_split]["num_samples"])
    notes = []
    if d.train_samples and d.train_samples != n:
        notes.append(f"data.train_samples={d.train_samples:,} but {d.root} holds {n:,} samples in "
                     f"split '{d.train_split}': planned with the data's count, which is what trains")
    return n, num_classes(info), f"{d.root}/_info.json", info, notes


def sized_data(cfg: C.Config, n: int, info: Optional[dict], world_size: int, notes: list):
    """The real ``TrainData`` when the shards are here, else ``SizedData`` from the count."""
    t, d = cfg.train, cfg.data
    local = t.batch_size // (world_size * t.grad_accum)
    if info is not None:
        from dsvit.data.pipeline import TrainData
        try:
            return TrainData(d, info, img_size=cfg.model.img_size, rank=0, world_size=world_size,
                             local_batch=local, seed=cfg.run.seed, batches_multiple=t.grad_accum)
        except FileNotFoundError as e:
            notes.append(f"{e}; sized from the count")
        except ValueError as e:
            raise C.ConfigError(str(e)) from None
    if d.mode == "partitioned":
        notes.append("data.mode=partitioned: an epoch's length depends on how the shards deal to the "
                     "streams; without the shards it is planned as resampled (an upper bound)")
    return SizedData(n, t.batch_size // t.grad_accum, t.grad_accum, d.steps_per_epoch)


# ---------------------------------------------------------------- model and memory
def model_state_bytes(psi: int, precision: str, stage: int, world: int, offload_optimizer: bool,
                      offload_param: bool) -> dict:
    """Bytes per rank by the ZeRO paper's formula (module docstring); offloaded states go to
    "host" as README's table has them (fp32 master, moments and gradients: 16 bytes/param / N)."""
    mixed = precision in ("bf16", "fp16")
    b, k = (2, 12) if mixed else (4, 8)
    out = {"parameters": b * psi / (world if stage >= 3 else 1),
           "gradients": b * psi / (world if stage >= 2 else 1),
           "optimizer": k * psi / (world if stage >= 1 else 1)}
    if offload_optimizer:
        out["host"] = 16 * psi / world
        out["optimizer"] = 0
    if offload_param and stage >= 3:
        out["host"] = out.get("host", 0) + out["parameters"]
        out["parameters"] = 0
    return {key: int(v) for key, v in out.items()}


def activation_bytes(model: torch.nn.Module, micro_batch: int, precision: str, checkpointing: bool) -> int:
    dim, depth = model.embed_dim, len(model.blocks)
    ratio = model.blocks[0].mlp.fc1.out_features / dim
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    per_value = 2 if precision in ("bf16", "fp16") else 4
    block = (9 + 2 * ratio) * micro_batch * tokens * dim * per_value
    boundary = micro_batch * tokens * dim * per_value
    return int(depth * boundary + block if checkpointing else depth * block)


def _lr(train: C.TrainConfig, total: int, steps_per_epoch: int) -> tuple[int, float]:
    """(warm-up steps, lr at the end of the warm-up) from the run's own schedule."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=train.lr)
    sched = lr_schedule(opt, train, total, steps_per_epoch)
    sched.step_update(sched.warmup_t)
    return sched.warmup_t, opt.param_groups[0]["lr"]


# ---------------------------------------------------------------- the plan
def make_plan(cfg: C.Config, world_size: int, build_plugins: Callable,
              describe: Optional[Callable] = None) -> Plan:
    """Validate ``cfg`` for ``world_size`` ranks and plan the run (ConfigError when invalid).
    ``build_plugins(cfg)`` makes the run's plugins (``dsvit.registry``); ``describe(cfg, plugins,
    total, epoch_steps, final_depth)`` adds their schedules' lines."""
    C.validate(cfg, world_size)
    plugins = build_plugins(cfg)
    check_composition(plugins, cfg)
    pset = PluginSet(plugins)
    n, classes, source, info, notes = train_size(cfg)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=classes))
    t = cfg.train
    base = steps = total = warmup = None
    peak = t.lr
    if n is not None:
        data = sized_data(cfg, n, info, world_size, notes)
        base, steps = epoch_plan(cfg, data, pset)
        total = cfg.run.max_steps if cfg.run.max_steps > 0 else sum(steps)
        warmup, peak = _lr(t, total, base)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = resolve_run(cfg.run, device)
    if cfg.run.ds_config == "auto":
        notes.append(f"run.ds_config=auto is {run.ds_config} on this machine ({device.type}); on a GPU "
                     f"with bf16 it is zero1-bf16")
    ds = complete_ds_config(dataclasses.replace(cfg, run=run), world_size)
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    final = meta_model(cfg.model, classes)
    first = meta_model(model_config(cfg.model, pset.architecture()), classes)
    psi = sum(p.numel() for p in final.parameters())
    micro = t.batch_size // (world_size * t.grad_accum)
    states = model_state_bytes(psi, run.precision, stage, world_size,
                               zero.get("offload_optimizer", {}).get("device", "none") != "none",
                               zero.get("offload_param", {}).get("device", "none") != "none")
    act = activation_bytes(final, micro, run.precision, cfg.model.grad_checkpointing)
    plan = Plan(world_size=world_size, train_samples=n, samples_from=source, num_classes=classes,
                micro_batch=micro, grad_accum=t.grad_accum, base_steps_per_epoch=base, epoch_steps=steps,
                total_steps=total, warmup_steps=warmup, peak_lr=peak, ds_config=run.ds_config,
                precision=run.precision, zero_stage=stage, params=psi,
                first_params=sum(p.numel() for p in first.parameters()), model_states=states,
                activations=act, notes=notes,
                lr_clock=next((q.name for q in pset if getattr(q.footprint(), "lr_clock", False)), ""))
    extra = describe(cfg, list(pset), total, steps, len(final.blocks)) if describe else []
    return dataclasses.replace(plan, lines=format_plan(plan, cfg, bool(plugins)) + [f"  {x}" for x in extra])


def epoch_runs(steps: list) -> list[str]:
    """Each run of equal epoch lengths as "epochs a-b: n"."""
    out, start = [], 0
    for e in range(1, len(steps) + 1):
        if e == len(steps) or steps[e] != steps[start]:
            which = f"epoch {start}" if e - 1 == start else f"epochs {start}-{e - 1}"
            out.append(f"{which}: {steps[start]:,}")
            start = e
    return out


def _mib(v: float) -> str:
    if v < 10 * MiB:
        return f"{v / MiB:.2f} MiB"
    return f"{v / MiB:,.0f} MiB" if v < 10 * 2 ** 30 else f"{v / 2 ** 30:,.1f} GiB"


def format_plan(p: Plan, cfg: C.Config, has_plugins: bool) -> list[str]:
    t, m = cfg.train, cfg.model
    out = [f"plan of {m.name} on {p.world_size} rank(s): nothing trained, no DeepSpeed, no data read"]
    if p.train_samples is None:
        out.append(f"data:     train samples unknown ({p.samples_from})")
    else:
        out.append(f"data:     {p.train_samples:,} train samples, {p.num_classes} classes (from {p.samples_from})")
    if cfg.data.repeated_aug > 1:
        out.append(f"          data.repeated_aug={cfg.data.repeated_aug}: an epoch has the same steps and sees "
                   f"1/{cfg.data.repeated_aug} of the distinct samples, each {cfg.data.repeated_aug} times")
    out.append(f"batch:    global {t.batch_size} = {p.world_size} rank(s) x {p.micro_batch} per micro-batch x "
               f"{p.grad_accum} micro-batch(es) (train.grad_accum); data.streams {cfg.data.streams}")
    if p.total_steps is not None:
        runs = epoch_runs(p.epoch_steps)
        per = runs[0].split(": ")[1] if len(runs) == 1 else "; ".join(runs)
        out.append(f"steps:    {p.total_steps:,} optimizer steps: {t.epochs} epoch(s), steps per epoch "
                   f"{per}" + (f" (run.max_steps={cfg.run.max_steps})" if cfg.run.max_steps > 0 else ""))
        out.append(f"lr:       AdamW, warm-up {p.warmup_steps:,} steps ({t.warmup_epochs:g} epochs of "
                   f"{p.base_steps_per_epoch:,}) from {t.warmup_lr:g} to {p.peak_lr:g} "
                   f"(= {t.lr * 512 / t.batch_size:.3g} x batch/512), cosine to {t.min_lr:g} at step "
                   f"{p.total_steps - 1:,}; weight decay {t.weight_decay:g}"
                   + (f"; steps on plugins.{p.lr_clock}'s clock, not the optimizer's (its lines below)"
                      if p.lr_clock else ""))
    else:
        out.append(f"lr:       peak {t.lr:g} (= {t.lr * 512 / t.batch_size:.3g} x batch/512); "
                   f"steps and warm-up need the sample count")
    start = f"; the plugins start it at {p.first_params / 1e6:.2f} M" if p.first_params != p.params else ""
    out.append(f"model:    {p.params / 1e6:.2f} M parameters (final model){start}")
    s = p.model_states
    host = f"; on the host {_mib(s['host'])}" if "host" in s else ""
    device_total = s["parameters"] + s["gradients"] + s["optimizer"]
    adam = "fp32 master, Adam m and v" if p.precision in ("bf16", "fp16") else "Adam m and v"
    out.append(f"memory:   per rank, {p.ds_config} (ZeRO-{p.zero_stage}, {p.precision}), ZeRO paper's formula: "
               f"parameters {_mib(s['parameters'])} + gradients {_mib(s['gradients'])} + optimizer "
               f"({adam}) {_mib(s['optimizer'])} = {_mib(device_total)}{host}")
    ckpt = "with per-block checkpointing" if m.grad_checkpointing else "no checkpointing"
    out.append(f"          activations ~{_mib(p.activations)} ({p.micro_batch} images per micro-batch, final "
               f"model at every token, {ckpt}); about {_mib(device_total + p.activations)} in all, "
               f"before buffers and reduce buckets")
    out += [f"note:     {n}" for n in p.notes]
    out.append("plugins:" + ("" if has_plugins else " none"))
    return out
