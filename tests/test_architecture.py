"""The package's shape, checked: a read-only configuration, imports without cycles (in-function
imports included), the environment read in one place, no module using another's private names,
and the size limits of the contract, the trainer and every file."""
import ast
import dataclasses
from pathlib import Path

import pytest

from dsvit import config as C

PKG = Path(__file__).resolve().parent.parent / "dsvit"


def modules() -> dict:
    """dotted module name -> parsed tree, for every file of the package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (path, ast.parse(path.read_text()))
    return out


def resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mods: dict) -> dict:
    """module -> the dsvit modules it imports anywhere in its body (functions included)."""
    graph = {}
    for name, (path, tree) in mods.items():
        found = set()
        for node in ast.walk(tree):
            targets, own = [], False
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve(name, node, path.name == "__init__.py")
                # a submodule importing from its own package runs inside the package's import
                own = name.startswith(base + ".")
                targets = ([] if own else [base]) + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if own and t not in mods:   # a name of the package this module is part of
                    continue
                while t and t not in mods:   # "dsvit.engine.plugin.State" -> "dsvit.engine.plugin"
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("dsvit"):
                    found.add(t)
        graph[name] = found
    return graph


def test_setting_a_config_field_after_loading_raises():
    cfg = C.load_config("stack", ["train.lr=0.01"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = C.ModelConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.plugins["toe"].keep_rates = [1.0]
    with pytest.raises(TypeError, match="read-only"):
        cfg.plugins["toe"] = None
    again = C.apply_override(cfg, "train.lr=0.5")     # a new config; the old one is unchanged
    assert (again.train.lr, cfg.train.lr) == (0.5, 0.01)


def test_a_plugin_gets_its_configuration_at_construction_only():
    from dsvit.engine.plugin import Plugin, State
    from dsvit.registry import build_plugins
    cfg = C.load_config("stack")
    plugins = build_plugins(cfg)
    assert plugins and all(p.config is cfg and p.cfg is cfg.plugins[p.name] for p in plugins)
    assert not hasattr(Plugin, "configure")
    assert "cfg" not in {f.name for f in dataclasses.fields(State)}


def test_no_import_cycle():
    graph = imports(modules())
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_environment_is_read_in_the_command_line_only():
    readers = []
    for name, (path, tree) in modules().items():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
                    and isinstance(node.value, ast.Name) and node.value.id == "os"
                    and name != "dsvit.cli"):
                readers.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    # the one exception: dsvit bench hands its runs an environment (it writes, never reads a value)
    assert readers == [r for r in readers if r.startswith("dsvit/bench/cli.py")], readers


def test_no_module_uses_another_modules_private_names():
    mods = modules()
    offences = []
    for name, (path, tree) in mods.items():
        aliases = {}   # local name -> dsvit module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = resolve(name, node, path.name == "__init__.py")
                for a in node.names:
                    if a.name.startswith("_") and base.startswith("dsvit") and base != name:
                        offences.append(f"{path.name}:{node.lineno} imports {base}.{a.name}")
                    if f"{base}.{a.name}" in mods:
                        aliases[a.asname or a.name] = f"{base}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods:
                        aliases[a.asname or a.name] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):
                offences.append(f"{path.name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not offences, offences


def test_size_limits():
    lines = {p.relative_to(PKG.parent).as_posix(): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    assert lines["dsvit/engine/plugin.py"] <= 150
    assert lines["dsvit/engine/trainer.py"] <= 300
    assert {f: n for f, n in lines.items() if n > 400} == {}


def test_module_names_are_plugin_names():
    from dsvit.registry import plugin_registry
    for name, cls in plugin_registry().items():
        assert cls.__module__ == f"dsvit.plugins.{name}", (name, cls.__module__)
