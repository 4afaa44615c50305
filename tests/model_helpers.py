"""Small models and a plugin starter shared by the token-plugin unit tests."""
import timm
import torch

from dsvit.config import ModelConfig
from dsvit.engine.plugin import State
from dsvit.model.vit import build_model, timm_kwargs

MODEL = ModelConfig(name="vit_tiny_patch16_224", embed_dim=32, depth=3, num_heads=2)


def small_vit(seed=0, **kw):
    """Our model (timm ViT + token stage), 224 px, 196 patches, 3 blocks."""
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**MODEL.__dict__, **kw}), num_classes=10)


def vanilla_vit(seed=0):
    """The same model from plain timm, same initial weights."""
    torch.manual_seed(seed)
    return timm.create_model(MODEL.name, pretrained=False, **timm_kwargs(MODEL, 10))


def start_plugin(plugin, model, stage, **state_kw):
    """Fire fit_start, step_start and before_forward as the trainer would; returns (plugin, state).
    The plugin got its configuration when it was built."""
    state = State(rank=state_kw.pop("rank", 0), world_size=1, model=model,
                  token_stage=stage, **state_kw)
    plugin.on_fit_start(state)
    next_step(plugin, state)
    return plugin, state


def next_step(plugin, state):
    """The events of a new optimizer step at ``state.step``."""
    for event in ("step_start", "before_forward"):
        getattr(plugin, f"on_{event}", lambda s: None)(state)
    return plugin, state


def block_inputs(model, blocks=None):
    """A list that records the sequence length entering each of ``blocks`` (default: all)."""
    sizes = []
    for i, blk in enumerate(model.blocks):
        if blocks is None or i in blocks:
            blk.register_forward_pre_hook(lambda m, a: sizes.append(a[0].shape[1]))
    return sizes
