"""The run configuration's sections: one frozen dataclass per section of a recipe (``run:``,
``model:``, ``data:``, ``train:``, ``checkpoint:``, ``log:``) and ``Config`` holding them with the
plugins' sections. Defaults and one-line meanings live here; loading, overrides and validation in
``dsvit.config``, which re-exports these names."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

from dsvit.typed_fields import FrozenDict

DATA_ROOT_UNSET = "UNSET"   # a recipe's data.root the user must give (refused by validate)


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"        # run directory: logs, resolved config, checkpoints
    seed: int = 0                      # random seed (weights, data order, augmentation)
    # name in ds_configs/, a path to a DeepSpeed JSON, or auto: zero1-bf16 on a GPU with bf16,
    # zero0 elsewhere (dsvit.engine.setup.resolve_run; the resolved name is what config.yaml records)
    ds_config: str = "auto"
    # auto: as the DeepSpeed JSON says, else bf16 on a GPU that has it, else fp32 | fp32 | bf16 | fp16
    precision: str = "auto"
    tf32: bool = True                # TF32 tensor cores for fp32 matmuls/convolutions on NVIDIA GPUs
    deterministic: bool = False      # deterministic algorithms (GPU: cuBLAS workspace; slower)
    compile: bool = False            # torch.compile each block, dynamic shapes (model.vit.compile_blocks)
    zero_stage: int = -1             # -1: as the DeepSpeed JSON says; else override 0..3
    max_steps: int = -1              # stop after this many optimizer steps (-1: train.epochs)
    overwrite: bool = False          # a fresh run in a folder holding another run moves it aside
    collective_timeout_s: float = 600.0  # a collective stuck this long (lost/hung rank) ends the run


@dataclass(frozen=True)
class ModelConfig:
    name: str = "vit_tiny_patch16_224" # timm ViT/DeiT name; its own architecture unless fields are set
    img_size: int = 224                # input side in pixels
    patch_size: Optional[int] = None   # None: the timm model's default
    embed_dim: Optional[int] = None    # width (None: the timm model's)
    depth: Optional[int] = None        # blocks (None: the timm model's)
    num_heads: Optional[int] = None    # attention heads (None: the timm model's)
    mlp_ratio: Optional[float] = None  # MLP hidden / width (None: the timm model's)
    num_classes: int = 1000            # the dataset's class count overrides this when known
    drop_path_rate: float = 0.0        # stochastic depth of the last block (linear from 0)
    global_pool: str = "token"         # token (CLS) | avg: what the head reads
    grad_checkpointing: bool = False   # recompute each block in backward (less memory)
    dynamic_img_size: bool = False     # inputs of any size divisible by the patch (one position table)
    init: str = ""                     # pretrained weights file or dsvit run/tag folder (model/pretrained.py)


@dataclass(frozen=True)
class DataConfig:
    root: str = "synthetic"            # shard folder with _info.json, or "synthetic" (embedded dataset)
    train_split: str = "train"         # split name in _info.json
    val_split: str = "val"             # split name in _info.json (evaluation)
    shards: str = ""                   # brace pattern/URLs overriding the _info.json shard list
    mode: str = "resampled"            # resampled | partitioned
    workers: int = 2                   # decode processes per rank, any number (the rank's process reads the streams)
    streams: int = 8                   # virtual data streams; a multiple of every world size used (README: why 8)
    shuffle_buffer: int = 1000         # samples per stream's shuffle buffer
    steps_per_epoch: int = -1          # -1: derived from sample count / global batch
    corrupt: str = "skip"              # skip (and count) | raise
    repeated_aug: int = 1              # copies of each sample, each augmented differently (1 = off, 3 = DeiT)
    # timm transforms
    hflip: float = 0.5                 # horizontal flip probability
    scale_min: float = 0.08            # smallest random-resized-crop area share
    auto_augment: str = ""             # e.g. rand-m9-mstd0.5-inc1; "" = off
    color_jitter: float = 0.0          # 0: off
    reprob: float = 0.0                # random erasing probability
    interpolation: str = "bicubic"     # resize filter
    crop_pct: float = 0.875            # evaluation centre-crop share
    mean: tuple = (0.485, 0.456, 0.406)# normalisation
    std: tuple = (0.229, 0.224, 0.225) # normalisation
    synthetic_train: int = 10000       # embedded dataset sizes
    synthetic_val: int = 2000
    train_samples: int = 0             # stated train-split size: `train --check` without the data (0: _info.json)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10                   # training length in epochs
    batch_size: int = 128              # global batch per optimizer step (all ranks, all micro-steps)
    grad_accum: int = 1                # micro-batches per optimizer step
    eval_batch_size: int = 256         # global
    lr: float = 1e-3                   # peak learning rate (AdamW)
    min_lr: float = 1e-5               # cosine floor
    warmup_lr: float = 1e-6            # learning rate at step 0
    warmup_epochs: float = 1.0         # linear warm-up, then cosine
    weight_decay: float = 0.05         # AdamW (not on biases, norms, tokens)
    betas: tuple = (0.9, 0.999)        # AdamW
    clip_grad: float = 0.0             # 0: off; written into the DeepSpeed config
    label_smoothing: float = 0.1
    mixup: float = 0.0                 # mixup alpha (0: off)
    cutmix: float = 0.0                # cutmix alpha (0: off)
    mixup_prob: float = 1.0            # share of batches mixed
    ema_decay: float = 0.0             # 0: no EMA
    layer_decay: float = 0.0           # layer-wise LR decay (BEiT/MAE fine-tuning: 0.65-0.75); 0: off
    eval_every_epochs: int = 1         # evaluate at every N-th epoch end (and always at the end of the run)
    eval_samples: int = 0              # intermediate evaluations read the first N val samples (0: all); the last reads all


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0               # 0: only at epoch ends
    every_epochs: int = 1              # checkpoint at every N-th epoch end
    keep_last: int = 2                 # complete checkpoints kept
    resume: str = ""                   # "" | auto | path to a checkpoint tag directory


@dataclass(frozen=True)
class LogConfig:
    every_steps: int = 10              # scalars, and the plain progress line when there is no bar
    tensorboard: bool = True           # write RUN_DIR/tb
    progress: bool = True              # a tqdm bar on a terminal; false (or a redirected log): no bar,
                                       # the same numbers as one plain line every every_steps
    image_every_steps: int = 0         # token image grids (builds plugins.token_viz); 0 = off


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    plugins: dict = field(default_factory=lambda: FrozenDict())   # name -> plugin config dataclass


SECTIONS = [f.name for f in fields(Config)]
