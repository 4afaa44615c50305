"""The plugin registry (a leaf module: config, the command line and plugins import it; it imports
none of them at import time).

``REGISTRY`` maps a plugin's config name (the key under ``plugins:`` in a recipe) to its class. Each
plugin class carries ``config_class``, a dataclass with at least ``enabled: bool`` and ``order: int``
(0 = the plugin's role default). Disabled plugins are never built.
"""
from __future__ import annotations

REGISTRY: dict = {}
BUILTIN = ("attention_sparsity", "efficienttrain", "example_pruning", "growth", "pss", "toe", "token_pruning",
           "token_viz")


def register(cls):
    if cls.name in REGISTRY:
        raise ValueError(f"plugin name '{cls.name}' registered twice")
    REGISTRY[cls.name] = cls
    return cls


def plugin_registry() -> dict:
    """The registry with dsvit's own plugins loaded (imported on first use, by name)."""
    import importlib
    for module in BUILTIN:
        importlib.import_module(f"dsvit.plugins.{module}")
    return REGISTRY


def build_plugins(config) -> list:
    """Instantiate the enabled plugins of a validated ``dsvit.config.Config``: each gets its own
    section and the whole config, the one way configuration reaches a plugin."""
    registry = plugin_registry()
    return [registry[name](pcfg, config) for name, pcfg in config.plugins.items()
            if getattr(pcfg, "enabled", True)]
