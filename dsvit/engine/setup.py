"""What the trainer is built from: the world, seeds, the completed DeepSpeed config, the optimizer
and LR schedule (rebuilt with every engine), soft targets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dsvit import config as C


@dataclass(frozen=True)
class World:
    """The distributed world, read from the launcher's environment once (``dsvit.cli``)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0


def close_world(world: World) -> None:
    """Destroy every process group, on every rank, once a command has ended cleanly on all of them
    (a world of one keeps its group: a caller in the same process, a notebook or a test, may go on
    using it, as before).

    Why. Gloo runs each collective on a worker thread that keeps the finished work, and the tensors
    it was given, until it next takes its queue's lock: after the caller has moved on. When the
    caller had already dropped such a tensor, freeing it means taking the GIL; during interpreter
    shutdown Python ends a thread that asks for the GIL, inside a C++ destructor, and the process
    aborts ("terminate called without an active exception", -6 under the launcher, after the run
    finished). Measured with tests/scripts/gloo_exit.py (torchrun, 2 gloo ranks, 200 all-reduces
    of temporaries on two groups, one still referenced at exit): 12 of 30 launches aborted, 0 of 30
    with the groups destroyed first (torch 2.14; pytorch/pytorch#190489). Not on an error path: a
    rank still waiting in a collective would make the join wait for the gloo timeout."""
    import torch.distributed as dist
    if world.world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    import random
    import numpy as np
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def gpu_has_bf16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_run(run: C.RunConfig, device: torch.device) -> C.RunConfig:
    """``run`` with ``ds_config=auto`` and ``precision=auto`` made concrete for ``device``.

    On a GPU with bf16 the default is ``zero1-bf16``: bf16 weights and activations, fp32 masters
    and Adam state sharded over the ranks, gradients reduced in 50M-element buckets. ZeRO-0 with
    bf16 runs DeepSpeed's unfused bf16 optimizer instead (every gradient flattened, norms read on the
    host each step). Elsewhere (CPU) ``zero0`` in fp32: the exactness tests keep their meaning."""
    bf16 = gpu_has_bf16(device)
    name = run.ds_config if run.ds_config != "auto" else ("zero1-bf16" if bf16 else "zero0")
    precision = run.precision
    if precision == "auto":
        ds = C.read_ds_config(name)
        precision = ("bf16" if ds.get("bf16", {}).get("enabled") else
                     "fp16" if ds.get("fp16", {}).get("enabled") else "bf16" if bf16 else "fp32")
    return dataclasses.replace(run, ds_config=name, precision=precision)


def use_device_numerics(run: C.RunConfig, device: torch.device) -> None:
    """TF32 for fp32 matmuls on NVIDIA GPUs (``run.tf32``); deterministic algorithms on request
    (``run.deterministic``: torch raises on an op without a deterministic implementation; on CUDA
    the cuBLAS workspace variable is set by the command line before CUDA starts)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = run.tf32
        torch.backends.cudnn.allow_tf32 = run.tf32
        torch.backends.cudnn.benchmark = not run.deterministic
    torch.use_deterministic_algorithms(run.deterministic)


def complete_ds_config(cfg: C.Config, world_size: int) -> dict:
    """The recipe's DeepSpeed JSON, completed with batch sizes, clipping and precision."""
    ds = C.load_ds_config(cfg)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise C.ConfigError(f"{C.ds_config_path(cfg.run.ds_config)} has an '{key}' section: dsvit "
                                f"builds the {key} from train.*; remove it from the JSON")
    t = cfg.train
    ds["train_batch_size"] = t.batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_micro_batch_size_per_gpu"] = t.batch_size // (world_size * t.grad_accum)
    if t.clip_grad > 0:
        ds["gradient_clipping"] = t.clip_grad
    if cfg.run.precision != "auto":
        ds["bf16"] = {"enabled": cfg.run.precision == "bf16"}
        ds["fp16"] = dict(ds.get("fp16", {}), enabled=cfg.run.precision == "fp16")
    if cfg.run.zero_stage >= 0:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.run.zero_stage
    zero = ds.get("zero_optimization", {})
    for key, least in (("offload_optimizer", 1), ("offload_param", 3)):
        # else DeepSpeed 0.19.8 ignores the section (offload_param below 3) or, at stage 0,
        # refuses the optimizer with advice that does not apply
        if zero.get(key, {}).get("device", "none") != "none" and zero.get("stage", 0) < least:
            raise C.ConfigError(f"{C.ds_config_path(cfg.run.ds_config)} sets {key} but runs ZeRO "
                                f"stage {zero.get('stage', 0)}: {key} needs stage {least} or above "
                                f"(check run.zero_stage, or pick a JSON without offload)")
    ds.setdefault("steps_per_print", 10**9)
    return ds


