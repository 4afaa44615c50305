"""``dsvit bench throughput`` on a tiny model: table structure, MAC counts, the stack's invariant.
No timing thresholds (the numbers are noisy; only their bookkeeping is checked). The measurement
runs in a subprocess: it builds DeepSpeed engines, so it needs a process group, and the pytest
processes keep none."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsvit.bench import peaks as P
from dsvit.bench import throughput as T

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "vit_tiny_patch16_224", "--img", "32", "--patch", "4", "--embed-dim", "64",
        "--depth", "4", "--heads", "2", "--classes", "10", "--batch", "2", "--rounds", "2",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``dsvit bench throughput`` on the tiny model, its markdown appended to a file that has a line."""
    tmp = tmp_path_factory.mktemp("throughput")
    md, js = tmp / "t.md", tmp / "t.json"
    md.write_text("earlier\n")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "dsvit", "bench", "throughput", *TINY, "--threads", "1",
                           "--out", str(md), "--json", str(js)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(js.read_text())[0], md.read_text(), proc.stdout


@pytest.fixture(scope="module")
def result(run):
    res, _, _ = run
    return res, res["device"]


def rows_of(res, method):
    return [r for r in res["rows"] if r["method"] == method]


def whole(res, method):
    return next(r for r in rows_of(res, method) if r["stage"] == "whole run")


def test_table_structure(result):
    res, line = result
    text = T.table(res, line)
    lines = text.strip().splitlines()
    assert lines[0].startswith("### vit_tiny_patch16_224 32 px, batch 2, 2 interleaved rounds")
    assert lines[1].startswith("device: cpu") and "torch" in lines[1] and "timm" in lines[1] and "fp32" in lines[1]
    body = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| method")]
    assert len(body) == len(res["rows"]) and all(ln.count("|") == 11 for ln in body)
    # stages per method (+ one whole-run row each, baseline excepted); shares sum to 1
    want = {"baseline": 1, "toe": 3, "pss": 5, "token_pruning": 1, "growth": 4, "stack": 6}
    for method, n in want.items():
        rows = rows_of(res, method)
        stages = [r for r in rows if r["stage"] != "whole run"]
        assert len(stages) == n and len(rows) == n + (method != "baseline")
        assert sum(r["share"] for r in stages) == pytest.approx(1.0)
    base = rows_of(res, "baseline")[0]
    assert base["speedup"] == base["mac_reduction"] == base["efficiency"] == 1.0
    for r in res["rows"]:
        assert r["s_per_step"] > 0 and r["efficiency"] == pytest.approx(r["speedup"] / r["mac_reduction"])


def test_baseline_macs_match_formula(result):
    res, _ = result
    d, depth, h, p, img, classes = 64, 4, 4 * 64, 4, 32, 10
    n = (img // p) ** 2
    t = n + 1                                       # + CLS
    blocks = depth * (t * (4 * d * d + 2 * d * h) + 2 * t * t * d)
    want = blocks + n * 3 * p * p * d + d * classes  # + patch embed and head
    assert rows_of(res, "baseline")[0]["gmacs"] * 1e9 == pytest.approx(want, rel=1e-12)
    assert rows_of(res, "baseline")[0]["tokens"] == t
    # ToE's keep-1.0 stage and PSS's keep 1.0 are the baseline computation itself
    assert rows_of(res, "toe")[2]["mac_reduction"] == 1.0 and rows_of(res, "pss")[-2]["mac_reduction"] == 1.0


def test_stack_reduces_macs_more_than_each_component(result):
    res, _ = result
    stack = whole(res, "stack")["mac_reduction"]
    for method in ("growth", "toe", "token_pruning"):
        assert stack > whole(res, method)["mac_reduction"], method
    # per stretch of the run: never below its growth stage or the token level alone
    growth = {r["stage"].split(":")[0].split()[1]: r["mac_reduction"]
              for r in rows_of(res, "growth") if r["stage"] != "whole run"}
    tp = rows_of(res, "token_pruning")[0]["mac_reduction"]
    for r in rows_of(res, "stack")[:-1]:
        g = r["stage"].split()[1]
        assert r["mac_reduction"] >= max(growth[g], tp) * (1 - 1e-12), r["stage"]


def test_no_mfu_on_cpu_and_the_real_engine(result, run):
    res, line = result
    assert res["peak_tflops"] is None and all(r["mfu"] is None for r in res["rows"])
    assert "MFU" not in T.table(res, line)
    _, md, stdout = run
    assert md.startswith("earlier\n") and md.count("### vit_tiny") == 1   # appended
    assert T.table(res, line) in md and T.table(res, line) in stdout
    # the engine a CPU run builds: DeepSpeed, ZeRO-0, fp32
    assert "DeepSpeed engine, zero0" in line and "fp32" in line


def test_known_peaks_and_arguments():
    assert P.peak_for("NVIDIA H200") == P.peak_for("NVIDIA H100 80GB HBM3") == 989.0   # SXM parts
    assert P.peak_for("NVIDIA H100 PCIe") == 756.0 and P.peak_for("NVIDIA H100 NVL") == 835.0
    assert P.peak_for("NVIDIA A100-SXM4-80GB") == P.peak_for("NVIDIA A100 80GB PCIe") == 312.0
    # exact names only: a name that merely contains a known one is not guessed
    assert P.peak_for("NVIDIA H100") is None and P.peak_for("NVIDIA H100 PCIe 2") is None
    args = T.parse_args(["--device", "cpu", "--methods", "baseline,toe", "stack"])
    assert args.methods == ["baseline", "toe", "stack"] and (args.dtype, args.ds_config) == ("fp32", "zero0")
    args = T.parse_args(["--device", "cpu", "--ds-config", "zero1-bf16"])
    assert (args.dtype, args.ds_config) == ("bf16", "zero1-bf16")   # auto: as the JSON says
    with pytest.raises(SystemExit, match="run.ds_config 'nope' not found"):
        T.parse_args(["--device", "cpu", "--ds-config", "nope"])
    with pytest.raises(SystemExit):
        T.parse_args(["--device", "cpu", "--methods", "nope"])
    with pytest.raises(SystemExit, match="--peak-tflops must be > 0"):
        T.parse_args(["--device", "cpu", "--peak-tflops", "0"])


@pytest.mark.parametrize("name,dtype,given,peak,says", [
    ("NVIDIA H100 PCIe", "bf16", None, 756.0, "table entry 'NVIDIA H100 PCIe'"),
    ("NVIDIA H100 NVL", "bf16", None, 835.0, "table entry 'NVIDIA H100 NVL'"),
    ("NVIDIA H200", "bf16", 700.0, 700.0, "from --peak-tflops"),
    ("NVIDIA H200", "fp32", None, None, "pass --peak-tflops"),
    ("NVIDIA H100 PCIe", "fp32", 51.0, 51.0, "from --peak-tflops"),
    ("Some Future GPU", "bf16", None, None, "not in the peak table; pass --peak-tflops"),
])
def test_peak_by_exact_device_name_or_the_flag(monkeypatch, capsys, name, dtype, given, peak, says):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    line, got = P.device_info(torch.device("cuda"), dtype, given)
    assert got == peak and line.startswith(f"{name}, torch") and says in line
    if peak is None and dtype == "bf16":   # an unknown device is said once on stderr too
        assert says in capsys.readouterr().err
