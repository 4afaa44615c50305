"""Example-level pruning's pure parts and the plugin in-process: forgetting counts against a
sequential reference (Tri-Level E-ViT's example level, Kong et al. AAAI 2023), rounds, InfoBatch
(Qin et al. ICLR 2024) prune sets and unbiasedness, the epoch plan, keep sets before decode, the
CLS-variance hook, mid-epoch resume, images by uid."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

from dsvit.config import apply_override, load_config, validate
from dsvit.data import pipeline as P
from dsvit.data.memory import MemoryTrainData, random_dataset
from dsvit.data.stream import SampleDecoder
from dsvit.errors import ConfigError
from dsvit.plugins.example_pruning import infobatch as IB
from dsvit.plugins.example_pruning.config import ExamplePruningConfig
from dsvit.plugins.example_pruning.events import EventBuffer, time_order
from dsvit.plugins.example_pruning.forgetting import ForgettingState, initial_active
from data_helpers import cfg as data_cfg, write_dataset
from example_pruning_helpers import FORGET, INFOB, Run, checkpointed, make_cfg
from launch import assert_same


# ------------------------------------------------------------------ forgetting: counting
def reference(n, window, events, state=None):
    """Sequential per-event update (the definition): (last_c, forget, ever, npres, clsvar sum/count)."""
    last, forget, ever, npres, vs, vn = state or ([-1] * n, [0] * n, [False] * n, [0] * n, [0.0] * n, [0] * n)
    for u, c, v in events:
        if npres[u] < window:
            if last[u] == 1 and c == 0:
                forget[u] += 1
            last[u], ever[u], npres[u] = c, ever[u] or c == 1, npres[u] + 1
        if np.isfinite(v):
            vs[u] += v
            vn[u] += 1
    return last, forget, ever, npres, vs, vn


def assert_matches(st, ref):
    last, forget, ever, npres, vs, vn = ref
    assert st.last_c.tolist() == last and st.forget.tolist() == forget
    assert st.ever.tolist() == ever and st.npres.tolist() == npres
    assert st.clsvar_n.tolist() == vn and np.allclose(st.clsvar_sum, vs)


def score_of(seq, window=30):
    st = ForgettingState(1, window, np.ones(1, bool))
    st.update(np.zeros(len(seq), np.int64), np.array(seq))
    return int(st.scores()[0])


@pytest.mark.parametrize("seq,want", [([1, 0, 1, 0], 2), ([0, 1, 1], 0), ([0, 0, 0], 30), ([1], 0),
                                      ([1, 0, 1, 0, 1, 0], 3), ([0], 30)])
def test_spec_examples(seq, want):
    assert score_of(seq) == want


def test_truncation_at_p():
    assert score_of([1, 0, 1, 0, 1, 0], window=4) == 2        # only the first 4 count
    assert score_of([0, 0, 0, 1], window=3) == 3               # correct only after P: never correct
    assert score_of([1, 0, 1, 0], window=1) == 0


def test_transitions_across_epochs_count_and_a_round_clears_them():
    st = ForgettingState(3, 30, np.ones(3, bool))
    st.update([0, 1], [1, 1])          # epoch 0
    st.update([1, 0], [0, 0])          # epoch 1: both forget, against last_c from epoch 0
    assert st.forget.tolist() == [1, 1, 0] and st.scores().tolist() == [1, 1, 30]
    st.update([2], [1])
    st.round(0, np.random.default_rng(0))
    assert st.scores().tolist() == [30, 30, 30] and (st.last_c == -1).all() and not st.npres.any()
    st.update([0], [0])                # after the round: no transition against the old window
    assert st.forget[0] == 0


@pytest.mark.parametrize("seed", range(6))
def test_vectorized_update_equals_sequential_reference(seed):
    rng = np.random.default_rng(seed)
    n, window = 40, int(rng.integers(1, 8))
    st, ref = ForgettingState(n, window, np.ones(n, bool)), None
    for _ in range(4):                 # epochs, each one update with repeated uids
        m = int(rng.integers(1, 120))
        uid = rng.integers(0, n, m)
        c = rng.integers(0, 2, m)
        v = np.where(rng.random(m) < 0.1, np.nan, rng.random(m))
        st.update(uid, c, v)
        ref = reference(n, window, zip(uid.tolist(), c.tolist(), v.tolist()), ref)
        assert_matches(st, ref)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_gather_layout_gives_the_time_order(world):
    """Ranks' buffers stacked as all_gather does ([W*rows, B]) -> events in (step, rank, position)
    order, and the state equals the sequential reference over that order."""
    rng = np.random.default_rng(world)
    rows, b, n = 5, 4, 12
    bufs = [rng.integers(0, 2, (rows, b, 3)).astype(np.float64) for _ in range(world)]
    for r, buf in enumerate(bufs):
        buf[..., 0] = rng.integers(0, n, (rows, b))
        buf[..., 2] = rng.random((rows, b))
    ev = time_order(np.concatenate(bufs), rows)
    want = [bufs[r][s, p] for s in range(rows) for r in range(world) for p in range(b)]
    assert np.array_equal(ev, np.array(want))
    st = ForgettingState(n, 3, np.ones(n, bool))
    st.update(ev[:, 0].astype(np.int64), ev[:, 1] > 0.5, ev[:, 2])
    assert_matches(st, reference(n, 3, [(int(u), int(c), v) for u, c, v in want]))


def test_event_buffer_rows_and_checkpoint():
    buf = EventBuffer(epoch=2, rows=3, batch=2, columns=2, device="cpu")
    buf.write(0, torch.tensor([5, 6]), torch.tensor([0.5, 1.5]))
    with pytest.raises(RuntimeError, match="out of step"):
        buf.write(2, torch.tensor([5, 6]), torch.tensor([0.5, 1.5]))
    saved = copy.deepcopy(buf.state_dict())
    again = EventBuffer(epoch=2, rows=3, batch=2, columns=2, device="cpu")
    again.load(saved, 1)
    for b in (buf, again):
        b.write(1, torch.tensor([7, 8]), torch.tensor([2.5, 3.5]))
        b.write(2, torch.tensor([9, 1]), torch.tensor([4.5, 5.5]))
    assert np.array_equal(buf.gather(True), again.gather(True))
    assert buf.gather(True)[:, 0].tolist() == [5, 6, 7, 8, 9, 1]
    with pytest.raises(RuntimeError, match="resumes 2 micro-batches"):
        EventBuffer(2, 3, 2, 2, "cpu").load(saved, 2)


# ------------------------------------------------------------------ forgetting: rounds
def windowed_state(seed, n=200, keep=0.8, window=5):
    rng = np.random.default_rng(seed)
    st = ForgettingState(n, window, initial_active(n, int(keep * n), np.random.default_rng([seed, 1])))
    act = np.flatnonzero(st.active)
    for _ in range(3):
        uid = rng.permutation(act)[:150]
        st.update(uid, rng.integers(0, 2, uid.size), rng.random(uid.size))
    return st


@pytest.mark.parametrize("tie_break", ["clsvar", "uid"])
def test_round_invariants(tie_break):
    st = windowed_state(0)
    before, n_active = st.active.copy(), int(st.active.sum())
    score, clsvar = st.scores(), st.clsvar_mean()
    cand = np.flatnonzero(st.active & (st.npres > 0))
    out = st.round(10, np.random.default_rng(3), tie_break)
    drop, restore = out["drop"], out["restore"]
    assert len(drop) == len(restore) == 10 and int(st.active.sum()) == n_active
    keys = sorted(cand, key=lambda u: (score[u], clsvar[u], u) if tie_break == "clsvar" else (score[u], u))
    assert drop.tolist() == keys[:10]                          # the 10 lowest by the sort keys
    assert not before[restore].any()                           # restored from the old pool
    assert not set(drop) & set(restore)                        # not back in the same round
    assert not st.active[drop].any() and st.active[restore].all()
    assert (st.active ^ before).sum() == 20                    # exactly those moved (pool = ~active)
    again = windowed_state(0)
    out2 = again.round(10, np.random.default_rng(3), tie_break)
    assert np.array_equal(out2["drop"], drop) and np.array_equal(out2["restore"], restore)


def test_round_only_drops_presented_examples_and_keeps_the_size():
    st = ForgettingState(10, 4, np.arange(10) < 8)
    st.update([0, 1], [1, 1])
    out = st.round(5, np.random.default_rng(0))
    assert sorted(out["drop"].tolist()) == [0, 1] and len(out["restore"]) == 2
    assert int(st.active.sum()) == 8


def test_checkpoint_round_trip_picks_the_same_round():
    st, rng = windowed_state(1), np.random.default_rng(7)
    rng.random(5)
    saved, rng_state = copy.deepcopy(st.state_dict()), copy.deepcopy(rng.bit_generator.state)
    out = st.round(12, rng)
    back = ForgettingState(st.n, st.window, np.zeros(st.n, bool))
    back.load_state_dict({k: torch.from_numpy(v).numpy() for k, v in saved.items()})
    rng2 = np.random.default_rng()
    rng2.bit_generator.state = rng_state
    out2 = back.round(12, rng2)
    assert np.array_equal(out["drop"], out2["drop"]) and np.array_equal(out["restore"], out2["restore"])


# ------------------------------------------------------------------ InfoBatch
def test_infobatch_prune_set_matches_a_reference():
    rng = np.random.default_rng(0)
    n = 1000
    ib = IB.InfoBatchState(n)
    scores = rng.exponential(1.0, n).astype(np.float32)
    seen = np.arange(n) >= 50                                   # never recorded: never pruned
    ib.scores, ib.seen = scores.copy(), seen.copy()
    m = IB.planned_pruned(n, 0.5, 0.6)
    out = ib.decide(m, 0.5, np.random.default_rng(1))
    below = seen & (scores < scores[seen].astype(np.float64).mean())
    k = min(m, int(0.5 * below.sum()))
    assert np.array_equal(ib.below, below) and out["pruned"] == k == int((~ib.keep).sum())
    assert not (~ib.keep & ~below).any()                        # only below-mean examples pruned
    assert ib.p == pytest.approx(k / below.sum())
    w = ib.weights()
    assert np.allclose(w[ib.keep & below], 1 / (1 - ib.p)) and (w[~below] == 1).all()
    assert ib.p <= 0.5


def test_infobatch_schedule_and_plan():
    assert IB.pruned_epochs(8, 0.125) == [False] + [True] * 6 + [False]
    assert IB.anneal_start(300, 0.125) == 263                   # InfoBatch: prune while e <= 262.5
    assert IB.pruned_epochs(4, 0.0) == [False, True, True, True]
    assert IB.plan(1000, 4, 0.5, 0.25, 0.6) == [1000, 700, 700, 1000]


@pytest.mark.parametrize("below_share", [0.9, 0.3])   # more / fewer below the mean than planned
def test_infobatch_gradient_is_unbiased(below_share):
    """Linear regression: the re-weighted gradient over the kept examples, averaged over many
    seeded prune draws, equals the full-data gradient (fewer than planned pruned: the epoch is a
    uniform cut of the kept set, which scales every example alike)."""
    rng = np.random.default_rng(0)
    n, d = 400, 3
    x, y, theta = rng.normal(size=(n, d)), rng.normal(size=n), rng.normal(size=d)
    grads = 2 * (x @ theta - y)[:, None] * x                    # per-example gradient
    losses = np.where(np.arange(n) < below_share * n, 0.1, 1.0).astype(np.float32)
    m = IB.planned_pruned(n, 0.5, 0.6)
    planned = n - m
    full = grads.sum(0)
    total, plain, draws = np.zeros(d), np.zeros(d), 4000
    for s in range(draws):
        ib = IB.InfoBatchState(n)
        ib.scores, ib.seen = losses.copy(), np.ones(n, bool)
        ib.decide(m, 0.5, np.random.default_rng(s))
        kept = np.flatnonzero(ib.keep)
        seen = np.random.default_rng([s, 1]).permutation(kept)[:planned]   # the trainer's cut
        scale = len(kept) / planned
        total += (ib.weights()[seen, None] * grads[seen]).sum(0) * scale
        plain += grads[seen].sum(0) * scale                     # without the 1/(1-p) weights
    tol = 0.006 * np.abs(full).max()   # ~6 Monte-Carlo standard errors (measured ~0.001 x |full|)
    assert np.abs(total / draws - full).max() < tol, (total / draws, full)
    assert np.abs(plain / draws - full).max() > 5 * tol         # the weights are what removes the bias


# ------------------------------------------------------------------ the plugin, in process
def test_forgetting_plugin_trains_on_the_active_set_and_swaps_at_rounds():
    run = Run(make_cfg(*FORGET, "plugins.example_pruning.log_images=4"))
    log = run.state.logger
    log.writer = True                                           # a TensorBoard writer: images too
    run.fit()
    assert log.images["example_pruning/least_forgettable"].shape[0] == 3
    assert set(log.images) == {"example_pruning/least_forgettable", "example_pruning/most_forgettable"}
    assert len(log.hists["example_pruning/round_scores"]) == log.scalars["example_pruning/candidates"][-1]
    assert run.steps == [10, 10, 10, 10]                       # 160 of 200 active / batch 16
    for e, keep in run.keeps.items():
        assert keep.sum() == 160 and keep[run.seen[e]].all()
    assert (run.keeps[1] ^ run.keeps[0]).sum() == 40 and (run.keeps[2] ^ run.keeps[1]).sum() == 40
    assert run.plugin.rounds_done == 2 and run.plugin.buffer is None   # no recording after the last round
    assert run.state.logger.scalars["example_pruning/dropped"] == [20, 20]


def test_infobatch_plugin_prunes_reweights_and_anneals():
    run = Run(make_cfg(*INFOB))
    run.fit()
    m = IB.planned_pruned(200, 0.5, 0.6)
    assert run.steps == [12, (200 - m) // 16, (200 - m) // 16, 12]
    assert run.keeps[0] is None and run.keeps[3] is None       # epoch 0 and the anneal epoch: full
    log = run.state.logger.scalars
    assert log["example_pruning/pruned"] == [200 - int(k.sum()) for k in (run.keeps[1], run.keeps[2])]
    for e in (1, 2):
        assert not set(np.flatnonzero(~run.keeps[e])) & set(run.seen[e])
    assert run.plugin._weights is None


def test_infobatch_weights_apply_to_the_kept_below_mean_examples():
    run = Run(make_cfg(*INFOB))
    run.fit(stop=12 + 2)                                        # inside epoch 1 (pruned)
    core, s = run.plugin.core, run.state
    uids = s.batch.uids.numpy()
    raw = ((s.batch.uids * 37 + 1 * 11) % 101).float() / 100
    want = raw * torch.from_numpy(np.where(core.below[uids], 1 / (1 - core.p), 1.0)).float()
    assert torch.allclose(run.last_loss, want) and core.below[uids].any()


@pytest.mark.parametrize("policy,stop", [("forgetting", 5), ("forgetting", 10), ("forgetting", 23),
                                         ("infobatch", 7), ("infobatch", 15)])
def test_mid_epoch_resume_takes_the_same_decisions(policy, stop):
    over = FORGET if policy == "forgetting" else INFOB
    straight = Run(make_cfg(*over))
    straight.fit()
    first = Run(make_cfg(*over))
    first.fit(stop=stop)
    rep = first.plugin.state_dict(), first.plugin.rank_state_dict()
    rep = checkpointed(rep)
    second = Run(make_cfg(*over))
    s, f = second.state, first.state
    s.step, s.epoch, s.step_in_epoch = f.step, f.epoch, f.step_in_epoch
    second.plugin.load_state_dict(rep[0])
    second.plugin.load_rank_state_dict(rep[1])
    second.fit()
    for e in range(f.epoch, 4):
        a, b = straight.keeps[e], second.keeps[e]
        assert (a is None and b is None) or np.array_equal(a, b)
        assert straight.seen[e][-len(second.seen[e]):] == second.seen[e]
    assert_same(straight.plugin.state_dict(), second.plugin.state_dict())


def test_per_rank_split_draws_per_rank_and_keeps_state_per_rank():
    runs = [Run(make_cfg(*FORGET, "plugins.example_pruning.per_rank_split=true"), rank=r, world=2)
            for r in range(2)]
    for run in runs:
        run.fit(stop=1)
    assert not np.array_equal(runs[0].keeps[0], runs[1].keeps[0])
    assert set(runs[0].plugin.state_dict()) == {"policy", "per_rank_split"}
    assert "core" in runs[0].plugin.rank_state_dict()


# ------------------------------------------------------------------ keep set before decode
@pytest.fixture(scope="module")
def shards(tmp_path_factory):  # 96 train in 8 shards of 12
    return write_dataset(tmp_path_factory.mktemp("ep"), 96, 10)


@pytest.mark.parametrize("policy", ["forgetting", "infobatch"])
def test_pruned_uids_are_never_decoded(shards, monkeypatch, policy):
    """Real shards: after a round / an InfoBatch decision the examples out of the keep set are
    neither decoded nor in any batch of the epoch."""
    decoded = []
    orig = SampleDecoder.decode

    def counting(self, uid, *a):
        decoded.append((self.plan.epoch, uid))
        return orig(self, uid, *a)
    monkeypatch.setattr(SampleDecoder, "decode", counting)
    over = (["plugins.example_pruning.round_epochs=[1]", "plugins.example_pruning.remove_fraction=0.2"]
            if policy == "forgetting" else INFOB)
    cfg = make_cfg(*over, batch=8, epochs=2)
    data = P.TrainData(data_cfg(shards, mode="resampled", workers=0), P.read_info(shards), img_size=16,
                       rank=0, world_size=1, local_batch=8, seed=0)
    run = Run(cfg, data=data)
    run.fit()
    for e in (0, 1):
        keep = np.ones(96, bool) if run.keeps[e] is None else run.keeps[e]
        dec = [u for ep, u in decoded if ep == e]
        assert dec and keep[dec].all() and keep[run.seen[e]].all()
    if policy == "forgetting":
        assert (run.keeps[0] & ~run.keeps[1]).sum() == 19        # dropped at the round: not decoded
    else:
        assert run.keeps[0] is None and (~run.keeps[1]).sum() > 0


def test_images_by_uid(shards):
    td = P.TrainData(data_cfg(shards, mode="resampled"), P.read_info(shards), img_size=16, rank=0,
                     world_size=1, local_batch=8, seed=0)
    uids = [50, 3, 95, 3]
    imgs = td.images_by_uid(uids)
    assert imgs.shape == (4, 3, 16, 16) and imgs.dtype == torch.float32
    assert torch.equal(imgs[1], imgs[3]) and not torch.equal(imgs[0], imgs[1])
    from PIL import Image
    from dsvit.data.transforms import build_eval_transform, image_stages, stack_images
    from data_helpers import make_arrays
    from dsvit.data.tar_reader import iter_shard
    raw, _ = make_arrays(106)                                   # write_dataset's train images first
    source = {int(k.rsplit("/", 1)[-1]): int(smp["txt"].decode().split("/")[1])   # shuffled at writing
              for url in td.urls for k, smp in iter_shard(url)}
    pil = [Image.fromarray(raw[source[u]]) for u in (50, 3)]
    for stage in image_stages(build_eval_transform(td.cfg, 16)):
        pil = [stage(x) for x in pil]
    assert torch.equal(imgs[:2], td.normalize(stack_images(pil)))
    with pytest.raises(KeyError, match="not in the shards"):
        td.images_by_uid([96])
    mem = MemoryTrainData(*random_dataset(8, 4, 3), rank=0, world_size=1, local_batch=2)
    assert torch.equal(mem.images_by_uid([5, 1]), mem.images[[5, 1]])


# ------------------------------------------------------------------ CLS variance hook
def test_clsvar_hook_records_the_last_blocks_cls_variance_and_follows_a_rebuild():
    from dsvit.config import ModelConfig
    from dsvit.model.vit import build_model
    mc = ModelConfig(name="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    model, stage = build_model(mc, 10)
    cfg = make_cfg(*FORGET, "plugins.example_pruning.tie_break=clsvar")
    run = Run(cfg)
    s = run.state
    s.model, s.token_stage = model, stage
    run.set.fire("fit_start", s)
    run.set.fire("epoch_start", s)
    assert [h[0] for h in stage.after_attention[1]] == [run.plugin._hook]
    seen = {}

    def spy(x, attn, st):
        seen["cls"] = attn.cls
        return x
    stage.add_after_attention(1, spy)
    model.train()
    x = torch.randn(3, 3, 16, 16)
    model(x)
    uids = torch.arange(3)
    assert torch.allclose(run.plugin._clsvar(stage, uids), seen["cls"].var(dim=1))
    model.eval()
    model(x)
    assert run.plugin._clsvar(stage, uids).isnan().all()      # evaluation records nothing
    copy, _ = build_model(mc, 10)
    stage.attach(copy, primary=False)
    copy.train()
    copy(x)
    assert run.plugin._clsvar(stage, uids).isnan().all()      # nor a copy's training-mode forward
    grown, _ = build_model(dataclasses.replace(mc, depth=3), 10)
    stage.attach(grown)
    stage.remap_blocks([0, 1, 1])
    s.model = grown
    run.set.fire("after_rebuild", s)
    assert run.plugin._hook in [h[0] for h in stage.after_attention[2]]
    assert run.plugin._hook not in [h[0] for h in stage.after_attention[1]]
    run.set.fire("fit_end", s)
    assert run.plugin._hook not in [h[0] for hooks in stage.after_attention.values() for h in hooks]


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("override,match", [
    ("policy=random", "policy must be"),
    ("round_epochs=[3,1]", "distinct ascending"),
    ("round_epochs=[0]", "must be in \\[1, train.epochs - 1"),
    ("round_epochs=[4]", "must be in \\[1"),
    ("remove_fraction=0.3", "remove_fraction=0.3 must be in"),
    ("tie_break=margin", "tie_break"),
    ("ratio=1.0", "ratio must be in"),
])
def test_config_errors_name_the_key(override, match):
    cfg = load_config("tiny_test", ["train.epochs=4", "plugins.example_pruning.enabled=true"])
    if override.startswith("ratio"):
        cfg = apply_override(cfg, "plugins.example_pruning.policy=infobatch")
    cfg = apply_override(cfg, f"plugins.example_pruning.{override}")
    with pytest.raises(ConfigError, match=f"plugins.example_pruning: .*{match}"):
        validate(cfg)


def test_default_rounds_scale_with_the_run():
    c = ExamplePruningConfig()
    assert c.round_list(300) == [30, 60, 90, 120, 150] and c.round_list(10) == [1, 2, 3, 4, 5]
    assert c.round_list(50) == [5, 10, 15, 20, 25]
    cfg = load_config("tiny_test", ["train.epochs=4", "plugins.example_pruning.enabled=true"])
    with pytest.raises(ConfigError, match="default schedule .*raise train.epochs, lower rounds"):
        validate(cfg)
    cfg = apply_override(cfg, "data.mode=partitioned")
    cfg = apply_override(cfg, "plugins.example_pruning.rounds=2")
    with pytest.raises(ConfigError, match="needs data.mode=resampled"):
        validate(cfg)


def test_logger_histogram(tmp_path):
    from dsvit.engine.logging import RunLogger
    log = RunLogger(tmp_path, 0, tensorboard=True, progress=False)
    log.histogram("h", np.array([1, 2, 2, 3]))
    log.scalar("s", 1.0)
    log.flush(1)
    log.close()
    assert any(p.name.startswith("events") for p in tmp_path.iterdir())
    RunLogger(tmp_path / "r1", 1).histogram("h", [1])           # other ranks: ignored
