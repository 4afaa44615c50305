"""Reading values into frozen dataclasses: type coercion from YAML/CLI strings, unknown keys with
close matches, and the read-only mapping that holds the plugin sections (``dsvit.config``)."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import fields
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from dsvit.errors import ConfigError


class FrozenDict(dict):
    """A dict that refuses changes after construction (``Config.plugins``): the config is read-only."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("the configuration is read-only after loading; make a new one with "
                        "dsvit.config.apply_override or dataclasses.replace")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore

    def __reduce__(self):
        return FrozenDict, (dict(self),)

    def __deepcopy__(self, memo):
        import copy
        return FrozenDict({k: copy.deepcopy(v, memo) for k, v in self.items()})


def coerce(value: Any, typ: Any, key: str) -> Any:
    origin = get_origin(typ)
    if type(None) in get_args(typ):   # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = [a for a in get_args(typ) if a is not type(None)][0]
        origin = get_origin(typ)
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
        if typ is tuple or origin is tuple:
            if isinstance(value, str):
                value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
            return tuple(value)
        if typ is list or origin is list:
            if isinstance(value, str):
                value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
            return list(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: cannot read {value!r} as {getattr(typ, '__name__', typ)}") from None
    return value


def unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"unknown key '{where}{key}'{hint}; valid keys at this level: {', '.join(valid)}")


def set_fields(obj: Any, values: dict, where: str) -> Any:
    """``obj`` (a frozen section) with ``values`` set, coerced to the fields' types."""
    hints = get_type_hints(type(obj))
    names = [f.name for f in fields(obj)]
    changes = {}
    for k, v in values.items():
        if k not in names:
            raise unknown_key(k, names, where)
        changes[k] = coerce(v, hints[k], where + k)
    return dataclasses.replace(obj, **changes)
