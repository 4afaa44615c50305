import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import shutil  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config):
    """Build DeepSpeed's CPU communication op once, in the controlling process, before any test
    starts a run: left to the tests, the first process to load it compiles it under torch's lock
    file while other tests SIGKILL ranks on purpose (tests/test_failure.py); a rank killed while it
    holds the lock leaves every later run waiting on it."""
    if hasattr(config, "workerinput"):   # an xdist worker: the controller has done it
        return
    from dsvit.cli import use_extension_cache_of_this_env
    use_extension_cache_of_this_env()
    try:
        from deepspeed.comm.torch import build_shm_op
        from dsvit.engine.comm_op import quiet_when_cached
        quiet_when_cached(build_shm_op)
    except Exception as e:   # no such op here: the runs say so themselves
        print(f"conftest: DeepSpeed's comm op not pre-built ({e})")


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
