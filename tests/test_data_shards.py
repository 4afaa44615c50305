"""Shard writing tools: round trip, _info.json, verify, bad input, the posterize fix, synthetic data."""
import argparse
import io
import json

import numpy as np
import pytest
from PIL import Image

from dsvit.data import shards as S
from dsvit.data.cli import add_shards_parser
from dsvit.data.tar_reader import iter_shard


def run(*argv):
    parser = argparse.ArgumentParser()
    add_shards_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["shards", *map(str, argv)])
    return args.func(args)


def read_all(root):
    """{source name: (label, ext, bytes, uid)} over every shard of every split, via the pipeline's reader."""
    info = json.loads((root / "_info.json").read_text())
    out = {}
    for split, s in info["splits"].items():
        for f in s["filenames"]:
            for key, smp in iter_shard(str(root / f)):
                name = smp["txt"].decode()
                assert (split, name) not in out, "sample written twice"
                ext = [e for e in smp if e in S.IMAGE_EXTS][0]
                out[split, name] = (int(smp["cls"]), ext, smp[ext], int(key))
    return info, out


@pytest.fixture
def folder(tmp_path):
    """src/<split>/<class>/<file>: 2 splits x 3 classes, JPEG and PNG files."""
    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", 7), ("val", 3)):
        for c in ("cat", "dog", "eel"):
            d = tmp_path / "src" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                fmt, ext = (("JPEG", "jpg"), ("PNG", "png"))[i % 2]
                p = d / f"{i}.{ext}"
                Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(p, format=fmt)
                files[split, f"{split}/{c}/{i}.{ext}"] = (["cat", "dog", "eel"].index(c), p.read_bytes())
    return tmp_path / "src", files


def test_imagefolder_round_trip_and_verify(folder, tmp_path, capsys):
    src, files = folder
    out = tmp_path / "out"
    assert run("imagefolder", src, out, "--shard-size", 4, "--workers", 2, "--no-progress") == 0
    assert "per class: cat=7, dog=7, eel=7" in capsys.readouterr().out
    info, got = read_all(out)
    assert set(got) == set(files)
    for k, (label, data) in files.items():
        assert got[k][0] == label and got[k][2] == data  # original bytes, right label
    for split, n in (("train", 21), ("val", 9)):
        s = info["splits"][split]
        assert s["num_samples"] == n and sum(s["shard_lengths"]) == n and max(s["shard_lengths"]) <= 4
        assert sorted(v[3] for k, v in got.items() if k[0] == split) == list(range(n))  # dense uids
    assert info["class_names"] == ["cat", "dog", "eel"] and info["num_classes"] == 3
    assert run("verify", out, "--no-progress") == 0
    with pytest.raises(SystemExit, match="already (has split|holds a dataset).*--overwrite"):
        run("imagefolder", src, out, "--no-progress")
    assert run("imagefolder", src, out, "--overwrite", "--no-progress", "--seed", 1) == 0


def test_write_time_shuffle_is_seeded(folder, tmp_path):
    src, _ = folder
    orders = []
    for name, seed in (("a", 0), ("b", 0), ("c", 5)):
        run("imagefolder", src, tmp_path / name, "--seed", seed, "--no-progress", "--workers", 1)
        _, got = read_all(tmp_path / name)
        orders.append(sorted((v[3], k) for k, v in got.items()))
    assert orders[0] == orders[1] and orders[0] != orders[2]


def test_verify_catches_truncated_shard_and_corrupt_jpeg(folder, tmp_path, capsys):
    src, _ = folder
    out = tmp_path / "out"
    run("imagefolder", src, out, "--shard-size", 5, "--no-progress", "--workers", 1)
    t0, t1 = out / "train-000000.tar", out / "train-000001.tar"
    t0.write_bytes(t0.read_bytes()[:2000])  # cut off
    data = bytearray(t1.read_bytes())
    at = data.index(b"\xff\xd8\xff")
    data[at + 30:at + 300] = b"\x00" * 270
    t1.write_bytes(bytes(data))
    (out / "val-000001.tar").unlink()
    with pytest.raises(SystemExit) as e:
        run("verify", out, "--no-progress")
    assert e.value.code == 1
    text = capsys.readouterr().out
    assert "train-000000.tar is truncated" in text and "train-000000.tar has" in text
    assert "train-000001.tar key" in text and "corrupt image" in text
    assert "val-000001.tar is missing" in text


def test_unreadable_files_skipped_or_strict(folder, tmp_path, capsys):
    src, _ = folder
    (src / "train" / "cat" / "broken.jpg").write_bytes(b"not an image")
    run("imagefolder", src, tmp_path / "o1", "--no-progress")
    assert "skipped 1 unreadable files" in capsys.readouterr().out and "broken.jpg" in \
        json.loads((tmp_path / "o1" / "_info.json").read_text())["splits"]["train"]["skipped"][0]
    with pytest.raises(SystemExit, match="unreadable files.*--strict.*broken.jpg"):
        run("imagefolder", src, tmp_path / "o2", "--strict", "--no-progress")


