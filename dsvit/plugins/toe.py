"""Token Expansion (ToE; Huang et al., CVPR 2024) as a token-stage plugin.

Paper: Huang et al., "A General and Efficient Training for Transformer via Token Expansion", CVPR 2024
(arXiv:2404.00672; reference code: github.com/Osilly/TokenExpansion).

Per forward (training only): split off the prefix tokens, take a fixed stride of seed patches, grow
the kept set chunk by chunk with the patches whose highest cosine similarity to the kept set is
lowest, then average every leftover patch into its most similar kept patch (the host counts once).
Blocks from ``insert_before_block`` on run on ``prefix + kept``. Similarities, sorts and argmaxes run
under no_grad; gathers and the average carry gradient, so every patch (merged ones included) trains
block 0 and the embeddings.

Where our setting deviates from the original (paper and reference code), and why:
- The stage schedule is given as fractions of training by default (``stage_unit="fraction"``,
  starts [0, 1/3, 2/3]); each start becomes the step ``round(f * total_steps)`` and the stage changes at
  that optimizer step, not at an epoch boundary. With epoch counts divisible by 3 (the paper's 300)
  this is the paper's epoch 100/200. ``stage_unit="epoch"`` takes the original epoch starts.
- Similarities are computed in fp32 on a detached copy (the original uses the AMP dtype), and
  normalisation uses eps=1e-6 (the original divides by the raw norm: NaN on zero tokens) [deviation-ok].
- Gating is tied to the running model's mode (``stage.training``); eval, and the EMA copy, always run
  full tokens unless ``sparse_eval`` (the LV-ViT script's never-switched-off eval is not reproduced).
- P is read from the tensor at call time, so after PSS ToE works on the survivors; at least one seed
  is kept (floor(P*rho) is 0 only for P < 4 at rho=0.25). A configuration whose worst case (PSS's
  largest drop on growth's smallest input, say) leaves the seed fraction no seed is refused at start
  (``footprint``, ``dsvit.engine.compose``).
- ``round_multiple`` (off by default) moves the last chunk so the post-ToE sequence length is a
  multiple of e.g. 8 (kernel-friendly shapes); counts then differ from the original's.

Quirks of the original, each with a faithful and a clean option (default clean):
- Seeds (``seeds``): "stride" (faithful) takes ``n0 = floor(P*rho)`` patches at stride ``1 // rho``
  (float floor division: 1 // 0.2 == 4, so rho=0.2 leaves the bottom rows seedless). "uniform" (clean)
  takes ``floor(i * P / n0)`` for i < n0: the same n0, spread over the whole sequence. Both give the
  identical seeds whenever 1/rho is an integer (the DeiT default rho=0.25), so the paper's DeiT setting
  is reproduced exactly either way.
Not offered as options (they define the method's token counts, not quirks): the float-difference
increments (``floor(P*(r_s - r_{s-1}))``, e.g. 0.7-0.4 < 0.3) and the special last-stage formula are
kept because the original's token counts depend on them; cosine is the only similarity.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dsvit.errors import ConfigError, RunStateError
from dsvit.engine.compose import Blocks, Footprint, TokenSite
from dsvit.engine.plugin import ORDER_TOKENS, Plugin
from dsvit.model.token_stage import add_tokens, take_tokens
from dsvit.plugins import register


# ---------------------------------------------------------------- schedule and counts (pure python)
def stage_index(t: float, starts: list) -> int:
    """Stage delta at time ``t`` (epoch or step): #{i : starts[i] <= t}; 0 means full tokens."""
    return bisect_right(list(starts), t)


def is_active(stage: int, keep_rates: list) -> bool:
    """ToE acts in stages 1..T, except a last stage with keep rate 1.0, which is a true bypass."""
    return stage >= 1 and not (stage == len(keep_rates) and keep_rates[-1] >= 1.0)


