"""The plugins of a run in their documented order: handler checks, event dispatch, their states, and
what they declare together (the architecture, the epoch plan). The contract: ``dsvit.engine.plugin``."""
from __future__ import annotations

import difflib
from typing import Optional

from dsvit.engine.plugin import EVENTS, Plugin, State


def handles(plugin: Plugin, event: str) -> bool:
    method = getattr(type(plugin), f"on_{event}", None)
    return method is not None and method is not getattr(Plugin, f"on_{event}", None)


def check_handlers(plugin: Plugin) -> None:
    for attr in dir(type(plugin)):
        if attr.startswith("on_") and callable(getattr(type(plugin), attr)) and attr[3:] not in EVENTS:
            close = difflib.get_close_matches(attr[3:], EVENTS, n=1)
            hint = f" (did you mean on_{close[0]}?)" if close else ""
            raise TypeError(f"plugin '{plugin.name}' has a handler {attr} for an event that does not "
                            f"exist{hint}; events: {', '.join(EVENTS)}")


class PluginSet:
    """Plugins in their documented order, with a per-event dispatch list built once."""

    def __init__(self, plugins: list[Plugin]):
        self.plugins = sorted(plugins, key=lambda p: (p.order, p.name))
        names = [p.name for p in self.plugins]
        if len(set(names)) != len(names):
            raise ValueError(f"two plugins share a name: {names}")
        for p in self.plugins:
            check_handlers(p)
        self._dispatch = {ev: [(p.name, getattr(p, f"on_{ev}")) for p in self.plugins if handles(p, ev)]
                          for ev in EVENTS}

    def fire(self, event: str, state: State) -> None:
        state.event = event
        for name, fn in self._dispatch[event]:
            state.plugin = name
            fn(state)
        state.event = state.plugin = ""

    # ---- state: replicated once, per-rank per rank
    def state_dict(self) -> dict:
        return {p.name: p.state_dict() for p in self.plugins}

    def rank_state_dict(self) -> dict:
        return {p.name: st for p in self.plugins for st in [p.rank_state_dict()] if st}

    def load_state_dict(self, replicated: dict, per_rank: dict) -> None:
        for p in self.plugins:
            if p.name not in replicated:
                raise RuntimeError(
                    f"checkpoint has no state for plugin '{p.name}': it was written by a run with other "
                    f"plugins; resume with the same plugins, or start fresh (checkpoint.resume='')")
            p.load_state_dict(replicated[p.name])
            p.load_rank_state_dict(per_rank.get(p.name, {}))

    def reshard_rank_states(self, every: list, rank: int, world_size: int) -> dict:
        """Per-rank states for this rank from every old rank's {plugin: state} (another world size)."""
        return {p.name: p.reshard_rank_state([e.get(p.name, {}) for e in every], rank, world_size)
                for p in self.plugins if any(p.name in e for e in every)}

    # ---- what the plugins declare about the model and the data
    def architecture(self) -> dict:
        arch, owner = {}, {}
        for p in self.plugins:
            for k, v in p.architecture().items():
                if k in arch:
                    raise ValueError(f"plugins '{owner[k]}' and '{p.name}' both set the model's '{k}'; "
                                     f"disable one of them")
                arch[k], owner[k] = v, p.name
        return arch

    def epoch_plan(self, num_samples: int, epochs: int) -> Optional[list]:
        plans = [(p.name, p.plan_epochs(num_samples, epochs)) for p in self.plugins]
        plans = [(n, plan) for n, plan in plans if plan is not None]
        if len(plans) > 1:
            raise ValueError(f"plugins {[n for n, _ in plans]} all change the epoch length; only one "
                             f"data plugin may: disable the others")
        return list(plans[0][1]) if plans else None

    def __iter__(self):
        return iter(self.plugins)

    def __len__(self):
        return len(self.plugins)