def model_dtype(ds_config: dict) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def build_engine(model: torch.nn.Module, train: C.TrainConfig, ds_config: dict, device: torch.device):
    """A DeepSpeed engine around ``model`` with timm's AdamW (DeepSpeedCPUAdam under optimizer
    offload): weight-decay groups by timm's rule (no decay for 1-D tensors, biases and
    ``model.no_weight_decay()``), recomputed for every model.
    Returns (engine, optimizer, {parameter name: weight decay}).

    ``train.layer_decay`` > 0: layer-wise LR decay (ELECTRA, Clark et al. 2020; for ViT fine-tuning
    BEiT, Bao et al. 2022, and MAE, He et al. 2022: 0.65-0.75), timm's ``param_groups_layer_decay``
    (BEiT's rule, by the model's ``group_matcher``): the stem (patch and position embeddings, class
    token) is layer 0, block ``i`` layer ``i + 1``, the final norm shares the last block's layer, the
    head is layer ``depth + 1``, and each group carries ``lr_scale = layer_decay ** (depth + 1 -
    layer)``, which timm's schedulers multiply into the group's LR (``lr_schedule``). The scales come
    from the model being wrapped; growth, which would change the depth and so every scale, is refused
    with layer decay (``plugins.growth``'s validate). DeepSpeed's ZeRO 1-3 wrappers step the client
    optimizer's own group dicts, one flat partition per group, so the scaled LRs act at every stage
    (``tests/test_finetune.py`` measures each parameter's first update); through rebuilds the
    optimizer state is carried by parameter name whatever the groups, and a resume through ZeRO-3's
    universal loader gets each group's ``lr_scale`` back (``resume.restore_group_settings``). Groups
    are ordered by falling ``lr_scale`` (a stable sort; without layer decay nothing moves): group 0,
    whose LR the trainer logs, then runs at the schedule's own LR."""
    import deepspeed
    import timm.optim
    optimizer = timm.optim.create_optimizer_v2(
        model, "adamw", lr=train.lr, weight_decay=train.weight_decay, betas=tuple(train.betas),
        foreach=device.type == "cuda", layer_decay=train.layer_decay or None)
    optimizer.param_groups.sort(key=lambda g: -g.get("lr_scale", 1.0))   # before any state exists
    zero = ds_config.get("zero_optimization", {})
    if (zero.get("stage", 0) > 0 and zero.get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
            and ds_config.get("zero_force_ds_cpu_optimizer", True)):
        # ZeRO-Offload steps the fp32 master weights on the host. DeepSpeed 0.19.8 refuses a client
        # torch optimizer there unless the JSON sets "zero_force_ds_cpu_optimizer": false (then
        # timm's AdamW is kept: the slow path on the host). DeepSpeedCPUAdam is the same AdamW
        # vectorised for the CPU, here with timm's groups and hyper-parameters. Its first use
        # JIT-builds the cpu_adam op into ~/.cache/torch_extensions (138 s on 2 cores, once).
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        optimizer = DeepSpeedCPUAdam([{"params": g["params"], "weight_decay": g["weight_decay"],
                                       "lr_scale": g.get("lr_scale", 1.0)}
                                      for g in optimizer.param_groups],
                                     lr=train.lr, betas=tuple(train.betas), adamw_mode=True)
    names = {id(p): n for n, p in model.named_parameters()}
    weight_decay = {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, optimizer, weight_decay


def lr_schedule(optimizer, train: C.TrainConfig, total_steps: int, steps_per_epoch: int):
    """Warm-up + cosine per optimizer step: a pure function of the step, so a rebuilt engine or a
    resumed run stepped to the same point has the same LR."""
    from timm.scheduler import CosineLRScheduler
    warmup = warmup_steps(train, total_steps, steps_per_epoch)
    return CosineLRScheduler(optimizer, t_initial=max(1, total_steps - warmup), lr_min=train.min_lr,
                             warmup_t=warmup, warmup_lr_init=train.warmup_lr, warmup_prefix=True,
                             t_in_epochs=False)


def warmup_steps(train: C.TrainConfig, total_steps: int, steps_per_epoch: int) -> int:
    """The warm-up's length in the schedule's steps (``train.warmup_epochs`` of the base epoch)."""
    return min(int(round(train.warmup_epochs * steps_per_epoch)), total_steps - 1)


def schedule_step(state) -> float:
    """The step the LR schedule reads: the optimizer step, or a plugin's clock of it (``State.lr_clock``)."""
    return state.lr_clock(state.step) if state.lr_clock is not None else state.step


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((labels.numel(), num_classes), off, device=labels.device).scatter_(
        1, labels.view(-1, 1), 1.0 - smoothing + off)


def clear_stale_zero3_grads(engine) -> None:
    """Zero ZeRO-3's gradient partitions after an optimizer step.

    DeepSpeed 0.19.8's ZeRO-3 copies each reduced gradient into its slot of one flat partition
    buffer and never clears a slot: a parameter that takes no part in a step (a block a supernet
    skips) is stepped again with its previous gradient. Found by an engine with layers ``a, b``
    stepping once with both and once with ``a`` only: ZeRO-2 moves ``b`` by Adam's decaying
    momentum (zero gradient), ZeRO-3 by a full second update (``b.weight[0,0]`` 0.3486 vs 0.3787).
    Every used parameter's slot is overwritten at the next step's first micro-batch, so clearing
    costs one memset and changes nothing else. Optimizer offload keeps its gradients elsewhere."""
    buffer = getattr(engine.optimizer, "grad_partitions_flat_buffer", None)
    if buffer is not None:
        buffer.zero_()
