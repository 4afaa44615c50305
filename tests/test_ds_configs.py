"""Every DeepSpeed config in ds_configs/ trains: a short run per file (tiny ViT, world size 1,
CPU/gloo), finite losses, the steps taken, a checkpoint written, and for the offload files the
optimizer where the file says. On the CPU accelerator "where" is the host either way: what is
checked there is DeepSpeed's offload flags and DeepSpeedCPUAdam; the device checks bite on GPUs.

One subprocess runs every file in turn (``python tests/test_ds_configs.py OUT RUN_ROOT``), once
per session also under pytest-xdist: one ``import deepspeed`` and one ``init_distributed`` for all
of them, and the pytest processes keep no process group. The first offload run on a machine
JIT-builds DeepSpeed's cpu_adam op into ~/.cache/torch_extensions (138 s on 2 cores, once)."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.stem for p in (ROOT / "ds_configs").glob("*.json"))
STEPS = 2


def _unsupported(ds: dict) -> str:
    """Why this machine's accelerator cannot run the JSON's precision ('' if it can)."""
    import torch
    from deepspeed.accelerator import get_accelerator
    accel = get_accelerator()
    for key, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        if ds.get(key, {}).get("enabled") and dtype not in accel.supported_dtypes():
            return (f"{key} is not supported by DeepSpeed's {accel.device_name()} accelerator "
                    f"(supported dtypes: {accel.supported_dtypes()}); deepspeed.initialize would "
                    f"raise 'Type {key} is not supported on your device.'")
    return ""


def _placement(engine) -> dict:
    """Where DeepSpeed keeps the optimizer (and, under ZeRO-3, the parameter partitions)."""
    opt = engine.optimizer
    base = engine.basic_optimizer
    state = [t for s in base.state.values() for t in s.values() if hasattr(t, "device") and t.dim()]
    out = {"basic_optimizer": type(base).__name__, "wrapper": type(opt).__name__,
           "state_devices": sorted({str(t.device) for t in state}), "state_tensors": len(state)}
    if hasattr(opt, "cpu_offload"):                       # ZeRO-1/2
        out["offload_optimizer"] = bool(opt.cpu_offload)
        out["master_devices"] = sorted({str(t.device) for t in opt.single_partition_of_fp32_groups})
    if hasattr(opt, "offload_param"):                     # ZeRO-3
        out["offload_optimizer"] = bool(opt.offload_optimizer)
        out["offload_param"] = bool(opt.offload_param)
        out["master_devices"] = sorted({str(t.device) for t in opt.fp32_partitioned_groups_flat})
        remote = opt.parameter_offload.offload_device
        out["param_offload_device"] = getattr(remote, "value", remote)
        # partitions below stage3_param_persistence_threshold stay on the device (all of them here)
        out["param_partition_devices"] = sorted({str(p.ds_tensor.device) for p in engine.module.parameters()
                                                 if not p.ds_persist})
    return out


def _run_one(name: str, run_root: Path, world) -> dict:
    from dsvit import config as C
    from dsvit.data.memory import MemoryEvalData, MemoryTrainData, random_dataset
    from dsvit.engine.trainer import Trainer

    cfg = C.load_config("tiny_test", [f"run.ds_config={name}", f"run.max_steps={STEPS}",
                                      f"run.dir={run_root / name}", "log.tensorboard=false"])
    C.validate(cfg, world.world_size)
    reason = _unsupported(C.load_ds_config(cfg))
    if reason:
        return {"skip": reason}
    images, labels = random_dataset(64, cfg.model.img_size, 10, seed=1)
    train = MemoryTrainData(images, labels, rank=0, world_size=1, local_batch=cfg.train.batch_size,
                            seed=cfg.run.seed)
    ev = MemoryEvalData(images[:20], labels[:20], rank=0, world_size=1, local_batch=20)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, world, [], train_data=train, eval_data=ev, num_classes=10)
    trainer.fit()
    rows = [json.loads(x) for x in (run_root / name / "tb" / "metrics.jsonl").read_text().splitlines()]
    out = {"losses": {r["step"]: r["train/loss"] for r in rows if "train/loss" in r},
           "global_steps": trainer.engine.global_steps, "zero_stage": trainer.zero_stage,
           "dtype": str(trainer.model_dtype), "device": str(trainer.device),
           "checkpoint": str(trainer.last_checkpoint),
           **_placement(trainer.engine)}
    trainer.destroy_engine()
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _worker(out: Path, run_root: Path) -> None:
    import traceback

    from dsvit.cli import init_distributed
    world = init_distributed(None)
    results = {}
    for name in CONFIGS:
        try:
            results[name] = _run_one(name, run_root, world)
        except Exception:   # one broken file must not hide the others
            results[name] = {"error": traceback.format_exc()[-3000:]}
        out.write_text(json.dumps(results, indent=1))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The runner's results, computed once per session even under pytest-xdist: the first worker
    to get here runs it under a lock in the temp folder all workers share, the others read."""
    import fcntl
    base = tmp_path_factory.getbasetemp()   # under xdist: pytest-N/popen-gwK, shared parent
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "ds_configs"
    root.mkdir(exist_ok=True)
    out = root / "results.json"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key, None)   # a world of one, on a free port dsvit picks
            proc = subprocess.run([sys.executable, __file__, str(out), str(root)], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=900)
            (root / "done").write_text(f"{proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    if not out.exists() or not (root / "done").read_text().startswith("0\n"):
        pytest.fail(f"the config runner failed:\n{(root / 'done').read_text()}")
    return json.loads(out.read_text())


def test_every_config_is_listed():
    assert len(CONFIGS) >= 17 and {"zero2-offload", "zero3-offload"} <= set(CONFIGS)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_config_trains(results, name):
    r = results[name]
    if "skip" in r:
        pytest.skip(r["skip"])
    assert "error" not in r, r["error"]
    ds = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    zero = ds.get("zero_optimization", {})
    assert r["zero_stage"] == zero.get("stage", 0)
    assert r["global_steps"] == STEPS
    assert sorted(r["losses"]) == [str(s) for s in range(1, STEPS + 1)]
    assert all(math.isfinite(v) for v in r["losses"].values()), r["losses"]
    assert r["dtype"] == ("torch.bfloat16" if ds.get("bf16", {}).get("enabled") else
                          "torch.float16" if ds.get("fp16", {}).get("enabled") else "torch.float32")
    assert Path(r["checkpoint"], "COMPLETE").exists()
    assert r["state_tensors"] > 0   # the optimizer stepped

    offload_opt = zero.get("offload_optimizer", {}).get("device") == "cpu"
    offload_param = zero.get("offload_param", {}).get("device") == "cpu"
    if zero.get("stage", 0) > 0:
        assert r["offload_optimizer"] == offload_opt
    if offload_opt:   # state and fp32 masters on the host, stepped by DeepSpeed's CPU Adam
        assert r["basic_optimizer"] == "DeepSpeedCPUAdam"
        assert r["state_devices"] == r["master_devices"] == ["cpu"]
    else:
        assert r["basic_optimizer"] == "AdamW"
        assert r["state_devices"] == [r["device"]]
    if zero.get("stage", 0) == 3:
        assert r["offload_param"] == offload_param
        assert r["param_offload_device"] == ("cpu" if offload_param else None)
        assert set(r["param_partition_devices"]) <= {"cpu" if offload_param else r["device"]}


@pytest.mark.parametrize("name,stage,message", [
    ("zero2-offload", 0, "sets offload_optimizer but runs ZeRO stage 0: offload_optimizer needs stage 1"),
    ("zero3-offload", 2, "sets offload_param but runs ZeRO stage 2: offload_param needs stage 3"),
])
def test_offload_below_its_stage_is_refused(name, stage, message):
    from dsvit import config as C
    from dsvit.engine.setup import complete_ds_config
    cfg = C.load_config("tiny_test", [f"run.ds_config={name}", f"run.zero_stage={stage}"])
    with pytest.raises(C.ConfigError, match=message):
        complete_ds_config(cfg, 1)


@pytest.mark.slow
def test_offload_changes_no_number(results):
    """fp32: optimizer offload (DeepSpeedCPUAdam on the host) trains like the plain stage (AdamW)."""
    for plain, offload in (("zero1", "zero1-offload"), ("zero2", "zero2-offload"),
                           ("zero3", "zero3-offload-opt"), ("zero3", "zero3-offload")):
        a, b = results[plain]["losses"], results[offload]["losses"]
        assert b == pytest.approx(a, rel=1e-5), (plain, offload)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
