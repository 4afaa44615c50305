import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import shutil  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shards_96_50(tmp_path_factory):
    """96 train samples in 8 shards of 12, 50 val in 2 shards of 25 (PNG), written once per session
    (per xdist worker). Read-only: a test that damages shards takes ``shards_96_50_copy``."""
    from data_helpers import write_dataset
    return write_dataset(tmp_path_factory.mktemp("shards_96_50"), 96, 50)


@pytest.fixture
def shards_96_50_copy(shards_96_50, tmp_path):
    """A private copy of ``shards_96_50`` to damage."""
    return str(shutil.copytree(shards_96_50, tmp_path / "d"))


@pytest.fixture
def decoded_uids(monkeypatch):
    """The uids ``SampleDecoder.decode`` is called with, in order (decoded in this process: workers=0)."""
    from dsvit.data.stream import SampleDecoder
    decoded, orig = [], SampleDecoder.decode

    def counting(self, uid, *a):
        decoded.append(uid)
        return orig(self, uid, *a)
    monkeypatch.setattr(SampleDecoder, "decode", counting)
    return decoded
