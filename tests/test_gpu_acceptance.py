"""tools/gpu_acceptance.sh: its CPU smoke mode runs every part and summarises each with numbers (so the
GPU script cannot rot), and the setup stops with a clear line where it cannot go on. No timing
thresholds: only that the numbers are there and the checks hold."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_acceptance.sh"
NUMBER = r"\d+(?:\.\d+)?"


def run(out: Path, *args: str, **env) -> tuple[subprocess.CompletedProcess, str]:
    proc = subprocess.run([str(SCRIPT), *args, str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHON": sys.executable, **env})
    summary = (out / "summary.md").read_text() if (out / "summary.md").exists() else ""
    return proc, summary


def sections(summary: str) -> dict[str, str]:
    """'1'..'5' and 'setup' -> the section's text, up to and including its status line."""
    out = {}
    for block in summary.split("\n## ")[1:]:
        title = block.split("\n", 1)[0]
        out["setup" if title == "setup" else title.split(".")[0]] = block
    return out


def table(section: str) -> list[dict]:
    lines = [x for x in section.splitlines() if x.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in x.strip("|").split("|")))) for x in lines[2:]]


def is_number(cell: str) -> bool:
    return re.fullmatch(NUMBER + r"( %)?", cell) is not None


@pytest.mark.slow
def test_smoke_mode_summarises_every_part_with_numbers(tmp_path):
    out = tmp_path / "acceptance"
    proc, summary = run(out, "--smoke")
    assert proc.returncode == 0, f"{summary}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert summary.startswith("# dsvit GPU acceptance (smoke mode") and "every part ok or skipped" in summary
    part = sections(summary)
    assert sorted(part) == ["1", "2", "3", "4", "5", "setup"]
    for n in "12345":
        assert re.search(rf"^part {n}: ok \({NUMBER} s\)$", part[n], re.M), part[n]

    # 1: images/s of baseline and stack for both models (no MFU on CPU)
    rows = table(part["1"])
    assert [(r["model"], r["method"]) for r in rows] == [
        (m, k) for m in ("vit_small_patch16_224", "vit_base_patch16_224") for k in ("baseline", "stack (whole run)")]
    assert all(is_number(r["images/s"]) and float(r["images/s"]) > 0 and r["MFU"] == "n/a" for r in rows)
    assert all("bf16" in r["device"] for r in rows)

    # 2: images/s and data-wait fraction per run; the stack's growth rebuilt and logged device memory
    rows = {r["run"]: r for r in table(part["2"])}
    assert sorted(rows) == ["baseline", "stack"]
    for r in rows.values():
        assert is_number(r["images/s (after the first interval)"]) and 0 <= float(r["data-wait fraction"]) <= 1
        assert is_number(r["eval top-1"])
    assert rows["baseline"]["device MiB after each rebuild (step: depth)"] == "no rebuilds"
    mem = re.findall(rf"({NUMBER}) \(step (\d+): depth (\d+)\)",
                     rows["stack"]["device MiB after each rebuild (step: depth)"])
    assert len(mem) >= 1 and all(float(m) > 0 for m, _, _ in mem)
    assert re.search(rf"stack / baseline images/s: {NUMBER}x", part["2"])

    # 3: device memory at every rebuild under ZeRO-3, depth growing
    rows = table(part["3"])
    assert len(rows) >= 1 and all(is_number(r["device MiB"]) and float(r["device MiB"]) > 0 for r in rows)
    depths = [int(r["depth"]) for r in rows]
    assert depths == sorted(depths)
    assert re.search(rf"after the first: {NUMBER}x", part["3"])

    # 4: the same steps with and without the identity rebuild, within bf16 tolerance
    rows = table(part["4"])
    assert len(rows) >= 4 and any("after it" in r["step"] for r in rows)
    assert all(is_number(r["loss, no rebuild"]) and is_number(r["loss, identity rebuild"]) for r in rows)
    assert "within bf16 tolerance" in part["4"]

    # 5: top-1 and times for both runs, every planned epoch evaluated
    rows = {r["run"]: r for r in table(part["5"])}
    assert sorted(rows) == ["baseline", "stack-et"]
    for r in rows.values():
        assert is_number(r["top-1"]) and is_number(r["end to end s"]) and is_number(r["training loop s"])
        done, planned = r["epochs evaluated"].split(" / ")
        assert done == planned


def test_setup_names_missing_packages_and_the_fix_without_wheels(tmp_path):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    proc, summary = run(tmp_path / "out", "--smoke", PYTHON=str(bare / "bin" / "python"),
                        WHEELS=str(tmp_path / "no-wheels"))
    assert proc.returncode == 1
    setup = sections(summary)["setup"]
    assert "lacks torch" in setup and "deepspeed" in setup and "no wheels folder" in setup
    assert "WHEELS=DIR" in setup and "header" in setup
    assert re.search(r"^part 0: FAILED", setup, re.M) and "stopped: the setup failed" in summary
    assert "## 1." not in summary


def test_gpu_mode_without_a_gpu_stops_at_the_setup_saying_so(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc, summary = run(tmp_path / "out")
    assert proc.returncode == 1
    assert "no GPU visible to torch" in summary and "--smoke" in summary and "## 1." not in summary


def test_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    proc = subprocess.run([str(SCRIPT), "--smoke", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is not empty" in proc.stderr and "new OUT_DIR" in proc.stderr
