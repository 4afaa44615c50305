"""Model surgery (block maps, name maps, remapped state dicts) and token hooks following a block map;
growth maps equal the examples of AutoProg (Li et al., CVPR 2022)."""
import pytest
import torch

from dsvit.config import ModelConfig
from dsvit.model import surgery
from dsvit.model.vit import build_model, build_plain, remapped_model

SMALL = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=4,
                    num_heads=2)


@pytest.mark.parametrize("p,n,src", [
    (6, 12, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]),
    (9, 12, [0, 1, 2, 3, 4, 5, 6, 6, 7, 7, 8, 8]),
    (6, 8, [0, 1, 2, 3, 4, 4, 5, 5]),
    (8, 10, [0, 1, 2, 3, 4, 5, 6, 6, 7, 7]),
    (5, 5, [0, 1, 2, 3, 4]),
])
def test_duplicate_last_equals_the_papers_examples(p, n, src):
    assert surgery.duplicate_last(p, n) == src
    new = surgery.new_positions(src)
    k = 2 * p - n
    assert new == [i for i in range(n) if i >= k and (i - k) % 2 == 1] and len(new) == n - p


def test_growth_bounds_are_checked():
    assert surgery.duplicate_last(3, 6) == [0, 0, 1, 1, 2, 2]
    for p, n in ((4, 3), (4, 9)):
        with pytest.raises(ValueError, match="between"):
            surgery.duplicate_last(p, n)
    with pytest.raises(ValueError, match="ascending"):
        surgery.extraction_map([2, 1], 4)
    with pytest.raises(ValueError, match="ascending"):
        surgery.extraction_map([0, 4], 4)


def test_names_and_state_dicts_follow_the_block_map():
    torch.manual_seed(0)
    old, _ = build_model(SMALL, 10)
    src = surgery.duplicate_last(4, 6)             # [0, 1, 2, 2, 3, 3]
    new = remapped_model(SMALL, 10, old.state_dict(), src)
    old_sd, new_sd = old.state_dict(), new.state_dict()
    assert len(new.blocks) == 6
    for name, value in new_sd.items():
        source = surgery.source_name(name, src)
        assert torch.equal(value, old_sd[source]), name
    pmap = surgery.param_map([n for n, _ in new.named_parameters()], src,
                             [n for n, _ in old.named_parameters()])
    assert pmap["blocks.3.attn.qkv.weight"] == "blocks.2.attn.qkv.weight"
    assert pmap["blocks.5.mlp.fc2.bias"] == "blocks.3.mlp.fc2.bias"
    assert pmap["cls_token"] == "cls_token" and pmap["head.weight"] == "head.weight"


def test_extracting_every_block_is_the_identity():
    torch.manual_seed(0)
    old, _ = build_model(SMALL, 10)
    src = surgery.extraction_map([0, 1, 2, 3], 4)
    new = remapped_model(SMALL, 10, old.state_dict(), src)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(old.eval()(x), new.eval()(x))
    sub = remapped_model(SMALL, 10, old.state_dict(), surgery.extraction_map([0, 2], 4))
    assert torch.equal(sub.state_dict()["blocks.1.norm1.weight"], old.state_dict()["blocks.2.norm1.weight"])


def test_build_plain_leaves_the_training_rng_alone():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    build_plain(SMALL, 10, depth=6)
    assert torch.equal(torch.get_rng_state(), before)


def test_token_hooks_follow_the_block_map():
    _, stage = build_model(SMALL, 10)
    hook, mask, late = (lambda x, s: x), (lambda x, s: None), (lambda x, s: x)
    stage.add_before_block(1, hook)
    stage.set_attn_mask(3, mask)
    stage.add_before_block(2, late)
    stage.remap_blocks(surgery.duplicate_last(4, 6))      # [0, 1, 2, 2, 3, 3]
    assert stage.before_block[1] == [hook] and stage.before_block[2] == [late]
    assert stage.attn_mask == {4: mask}
    stage.remap_blocks(surgery.extraction_map([0, 1, 4], 6))   # old 2, 3 removed: hooks move on
    assert stage.before_block[1] == [hook] and stage.before_block[2] == [late]
    assert stage.attn_mask == {2: mask}
    with pytest.raises(ValueError, match="no block to follow"):
        stage.remap_blocks([0, 1])
