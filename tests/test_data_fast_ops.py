"""fast_ops: every op pixel-equal to timm/Pillow's, and a sped-up transform equal to the original
under the same seeds (so the speed-up changes no augmentation)."""
import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as aa
from timm.data import create_transform

from dsvit.data import fast_ops as F
from dsvit.data.transforms import fix_posterize, seed_rngs


def _images():
    rng = np.random.default_rng(0)
    out = []
    for i in range(120):
        kind = i % 6
        if kind == 0:
            a = rng.integers(0, 256, (17, 13, 3))
        elif kind == 1:
            a = np.full((8, 8, 3), rng.integers(0, 256))           # constant: identity tables
        elif kind == 2:
            a = rng.integers(0, 2, (9, 9, 3)) * rng.integers(1, 256)  # two levels
        elif kind == 3:
            a = rng.integers(100, 110, (32, 32, 3))                # narrow range: big stretch
        elif kind == 4:
            a = rng.random((32, 32, 3)) ** 3 * 255                 # skewed histogram
        else:
            a = np.stack([np.full((6, 6), 7), rng.integers(0, 256, (6, 6)), np.full((6, 6), 250)], -1)
        out.append(Image.fromarray(a.astype(np.uint8)))
    return out + [im.convert("L") for im in out[:24]]


def _equal(a, b):
    return a.mode == b.mode and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


CASES = [("auto_contrast", F.auto_contrast, aa.auto_contrast, [()]),
         ("equalize", F.equalize, aa.equalize, [()]),
         ("invert", F.invert, aa.invert, [()]),
         ("solarize", F.solarize, aa.solarize, [(t,) for t in (0, 1, 64, 128, 200, 256)]),
         ("solarize_add", F.solarize_add, aa.solarize_add, [(a,) for a in (0, 30, 110)] + [(50, 200)]),
         ("posterize", F.posterize, aa.posterize, [(b,) for b in range(1, 9)])]


@pytest.mark.parametrize("name,fast,orig,args", CASES, ids=[c[0] for c in CASES])
def test_op_equals_timm(name, fast, orig, args):
    for img in _images():
        for a in args:
            assert _equal(fast(img, *a), orig(img, *a)), (name, a, img.mode, np.asarray(img)[:2, :2])


def test_non_rgb_falls_back():
    img = Image.new("RGBA", (5, 5), (10, 20, 30, 40))
    with pytest.raises(OSError):  # Pillow's own error for the mode: the original function ran
        F.auto_contrast(img)


def _transform(aa_config):
    return create_transform(32, is_training=True, use_prefetcher=True, scale=(0.08, 1.0), hflip=0.5,
                            auto_augment=aa_config, interpolation="random", re_prob=0.0)


@pytest.mark.parametrize("aa_config", ["rand-m9-mstd0.5-inc1", "rand-m15-n3", "original", "v0"])
def test_sped_up_transform_equals_original_under_same_seed(aa_config):
    orig, fast = fix_posterize(_transform(aa_config)), F.speed_up(_transform(aa_config))
    assert any(isinstance(t, F.HorizontalFlip) for t in fast.transforms)
    swapped = []

    def walk(t):
        if isinstance(t, aa.AugmentOp):
            swapped.append(t.aug_fn)
        for c in getattr(t, "ops", None) or getattr(t, "policy", None) or getattr(t, "transforms", None) or []:
            for x in (c if isinstance(c, (list, tuple)) else [c]):
                walk(x)
    walk(fast)
    assert not set(swapped) & set(F.FAST)  # every lookup-table op reached, AutoAugment sub-policies too
    imgs = _images()[:100]
    for i, img in enumerate(imgs):
        img = img.convert("RGB")
        seed_rngs(3, i)
        a = orig(img)
        seed_rngs(3, i)
        b = fast(img)
        assert torch.equal(a, b), (aa_config, i)