def seed_positions(num_patches: int, rho: float, seeds: str = "uniform") -> list[int]:
    """Seed patch indices (0-based, ascending). See the module docstring for stride vs uniform.
    At least one seed, so tiny token counts (e.g. after heavy PSS) still have something to grow from."""
    n0 = min(num_patches, max(1, math.floor(num_patches * rho)))
    if seeds == "stride":
        q = int(1.0 // rho)
        return list(range(0, num_patches, q))[:n0]
    return [(i * num_patches) // n0 for i in range(n0)]


def chunk_sizes(num_patches: int, rho: float, keep_rates: list, stage: int, repeats: int) -> list[int]:
    """Sizes of the expansion chunks run at ``stage`` (all chunks of stages 1..stage, in order)."""
    p, total_rates = num_patches, len(keep_rates)
    deltas, prev, acc = [], rho, rho
    for s in range(1, min(stage, total_rates) + 1):
        d = keep_rates[s - 1] - prev       # float difference first, floored afterwards (as the original)
        if s < total_rates:
            deltas.append(math.floor(p * d))
            acc += d
        else:
            deltas.append(math.floor(p * keep_rates[-1]) - math.floor(p * acc))
        prev = keep_rates[s - 1]
    chunks = []
    for delta in deltas:
        base = delta // repeats
        chunks += [base] * (repeats - 1) + [delta - (repeats - 1) * base]
    return chunks


def min_patches_for_a_seed(rho: float) -> int:
    """The fewest patches whose seed fraction gives a seed: floor(P * rho) >= 1."""
    p = max(1, math.ceil(1 / rho) - 1)
    while math.floor(p * rho) < 1:
        p += 1
    return p


def round_chunks(chunks: list[int], n0: int, num_patches: int, num_prefix: int, multiple: int) -> list[int]:
    """Move the last chunks so ``num_prefix + kept`` is the nearest multiple of ``multiple``."""
    kept = n0 + sum(chunks)
    if multiple <= 1 or kept >= num_patches:
        return chunks
    seq = max(multiple * round((num_prefix + kept) / multiple), num_prefix + n0)
    diff = min(seq, num_prefix + num_patches) - num_prefix - kept
    chunks = list(chunks)
    if diff > 0 and chunks:
        chunks[-1] += diff
    for i in range(len(chunks) - 1, -1, -1):    # remove tokens from the last chunks first
        take = min(chunks[i], max(0, -diff))
        chunks[i] -= take
        diff += take
    return [c for c in chunks if c > 0]


# ---------------------------------------------------------------- tensor core
@torch.no_grad()
def expand(xn: torch.Tensor, sel: torch.Tensor, uns: torch.Tensor, chunks: list[int]):
    """Grow ``sel`` by ``chunks``: each chunk takes the unselected tokens with the lowest maximum cosine
    similarity to the selected set, in ascending score order. ``xn``: L2-normalised tokens [B, P, C];
    sel/uns: [B, *] indices into P. Returns (sel, uns), uns in the last chunk's score order."""
    for n in chunks:
        if n <= 0 or uns.shape[1] == 0:
            continue
        score = torch.bmm(take_tokens(xn, uns), take_tokens(xn, sel).transpose(1, 2)).amax(-1)   # [B, |U|]
        order = score.argsort(dim=-1, stable=True)
        sel = torch.cat([sel, torch.gather(uns, 1, order[:, :n])], 1)
        uns = torch.gather(uns, 1, order[:, n:])
    return sel, uns


def merge(xp: torch.Tensor, xn: torch.Tensor, sel: torch.Tensor, uns: torch.Tensor):
    """Average every unselected token into its most similar selected token, the host counting once:
    y_s = (x_s + sum_{h(u)=s} x_u) / (1 + #{u: h(u)=s}). Returns (y [B, K, C], host [B, |U|])."""
    kept = take_tokens(xp, sel)
    if uns.shape[1] == 0:
        return kept, uns
    with torch.no_grad():
        host = torch.bmm(take_tokens(xn, uns), take_tokens(xn, sel).transpose(1, 2)).argmax(-1)    # [B, |U|]
        count = torch.ones(sel.shape, dtype=xp.dtype, device=xp.device)
        count.scatter_add_(1, host, torch.ones(uns.shape, dtype=xp.dtype, device=xp.device))
    summed = add_tokens(kept, host, take_tokens(xp, uns))
    return summed / count.unsqueeze(-1), host


def token_expansion(x: torch.Tensor, num_prefix: int, seeds: torch.Tensor, chunks: list[int]):
    """Full ToE on ``x`` [B, num_prefix + P, C] with seed patch indices ``seeds`` [n0] (into P).

    Returns (y, keep, merged, host): y [B, num_prefix + K, C] = [prefix, kept patches (seeds ascending,
    then chunk by chunk)]; keep [B, num_prefix + K] indices into x's token axis; merged [B, P - K] indices
    into x of the tokens averaged away; host [B, P - K] their host's index into y's token axis."""
    b, n, _ = x.shape
    p = n - num_prefix
    prefix, xp = x[:, :num_prefix], x[:, num_prefix:].contiguous()   # one copy, not one per gather
    mask = torch.ones(p, dtype=torch.int8, device=x.device)
    mask[seeds] = 0
    sel = seeds.expand(b, -1)
    # the unselected patches, ascending: a stable sort puts them first, and their count is known
    # from the shapes (a boolean index would be a nonzero, i.e. a host sync on every forward)
    uns = torch.sort(mask, descending=True, stable=True).indices[:p - seeds.numel()].expand(b, -1)
    xn = F.normalize(xp.detach().float(), dim=-1, eps=1e-6)
    sel, uns = expand(xn, sel, uns, chunks)
    y, host = merge(xp, xn, sel, uns)
    keep = torch.cat([torch.arange(num_prefix, device=x.device).expand(b, -1), sel + num_prefix], 1)
    return torch.cat([prefix, y], 1), keep, uns + num_prefix, host + num_prefix


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v


# ---------------------------------------------------------------- config + plugin
@dataclass(frozen=True)
class ToEConfig:
    enabled: bool = True
    order: int = 0                       # 0: ORDER_TOKENS + 10 (after PSS)
    stage_unit: str = "fraction"         # fraction (of total steps) | epoch
    stage_starts: list = field(default_factory=lambda: [0.0, 1 / 3, 2 / 3])
    keep_rates: list = field(default_factory=lambda: [0.5, 0.75, 1.0])
    init_keep_rate: float = 0.25         # rho: seed fraction
    repeats: int = 2                     # k: chunks per stage
    seeds: str = "uniform"               # uniform (clean) | stride (faithful: 1 // rho stride)
    insert_before_block: int = 1         # block 0 always sees every token
    sparse_eval: bool = False            # evaluate with the current stage's reduction (analysis only)
    round_multiple: int = 0              # >1: post-ToE sequence length to the nearest multiple

    def validate(self, cfg) -> None:
        if self.stage_unit not in ("fraction", "epoch"):
            raise ConfigError(f"stage_unit must be fraction or epoch, got '{self.stage_unit}'")
        if not self.stage_starts or len(self.stage_starts) != len(self.keep_rates):
            raise ConfigError(f"stage_starts {self.stage_starts} and keep_rates {self.keep_rates} need "
                              "the same, non-zero length (one start per stage)")
        if list(self.stage_starts) != sorted(self.stage_starts) or self.stage_starts[0] < 0:
            raise ConfigError(f"stage_starts must be ascending and >= 0, got {self.stage_starts}")
        if self.stage_unit == "fraction" and self.stage_starts[-1] >= 1:
            raise ConfigError(f"stage_starts are fractions of training in [0, 1), got {self.stage_starts}; "
                              "set stage_unit=epoch to give epochs")
        if self.stage_unit == "epoch" and self.stage_starts[-1] >= cfg.train.epochs:
            raise ConfigError(f"stage_starts {self.stage_starts} (epochs) reach past train.epochs="
                              f"{cfg.train.epochs}; use smaller starts or stage_unit=fraction")
        if not 0 < self.init_keep_rate <= self.keep_rates[0]:
            raise ConfigError(f"init_keep_rate must be in (0, keep_rates[0]={self.keep_rates[0]}], "
                              f"got {self.init_keep_rate}")
        if list(self.keep_rates) != sorted(self.keep_rates) or self.keep_rates[-1] > 1:
            raise ConfigError(f"keep_rates must be non-decreasing and <= 1, got {self.keep_rates}")
        if self.repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {self.repeats}")
        if self.seeds not in ("uniform", "stride"):
            raise ConfigError(f"seeds must be uniform or stride, got '{self.seeds}'")
        depth = cfg.model.depth
        if self.insert_before_block < 0 or (depth is not None and self.insert_before_block >= depth):
            raise ConfigError(f"insert_before_block must be in [0, model depth), got {self.insert_before_block}")
        if self.round_multiple < 0:
            raise ConfigError(f"round_multiple must be >= 0 (0 = off), got {self.round_multiple}")


@register
class TokenExpansion(Plugin):
    name = "toe"
    config_class = ToEConfig
    order = ORDER_TOKENS + 10

    # schedule-defining fields: a resume with other values would train a different method
    SCHEDULE_KEYS = ("stage_unit", "stage_starts", "keep_rates", "init_keep_rate", "repeats", "seeds",
                     "insert_before_block", "round_multiple")

    def __init__(self, cfg: ToEConfig, config=None):
        super().__init__(cfg, config)
        self.stage = 0
        self.tokens = 0                  # sequence length after ToE in the last training forward
        self._seeds: dict = {}           # (P, rho, device) -> seed index tensor

    # ---- schedule
    def stage_at(self, step: int, epoch: int, total_steps: int) -> int:
        c = self.cfg
        if c.stage_unit == "epoch":
            return stage_index(epoch, c.stage_starts)
        return stage_index(step, [round(f * total_steps) for f in c.stage_starts])

    def active(self, training: bool) -> bool:
        return (training or self.cfg.sparse_eval) and is_active(self.stage, self.cfg.keep_rates)

    def seeds_for(self, num_patches: int, device) -> torch.Tensor:
        key = (num_patches, self.cfg.init_keep_rate, str(device))
        if key not in self._seeds:
            pos = seed_positions(num_patches, self.cfg.init_keep_rate, self.cfg.seeds)
            self._seeds[key] = torch.tensor(pos, dtype=torch.long, device=device)
        return self._seeds[key]

    def plan(self, num_patches: int, num_prefix: int, device):
        seeds = self.seeds_for(num_patches, device)
        return seeds, self._chunks(num_patches, len(seeds), num_prefix, self.stage)

    def _chunks(self, num_patches: int, num_seeds: int, num_prefix: int, stage: int) -> list[int]:
        c = self.cfg
        chunks = chunk_sizes(num_patches, c.init_keep_rate, c.keep_rates, stage, c.repeats)
        return round_chunks(chunks, num_seeds, num_patches, num_prefix, c.round_multiple)

    def kept_patches(self, num_patches: int, stage: int) -> int:
        """Patches ToE keeps of ``num_patches`` in ``stage`` (seeds plus chunks)."""
        n0 = len(seed_positions(num_patches, self.cfg.init_keep_rate, self.cfg.seeds))
        return min(num_patches, n0 + sum(self._chunks(num_patches, n0, 1, stage)))

    def footprint(self) -> Footprint:
        """Before ``insert_before_block`` (registered once: rebuilds move it by their block map), the
        fewest patches of any active stage. Fewer than 1 / init_keep_rate patches arriving would leave
        the seed fraction no seed (the hook then keeps one anyway: a method other than configured)."""
        c = self.cfg
        active = [s for s in range(1, len(c.keep_rates) + 1) if is_active(s, c.keep_rates)]
        where = Blocks("insert_before_block", indices=(c.insert_before_block,), moves=True)
        if not active:
            return Footprint(sites=(TokenSite("before_block", where),))
        return Footprint(sites=(TokenSite(
            "before_block", where, lambda n: min(self.kept_patches(n, s) for s in active),
            ("keep_rates", "init_keep_rate"), needs=min_patches_for_a_seed(c.init_keep_rate),
            needs_keys=("init_keep_rate",), why="its seed fraction must give at least one seed"),))

    # ---- the hook
    def __call__(self, x: torch.Tensor, stage) -> torch.Tensor:
        if not self.active(stage.training):
            return x
        npt = stage.num_prefix_tokens
        seeds, chunks = self.plan(x.shape[1] - npt, npt, x.device)
        pos = stage.current_positions(x)
        y, keep, merged, host = token_expansion(x, npt, seeds, chunks)
        stage.keep_positions(x, keep)
        # global positions of the merged tokens and of their hosts (visualisation)
        stage.note_merge(torch.gather(pos, 1, merged), torch.gather(stage.positions, 1, host))
        if stage.training:
            self.tokens = y.shape[1]
        return y

    # ---- events
    def on_fit_start(self, state) -> None:
        if len(state.model.blocks) <= self.cfg.insert_before_block:
            raise ValueError(f"plugins.toe.insert_before_block={self.cfg.insert_before_block} but the "
                             f"model has {len(state.model.blocks)} blocks")
        state.token_stage.add_before_block(self.cfg.insert_before_block, self)
        self.stage = self.stage_at(state.step, state.epoch, state.total_steps)

    def on_step_start(self, state) -> None:
        self.stage = self.stage_at(state.step, state.epoch, state.total_steps)

    def on_before_forward(self, state) -> None:
        self.tokens = 0

    def on_after_step(self, state) -> None:
        if state.logger is not None:
            state.logger.scalar("toe/stage", self.stage)
            rate = self.cfg.keep_rates[self.stage - 1] if self.stage else 1.0
            state.logger.scalar("toe/keep_rate", rate if self.tokens else 1.0)
            if self.tokens:
                state.logger.scalar("toe/tokens_after_merge", self.tokens)   # sequence length after ToE

    def on_fit_end(self, state) -> None:
        state.token_stage.remove(self)

    # ---- resume
    def state_dict(self) -> dict:
        return {k: getattr(self.cfg, k) for k in self.SCHEDULE_KEYS}

    def load_state_dict(self, state: dict) -> None:
        now = self.state_dict()
        diff = {k: (v, now[k]) for k, v in state.items() if k in now and _plain(v) != _plain(now[k])}
        if diff:
            raise RunStateError(f"plugins.toe: the checkpoint was trained with other ToE settings "
                               f"(checkpoint, now): {diff}; resume with the same values or start fresh")
