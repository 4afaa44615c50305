"""`dsvit shards imagefolder` on ImageNet as distributed: a flat val folder labelled by the devkit's
ground truth + a synset list, Kaggle's LOC_val_solution.csv, a file,label CSV or one wnid per line;
label errors; a killed conversion resumed to byte-identical shards; unreadable files counted per
reason. Fake trees with the real names and 8x8 JPEGs."""
import argparse
import io
import json
import multiprocessing as mp
import os
import signal

import numpy as np
import pytest
from PIL import Image

from dsvit.data import shards as S
from dsvit.data.cli import add_shards_parser
from dsvit.data.tar_reader import iter_shard

WNIDS = ["n01440764", "n01443537", "n02119789"]  # sorted: class indices 0, 1, 2
DEVKIT_ORDER = [("n02119789", "kit fox, Vulpes macrotis"), ("n01443537", "goldfish, Carassius auratus"),
                ("n01440764", "tench, Tinca tinca"), ("n09999999", "not a class of this tree")]
VAL_WNIDS = ["n01443537", "n02119789", "n01440764", "n01440764", "n02119789",
             "n01443537", "n02119789", "n01440764", "n01443537"]  # ILSVRC2012_val_00000001..9


def run(*argv):
    parser = argparse.ArgumentParser()
    add_shards_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["shards", "imagefolder", *map(str, argv)] if argv[0] != "verify"
                             else ["shards", *map(str, argv)])
    return args.func(args)


