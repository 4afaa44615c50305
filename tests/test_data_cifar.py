"""Real data: a CIFAR-10 JPEG subset converts, verifies and streams (skips without ../shared/data)."""
import argparse
import tarfile
from pathlib import Path

import pytest
import torch

from dsvit.data.cli import add_shards_parser
from dsvit.data import pipeline as P
from host_images import finished
from data_helpers import cfg, collect

TARBALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
PER_CLASS = {"train": 160, "test": 40}  # 2000 images


@pytest.fixture(scope="session")
def cifar_subset(tmp_path_factory):
    if not TARBALL.exists():
        pytest.skip(f"real-data test skipped: {TARBALL} not found (see shared/data/README.md)")
    root = tmp_path_factory.mktemp("cifar")
    taken = {}
    with tarfile.open(TARBALL, "r:gz") as tf:
        for m in tf:
            parts = m.name.split("/")  # cifar10/<split>/<class>/<file>
            if m.isfile() and len(parts) == 4:
                k = (parts[1], parts[2])
                if taken.get(k, 0) < PER_CLASS[parts[1]]:
                    taken[k] = taken.get(k, 0) + 1
                    tf.extract(m, root, filter="data")
    return root / "cifar10"


def run(*argv):
    parser = argparse.ArgumentParser()
    add_shards_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["shards", *map(str, argv)])
    return args.func(args)


def test_cifar_converts_verifies_and_streams(cifar_subset, tmp_path):
    out = tmp_path / "shards"
    assert run("imagefolder", cifar_subset, out, "--shard-size", 200, "--workers", 2, "--no-progress") == 0
    assert run("verify", out, "--no-progress") == 0
    info = P.read_info(str(out))
    assert P.num_classes(info) == 10 and info["splits"]["train"]["num_samples"] == 1600
    assert info["splits"]["train"]["class_counts"] == [160] * 10
    c = cfg(out, workers=2, val_split="test", auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    uids = []
    for rank in (0, 1):
        td = P.TrainData(c, info, img_size=32, rank=rank, world_size=2, local_batch=40, seed=0)
        x, y, u = collect(finished(td.epoch_batches(0)))
        assert x.shape[1:] == (3, 32, 32) and torch.isfinite(x).all()
        uids += u.tolist()
    assert sorted(uids) == list(range(1600))
    ed = P.EvalData(c, info, img_size=32, rank=0, world_size=1, local_batch=64)
    labels = torch.cat([y[v] for _, y, v in ed.batches()])
    assert torch.bincount(labels).tolist() == [40] * 10
