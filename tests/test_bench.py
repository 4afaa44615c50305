"""`dsvit bench`: the scheduling policy, the timing arithmetic of the report, the spec's checks, and
the interleaver on real (tiny) processes, interrupted and resumed."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dsvit.bench import report as R
from dsvit.bench import spec as S
from dsvit.bench.scheduler import Interleaver, RunRecord, core_groups, default_slots, pick_active
from dsvit.errors import ConfigError


def test_pick_active_takes_least_active_unfinished_runs_in_spec_order_on_ties():
    recs = [RunRecord("a", "running", 30.0), RunRecord("b", "pending", 0.0), RunRecord("c", "done", 0.0),
            RunRecord("d", "running", 10.0), RunRecord("e", "pending", 0.0)]
    assert pick_active(recs, 2) == ["b", "e"]
    assert pick_active(recs, 3) == ["b", "e", "d"]
    assert pick_active([RunRecord("x", "failed")], 1) == []


def test_runs_stay_on_their_accelerator_one_at_a_time_and_share_the_cores():
    recs = [RunRecord(n, "pending", t) for n, t in zip("abcde", (5.0, 1.0, 0.0, 2.0, 0.5))]
    # 2 GPUs: runs a, c, e on GPU 0 and b, d on GPU 1; each GPU takes its least-run run
    assert pick_active(recs, 2, devices=2) == ["c", "b"]
    recs[2].status = "done"
    assert pick_active(recs, 2, devices=2) == ["e", "b"]
    assert pick_active(recs, 4, devices=2) == ["e", "b", "d", "a"]   # two per GPU when asked
    assert pick_active(recs, 1, devices=2) == ["e"]   # --slots 1 on 2 GPUs: one run at a time
    assert core_groups(list(range(16)), 2) == [list(range(8)), list(range(8, 16))]
    assert core_groups([0, 1], 2) == [[0], [1]] and core_groups([0, 1], 3) == [[0], [1], [0]]


def test_a_run_bound_to_an_accelerator_sees_only_it(tmp_path):
    script = tmp_path / "env.py"
    script.write_text("import os, sys\nopen(sys.argv[1], 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])\n")
    il = Interleaver(tmp_path / "b", ["a", "b", "c"], lambda n: [sys.executable, str(script), str(tmp_path / f"{n}.env")],
                     slots=2, quantum_s=0.2, cores=[0], log=lambda m: None, env=dict(os.environ), devices=2)
    assert [r.status for r in il.run(tick_s=0.02)] == ["done"] * 3
    assert [(tmp_path / f"{n}.env").read_text() for n in "abc"] == ["0", "1", "0"]


def test_slots_default_to_one_run_per_gpu_on_a_gpu_machine_else_one_per_core():
    assert default_slots("cuda", 1, 16) == 1          # not 16 runs sharing one GPU
    assert default_slots("cuda", 8, 16) == 8
    assert default_slots("cpu", 1, 16) == 16          # DS_ACCELERATOR=cpu: the runs train on the cores
    assert default_slots("cuda", 0, 4) == 1
    from deepspeed.accelerator import get_accelerator
    from dsvit.bench import cli as B
    if get_accelerator().device_name() == "cpu":
        assert B._default_slots() == len(os.sched_getaffinity(0))
    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    B.add_bench_parser(sub)
    args = sub.choices["bench"].parse_args(["run", "spec.yaml", "--dir", "d"])
    assert args.slots is None                         # resolved by cmd_run, from the accelerator


def test_overlap_and_active_time():
    pauses = [[10.0, 20.0], [30.0, None]]
    assert R.overlap(0, 15, pauses) == 5
    assert R.overlap(12, 35, pauses) == 8 + 5
    segments = [[0.0, 40.0], [50.0, None]]   # a restart after an interruption at 40
    # launched 40 + 10 (50..60), stopped 10 (10..20) + 10 (30..40)
    assert R.active_at(60.0, segments, [[10.0, 20.0], [30.0, 40.0]]) == 30.0


def _metrics(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_run_times_subtracts_pauses_inside_logged_step_windows(tmp_path):
    # steps 1-10 logged at t=110 with 5 s/step (50 s); the run was stopped 100..105 inside that window
    rows = [{"time": 60.0, "step": 0, "eval/top1": 10.0},
            {"time": 110.0, "step": 10, "train/step_time_s": 5.0, "train/block_gmacs_per_image": 2.0},
            {"time": 130.0, "step": 20, "train/step_time_s": 2.0, "train/block_gmacs_per_image": 1.0},
            {"time": 135.0, "step": 20, "eval/top1": 42.0}]
    record = {"name": "r", "segments": [[50.0, 140.0]], "pauses": [[100.0, 105.0]], "active_s": 85.0,
              "restarts": 0}
    t = R.run_times(record, _metrics(tmp_path / "m.jsonl", rows))
    assert t.steps == 20
    assert t.steps_s == pytest.approx(50 - 5 + 20)
    assert t.train_macs == pytest.approx(10 * 2.0 + 10 * 1.0)
    assert t.top1 == 42.0 and t.end_to_end_s == 85.0
    assert t.evals == [(10.0, 10.0), (80.0, 42.0)]   # active seconds: 135 - 50 - 5 stopped


def test_run_times_of_a_window_stopped_most_of_its_length(tmp_path):
    # 25 steps of 0.2 s (5 s) with two 60 s quanta stopped inside: the window is 125 s, the steps 5 s
    rows = [{"time": 10.0, "step": 0, "interval": "startup", "began": 0.0},
            {"time": 135.0, "step": 25, "train/step_time_s": 5.0, "train/block_gmacs_per_image": 1.0},
            {"time": 140.0, "step": 25, "eval/top1": 50.0}]
    record = {"name": "r", "segments": [[0.0, 141.0]], "pauses": [[12.0, 72.0], [72.0, 132.0]],
              "active_s": 21.0, "restarts": 0}
    t = R.run_times(record, _metrics(tmp_path / "m.jsonl", rows))
    assert t.steps_s == pytest.approx(125 - 120)   # a floor of a tenth of the window said 12.5
    assert t.breakdown["startup"] == pytest.approx(10.0)
    # the parts never add to more than the run's active time
    assert t.steps_s + sum(t.breakdown.values()) <= t.end_to_end_s


def test_run_times_takes_out_only_the_stops_inside_the_timed_span(tmp_path):
    # steps 1-10 timed over 10..60 (5 s/step); a stop at 62..92 falls after the span, before the row
    # was written (the loss all-reduce, the flush): it is no step time, and none was logged for it
    rows = [{"time": 10.0, "step": 0, "interval": "startup", "began": 0.0},
            {"time": 60.0, "step": 10, "interval": "steps", "began": 10.0},
            {"time": 95.0, "step": 10, "train/step_time_s": 5.0, "train/block_gmacs_per_image": 1.0},
            {"time": 100.0, "step": 10, "eval/top1": 50.0}]
    record = {"name": "r", "segments": [[0.0, 101.0]], "pauses": [[62.0, 92.0], [20.0, 30.0]],
              "active_s": 61.0, "restarts": 0}
    t = R.run_times(record, _metrics(tmp_path / "m.jsonl", rows))
    assert t.steps_s == pytest.approx(50 - 10)      # the stop inside the span only
    rows[1]["step"] = 9                             # no span of this row (older metrics): the window
    t = R.run_times(record, _metrics(tmp_path / "n.jsonl", rows))   # 45..95 before the row, 30 s stopped
    assert t.steps_s == pytest.approx(50 - 30)


def test_run_times_counts_redone_steps_of_a_resumed_run_once(tmp_path):
    rows = [{"time": 10.0, "step": 10, "train/step_time_s": 1.0, "train/block_gmacs_per_image": 1.0},
            # killed after step 10, resumed from the checkpoint at step 5: steps 6..10 logged again
            {"time": 30.0, "step": 10, "train/step_time_s": 1.0, "train/block_gmacs_per_image": 1.0},
            {"time": 40.0, "step": 20, "train/step_time_s": 1.0, "train/block_gmacs_per_image": 1.0},
            {"time": 41.0, "step": 20, "eval/top1": 50.0}]
    record = {"name": "r", "segments": [[0.0, 12.0], [20.0, 42.0]], "pauses": [], "active_s": 34.0}
    t = R.run_times(record, _metrics(tmp_path / "m.jsonl", rows))
    assert t.steps == 20 + 1   # the repeated window counts one step, not ten
    with pytest.raises(ValueError, match="no evaluation"):
        R.run_times(record, _metrics(tmp_path / "n.jsonl", rows[:1]))


def test_wall_time_breakdown_from_intervals_less_the_stopped_time(tmp_path):
    # start-up 50..60, an evaluation of the first 2000 samples 80..90 (a curve point, not the result),
    # a checkpoint 90..92, the final evaluation 120..130 with the run stopped 122..126 inside it
    rows = [{"step": 1, "time": 60.0, "interval": "startup", "began": 50.0},
            {"time": 80.0, "step": 10, "train/step_time_s": 2.0, "train/block_gmacs_per_image": 1.0},
            {"time": 90.0, "step": 10, "eval_part/top1": 30.0},
            {"step": 10, "time": 90.0, "interval": "eval", "began": 80.0},
            {"step": 10, "time": 92.0, "interval": "checkpoint", "began": 90.0},
            {"time": 120.0, "step": 20, "train/step_time_s": 2.0, "train/block_gmacs_per_image": 1.0},
            {"time": 130.0, "step": 20, "eval/top1": 41.0},
            {"step": 20, "time": 130.0, "interval": "eval", "began": 120.0}]
    record = {"name": "r", "segments": [[50.0, 131.0]], "pauses": [[122.0, 126.0]], "active_s": 77.0}
    t = R.run_times(record, _metrics(tmp_path / "m.jsonl", rows))
    assert t.top1 == 41.0 and [a for _, a in t.evals] == [30.0, 41.0]   # the part is on the curve only
    assert t.breakdown == {"startup": 10.0, "eval": 10.0 + 6.0, "checkpoint": 2.0, "rebuild": 0.0}
    table = R.time_table({"r": t}, {"r": "base"})
    # 77 s end to end: start-up 10, steps 40, evaluation 16, checkpoints 2, other 9
    assert "| base | 77 s | 10 s (13 %) | 40 s (52 %) | 16 s (21 %) | 2 s (3 %) | 0 s (0 %) | 9 s (12 %) |" in table


def test_step_time_takes_out_the_stops_between_steps_not_those_inside_a_checkpoint(tmp_path):
    # steps 1-10 logged at t=130: 100..110 steps (stopped 104..106), 110..120 a checkpoint (stopped
    # 112..115: not step time, the trainer's logged time already leaves the checkpoint out), 120..130
    # steps; logged step time = 20 s of wall time + the 2 s stop among the steps
    rows = [{"time": 100.0, "step": 0, "train/step_time_s": 0.0, "train/block_gmacs_per_image": 1.0},
            {"step": 10, "time": 120.0, "interval": "checkpoint", "began": 110.0},
            {"time": 130.0, "step": 10, "train/step_time_s": 2.2, "train/block_gmacs_per_image": 1.0},
            {"time": 131.0, "step": 10, "eval/top1": 40.0}]
    record = {"name": "r", "segments": [[90.0, 132.0]], "pauses": [[104.0, 106.0], [112.0, 115.0]], "active_s": 37.0}
    t = R.run_times(record, _metrics(tmp_path / "m.jsonl", rows))
    assert t.steps_s == pytest.approx(22.0 - 2.0)
    assert t.breakdown["checkpoint"] == pytest.approx(10.0 - 3.0)


def _times(name, top1, e2e, steps_s, macs, steps=100):
    return R.RunTimes(name, top1, [(e2e, top1)], e2e, steps_s, steps, macs, 0)


def test_table_ratios_against_the_baseline_mean():
    runs = {"base-s0": _times("base-s0", 50.0, 100.0, 80.0, 1000.0), "base-s1": _times("base-s1", 52.0, 120.0, 100.0, 1000.0),
            "fast-s0": _times("fast-s0", 50.5, 50.0, 30.0, 400.0)}
    variant_of = {"base-s0": "base", "base-s1": "base", "fast-s0": "fast", "fast-s1": "fast"}
    rows = {r.variant: r for r in R.table(runs, variant_of, "base", global_batch=10)}
    b, f = rows["base"], rows["fast"]
    assert (b.seeds, b.top1, b.spread, b.speedup) == (2, 51.0, 2.0, 1.0)
    assert f.delta == pytest.approx(-0.5)
    assert f.speedup == pytest.approx(110 / 50) and f.steps_speedup == pytest.approx(90 / 30)
    assert f.flop_reduction == pytest.approx(2.5) and f.efficiency == pytest.approx(3.0 / 2.5)
    assert f.images_per_s == pytest.approx(10 * 100 / 30)
    assert "second seed" in f.note   # one seed, within 1 pt of the baseline
    text = R.markdown(list(rows.values()), "base")
    assert "| fast | 1 | 50.50 (0.00) | -0.50 pt |" in text and "**2.20x**" in text
    with pytest.raises(ValueError, match="baseline"):
        R.table({"fast-s0": runs["fast-s0"]}, variant_of, "base", 10)


def test_seeds_run_apart_from_the_baseline_give_top1_but_not_time():
    # fast-s1 and base-s1 were added to the folder after the first seeds had finished (another
    # stretch of the machine's drift); slow-s0 started as the baseline ended
    records = {"base-s0": {"segments": [[0.0, 100.0]]}, "fast-s0": {"segments": [[10.0, 60.0], [90.0, 95.0]]},
               "fast-s1": {"segments": [[200.0, 230.0]]}, "slow-s0": {"segments": [[100.0, None]]},
               "base-s1": {"segments": [[300.0, 400.0]]}}
    variant_of = {"base-s0": "base", "base-s1": "base", "fast-s0": "fast", "fast-s1": "fast", "slow-s0": "slow"}
    apart = R.apart_from_baseline(records, variant_of, "base")
    assert apart == ["fast-s1", "slow-s0", "base-s1"]   # touching the baseline's end is not beside it
    runs = {"base-s0": _times("base-s0", 50.0, 100.0, 80.0, 1000.0), "base-s1": _times("base-s1", 52.0, 50.0, 40.0, 1000.0),
            "fast-s0": _times("fast-s0", 50.0, 50.0, 40.0, 500.0), "fast-s1": _times("fast-s1", 52.0, 25.0, 20.0, 500.0)}
    rows = {r.variant: r for r in R.table(runs, variant_of, "base", 10, {}, apart)}
    assert rows["base"].top1 == 51.0 and rows["base"].end_to_end_s == 100.0   # time: base-s0's only
    assert rows["fast"].seeds == 2 and rows["fast"].top1 == 51.0   # accuracy from both seeds
    assert rows["fast"].speedup == pytest.approx(2.0) and rows["fast"].steps_speedup == pytest.approx(2.0)
    assert "times of fast-s0 only" in rows["fast"].note
    only_apart = R.table({**runs, "slow-s0": _times("slow-s0", 49.0, 200.0, 160.0, 1000.0)}, variant_of, "base",
                         10, {}, apart)
    assert only_apart[-1].variant == "slow" and "not comparable" in only_apart[-1].note
    assert "| fast | 50 s |" in R.time_table(runs, variant_of, apart)
    # a sequential folder (no baseline seed beside another): only the first baseline run is the reference
    assert R.apart_from_baseline({"base-s0": {"segments": [[0.0, 1.0]]}}, {"base-s0": "base"}, "base") == []


def test_replace_section_appends_once_then_replaces_in_place():
    doc = "# Results\n\nintro\n"
    once = R.replace_section(doc, "b", "table 1")
    assert once.startswith(doc.rstrip()) and "table 1" in once
    twice = R.replace_section(once + "\n## later\n", "b", "table 2")
    assert "table 1" not in twice and "table 2" in twice and twice.endswith("## later\n")
    assert twice.count("dsvit bench b: start") == 1


def _write_spec(tmp_path, variants, **top):
    spec = {"name": "t", "recipe": "tiny_test", "seeds": [0, 1], "variants": variants, **top}
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))   # JSON is YAML
    return path


def test_spec_expands_variants_and_seeds_and_validates_every_run(tmp_path):
    path = _write_spec(tmp_path, {"baseline": {}, "toe": {"overrides": ["plugins.toe.enabled=true"], "seeds": [3]},
                                  "stack": {"plugins_from": "stack", "overrides": ["model.depth=4"]}})
    spec = S.load(path, ["train.epochs=1"])
    assert [r.name for r in spec.runs] == ["baseline-s0", "baseline-s1", "toe-s3", "stack-s0", "stack-s1"]
    assert spec.runs[2].overrides[-2:] == ("run.seed=3", "train.epochs=1")
    assert "growth" in spec.runs[3].recipe["plugins"] and spec.runs[3].recipe["base"] == "tiny_test"
    assert [r.name for r in S.load(path, (), ["toe"]).runs] == ["toe-s3"]
    assert S.load(path).fingerprint() != S.load(path, ["train.epochs=1"]).fingerprint()
    with pytest.raises(ConfigError, match="--only nope"):
        S.load(path, (), ["nope"])


@pytest.mark.parametrize("variants,top,message", [
    ({"x": {}}, {}, "baseline 'baseline' is not one of the variants"),
    ({"baseline": {"overide": []}}, {}, "variant 'baseline': unknown key"),
    ({"baseline": {}}, {"seed": [0]}, "unknown key"),
    ({"baseline": {"overrides": ["plugins.toe.keep_rate=2"]}}, {}, "run 'baseline-s0'"),
])
def test_spec_errors_name_the_key(tmp_path, variants, top, message):
    with pytest.raises(ConfigError, match=message):
        S.load(_write_spec(tmp_path, variants, **top))


# ---------------------------------------------------------------- the interleaver, on real processes
# A "run" counts to N in 20 ms ticks, appending each tick's time to its file; SIGSTOP freezes it.
COUNTER = ("import sys, time\npath, n = sys.argv[1], int(sys.argv[2])\n"
           "done = sum(1 for _ in open(path)) if __import__('os').path.exists(path) else 0\n"
           "with open(path, 'a') as f:\n    for _ in range(n - done):\n"
           "        time.sleep(0.02); f.write(f'{time.time()}\\n'); f.flush()\n")


def _command(tmp_path, n):
    script = tmp_path / "counter.py"
    script.write_text(COUNTER)
    return lambda name: [sys.executable, str(script), str(tmp_path / f"{name}.ticks"), str(n)]


def test_interleaver_runs_one_at_a_time_on_one_slot_and_finishes_all(tmp_path):
    il = Interleaver(tmp_path / "b", ["a", "b", "c"], _command(tmp_path, 40), slots=1, quantum_s=0.3,
                     cores=[0], log=lambda m: None)
    records = il.run(tick_s=0.02)
    assert [r.status for r in records] == ["done"] * 3
    assert sum(1 for _ in open(tmp_path / "a.ticks")) == 40
    assert all(r.pauses for r in records[:2])   # each was stopped while another ran
    # never two at once: between any two ticks of one run, no other run ticked unless it was paused
    ticks = sorted((float(t), n) for n in "abc" for t in open(tmp_path / f"{n}.ticks"))
    switches = sum(1 for (_, x), (_, y) in zip(ticks, ticks[1:]) if x != y)
    assert switches <= len([p for r in records for p in r.pauses]) + 2
    saved = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert [r["status"] for r in saved["runs"]] == ["done"] * 3


def test_interleaver_interrupted_resumes_unfinished_runs_and_keeps_their_time(tmp_path):
    folder = tmp_path / "b"
    f1, f2 = {"a": "f1", "b": "f1"}, {"a": "f1", "b": "f2"}
    il = Interleaver(folder, ["a", "b"], _command(tmp_path, 60), slots=1, quantum_s=0.2, cores=[0],
                     settings=f1, log=lambda m: None)
    il._schedule(time.time())
    time.sleep(0.5)
    il.records[0].active_s = 0.5
    il.shutdown()   # what Ctrl-C does
    first = json.loads((folder / "bench.json").read_text())["runs"][0]
    assert first["status"] == "pending" and first["segments"][0][1] is not None
    with pytest.raises(RuntimeError, match=r"run\(s\) \['b'\] made with other settings"):
        Interleaver(folder, ["a", "b"], _command(tmp_path, 60), 1, settings=f2, log=lambda m: None)
    il2 = Interleaver(folder, ["a", "b"], _command(tmp_path, 60), slots=1, quantum_s=0.2, cores=[0],
                      settings=f1, log=lambda m: None)
    records = il2.run(tick_s=0.02)
    assert [r.status for r in records] == ["done", "done"]
    assert records[0].restarts == 1 and len(records[0].segments) == 2 and records[0].active_s > 0.5
    assert sum(1 for _ in open(tmp_path / "a.ticks")) == 60   # continued, not started over


def test_a_folder_grows_by_new_runs_and_keeps_the_runs_it_has(tmp_path):
    folder = tmp_path / "b"
    Interleaver(folder, ["a"], _command(tmp_path, 20), slots=1, quantum_s=0.2, cores=[0],
                settings={"a": "fa"}, log=lambda m: None).run(tick_s=0.02)
    done_a = json.loads((folder / "bench.json").read_text())["runs"][0]
    grown = Interleaver(folder, ["a", "b"], _command(tmp_path, 20), slots=1, quantum_s=0.2, cores=[0],
                        settings={"a": "fa", "b": "fb"}, log=lambda m: None)
    assert [r.status for r in grown.run(tick_s=0.02)] == ["done", "done"]
    saved = {r["name"]: r for r in json.loads((folder / "bench.json").read_text())["runs"]}
    assert saved["a"] == done_a and saved["b"]["settings"] == "fb"   # a not run again
    assert sum(1 for _ in open(tmp_path / "a.ticks")) == 20
    # a later invocation naming only c keeps a and b in the folder
    Interleaver(folder, ["c"], _command(tmp_path, 1), slots=1, cores=[0], settings={"c": "fc"},
                log=lambda m: None).run(tick_s=0.02)
    assert [r["name"] for r in json.loads((folder / "bench.json").read_text())["runs"]] == ["c", "a", "b"]


def test_a_folder_from_before_per_run_settings_is_checked_once_by_the_whole_fingerprint(tmp_path):
    folder = tmp_path / "b"
    folder.mkdir()
    run = {"name": "a", "status": "done", "active_s": 3.0, "segments": [[0.0, 3.0]], "pauses": [],
           "restarts": 0, "returncode": 0, "pgid": None}
    (folder / "bench.json").write_text(json.dumps({"fingerprint": "whole", "slots": 1, "quantum_s": 60, "runs": [run]}))
    asked = []
    with pytest.raises(RuntimeError, match="another spec"):
        Interleaver(folder, ["a", "b"], _command(tmp_path, 1), 1, settings={"a": "fa", "b": "fb"},
                    legacy_fingerprint=lambda names: asked.append(names) or "other", log=lambda m: None)
    assert asked == [["a"]]   # the old fingerprint covered the runs the folder held
    il = Interleaver(folder, ["a", "b"], _command(tmp_path, 1), 1, settings={"a": "fa", "b": "fb"},
                     legacy_fingerprint=lambda names: "whole", log=lambda m: None)
    assert [(r.name, r.status, r.settings) for r in il.records] == [("a", "done", "fa"), ("b", "pending", "fb")]
    il.save()
    assert "fingerprint" not in json.loads((folder / "bench.json").read_text())


def test_bench_run_adds_variants_to_a_folder_but_keeps_its_spec_and_overrides(tmp_path):
    from dsvit.bench.cli import _spec
    path = _write_spec(tmp_path, {"baseline": {}, "toe": {"overrides": ["plugins.toe.enabled=true"]},
                                  "pss": {"plugins_from": "pss"}}, seeds=[0])
    folder = tmp_path / "bench"
    args = lambda only, overrides=(): argparse.Namespace(spec=str(path), overrides=list(overrides), only=only)  # noqa: E731
    assert [r.name for r in _spec(folder, args("baseline")).runs] == ["baseline-s0"]
    assert [r.name for r in _spec(folder, args("pss,baseline")).runs] == ["baseline-s0", "pss-s0"]
    assert [r.name for r in _spec(folder).runs] == ["baseline-s0", "pss-s0"]   # what `bench report` reads
    with pytest.raises(ConfigError, match="other overrides"):
        _spec(folder, args("toe", ["train.epochs=1"]))
    with pytest.raises(ConfigError, match="--only toee"):   # refused, and not saved into the folder
        _spec(folder, args("toee"))
    assert [r.name for r in _spec(folder, args("")).runs] == ["baseline-s0", "toe-s0", "pss-s0"]   # all
    # a folder written before each run kept its settings holds the fingerprint of its --only's runs
    # (spec order): the grown spec gives the same one for those runs
    assert _spec(folder).fingerprint(["baseline-s0", "pss-s0"]) == S.load(path, (), ["pss", "baseline"]).fingerprint()
    assert _spec(folder).fingerprint(["baseline-s0", "pss-s0"]) != S.load(path, (), ["toe", "baseline"]).fingerprint()


def test_interleaver_kills_runs_left_over_by_a_killed_benchmark(tmp_path):
    folder = tmp_path / "b"
    folder.mkdir()
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    (folder / "bench.json").write_text(json.dumps({"fingerprint": "", "runs": [
        {"name": "a", "status": "running", "active_s": 3.0, "segments": [[0.0, None]], "pauses": [],
         "restarts": 0, "returncode": None, "pgid": orphan.pid}]}))
    il = Interleaver(folder, ["a"], _command(tmp_path, 1), slots=1, cores=[0], log=lambda m: None)
    assert orphan.wait(timeout=10) == -signal.SIGKILL
    assert il.records[0].status == "pending" and il.records[0].segments[0][1] is not None


def test_spec_refuses_a_run_whose_plugins_cannot_compose(tmp_path):
    # the token level pruning inside the span of an attention mask: the composition check's refusal
    path = _write_spec(tmp_path, {"baseline": {"overrides": [
        "model.depth=4", "plugins.token_pruning.enabled=true", "plugins.token_pruning.blocks=[1,2]",
        "plugins.attention_sparsity.enabled=true", "plugins.attention_sparsity.blocks=[1,3]"]}})
    with pytest.raises(ConfigError, match=r"run 'baseline-s0'.*token_pruning changes the token set inside block 2"):
        S.load(path)
