"""Errors shared by every layer (a leaf module: config, plugins and the engine all import it)."""


class ConfigError(ValueError):
    """A configuration mistake; the message says which key and what to do."""
