"""``plugins.example_pruning``: which examples each epoch trains on (forgetting rounds or InfoBatch)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from dsvit.errors import ConfigError


@dataclass(frozen=True)
class ExamplePruningConfig:
    enabled: bool = True
    order: int = 0                       # 0: the data role (first)
    policy: str = "forgetting"           # forgetting (Tri-Level E-ViT) | infobatch (Qin et al.)
    per_rank_split: bool = False         # reproduction switch: each rank its own split and stats
    # forgetting policy
    keep_fraction: float = 0.8           # initial active share of the training set
    remove_fraction: float = 0.05        # share of N swapped per round (64058 / 1281167 in the paper)
    window_presentations: int = 30       # P: presentations a score counts
    round_epochs: list = field(default_factory=list)   # []: `rounds` rounds, `round_every` apart
    rounds: int = 5
    round_every: float = 0.1             # of train.epochs (the paper: every 30 of 300 epochs)
    tie_break: str = "clsvar"            # clsvar (then uid) | uid
    # infobatch policy
    ratio: float = 0.5                   # r: prune probability of a below-mean example
    anneal_fraction: float = 0.125       # final share of epochs on full data (InfoBatch: 1 - delta)
    expected_below_mean: float = 0.6     # plan: pruned per epoch m = floor(ratio * this * N)
    # logging
    log_images: int = 16                 # at each round: most / least forgettable images (0: off)

    def validate(self, cfg) -> None:
        if not self.enabled:   # never built: its defaults must not stop a run (e.g. a short one)
            return
        if self.policy not in ("forgetting", "infobatch"):
            raise ConfigError(f"policy must be forgetting or infobatch, got '{self.policy}'")
        if cfg.data.mode == "partitioned":
            # each rank's share of a keep set depends on its shards, so no plan can promise every
            # rank the same number of batches; resampled streams never run dry
            why = ("each rank would draw its own split from its own shards"
                   if self.per_rank_split else
                   "a rank's share of the kept samples varies with its shards, so the planned epoch "
                   "length cannot be promised to every rank")
            raise ConfigError(f"needs data.mode=resampled: with data.mode=partitioned {why}; set "
                              f"data.mode=resampled")
        if not 0 <= self.log_images <= 16:
            raise ConfigError(f"log_images must be in [0, 16] (per grid), got {self.log_images}")
        if self.policy == "forgetting":
            self._validate_forgetting(cfg)
        else:
            self._validate_infobatch(cfg)

    def _validate_forgetting(self, cfg) -> None:
        if self.tie_break not in ("clsvar", "uid"):
            raise ConfigError(f"tie_break must be clsvar or uid, got '{self.tie_break}'")
        if not 0 < self.keep_fraction <= 1:
            raise ConfigError(f"keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if not 0 <= self.remove_fraction <= 1 - self.keep_fraction + 1e-12:
            raise ConfigError(
                f"remove_fraction={self.remove_fraction} must be in [0, 1 - keep_fraction = "
                f"{1 - self.keep_fraction:g}]: the restored examples come from the pool; lower "
                f"remove_fraction or keep_fraction")
        if self.window_presentations < 1:
            raise ConfigError(f"window_presentations must be >= 1, got {self.window_presentations}")
        if self.rounds < 0 or not 0 < self.round_every <= 1:
            raise ConfigError(f"rounds must be >= 0 and round_every in (0, 1], got {self.rounds} and "
                              f"{self.round_every}")
        epochs = cfg.train.epochs
        got = self.round_list(epochs)
        where = "round_epochs" if self.round_epochs else (
            f"the default schedule (rounds={self.rounds} every {self.round_every:g} x train.epochs)")
        if any(int(e) != e for e in got) or got != sorted(set(got)):
            raise ConfigError(f"{where} gives {got}: rounds must be distinct ascending whole epochs")
        if got and not 1 <= got[0] <= got[-1] < epochs:
            raise ConfigError(
                f"{where} gives rounds at epochs {got}, but a round needs a window of at least one "
                f"epoch before it and an epoch after it: every round epoch must be in [1, "
                f"train.epochs - 1 = {epochs - 1}]; raise train.epochs, lower rounds or give "
                f"round_epochs explicitly")

    def _validate_infobatch(self, cfg) -> None:
        if not 0 <= self.ratio < 1:
            raise ConfigError(f"ratio must be in [0, 1) (its kept examples are weighted 1/(1-ratio)), "
                              f"got {self.ratio}")
        if not 0 <= self.anneal_fraction <= 1:
            raise ConfigError(f"anneal_fraction must be in [0, 1], got {self.anneal_fraction}")
        if not 0 < self.expected_below_mean <= 1:
            raise ConfigError(f"expected_below_mean must be in (0, 1], got {self.expected_below_mean}")

    def round_list(self, epochs: int) -> list:
        """Round epochs: the explicit list, or `rounds` rounds every max(1, round(round_every *
        epochs)) epochs (300 epochs: 30, 60, 90, 120, 150 as the paper)."""
        if self.round_epochs:
            return [int(e) if float(e).is_integer() else e for e in self.round_epochs]
        if self.rounds == 0 or self.remove_fraction == 0:
            return []
        period = max(1, int(math.floor(self.round_every * epochs + 0.5)))
        return [period * (k + 1) for k in range(self.rounds)]
