"""Token Expansion: counts, schedule, selection/merge invariants, gradients, model-level behaviour."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dsvit.config import Config, ConfigError
from model_helpers import block_inputs, next_step, small_vit, start_plugin, vanilla_vit
from dsvit.plugins.toe import (ToEConfig, TokenExpansion, chunk_sizes, is_active, merge,
                                           round_chunks, seed_positions, stage_index, token_expansion)

def toe_on(model, stage, step=0, total_steps=300, **cfg):
    return start_plugin(TokenExpansion(ToEConfig(**cfg)), model, stage, step=step, total_steps=total_steps)


def run(seeds_rho=0.25, rates=(0.5, 0.75, 1.0), stage=1, k=2, x=None, p=196, b=3, c=24):
    x = torch.randn(b, 1 + p, c) if x is None else x
    seeds = torch.tensor(seed_positions(x.shape[1] - 1, seeds_rho))
    return x, token_expansion(x, 1, seeds, chunk_sizes(x.shape[1] - 1, seeds_rho, list(rates), stage, k))


# ---------------------------------------------------------------- counts and schedule
@pytest.mark.parametrize("rho,rates,p,expect", [
    (0.25, [0.5, 0.75, 1.0], 196, [(98, [24, 25]), (147, [24, 25, 24, 25])]),           # DeiT
    (0.2, [0.4, 0.7, 1.0], 196, [(78, [19, 20]), (136, [19, 20, 29, 29])]),             # LV-ViT
    (0.3, [0.6, 0.8, 1.0], 196, [(116, [29, 29]), (155, [29, 29, 19, 20])]),            # ET @224
    (0.3, [0.6, 0.8, 1.0], 144, [(86, [21, 22]), (114, [21, 22, 14, 14])]),             # ET @192
    (0.3, [0.6, 0.8, 1.0], 100, [(60, [15, 15]), (80, [15, 15, 10, 10])]),              # ET @160
])
def test_counts_match_spec_table(rho, rates, p, expect):
    n0 = len(seed_positions(p, rho))
    for stage, (kept, chunks) in enumerate(expect, start=1):
        assert chunk_sizes(p, rho, rates, stage, 2) == chunks
        assert n0 + sum(chunks) == kept
        x, (y, keep, merged, host) = run(rho, rates, stage, p=p, b=2, c=8)
        assert y.shape == (2, 1 + kept, 8) and merged.shape == (2, p - kept)


def test_stage_map_and_bypass():
    assert [stage_index(e, [0, 100, 200]) for e in (0, 99, 100, 199, 200, 299)] == [1, 1, 2, 2, 3, 3]
    assert stage_index(4, [5, 50, 100]) == 0
    assert [is_active(s, [0.5, 0.75, 1.0]) for s in (0, 1, 2, 3)] == [False, True, True, False]
    assert is_active(3, [0.5, 0.75, 0.9])
    # fractions of training become steps: thirds of 300 epochs x 7 steps are epochs 100 / 200
    plugin = TokenExpansion(ToEConfig())
    steps = [0, 700 - 1, 700, 1400 - 1, 1400]
    assert [plugin.stage_at(s, 0, 2100) for s in steps] == [1, 1, 2, 2, 3]
    plugin = TokenExpansion(ToEConfig(stage_unit="epoch", stage_starts=[0, 100, 200]))
    assert [plugin.stage_at(0, e, 1) for e in (0, 99, 100, 200)] == [1, 1, 2, 3]


def test_seeds_stride_quirk_and_uniform():
    assert seed_positions(196, 0.25, "stride") == seed_positions(196, 0.25) == list(range(0, 196, 4))
    stride = seed_positions(196, 0.2, "stride")          # 1 // 0.2 == 4: bottom 3 rows seedless
    assert len(stride) == 39 and stride[-1] == 152
    uniform = seed_positions(196, 0.2)
    assert len(uniform) == 39 and uniform[-1] >= 182 and len(set(uniform)) == 39
    assert seed_positions(100, 0.3, "stride")[-1] == 87


def test_round_multiple():
    for stage in (1, 2):
        chunks = round_chunks(chunk_sizes(196, 0.25, [0.5, 0.75, 1.0], stage, 2), 49, 196, 1, 8)
        assert (1 + 49 + sum(chunks)) % 8 == 0 and min(chunks) > 0
    assert 1 + 49 + sum(round_chunks([24, 25], 49, 196, 1, 8)) == 96


# ---------------------------------------------------------------- core invariants
def test_cls_partition_seeds():
    x, (y, keep, merged, host) = run(stage=2)
    assert torch.equal(y[:, 0], x[:, 0]) and (keep[:, 0] == 0).all()
    assert torch.equal(keep[:, 1:50] - 1, torch.arange(0, 196, 4).expand(3, -1))
    everything = torch.cat([keep[:, 1:], merged], 1).sort(1).values
    assert torch.equal(everything, torch.arange(1, 197).expand(3, -1))


def brute_force_expansion(xp, sel, chunks):
    """One sample: per chunk, the n unselected tokens with the smallest max-cosine, ascending."""
    sel = list(sel)
    uns = [i for i in range(xp.shape[0]) if i not in sel]
    for n in chunks:
        score = {u: max(F.cosine_similarity(xp[u], xp[s], dim=0).item() for s in sel) for u in uns}
        ranked = sorted(uns, key=lambda u: score[u])
        sel += ranked[:n]
        uns = ranked[n:]
    return sel, uns


def test_expansion_matches_brute_force():
    torch.manual_seed(1)
    x = torch.randn(2, 1 + 40, 6, dtype=torch.float64).float()
    seeds = seed_positions(40, 0.25)
    chunks = chunk_sizes(40, 0.25, [0.5, 0.75, 1.0], 2, 2)
    y, keep, merged, host = token_expansion(x, 1, torch.tensor(seeds), chunks)
    for b in range(2):
        sel, _ = brute_force_expansion(x[b, 1:], seeds, chunks)
        assert (keep[b, 1:] - 1).tolist() == sel


def test_merge_value_hosts_and_mass():
    x, (y, keep, merged, host) = run(stage=1)
    xp = x[:, 1:]
    for b in range(3):
        kept = keep[b, 1:] - 1
        m = merged[b] - 1
        sim = F.normalize(xp[b, m], dim=-1) @ F.normalize(xp[b, kept], dim=-1).T
        assert torch.equal(host[b] - 1, sim.argmax(-1))            # most similar kept token
        counts = torch.ones(len(kept))
        for j in range(len(kept)):
            members = m[host[b] - 1 == j]
            counts[j] += len(members)
            expect = (xp[b, kept[j]] + xp[b, members].sum(0)) / (1 + len(members))
            if len(members) == 0:                                    # hosts without members: unchanged
                assert torch.equal(y[b, 1 + j], xp[b, kept[j]])
            else:
                torch.testing.assert_close(y[b, 1 + j], expect, rtol=0, atol=1e-5)
        assert counts.sum() == 196                                   # each leftover in exactly one host
        torch.testing.assert_close((counts[:, None] * y[b, 1:]).sum(0), xp[b].sum(0), atol=1e-4, rtol=0)


def test_gradient_one_over_group_size_and_no_grad_through_similarity():
    x = torch.randn(2, 197, 16, requires_grad=True)
    _, (y, keep, merged, host) = run(stage=1, x=x)
    y.sum().backward()
    g = x.grad[..., 0]
    assert (g[:, 0] == 1).all()
    for b in range(2):
        size = torch.ones(99).index_add_(0, host[b], torch.ones(98))     # group size per y token
        assert torch.allclose(g[b, keep[b]], 1 / size)
        assert torch.allclose(g[b, merged[b]], 1 / size[host[b]])
    assert (x.grad != 0).all()
    torch.testing.assert_close(x.grad.sum(1), torch.full((2, 16), 99.0))
    # the autograd graph holds only the token gathers (index_select), the summing index_add, the
    # division, views and the concat
    seen, todo = set(), [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        todo += [f for f, _ in fn.next_functions]
    names = {type(f).__name__ for f in seen}
    assert {"IndexAddBackward0", "IndexSelectBackward0", "DivBackward0"} <= names
    assert not any(s in n for n in names for s in ("Bmm", "Norm", "Sort", "Max", "Mm"))


def test_nesting_scale_invariance_batch_independence():
    x, (_, keep1, _, _) = run(stage=1)
    _, (_, keep2, _, _) = run(stage=2, x=x)
    assert torch.equal(keep2[:, :keep1.shape[1]], keep1)
    _, (_, keep_scaled, _, _) = run(stage=2, x=3.0 * x)
    assert torch.equal(keep_scaled, keep2)
    _, (y_alone, keep_alone, _, _) = run(stage=2, x=x[1:2])
    _, (y_all, _, _, _) = run(stage=2, x=x)
    assert torch.equal(keep_alone, keep2[1:2])
    torch.testing.assert_close(y_alone, y_all[1:2], rtol=0, atol=1e-6)


def test_merge_without_leftovers_is_gather():
    xp = torch.randn(2, 5, 4)
    sel = torch.tensor([[3, 1, 0, 2, 4]] * 2)
    y, host = merge(xp, F.normalize(xp, dim=-1), sel, sel[:, :0])
    assert torch.equal(y, xp[:, [3, 1, 0, 2, 4]]) and host.shape == (2, 0)


# ---------------------------------------------------------------- on a model
@pytest.mark.parametrize("mode", ["final_stage", "eval"])
def test_identity_cases_bit_identical_to_timm(mode):
    model, stage = small_vit()
    ref = vanilla_vit()
    img = torch.randn(2, 3, 224, 224)
    if mode == "final_stage":
        toe_on(model, stage, step=299, total_steps=300)
    else:
        toe_on(model, stage, step=0)
        model.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(model(img), ref(img))


def test_block_token_counts_and_positions():
    model, stage = small_vit()
    sizes = block_inputs(model)
    img = torch.randn(2, 3, 224, 224)
    plugin, state = toe_on(model, stage, step=0)
    model(img)
    assert sizes == [197, 99, 99] and plugin.tokens == 99
    pos = stage.positions
    assert (pos[:, 0] == 0).all() and torch.equal(pos[:, 1:50] - 1, torch.arange(0, 196, 4).expand(2, -1))
    assert torch.equal(torch.cat([pos[:, 1:], stage.last_merge.merged], 1).sort(1).values,
                       torch.arange(1, 197).expand(2, -1))
    state.step = 100
    next_step(plugin, state)
    sizes.clear(), model(img)
    assert sizes == [197, 148, 148]
    model.eval()
    sizes.clear(), model(img)
    assert sizes == [197] * 3
    plugin.cfg = dataclasses.replace(plugin.cfg, sparse_eval=True)
    sizes.clear(), model(img)
    assert sizes == [197, 148, 148]


def test_acts_under_grad_checkpointing_same_output_and_grads():
    img = torch.randn(2, 3, 224, 224)
    outs = []
    for ckpt in (False, True):
        model, stage = small_vit()
        model.set_grad_checkpointing(ckpt)
        sizes = block_inputs(model)
        toe_on(model, stage, step=0)
        out = model(img)
        out.square().sum().backward()
        assert sizes[:3] == [197, 99, 99]
        outs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=1e-6)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_state_seed_cache_and_resume_check():
    model, stage = small_vit()
    ref_keys = set(vanilla_vit().state_dict())
    plugin, _ = toe_on(model, stage)
    assert set(model.state_dict()) == ref_keys
    assert plugin.seeds_for(196, "cpu") is plugin.seeds_for(196, "cpu")
    other = TokenExpansion(ToEConfig())
    other.load_state_dict(plugin.state_dict())
    with pytest.raises(RuntimeError, match="keep_rates"):
        TokenExpansion(ToEConfig(keep_rates=[0.6, 0.8, 1.0])).load_state_dict(plugin.state_dict())


def test_config_validation():
    cfg = Config()
    ToEConfig().validate(cfg)
    bad = [dict(stage_starts=[0, 0.5]), dict(stage_starts=[0, 2, 4]), dict(keep_rates=[0.8, 0.5, 1.0]),
           dict(init_keep_rate=0.6), dict(seeds="grid"), dict(stage_unit="epoch", stage_starts=[0, 5, 20])]
    for kw in bad:
        with pytest.raises(ConfigError):
            ToEConfig(**kw).validate(cfg)
