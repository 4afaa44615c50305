"""Example-level data pruning: which training examples each epoch sees.

Two policies, one plugin (``plugins.example_pruning.policy``):

- ``forgetting``: the example level of Tri-Level E-ViT (Kong et al., "Peeling the Onion:
  Hierarchical Reduction of Data Redundancy for Efficient Vision Transformer Training", AAAI 2023,
  arXiv:2211.10801). Train on a random ``keep_fraction`` of the data; at round epochs swap the
  least-forgettable ``remove_fraction`` (Toneva et al., ICLR 2019 forgetting counts, ties broken by
  the last block's CLS-attention variance, then uid) for random pool examples (``forgetting.py``).
- ``infobatch``: Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data
  Pruning", ICLR 2024: prune below-mean-loss examples at random and re-weight the kept ones, with a
  planned pruned count so the run length is known at start (``infobatch.py`` explains why).

Statistics come from the training forward itself (no extra pass): correctness of argmax(logits)
against the hard labels from before mixup, the CLS variance from a token-stage hook, the per-sample
loss before the re-weighting. They are written into per-epoch device buffers (no host sync per
step) and gathered once per epoch in (step, rank, position) order (``events.py``), so every rank
holds the same state and takes the same decisions from it and a generator seeded by the run seed;
each decision is checked equal on all ranks. Pruned examples are filtered from the stream before
decoding (``state.data.set_keep_set``), re-applied at every epoch start, a resumed one too.

Differences from the original (deliberate): one global split and globally gathered statistics
(the original lets every rank draw its own split with seed+rank and keep its own stats; that is
``per_rank_split=true``, which makes the state per rank and needs data.mode=resampled); ties by
uid; recording stops after the last round (forgetting) or the last pruned epoch (InfoBatch).
Checkpoints hold the state, the generator and a partial epoch's events, so a mid-epoch resume takes
the decisions of the uninterrupted run.
"""
from __future__ import annotations

import numpy as np
import torch

from dsvit.engine.plugin import ORDER_DATA, Plugin
from dsvit.engine.resume import reslice_batch
from dsvit.errors import RunStateError
from dsvit.plugins import register
from dsvit.plugins.example_pruning import infobatch as IB
from dsvit.plugins.example_pruning.config import ExamplePruningConfig
from dsvit.plugins.example_pruning.events import EventBuffer, check_agree, digest, distributed
from dsvit.plugins.example_pruning.forgetting import ForgettingState, initial_active

__all__ = ["ExamplePruning", "ExamplePruningConfig"]
STREAM = 0x45505255   # the generator's stream tag: other seeded draws of the run stay independent
TAG = "example_pruning"


def _tensors(d: dict) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
            for k, v in d.items()}


def _arrays(d: dict) -> dict:
    return {k: v.numpy() if torch.is_tensor(v) else v for k, v in d.items()}


