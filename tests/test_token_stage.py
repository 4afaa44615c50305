"""The token stage reproduces timm's forward bit-exactly and runs hooks outside checkpointing."""
import timm
import torch

from dsvit.config import ModelConfig
from dsvit.model.vit import build_model, timm_kwargs

CFG = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=3,
                  num_heads=3, num_classes=10)


def models():
    torch.manual_seed(0)
    ours, stage = build_model(CFG, 10)
    torch.manual_seed(0)
    ref = timm.create_model(CFG.name, **timm_kwargs(CFG, 10))
    return ours, stage, ref


def test_no_hooks_is_bit_identical_to_timm_train_and_eval():
    ours, _, ref = models()
    x = torch.randn(4, 3, 32, 32)
    for mode in (True, False):
        ours.train(mode), ref.train(mode)
        assert torch.equal(ours(x), ref(x))
    assert ours.state_dict().keys() == ref.state_dict().keys()


def test_checkpointing_gives_same_output_and_grads():
    ours, _, ref = models()
    x = torch.randn(2, 3, 32, 32)
    ours.set_grad_checkpointing(True)
    ours(x).sum().backward()
    ref(x).sum().backward()
    for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6, msg=n)


def test_hooks_fire_once_per_forward_even_under_checkpointing():
    ours, stage, _ = models()
    ours.set_grad_checkpointing(True)
    calls = []

    def keep_first_half(x, st):
        calls.append(x.shape[1])
        n = x.shape[1] // 2
        return st.gather(x, torch.arange(n).expand(x.shape[0], n))

    stage.add_before_block(1, keep_first_half)
    ours(torch.randn(2, 3, 32, 32)).sum().backward()
    assert calls == [65]                      # not re-run during recomputation
    assert stage.positions.shape == (2, 32) and stage.positions[0, -1].item() == 31
    assert stage.mean_block_tokens == (65 + 32 + 32) / 3