def jpeg(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def val_name(i: int) -> str:
    return f"ILSVRC2012_val_{i + 1:08d}.JPEG"


@pytest.fixture
def imagenet(tmp_path):
    """root/{train/<wnid>/<wnid>_<n>.JPEG, val/ILSVRC2012_val_*.JPEG} + every kind of label file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ILSVRC"
    expected = {}  # source name in KEY.txt -> class index
    for c, wnid in enumerate(WNIDS):
        (root / "train" / wnid).mkdir(parents=True)
        for n in (10026, 10027, 1003, 2, 77):
            (root / "train" / wnid / f"{wnid}_{n}.JPEG").write_bytes(jpeg(rng))
            expected[f"train/{wnid}/{wnid}_{n}.JPEG"] = c
    (root / "val").mkdir()
    for i, wnid in enumerate(VAL_WNIDS):
        (root / "val" / val_name(i)).write_bytes(jpeg(rng))
        expected[f"val/{val_name(i)}"] = WNIDS.index(wnid)
    ids = {w: k + 1 for k, (w, _) in enumerate(DEVKIT_ORDER)}
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for w in VAL_WNIDS))
    (kit / "synsets.txt").write_text("".join(f"{w} {d}\n" for w, d in DEVKIT_ORDER))
    (kit / "wnids.txt").write_text("\n".join(VAL_WNIDS) + "\n")
    rows = [f"{val_name(i)[:-5]},{w} 1 2 7 8 {w} 0 0 3 3" for i, w in enumerate(VAL_WNIDS)]
    (kit / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows[::-1]) + "\n")
    plain = [f"{val_name(i) if i % 2 else val_name(i)[:-5]},{w if i % 3 else WNIDS.index(w)}"
             for i, w in enumerate(VAL_WNIDS)]  # with/without extension, wnid or class index
    (kit / "labels.csv").write_text("\n".join(plain[3:] + plain[:3]) + "\n")
    return root, kit, expected


def read_back(out):
    """{source name: class index} over all shards, and the info."""
    info = json.loads((out / "_info.json").read_text())
    got = {}
    for s in info["splits"].values():
        for f in s["filenames"]:
            for _, smp in iter_shard(str(out / f)):
                got[smp["txt"].decode()] = int(smp["cls"])
    return got, info


def files_of(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("labels", ["ground_truth", "kaggle", "csv", "wnids"])
def test_flat_val_labels_match_train_classes(imagenet, tmp_path, labels):
    root, kit, expected = imagenet
    extra = {"ground_truth": ["--val-labels", kit / "ILSVRC2012_validation_ground_truth.txt",
                              "--synsets", kit / "synsets.txt"],
             "kaggle": ["--val-labels", kit / "LOC_val_solution.csv"],
             "csv": ["--val-labels", kit / "labels.csv"],
             "wnids": ["--val-labels", kit / "wnids.txt"]}[labels]
    out = tmp_path / "out"
    assert run(root, out, *extra, "--shard-size", 4, "--workers", 1, "--no-progress") == 0
    got, info = read_back(out)
    assert got == expected
    assert info["class_names"] == WNIDS and info["splits"]["val"]["num_samples"] == 9
    assert not (out / S.PROGRESS_NAME).exists() and not list(out.glob(".*"))
    if labels == "ground_truth":
        assert info["class_descriptions"] == ["tench, Tinca tinca", "goldfish, Carassius auratus",
                                              "kit fox, Vulpes macrotis"]
        assert run("verify", out, "--no-progress") == 0


def test_kaggle_layout_split_and_val_dir(imagenet, tmp_path):
    """train converted with --split train, the val folder elsewhere via --val-dir."""
    root, kit, expected = imagenet
    out = tmp_path / "out"
    run(root / "train", out, "--split", "train", "--val-dir", root / "val", "--val-labels",
        kit / "LOC_val_solution.csv", "--synsets", kit / "synsets.txt", "--workers", 1, "--no-progress")
    got, info = read_back(out)
    assert got == {k.split("/", 1)[1] if k.startswith("train/") else k: v for k, v in expected.items()}
    assert set(info["splits"]) == {"train", "val"} and len(info["class_descriptions"]) == 3


@pytest.mark.parametrize("edit,match", [
    (lambda kit: kit / "labels.csv", None),  # the fixture's CSV: converts (baseline of the edits)
    (lambda kit: _cut(kit / "labels.csv", 1), r"1 of the 9 images .* have no label in .*labels.csv"),
    (lambda kit: _append(kit / "labels.csv", "ILSVRC2012_val_00000099.JPEG,n01440764"),
     r"labels.csv, line 10: 'ILSVRC2012_val_00000099.JPEG' names no file"),
    (lambda kit: _append(kit / "labels.csv", "ILSVRC2012_val_00000001,n01440764"), r"line 10: a second label"),
    (lambda kit: _replace(kit / "labels.csv", ",n02119789", ",n09999999"),
     r"labels.csv, line \d+ \(ILSVRC2012_val_\d+.JPEG\): label 'n09999999' is no class"),
    (lambda kit: _replace(kit / "labels.csv", ",n02119789", ",n02119789,x"), r"line \d+: .* has 3 fields"),
    (lambda kit: _replace(kit / "wnids.txt", "n01443537\n", "n01443537 x\n"),
     r"wnids.txt, line 1: 'n01443537 x' is not one id or class name"),
    (lambda kit: _cut(kit / "wnids.txt", 1), r"8 labels for the 9 images"),
    (lambda kit: _replace(kit / "ILSVRC2012_validation_ground_truth.txt", "1\n", "4\n"),
     r"line \d+ \(ILSVRC2012_val_\d+.JPEG\): label 'n09999999' is no class"),
    (lambda kit: _replace(kit / "ILSVRC2012_validation_ground_truth.txt", "2\n", "7\n"),
     r"line \d+: '7' is not an ILSVRC2012_ID in \[1, 4\]"),
])
def test_label_file_errors_name_file_and_line(imagenet, tmp_path, edit, match):
    root, kit, _ = imagenet
    labels = edit(kit)
    args = [root, tmp_path / "out", "--val-labels", labels, "--synsets", kit / "synsets.txt",
            "--workers", 1, "--no-progress"]
    if match is None:
        assert run(*args) == 0
    else:
        with pytest.raises(SystemExit, match=match):
            run(*args)


def test_ground_truth_needs_id_ordered_synsets(imagenet, tmp_path):
    root, kit, _ = imagenet
    gt = kit / "ILSVRC2012_validation_ground_truth.txt"
    with pytest.raises(SystemExit, match="ILSVRC2012_IDs .*pass --synsets"):
        run(root, tmp_path / "o", "--val-labels", gt, "--no-progress")
    loc = kit / "LOC_synset_mapping.txt"  # ImageNet-1k's, sorted by wnid: not the id order
    loc.write_text("".join(f"n{i:08d} class {i}\n" for i in range(1000)))
    with pytest.raises(SystemExit, match="sorted wnid order .* meta.mat order"):
        run(root, tmp_path / "o", "--val-labels", gt, "--synsets", loc, "--no-progress")
    with pytest.raises(SystemExit, match="n01440764.* not in the synset list"):
        run(root, tmp_path / "o", "--val-labels", kit / "wnids.txt", "--synsets", loc, "--no-progress")


def _cut(path, n):
    path.write_text("\n".join(path.read_text().splitlines()[:-n]) + "\n")
    return path


def _append(path, line):
    path.write_text(path.read_text() + line + "\n")
    return path


def _replace(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path


def _killed_conversion(argv, kill_at_task: int):
    """Run the conversion in a forked process that SIGKILLs itself half-way through writing its
    ``kill_at_task``-th write task (counted over all splits): a deterministic hard kill."""
    def child():
        real, calls = S._write_task, [0]

        def write_then_die(task):
            calls[0] += 1
            if calls[0] == kill_at_task:
                out_dir, split, t = task[:3]
                with open(os.path.join(out_dir, S.part_tmp_name(split, t, 0)), "wb") as f:
                    f.write(b"\0" * 700)  # half a tar
                os.kill(os.getpid(), signal.SIGKILL)
            return real(task)
        S._write_task = write_then_die
        run(*argv)
        os._exit(0)
    proc = mp.get_context("fork").Process(target=child)
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL


@pytest.mark.parametrize("parts", [1, 2])  # shards per write task: 2 when --shard-mb cuts the task
def test_killed_conversion_resumes_byte_identical(imagenet, tmp_path, capsys, parts):
    root, kit, _ = imagenet
    opts = ["--val-labels", kit / "LOC_val_solution.csv", "--synsets", kit / "synsets.txt",
            "--shard-size", 4, "--shard-mb", 256 if parts == 1 else 0.0045, "--no-progress"]
    run(root, tmp_path / "ref", *opts, "--workers", 1)
    reference = files_of(tmp_path / "ref")
    shards = [f"train-{i:06d}.tar" for i in range(3 * parts)]  # of tasks 0-2 (train: 4 tasks of 4, 4, 4, 3)
    assert len([n for n in reference if n.startswith("train-")]) == 4 * parts
    out = tmp_path / "out"
    _killed_conversion([root, out, *opts, "--workers", 1], kill_at_task=4)
    left = files_of(out)
    assert set(left) == {S.PROGRESS_NAME, ".train-t000003-000.tar.tmp", *shards}  # no _info.json yet
    assert all(left[n] == reference[n] for n in shards)  # no half shard under a final name
    # as if killed between finishing task 1 and naming its shards, and task 2's first shard damaged since
    for p in range(parts):
        os.replace(out / shards[parts + p], out / S.part_tmp_name("train", 1, p))
    (out / shards[2 * parts]).write_bytes(reference[shards[2 * parts]][:1024])
    kept = {n: (out / n).stat().st_ino for n in (shards[0], S.part_tmp_name("train", 1, 0))}
    capsys.readouterr()
    assert run(root, out, *opts, "--workers", 2) == 0  # another worker count: same shards
    assert "continuing the unfinished conversion" in capsys.readouterr().out
    assert files_of(out) == reference
    assert (out / shards[0]).stat().st_ino == kept[shards[0]]  # checked, not rewritten
    assert (out / shards[parts]).stat().st_ino == kept[S.part_tmp_name("train", 1, 0)]
    with pytest.raises(SystemExit, match="already (has split|holds a dataset).*--overwrite"):  # finished
        run(root, out, *opts)


def test_resume_with_other_arguments_or_files_is_refused(imagenet, tmp_path):
    root, kit, _ = imagenet
    out = tmp_path / "out"
    opts = ["--val-labels", kit / "labels.csv", "--shard-size", 4, "--workers", 1, "--no-progress"]
    _killed_conversion([root, out, *opts], kill_at_task=2)
    with pytest.raises(SystemExit, match=r"unfinished conversion started with other arguments \(seed: 0 then, "
                                         r"1 now\): run it again with the same arguments .* --overwrite"):
        run(root, out, *opts, "--seed", 1)
    (root / "train" / WNIDS[0] / f"{WNIDS[0]}_5.JPEG").write_bytes(jpeg(np.random.default_rng(1)))
    with pytest.raises(SystemExit, match="files or labels of split 'train' changed .* --overwrite"):
        run(root, out, *opts)
    assert run(root, out, *opts, "--seed", 1, "--overwrite") == 0
    run(root, tmp_path / "fresh", *opts, "--seed", 1)
    assert files_of(out) == files_of(tmp_path / "fresh")


def test_unreadable_files_counted_per_reason(imagenet, tmp_path, capsys):
    root, _, _ = imagenet
    good = (root / "train" / WNIDS[0] / f"{WNIDS[0]}_2.JPEG").read_bytes()
    bad = {"cut.JPEG": good[:len(good) // 2], "cut2.JPEG": good[:-2], "notes.JPEG": b"not an image",
           "empty.JPEG": b""}
    for name, data in bad.items():
        (root / "train" / WNIDS[1] / name).write_bytes(data)
    out = tmp_path / "out"
    run(root / "train", out, "--split", "train", "--workers", 1, "--no-progress")
    text = capsys.readouterr().out
    assert "skipped 4 unreadable files (empty file: 1, not an image: 1, truncated: 2)" in text
    s = json.loads((out / "_info.json").read_text())["splits"]["train"]
    assert s["skipped_reasons"] == {"empty file": 1, "not an image": 1, "truncated": 2}
    assert sorted(os.path.basename(p) for p in s["skipped"]) == sorted(bad) and s["num_samples"] == 15
    with pytest.raises(SystemExit, match="4 unreadable files in split 'train' \\(--strict\\)"):
        run(root / "train", tmp_path / "strict", "--split", "train", "--strict", "--workers", 1, "--no-progress")
