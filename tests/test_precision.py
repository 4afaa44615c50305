"""Precision and ZeRO defaults per device: ``run.ds_config=auto``/``run.precision=auto`` resolve to
zero1-bf16 on a GPU with bf16 and to zero0 fp32 on CPU; every ZeRO 1/2 JSON has bucket sizes;
``run.deterministic`` switches torch's deterministic algorithms."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dsvit import config as C
from dsvit.engine import setup

DS = Path(__file__).resolve().parent.parent / "ds_configs"


def test_auto_on_cpu_is_zero0_fp32_and_explicit_choices_stand():
    cpu = torch.device("cpu")
    run = setup.resolve_run(C.load_config("default").run, cpu)
    assert (run.ds_config, run.precision) == ("zero0", "fp32")
    run = setup.resolve_run(C.load_config("default", ["run.ds_config=zero2-bf16"]).run, cpu)
    assert (run.ds_config, run.precision) == ("zero2-bf16", "bf16")     # the JSON says bf16
    run = setup.resolve_run(C.load_config("default", ["run.precision=fp32", "run.ds_config=zero1-bf16"]).run, cpu)
    assert run.precision == "fp32"                                       # the user said fp32


def test_auto_on_a_bf16_gpu_is_zero1_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = torch.device("cuda", 0)
    run = setup.resolve_run(C.load_config("default").run, gpu)
    assert (run.ds_config, run.precision) == ("zero1-bf16", "bf16")
    run = setup.resolve_run(C.load_config("default", ["run.ds_config=zero2"]).run, gpu)
    assert (run.ds_config, run.precision) == ("zero2", "bf16")          # an fp32 JSON gets bf16 on GPU
    resolved = dataclasses.replace(C.load_config("default", ["run.ds_config=zero2"]), run=run)
    assert setup.complete_ds_config(resolved, 1)["bf16"] == {"enabled": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)   # e.g. a V100
    assert setup.resolve_run(C.load_config("default").run, gpu).precision == "fp32"


@pytest.mark.parametrize("path", sorted(DS.glob("*.json")), ids=lambda p: p.stem)
def test_zero_configs_name_their_bucket_sizes(path):
    """DeepSpeed's default buckets are 5e8 elements (2 GB in fp32 per bucket, allocated every
    backward); every shipped ZeRO 1-3 config names a bucket of 5e7 elements at most."""
    zero = json.loads(path.read_text()).get("zero_optimization", {})
    stage = zero.get("stage", 0)
    keys = {1: ("reduce_bucket_size", "allgather_bucket_size"),
            2: ("reduce_bucket_size", "allgather_bucket_size"),
            3: ("reduce_bucket_size", "stage3_prefetch_bucket_size")}.get(stage, ())
    for key in keys:
        assert 0 < zero[key] <= 5e7, (path.name, key)


def test_deterministic_switch():
    run = C.load_config("default", ["run.deterministic=true"]).run
    try:
        setup.use_device_numerics(run, torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        setup.use_device_numerics(C.load_config("default").run, torch.device("cpu"))
    assert not torch.are_deterministic_algorithms_enabled()