@register
class ExamplePruning(Plugin):
    name = TAG
    config_class = ExamplePruningConfig
    order = ORDER_DATA

    def __init__(self, cfg: ExamplePruningConfig, config=None):
        super().__init__(cfg, config)
        self.forgetting = cfg.policy == "forgetting"
        t = self.config.train
        self.epochs, self.seed, self.ga, self.global_batch = t.epochs, self.config.run.seed, t.grad_accum, t.batch_size
        self.round_epochs = cfg.round_list(t.epochs) if self.forgetting else []
        self.mean, self.std = tuple(self.config.data.mean), tuple(self.config.data.std)
        self.core = None              # ForgettingState | InfoBatchState, built at fit_start
        self.rng = None
        self.rounds_done = 0
        self.decided_epoch = -1       # InfoBatch: the epoch whose prune set `core` holds
        self.buffer = None            # this epoch's events (None: not recording)
        self._saved_events = None     # a mid-epoch checkpoint's events, until its epoch starts
        self._weights = None          # InfoBatch: per-uid loss weights on the device
        self._hook = self._clsvar_hook
        self._stage = None            # the token stage the hook is registered with
        self._row = 0
        self.gather = False           # gather events across ranks (global state, distributed)
        self.device = torch.device("cpu")

    # ------------------------------------------------------------ setup
    def _remove_n(self, n: int) -> int:
        return int(self.cfg.remove_fraction * n)

    def plan_epochs(self, num_samples: int, epochs: int) -> list:
        c = self.cfg
        if self.forgetting:
            return [int(c.keep_fraction * num_samples)] * epochs
        return IB.plan(num_samples, epochs, c.ratio, c.anneal_fraction, c.expected_below_mean)

    def _build(self, state) -> None:
        """A fresh run's state: the initial split (forgetting) drawn from the run seed (seed+rank
        with per_rank_split: the original's behaviour)."""
        n, c = state.data.num_samples, self.cfg
        seed = self.seed + (state.rank if c.per_rank_split else 0)
        self.rng = np.random.default_rng([seed, STREAM])
        if self.forgetting:
            active = initial_active(n, int(c.keep_fraction * n), self.rng)
            self.core = ForgettingState(n, c.window_presentations, active)
        else:
            self.core = IB.InfoBatchState(n)

    def on_fit_start(self, state) -> None:
        if not state.training or state.data is None:   # dsvit eval: nothing to select
            return
        self.device = next(state.model.parameters()).device
        self.gather = not self.cfg.per_rank_split and distributed()
        if self.core is None:
            self._build(state)
            if self.gather and self.forgetting:
                check_agree(digest(self.core.active), "the initial split", self.device)
        if self.core.n != state.data.num_samples:
            raise RunStateError(f"plugins.example_pruning: the state covers {self.core.n} examples, the "
                               f"training set has {state.data.num_samples}; resume on the same data")
        state.logger.info("example_pruning (%s): %s", self.cfg.policy, self._describe())

    def _describe(self) -> str:
        c = self.cfg
        if self.forgetting:
            return (f"{int(self.core.active.sum())} of {self.core.n} active, rounds at epochs "
                    f"{self.round_epochs} swapping {self._remove_n(self.core.n)}, P={c.window_presentations}, "
                    f"tie break {c.tie_break}{', per-rank splits' if c.per_rank_split else ''}")
        m = IB.planned_pruned(self.core.n, c.ratio, c.expected_below_mean)
        pruned = [e for e, p in enumerate(IB.pruned_epochs(self.epochs, c.anneal_fraction)) if p]
        return f"ratio {c.ratio}, {m} pruned in epochs {pruned[:1]}..{pruned[-1:]} (planned)"

    # ------------------------------------------------------------ epoch start: decide, apply
    def _recording(self, epoch: int) -> bool:
        if self.forgetting:
            return self.rounds_done < len(self.round_epochs)
        return epoch + 1 < self.epochs and IB.pruned_epochs(self.epochs, self.cfg.anneal_fraction)[epoch + 1]

    def on_epoch_start(self, state) -> None:
        if self.core is None:
            return
        e = state.epoch
        if self.forgetting:
            due = self.rounds_done < len(self.round_epochs) and self.round_epochs[self.rounds_done] <= e
            if due:   # once: a resumed epoch start finds it done (rounds_done is in the state)
                self._round(state)
            keep = self.core.active
            self._weights = None
        else:
            self._infobatch_epoch(state)
            keep = None if self.core.keep.all() else self.core.keep
        # a copy: the data must not see later in-place edits of the state
        state.data.set_keep_set(None if keep is None else keep.copy())
        state.logger.scalar(f"{TAG}/active", int(keep.sum()) if keep is not None else self.core.n)
        self._open_buffer(state)
        self._sync_hook(state)

    def _round(self, state) -> None:
        c, core = self.cfg, self.core
        out = core.round(self._remove_n(core.n), self.rng, c.tie_break)
        self.rounds_done += 1
        if self.gather:
            check_agree(digest(core.active), f"active set after round {self.rounds_done}", self.device)
        log = state.logger
        log.scalar(f"{TAG}/round", self.rounds_done)
        log.scalar(f"{TAG}/dropped", len(out["drop"]))
        log.scalar(f"{TAG}/restored", len(out["restore"]))
        log.scalar(f"{TAG}/candidates", len(out["ranked"]))
        log.histogram(f"{TAG}/round_scores", out["scores"])
        k = len(out["drop"])
        log.info("example_pruning round %d at epoch %d: dropped %d of %d candidates (scores <= %s), "
                 "restored %d from the pool", self.rounds_done, state.epoch, k, len(out["ranked"]),
                 int(out["scores"][k - 1]) if k else "-", len(out["restore"]))
        self._log_images(state, out["ranked"])

    def _log_images(self, state, ranked: np.ndarray) -> None:
        """Rank 0: the least and most forgettable examples of the round, as image grids."""
        n, log = min(self.cfg.log_images, len(ranked)), state.logger
        if (n == 0 or state.rank != 0 or getattr(log, "writer", None) is None
                or not hasattr(state.data, "images_by_uid")):
            return
        from torchvision.utils import make_grid
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        for name, uids in (("least_forgettable", ranked[:n]), ("most_forgettable", ranked[::-1][:n].copy())):
            imgs = (state.data.images_by_uid(uids).float() * std + mean).clamp(0, 1)
            log.image(f"{TAG}/{name}", make_grid(imgs, nrow=8, padding=1))

    def _infobatch_epoch(self, state) -> None:
        c, core, e = self.cfg, self.core, state.epoch
        if not (e < self.epochs and IB.pruned_epochs(self.epochs, c.anneal_fraction)[e]):
            core.full()
            self._weights = None
            return
        if self.decided_epoch != e:   # a resumed epoch start re-applies, never re-decides
            m = IB.planned_pruned(core.n, c.ratio, c.expected_below_mean)
            out = core.decide(m, c.ratio, self.rng)
            self.decided_epoch = e
            if self.gather:
                check_agree(digest(core.keep, core.below), f"InfoBatch prune set of epoch {e}", self.device)
            log = state.logger
            log.scalar(f"{TAG}/pruned", out["pruned"])
            log.scalar(f"{TAG}/p", out["p"])
            log.scalar(f"{TAG}/below_mean", out["below"])
            log.scalar(f"{TAG}/shortfall", out["shortfall"])
            if out["shortfall"] > 0:
                log.info("example_pruning epoch %d: %d below the mean loss, pruned %d of the planned %d; "
                         "the epoch is cut at its planned length (lower expected_below_mean to plan "
                         "for this)", e, out["below"], out["pruned"], m)
        self._weights = torch.from_numpy(core.weights()).to(self.device)

    # ------------------------------------------------------------ per step: record, re-weight
    def _open_buffer(self, state) -> None:
        e, saved, self._saved_events = state.epoch, self._saved_events, None
        self.buffer = None
        if not self._recording(e):
            return
        steps = state.epoch_steps[e] if e < len(state.epoch_steps) else state.steps_per_epoch
        batch = self.global_batch // (state.world_size * self.ga)
        columns = 3 if self.forgetting and self.cfg.tie_break == "clsvar" else 2
        self.buffer = EventBuffer(e, steps * self.ga, batch, columns, self.device)
        if saved is not None:
            self.buffer.load(saved, state.step_in_epoch * self.ga)
        elif state.step_in_epoch:
            raise RunStateError(f"plugins.example_pruning: resumed {state.step_in_epoch} steps into epoch "
                               f"{e} without that epoch's recorded events; resume from a checkpoint "
                               f"written with this plugin enabled")

    def on_step_start(self, state) -> None:
        self._row = state.step_in_epoch * self.ga

    def on_after_loss(self, state) -> None:
        if self.buffer is None and self._weights is None:
            return
        uids = state.batch.uids
        if uids is None:
            raise RuntimeError("plugins.example_pruning needs sample uids in the batches; the data "
                               "must yield (images, labels, uids)")
        if self.buffer is not None:
            if self.forgetting:
                correct = state.logits.detach().argmax(-1) == state.batch.labels
                extra = (self._clsvar(state.token_stage, uids),) if self.buffer.columns == 3 else ()
                self.buffer.write(self._row, uids, correct, *extra)
            else:   # the loss before the re-weighting below
                self.buffer.write(self._row, uids, state.loss_per_sample.detach())
            self._row += 1
        if self._weights is not None:
            state.loss_per_sample = state.loss_per_sample * self._weights[uids]

    def on_epoch_end(self, state) -> None:
        if self.buffer is None:
            return
        events = self.buffer.gather(self.gather)
        self.buffer = None
        uid = events[:, 0].astype(np.int64)
        if self.forgetting:
            clsvar = events[:, 2] if events.shape[1] == 3 else None
            self.core.update(uid, events[:, 1] > 0.5, clsvar)
        else:
            self.core.update(uid, events[:, 1])

    # ------------------------------------------------------------ CLS variance (token stage)
    def _clsvar_hook(self, x, attn, stage):
        """The CLS row's variance of the forward that runs, into the stage's per-forward scratch:
        evaluation and copies' forwards (a growth search's scoring) record nothing."""
        if stage.training and stage.primary:
            stage.scratch(self)["clsvar"] = attn.cls.detach().float().var(dim=1)
        return x

    def _clsvar(self, stage, uids) -> torch.Tensor:
        v = stage.scratch(self).get("clsvar") if stage is not None else None
        if v is None or v.shape[0] != uids.shape[0]:   # no hook output this forward: NaN (mean skips it)
            return torch.full(uids.shape, float("nan"), device=uids.device)
        return v

    def _sync_hook(self, state) -> None:
        """Registered at the last block while a forgetting window with tie_break=clsvar is open."""
        want = self.forgetting and self.cfg.tie_break == "clsvar" and self.buffer is not None
        if want and self._stage is None:
            stage = state.token_stage
            stage.add_after_attention(len(state.model.blocks) - 1, self._hook, need="cls",
                                    order=self.order)
            self._stage = stage
        elif not want:
            self._remove_hook()

    def _remove_hook(self) -> None:
        if self._stage is not None:
            self._stage.remove(self._hook)
            self._stage = None

    def on_after_rebuild(self, state) -> None:
        if self._stage is not None:   # the last block of the new model
            self._remove_hook()
            self._sync_hook(state)

    def on_fit_end(self, state) -> None:
        self._remove_hook()

    # ------------------------------------------------------------ checkpoint
    def _core_state(self) -> dict:
        if self.core is None:
            return {}
        return {"core": _tensors(self.core.state_dict()), "rng": self.rng.bit_generator.state,
                "rounds_done": self.rounds_done, "decided_epoch": self.decided_epoch, "n": self.core.n}

    def _load_core(self, st: dict) -> None:
        if "core" not in st:
            return
        n, c = int(st["n"]), self.cfg
        self.core = (ForgettingState(n, c.window_presentations, np.zeros(n, bool)) if self.forgetting
                     else IB.InfoBatchState(n))
        self.core.load_state_dict(_arrays(st["core"]))
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = st["rng"]
        self.rounds_done, self.decided_epoch = int(st["rounds_done"]), int(st["decided_epoch"])

    def state_dict(self) -> dict:
        head = {"policy": self.cfg.policy, "per_rank_split": self.cfg.per_rank_split}
        return head if self.cfg.per_rank_split else {**head, **self._core_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("policy") != self.cfg.policy or state.get("per_rank_split") != self.cfg.per_rank_split:
            raise RunStateError(f"plugins.example_pruning: the checkpoint was written with policy="
                               f"{state.get('policy')} per_rank_split={state.get('per_rank_split')}; "
                               f"resume with the same settings or start a new run")
        if not self.cfg.per_rank_split:
            self._load_core(state)

    def rank_state_dict(self) -> dict:
        out = self._core_state() if self.cfg.per_rank_split else {}
        if self.buffer is not None and self.buffer.filled:   # a partial epoch's events
            out["events"] = self.buffer.state_dict()
        return out

    def load_rank_state_dict(self, state: dict) -> None:
        if self.cfg.per_rank_split:
            self._load_core(state)
        self._saved_events = state.get("events")

    def reshard_rank_state(self, states: list, rank: int, world_size: int) -> dict:
        """The unfinished epoch's events, row = micro-batch, column = position in the rank's share of
        the global micro-batch: this rank's slice of every row, so the epoch-end gather sees the
        events in the (step, global position) order the uninterrupted run would have."""
        if self.cfg.per_rank_split:   # per-rank statistics do not map to other ranks
            return super().reshard_rank_state(states, rank, world_size)
        saved = [s["events"] for s in states if "events" in s]
        if not saved:
            return {}
        if len(saved) != len(states):
            raise RuntimeError("example_pruning: only some ranks saved events of the unfinished epoch")
        return {"events": {"epoch": saved[0]["epoch"], "rows": saved[0]["rows"],
                           "events": reslice_batch([e["events"] for e in saved], rank, world_size, dim=1)}}