def test_imagefolder_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="has no subfolders"):
        run("imagefolder", tmp_path / "empty", tmp_path / "o")
    (tmp_path / "s" / "train" / "cat").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "s" / "train" / "cat" / "a.png")
    (tmp_path / "s" / "train" / "dog").mkdir()
    with pytest.raises(SystemExit, match="class folder .*dog has no images"):
        run("imagefolder", tmp_path / "s", tmp_path / "o")
    with pytest.raises(SystemExit, match="looks like one split.*--split"):
        run("imagefolder", tmp_path / "s" / "train", tmp_path / "o")
    with pytest.raises(SystemExit, match="does not exist"):
        run("imagefolder", tmp_path / "nope", tmp_path / "o")


def test_npz_splits_round_trip_png_lossless(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 3, 30)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    out = tmp_path / "out"
    run("npz", tmp_path / "d.npz", out, "--split", "train", "--images", "x", "--labels", "y",
        "--classes", "a,b,c", "--shard-size", 7, "--no-progress")
    run("npz", tmp_path / "d.npz", out, "--split", "val", "--images", "x", "--labels", "y", "--no-progress")
    with pytest.raises(SystemExit, match="already has split 'val'.*--overwrite"):
        run("npz", tmp_path / "d.npz", out, "--split", "val", "--images", "x", "--labels", "y")
    info, got = read_all(out)
    assert set(info["splits"]) == {"train", "val"} and info["class_names"] == ["a", "b", "c"]
    for (split, name), (label, ext, data, uid) in got.items():
        i = int(name.split("[")[1][:-1])
        assert ext == "png" and label == y[i]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), x[i])
    assert run("verify", out, "--no-progress") == 0


@pytest.mark.parametrize("images,labels,msg", [
    (np.zeros((4, 8, 8, 3), np.float32), np.zeros(4, int), "dtype float32; images must be uint8 NHWC"),
    (np.zeros((4, 3, 8, 8), np.uint8), np.zeros(4, int), "looks like NCHW"),
    (np.zeros((4, 8, 8), np.uint8), np.zeros(4, int), "must be uint8 NHWC"),
    (np.zeros((4, 8, 8, 3), np.uint8), np.zeros(5, int), "labels must be integers of shape"),
])
def test_npz_bad_arrays(tmp_path, images, labels, msg):
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    with pytest.raises(SystemExit, match=msg):
        run("npz", tmp_path / "d.npz", tmp_path / "o", "--split", "train")


def test_npz_missing_key(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(SystemExit, match="no array 'labels'.*--images/--labels"):
        run("npz", tmp_path / "d.npz", tmp_path / "o", "--split", "train")


def test_posterize_zero_bits_fixed():
    from timm.data import auto_augment as aa
    from dsvit.config import DataConfig
    from dsvit.data import fast_ops
    from dsvit.data.transforms import build_train_transform, safe_posterize
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    bits = aa._posterize_increasing_level_to_arg(10, {})[0]  # magnitude 10 -> 0 bits
    assert bits == 0
    with pytest.raises(ValueError, match="bits must be"):  # the bug this fixes (Pillow >= 11)
        aa.posterize(img, bits)
    assert safe_posterize(img, bits).size == (8, 8)
    assert np.array_equal(np.asarray(fast_ops.posterize(img, bits)), np.asarray(safe_posterize(img, bits)))
    t = build_train_transform(DataConfig(auto_augment="rand-m9-mstd0.5-inc1"), 8)
    ra = [x for x in t.transforms if isinstance(x, aa.RandAugment)][0]
    ops = [op for op in ra.ops if op.name == "PosterizeIncreasing"]
    assert ops and all(op.aug_fn is fast_ops.posterize for op in ops)
    op = ops[0]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    assert op(img).size == (8, 8)


def test_synthetic_deterministic_balanced_idempotent(tmp_path):
    from dsvit.data.synthetic import ensure_synthetic, make_images
    a, la = make_images(200, 0)
    b, lb = make_images(200, 0)
    c, _ = make_images(200, 1)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and not np.array_equal(a, c)
    assert np.bincount(la).tolist() == [20] * 10
    root = ensure_synthetic(tmp_path / "syn", 300, 50)
    stamp = (tmp_path / "syn" / "train-000000.tar").stat().st_mtime_ns
    assert ensure_synthetic(tmp_path / "syn", 300, 50) == root
    assert (tmp_path / "syn" / "train-000000.tar").stat().st_mtime_ns == stamp  # reused
    (tmp_path / "syn" / "val-000000.tar").unlink()  # incomplete -> rewritten
    ensure_synthetic(tmp_path / "syn", 300, 50)
    info = json.loads((tmp_path / "syn" / "_info.json").read_text())
    assert info["splits"]["train"]["class_counts"] == [30] * 10 and info["splits"]["val"]["num_samples"] == 50
    problems, _ = S.verify_dataset(root, progress=False)
    assert problems == []
