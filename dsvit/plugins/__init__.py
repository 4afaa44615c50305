"""Efficient-training methods as engine plugins, one module per method; each registers itself in
``dsvit.registry`` (re-exported here for plugin authors)."""
from dsvit.registry import REGISTRY, build_plugins, register  # noqa: F401
