"""Efficient-training methods as engine plugins. One module per method; each registers here.

``REGISTRY`` maps a plugin's config name (the key under ``plugins:`` in a recipe) to its class.
Each plugin class carries ``config_class``, a dataclass with at least ``enabled: bool`` and
``order: int`` (0 = the plugin's role default). Disabled plugins are never built.
"""
from __future__ import annotations

REGISTRY: dict = {}


def register(cls):
    if cls.name in REGISTRY:
        raise ValueError(f"plugin name '{cls.name}' registered twice")
    REGISTRY[cls.name] = cls
    return cls


def build_plugins(plugin_cfgs: dict) -> list:
    """Instantiate the enabled plugins of a validated config."""
    return [REGISTRY[name](pcfg) for name, pcfg in plugin_cfgs.items() if getattr(pcfg, "enabled", True)]


def _load_builtin() -> None:
    import importlib
    for module in ("patch_sampling", "token_expansion", "visualize"):
        importlib.import_module(f"dsvit.plugins.{module}")


_load_builtin()
