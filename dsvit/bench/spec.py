"""A benchmark spec: which variants of one recipe to train, with which seeds.

    name: cifar10-stack
    recipe: cifar10-bench          # every variant is this recipe plus its own overrides
    baseline: baseline             # speed-ups and accuracy deltas are against this variant
    seeds: [0, 1]                  # default seeds (a variant may set its own)
    overrides: []                  # common to every variant
    variants:
      baseline: {}
      toe: {overrides: [plugins.toe.enabled=true]}
      stack: {plugins_from: stack}                       # the plugins section of recipe `stack`
      stack-no-toe: {plugins_from: stack, overrides: [plugins.toe.enabled=false], seeds: [0]}

Each (variant, seed) is one run, named ``<variant>-s<seed>``. ``plugins_from`` takes only the
``plugins:`` mapping of another recipe, so a recipe written for the main job (``stack``) is measured on
the benchmark's model and data without copying its settings. Every run's resolved config is checked
(values and the plugins' composition) here, before anything starts, so a typo fails the benchmark at once rather than an hour in.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dsvit import config as C
from dsvit.errors import ConfigError

SPEC_KEYS = {"name", "recipe", "baseline", "seeds", "overrides", "variants"}
VARIANT_KEYS = {"overrides", "plugins_from", "seeds", "note"}


@dataclass(frozen=True)
class RunSpec:
    name: str                  # <variant>-s<seed>
    variant: str
    seed: int
    recipe: dict               # {base: recipe, plugins: {...}} written next to the run
    overrides: tuple           # section.key=value, seed included

    def fingerprint(self) -> str:
        """Changes when this run's settings change: a benchmark folder refuses to resume it under others."""
        text = json.dumps([self.name, self.recipe, list(self.overrides)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BenchSpec:
    name: str
    recipe: str
    baseline: str
    variants: dict             # label -> {overrides, plugins_from, seeds, note}
    runs: tuple = field(default_factory=tuple)

    def notes(self) -> dict:
        return {label: v.get("note", "") for label, v in self.variants.items()}

    def settings(self) -> dict:
        """Each run's fingerprint, by name: what a benchmark folder checks its runs against."""
        return {r.name: r.fingerprint() for r in self.runs}

    def fingerprint(self, names=None) -> str:
        """The whole spec's (or the named runs') fingerprint: what bench.json held before it kept one per
        run, checked once when such a folder is resumed or extended."""
        runs = [r for r in self.runs if names is None or r.name in names]
        text = json.dumps([[r.name, r.recipe, list(r.overrides)] for r in runs], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load(path: str | Path, common: list[str] = (), only: list[str] = ()) -> BenchSpec:
    """Read, expand into runs and validate every run's config. ``common`` overrides come last (e.g.
    ``data.root=...``); ``only`` keeps the named variants (and fails on an unknown one)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"benchmark spec {path}: {e}") from None
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"benchmark spec {path}: unknown key(s) {sorted(unknown)}; valid: {sorted(SPEC_KEYS)}")
    variants = data.get("variants") or {}
    baseline = data.get("baseline", "baseline")
    if baseline not in variants:
        raise ConfigError(f"benchmark spec {path}: baseline '{baseline}' is not one of the variants "
                          f"{list(variants)}; add it or set baseline:")
    for label in only:
        if label not in variants:
            raise ConfigError(f"--only {label}: no such variant in {path}; variants: {list(variants)}")
    recipe = data.get("recipe", "cifar10-bench")
    seeds = list(data.get("seeds", [0]))
    runs = []
    for label, v in variants.items():
        v = v or {}
        bad = set(v) - VARIANT_KEYS
        if bad:
            raise ConfigError(f"benchmark spec {path}, variant '{label}': unknown key(s) {sorted(bad)}; "
                              f"valid: {sorted(VARIANT_KEYS)}")
        if only and label not in only:
            continue
        generated = {"base": recipe}
        if v.get("plugins_from"):
            plugins = _recipe_plugins(v["plugins_from"])
            if not plugins:
                raise ConfigError(f"variant '{label}': recipe '{v['plugins_from']}' has no plugins: section")
            generated["plugins"] = plugins
        for seed in v.get("seeds", seeds):
            overrides = (*data.get("overrides", []), *v.get("overrides", []), f"run.seed={seed}", *common)
            run = RunSpec(f"{label}-s{seed}", label, int(seed), generated, tuple(overrides))
            _check(run, path)
            runs.append(run)
    return BenchSpec(data.get("name", path.stem), recipe, baseline,
                     {k: (v or {}) for k, v in variants.items()}, tuple(runs))


def _recipe_plugins(name: str) -> dict:
    with open(C.recipe_path(name)) as f:
        return (yaml.safe_load(f) or {}).get("plugins") or {}


def write_recipe(run: RunSpec, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(run.recipe, sort_keys=False))
    return path


def _check(run: RunSpec, spec_path: Path) -> None:
    import tempfile
    from dsvit.engine.compose import check_composition
    from dsvit.registry import build_plugins
    with tempfile.TemporaryDirectory() as tmp:
        recipe = write_recipe(run, Path(tmp))
        try:
            cfg = C.load_config(str(recipe), list(run.overrides))
            C.validate(cfg, 1)
            check_composition(build_plugins(cfg), cfg)
        except ConfigError as e:
            raise ConfigError(f"benchmark spec {spec_path}, run '{run.name}': {e}") from None
