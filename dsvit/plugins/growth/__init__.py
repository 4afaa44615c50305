"""Progressive depth and resolution growth with MoGrow, by hand ("Prog") or searched (AutoProg).

Paper: Li et al., "Automated Progressive Learning for Efficient Training of Vision Transformers",
CVPR 2022 (arXiv:2203.14509; reference code: github.com/changlin31/AutoProg, VOLO only).

The model starts shallow and at a lower input resolution and grows at stage starts. Every growth
is an engine rebuild (``dsvit.engine.rebuild``): the online weights come from the slowest momentum
copy grown by MoGrow's duplication map (``surgery.duplicate_last``), every momentum copy grows
from itself, and Adam's moments are carried by source (``optimizer_state=carry``) or dropped
(``reset``, what the released code does). Resolution is an input size only: the model is built
with ``dynamic_img_size`` and one full-size position table, resampled per forward. The loader
crops each epoch at the largest resolution the epoch trains at (``on_epoch_start``; a manual
schedule: the stage resolution unless a stage starts inside the epoch), so the early stages decode,
augment and copy a quarter of the pixels; where a batch is larger than the step's resolution
(across a stage start, AutoProg) it is resized on the device after mixup (bilinear, no antialias, as
the original, which resizes every batch).

AutoProg (``mode=auto``): at each stage start but the last, the model is grown to the deepest
candidate (the supernet) and trained for ``search_length`` with one (resolution, depth) candidate
sampled per step, the same on every rank (seeded by the step). A depth-d candidate runs the
supernet's blocks ``surgery.supernet_active(base, max, d)`` (the token stage skips the others), so
it is exactly "MoGrow from the base straight to d". The scoring copy (fastest momentum copy, train
mode, forked RNG) gives every candidate's loss on this rank's first ``search_batches`` micro-batches
of the search, all-reduced, at the original's five points; costs are measured fwd+bwd times
(warm-up, median, rank 0's broadcast) or analytic MACs (``cost=flops``: reproducible). The
decision (``schedule.decide``) is made on rank 0, broadcast and checked equal on all ranks; the
chosen sub-network is extracted keeping the online supernet's weights and moments.

Where dsvit departs from the released code, and why (faithful behaviour behind a flag):
- The current depth is the base of both sampling and extraction; the released code samples with
  the smallest candidate as base but extracts with the current depth, so the extracted network is
  not the one scored (``quirk_smallest_base`` restores its sampling; extraction is the same either way).
- Choosing the supernet's full depth keeps the online supernet; the released code re-grows from
  the slow copy then (``quirk_remogrow_at_max``).
- Candidates deeper than twice the base are dropped (MoGrow at most doubles; the original asserts).
- Momentum decays keep their time constant as a share of the run (``decay_rescale=run``): the
  paper's 0.9996 at batch 1024 is 2 % of a 100-epoch ImageNet run, and rescaling by batch alone
  (``batch``, the paper's rule) leaves a short run growing from a copy of its first steps.
- The search scores on a fixed set of the search's own first batches (the original re-draws its
  "fixed" search loader) with the training loss (soft targets), and the stage regularisation of
  a search is the final stage's (as the original). Stage starts and search lengths are fractions
  of the run by default. Data augmentation changes apply from the next epoch (the loader's
  transform is per epoch); drop-path changes at the step.
- ``optimizer_state=carry`` (default) is new: the released code builds a fresh AdamW at every stage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsvit.engine import host_sync
from dsvit.engine.compose import Footprint
from dsvit.engine.plugin import ORDER_DEPTH, Plugin
from dsvit.engine.rebuild import RebuildRequest
from dsvit.engine.resume import reslice_batch
from dsvit.errors import ConfigError, RunStateError
from dsvit.model import surgery
from dsvit.model.vit import build_plain
from dsvit.plugins import register
from dsvit.plugins.growth import schedule as S
from dsvit.plugins.growth.config import GrowthConfig, max_magnitude, stage_augment
from dsvit.plugins.growth.momentum import MomentumCopies, rescaled_decay
from dsvit.plugins.growth.search import Search, agree, measure_losses, measure_times

__all__ = ["ProgressiveGrowth", "GrowthConfig"]


@register
class ProgressiveGrowth(Plugin):
    name = "growth"
    config_class = GrowthConfig
    order = ORDER_DEPTH
    SCHEDULE_KEYS = ("mode", "stages", "stage_unit", "stage_starts", "depths", "depth_scale",
                     "resolutions", "resolution_scale", "decays", "optimizer_state", "search_length")

    def __init__(self, cfg: GrowthConfig, config=None):
        super().__init__(cfg, config)
        m = self.config.model
        self.model_cfg, self.data_cfg, self.seed = m, self.config.data, self.config.run.seed
        # model.depth None is refused by the config check (nothing to grow to)
        self.depths = cfg.depth_list(m) if m.depth is not None else []
        self.resolutions = cfg.resolution_list(m)
        self.patch, self.dim = m.patch_size or 16, m.embed_dim or 192
        self.mlp_ratio = m.mlp_ratio or 4.0
        self.dynamic = len(set(self.resolutions)) > 1
        self.depth = self.resolution = 0   # current online depth (the supernet's in a search) and input size
        self.search: Search | None = None
        self.decisions: list = []
        self.copies = MomentumCopies(cfg.decays)
        self._loaded_copies = None
        self._pending = None               # momentum states waiting for the rebuilt engine
        self.step_res = self.step_depth = 0
        self._sampled = None               # the step's sub-network while an evaluation runs

    # ------------------------------------------------------------ setup
    def architecture(self) -> dict:
        arch = {"depth": self.depth or self.depths[0]}
        if self.dynamic:
            arch["dynamic_img_size"] = True
        return arch

    def footprint(self) -> Footprint:
        """The stage depths (a search's supernet and its sub-networks among them), MoGrow's block
        map at every growth, the first stage's input size."""
        c, m = self.cfg, self.config.model
        if m.depth is None:       # refused by the config check: nothing to grow to
            return Footprint()
        res = c.resolution_list(m)
        # AutoProg scores its candidates on batches at their own sizes (and builds its momentum
        # copies without dynamic_img_size at a single size): it owns the input size even when
        # every candidate is full size
        owns_size = len(set(res)) > 1 or c.mode == "auto"
        return Footprint(depths=tuple(c.depth_list(m)), block_map=surgery.duplicate_last,
                         depth_keys=("depths",) if c.depths else ("depth_scale",),
                         min_resolution=min(res), input_sizes=tuple(res) if owns_size else (),
                         resolution_keys=("resolutions",) if c.resolutions else ("resolution_scale",),
                         augmentation=c.augreg, augmentation_keys=("augreg",))

    def _build(self, state, depth: int) -> torch.nn.Module:
        arch = dict(self.architecture(), depth=depth)
        return build_plain(self.model_cfg, state.num_classes, **arch)

    def on_fit_start(self, state) -> None:
        if not state.training:          # dsvit eval: the checkpoint's architecture is all that matters
            return
        c, t = self.cfg, self.config.train
        starts = self.cfg.start_steps(state.total_steps, state.epoch_steps)
        if len(set(starts)) != len(starts):
            raise ConfigError(f"plugins.growth: stage starts {starts} (steps of {state.total_steps}) "
                             f"collide; the run is too short for {c.stages} stages")
        dp_max = self.model_cfg.drop_path_rate
        self.table = S.stage_table(starts, self.depths, self.resolutions,
                                   max_magnitude(self.data_cfg.auto_augment), dp_max,
                                   self.data_cfg.reprob, c.aa_scale if c.augreg else 1.0,
                                   c.dp_scale if c.augreg else 1.0, c.re_scale if c.augreg else 1.0)
        self.starts = [r.start for r in self.table]
        self.window = self.cfg.search_steps(state.total_steps, state.epoch_steps)
        if c.mode == "auto" and self.window * t.grad_accum < 2 * c.search_batches:
            raise ConfigError(f"plugins.growth: a search of {self.window} steps is too short to keep "
                             f"{c.search_batches} micro-batches and score them; raise search_length")
        decays = [d if c.decay_rescale == "none" else rescaled_decay(
            d, c.decay_rescale, t.batch_size, c.decay_batch, state.total_steps, c.reference_steps)
            for d in c.decays]
        self.copies.decays = decays
        if not self.depth:
            self.depth, self.resolution = self.table[0].depth, self.table[0].resolution
        self._start_copies(state, self._loaded_copies)
        self._loaded_copies = None
        state.logger.info("growth (%s): stages %s, momentum decays %s, optimizer state %s", c.mode,
                          [(s.start, s.resolution, s.depth) for s in self.table],
                          [round(d, 6) for d in decays], c.optimizer_state)
        self._configure_step(state)

    def _start_copies(self, state, states) -> None:
        zero3 = hasattr(next(state.model.parameters()), "ds_id")
        shadows = [self._build(state, self.depth).to(next(state.model.parameters()).device)
                   for _ in self.copies.decays]
        self.copies.start(state.model, shadows, zero3, states)
        for m in shadows:
            state.token_stage.attach(m, primary=False)

    # ------------------------------------------------------------ the controller
    def on_step_start(self, state) -> None:
        step, c = state.step, self.cfg
        if self.search is not None and step == self.search.end:
            with host_sync.allowed("AutoProg decision (once per search)"):
                self._finish_search(state)
        else:
            s = S.stage_of(step, self.starts)
            begins = step == self.table[s].start and not any(d["step"] == step for d in self.decisions)
            if begins and (self.search is None or self.search.start != step):
                if c.mode == "auto" and s < len(self.table) - 1 and self._begin_search(state, s):
                    pass
                elif self.table[s].depth > self.depth or self.table[s].resolution > self.resolution:
                    self._manual_growth(state, s)
        self._configure_step(state)

    def _configure_step(self, state) -> None:
        """This step's sub-network, input size and drop-path (a pure function of the step and state)."""
        stage = state.token_stage
        if self.search is not None:
            r, d = self.search.sample(state.step, self.seed)
            stage.set_active_blocks(self.search.active(d, self.cfg.quirk_smallest_base))
            self.step_res, self.step_depth = r, d
            surgery.set_drop_path(state.model, self.table[-1].drop_path, self.depth)
        else:
            stage.set_active_blocks(None)
            self.step_res, self.step_depth = self.resolution, self.depth
            row = self.table[S.stage_of(state.step, self.starts)]
            surgery.set_drop_path(state.model, row.drop_path)

    def _grow_request(self, state, new_depth: int, reason: str) -> None:
        """MoGrow: online weights and every copy from the slow copy / themselves, duplicated."""
        src = surgery.duplicate_last(self.depth, new_depth)
        grown = surgery.remap_blocks(self.copies.model(self.cfg.grow_from).state_dict(), src)
        self._pending = self.copies.remapped(src)
        self.depth = new_depth
        state.request_rebuild(RebuildRequest(
            block_map=src, arch=self.architecture(), weights=grown,
            optimizer_state=self.cfg.optimizer_state, new_param_state=self.cfg.new_param_state,
            step="carry" if self.cfg.optimizer_state == "carry" else "reset", reason=reason))

    def _manual_growth(self, state, s: int) -> None:
        """The stage's table row, never shrinking what a search chose."""
        row = self.table[s]
        res, depth = max(row.resolution, self.resolution), max(row.depth, self.depth)
        if res != self.resolution:
            state.logger.info("growth stage %d at step %d: resolution %d -> %d", s, state.step,
                              self.resolution, res)
        self.resolution = res
        self.decisions.append({"step": state.step, "stage": s, "kind": "manual", "resolution": res,
                               "depth": depth})
        if depth > self.depth:
            self._grow_request(state, depth, f"stage {s}: depth {self.depth} -> {depth}, resolution {res}")

    def _begin_search(self, state, s: int) -> bool:
        cands = [(r, d) for r, d in S.candidates(s, self.resolution, self.depth, self.resolutions,
                                                  self.depths) if d <= 2 * self.depth]
        if len(cands) <= 1 or (self.resolution, self.depth) == max(cands):
            return False
        max_depth = max(d for _, d in cands)
        self.search = Search(stage=s, base=self.depth, max_depth=max_depth, cands=cands,
                             start=state.step, end=state.step + self.window,
                             points=[state.step + p for p in S.loss_points(self.window)])
        if max_depth > self.depth:
            self._grow_request(state, max_depth, f"stage {s}: AutoProg supernet {self.depth} -> "
                                                 f"{max_depth} blocks, {len(cands)} candidates")
        return True

    def _finish_search(self, state) -> None:
        c, srch = self.cfg, self.search
        costs = self._costs()
        index, scores, w = srch.decide(costs)
        index = agree(index)
        r, d = srch.cands[index]
        record = {"step": state.step, "stage": srch.stage, "kind": "search", "resolution": r, "depth": d,
                  "w": w, "candidates": [list(x) for x in srch.cands], "scores": scores,
                  "losses": srch.mean_losses(), "costs": costs}
        self.decisions.append(record)
        self._log_search(state, record)
        active = srch.active(d)   # the current depth as base, also in the released code (quirk or not)
        self.search, self.resolution = None, r
        self._pending = self.copies.remapped(active)
        weights = "masters"
        if c.quirk_remogrow_at_max and d == srch.max_depth:
            weights = surgery.remap_blocks(self.copies.model(c.grow_from).state_dict(), active)
        elif active == list(range(self.depth)):   # the whole supernet: nothing to extract
            self._pending = None
            return
        self.depth = d
        state.request_rebuild(RebuildRequest(
            block_map=active, arch=self.architecture(), weights=weights,
            optimizer_state=c.optimizer_state, new_param_state=c.new_param_state,
            step="carry" if c.optimizer_state == "carry" else "reset",
            reason=f"stage {srch.stage}: AutoProg chose resolution {r}, depth {d}"))

    def _costs(self) -> list[float]:
        """The search's candidates' costs: measured times, or MACs (``cost=flops``, or no time yet)."""
        srch = self.search
        if self.cfg.cost == "time" and srch.times:
            return list(srch.times)
        return [S.candidate_macs(r, d, self.patch, 1, self.dim, self.mlp_ratio) for r, d in srch.cands]

    def on_after_rebuild(self, state) -> None:
        if state.last_rebuild.requested_by != self.name:
            return
        self._start_copies(state, self._pending)
        self._pending = None
        self._configure_step(state)

    # ------------------------------------------------------------ per micro-batch / per step
    def on_batch_start(self, state) -> None:
        b, srch = state.batch, self.search
        if srch is not None and len(srch.batches) < self.cfg.search_batches:
            # kept on the device (a copy to the host would sync every step of the window)
            srch.batches.append((b.images.detach().clone(), b.targets.detach().clone()))
        # depth-only growth leaves the input size to whoever owns it (compose: one plugin may)
        if self.dynamic and self.step_res and self.step_res != b.images.shape[-1]:
            b.images = F.interpolate(b.images, size=(self.step_res, self.step_res), mode="bilinear",
                                     align_corners=False)

    def on_after_step(self, state) -> None:
        self.copies.update()
        srch, c = self.search, self.cfg
        if srch is not None:
            scorer = self.copies.model(c.score_with)
            if c.cost == "time" and srch.times is None and len(srch.batches) >= c.search_batches:
                with host_sync.allowed("AutoProg timing (once per search)"):
                    srch.times = measure_times(scorer, state.token_stage, srch, c.time_iters, c.time_warmup,
                                               c.quirk_smallest_base, self.table[-1].drop_path)
            if state.step in srch.points:
                with host_sync.allowed("AutoProg scoring (a few points per search)"):
                    srch.losses.append(measure_losses(scorer, state.token_stage, srch, c.quirk_smallest_base,
                                                      self.table[-1].drop_path, seed=state.step))
        log = state.logger
        if log is not None:
            log.scalar("growth/depth", self.step_depth)
            log.scalar("growth/resolution", self.step_res)
            log.scalar("growth/tokens_per_image", (self.step_res // self.patch) ** 2 + 1)

    def on_eval_start(self, state) -> None:
        """Evaluation inside a search runs the whole supernet (at the full input size)."""
        self._sampled = state.token_stage.active_blocks
        state.token_stage.set_active_blocks(None)

    def on_eval_end(self, state) -> None:
        state.token_stage.set_active_blocks(self._sampled)

    def on_epoch_start(self, state) -> None:
        """Per epoch (the loader takes its transform per epoch): the per-stage RandAugment magnitude
        and random erasing of the stage holding the epoch's first step, and, with a manual schedule,
        images cropped at the largest resolution any step of the epoch trains at (the stage
        resolution itself unless a stage starts inside the epoch; steps at a lower one are resized
        on the device, as before). AutoProg's resolutions are decided by its searches, so it keeps
        full-size crops."""
        first = sum(state.epoch_steps[:state.epoch])
        if self.cfg.mode != "auto" and self.dynamic:
            e = state.epoch
            end = first + (state.epoch_steps[e] if e < len(state.epoch_steps) else state.steps_per_epoch)
            last = S.stage_of(end - 1, self.starts)   # resolution never shrinks (on_step_start's max)
            state.data.set_decode_size(max(row.resolution for row in self.table[:last + 1]))
        if not self.cfg.augreg:
            return
        row = self.table[S.stage_of(first, self.starts)]
        state.data.set_augmentation(stage_augment(self.data_cfg.auto_augment, row.magnitude), row.reprob)

    def _log_search(self, state, record: dict) -> None:
        log = state.logger
        lines = []
        for (r, d), loss, cost, score in zip(record["candidates"], record["losses"], record["costs"],
                                             record["scores"]):
            tag = f"growth/search{record['stage']}/r{r}_d{d}"
            log.scalar(f"{tag}/loss", loss)
            log.scalar(f"{tag}/cost", cost)
            log.scalar(f"{tag}/score", score)
            lines.append(f"r{r} d{d}: loss {loss:.4f} cost {cost:.4g} score {score:.4f}")
        log.scalar(f"growth/search{record['stage']}/w", record["w"])
        log.scalar(f"growth/search{record['stage']}/chosen_depth", record["depth"])
        log.scalar(f"growth/search{record['stage']}/chosen_resolution", record["resolution"])
        log.info("AutoProg search %d at step %d (w %.3f): %s -> resolution %d, depth %d", record["stage"],
                 record["step"], record["w"], "; ".join(lines), record["resolution"], record["depth"])

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"depth": self.depth, "resolution": self.resolution, "decisions": list(self.decisions),
                "search": None if self.search is None else self.search.state_dict(),
                "copies": self.copies.state_dicts(),
                "schedule": {k: getattr(self.cfg, k) for k in self.SCHEDULE_KEYS}}

    def load_state_dict(self, state: dict) -> None:
        now = {k: getattr(self.cfg, k) for k in self.SCHEDULE_KEYS}
        diff = {k: (v, now[k]) for k, v in state["schedule"].items() if _plain(v) != _plain(now[k])}
        if diff:
            raise RunStateError(f"plugins.growth: the checkpoint was trained with another schedule "
                               f"(checkpoint, now): {diff}; resume with the same values or start fresh")
        self.depth, self.resolution = state["depth"], state["resolution"]
        self.decisions = list(state["decisions"])
        self.search = None if state["search"] is None else Search.from_state(state["search"])
        self._loaded_copies = state["copies"]

    def rank_state_dict(self) -> dict:
        if self.search is None:
            return {}
        return {"batches": [(x.cpu(), y.cpu()) for x, y in self.search.batches]}

    def load_rank_state_dict(self, state: dict) -> None:
        if self.search is not None:
            self.search.batches = list(state.get("batches", []))

    def reshard_rank_state(self, states: list, rank: int, world_size: int) -> dict:
        """The scoring batches are slices of global micro-batches: this rank's slice of each."""
        if not any(states):
            return {}
        per_rank = [s["batches"] for s in states]
        return {"batches": [tuple(reslice_batch([b[j][i] for b in per_rank], rank, world_size) for i in (0, 1))
                            for j in range(len(per_rank[0]))]}


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v

