"""``dsvit bench``: run a benchmark spec interleaved on the cores, report it, or measure throughput.

    dsvit bench run SPEC.yaml --dir DIR [--slots K] [--quantum S] [--only A,B] [--results FILE] [k=v ...]
    dsvit bench report --dir DIR [--results FILE]
    dsvit bench throughput [--model ...] [--methods ...]      (step speed only; see --help there)

``run`` is resumable: run it again with the same arguments after an interruption. A folder also
grows: run it again with another ``--only``, or after adding a variant or a seed to the spec, and the
new runs join the old ones in its table (a run the folder holds must keep its settings; the report
names the runs that did not run beside the baseline's first seed). Extra ``section.key=value`` arguments apply
to every run (e.g. ``data.root=/data/cifar10-shards``).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dsvit import config as C


def add_bench_parser(sub) -> None:
    from dsvit.cli_help import plain_text
    p = sub.add_parser("bench", help="benchmark methods side by side (interleaved), or their throughput",
                       description=plain_text(__doc__),
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    bs = p.add_subparsers(dest="bench_command", required=True)
    r = bs.add_parser("run", help="train every variant x seed of SPEC interleaved, then report")
    r.add_argument("spec", help="benchmark spec YAML (dsvit/bench/spec.py; e.g. benchmarks/stack_bench.yaml)")
    r.add_argument("--dir", required=True, help="benchmark folder (runs, logs, bench.json, report)")
    r.add_argument("--slots", type=int, default=None,
                   help="runs going at once (default: one per GPU on a GPU machine, as DeepSpeed's "
                        "accelerator sees it; else one per core this process may use)")
    r.add_argument("--quantum", type=float, default=60.0, help="seconds between switches")
    r.add_argument("--only", default="", help="comma-separated variants to run (default: all); "
                                             "in a folder that has runs, adds these variants to them")
    r.add_argument("--results", default="", help="also write the table into this markdown file")
    r.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="applied to every run (e.g. data.root=/data/cifar10-shards)")
    r.set_defaults(func=cmd_run)
    q = bs.add_parser("report", help="write the table and plot of a benchmark folder")
    q.add_argument("--dir", required=True, help="the --dir of a `dsvit bench run`")
    q.add_argument("--results", default="", help="also write the table into this markdown file "
                   "(its section for this benchmark is replaced)")
    q.set_defaults(func=cmd_report)
    # listed for `dsvit bench --help` only: dsvit.cli.main hands `bench throughput ...` to
    # dsvit.bench.throughput.main before argparse, which would take its flags for overrides
    bs.add_parser("throughput", help="step speed of each method's stages (no training)", add_help=False)


def _spec(folder: Path, args=None):
    """The folder's spec; ``args`` (a `bench run`) may add variants to it (another --only), never
    change the spec file or the common overrides its runs were made with."""
    from dsvit.bench import spec as S
    saved = folder / "bench_args.json"
    if args is not None:
        given = {"spec": str(Path(args.spec).resolve()), "overrides": list(args.overrides),
                 "only": [v for v in args.only.split(",") if v]}
        if saved.exists():
            before = json.loads(saved.read_text())
            if {k: before[k] for k in ("spec", "overrides")} != {k: given[k] for k in ("spec", "overrides")}:
                raise C.ConfigError(f"{folder} holds a benchmark of another spec or other overrides "
                                    f"({saved.read_text().strip()}); use another --dir to start a new one")
            # the runs already there stay in the folder's table: --only adds to them (empty: every variant)
            given["only"] = (before["only"] + [v for v in given["only"] if v not in before["only"]]
                             if before["only"] and given["only"] else [])
        spec = S.load(given["spec"], given["overrides"], given["only"])   # a typo is refused, not saved
        folder.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(given))
        return spec
    if not saved.exists():
        raise C.ConfigError(f"{folder} is not a benchmark folder (no bench_args.json); run `dsvit bench run` first")
    given = json.loads(saved.read_text())
    return S.load(given["spec"], given["overrides"], given["only"])


def cmd_run(args) -> int:
    from dsvit.bench import spec as S
    from dsvit.bench.scheduler import Interleaver
    folder = Path(args.dir).resolve()
    spec = _spec(folder, args)
    runs = {r.name: r for r in spec.runs}
    devices = _accelerators()
    if args.slots is None:
        args.slots = _default_slots()

    def command(name: str) -> list:
        r = runs[name]
        recipe = S.write_recipe(r, folder / "recipes")
        return [sys.executable, "-m", "dsvit", "train", "--config", str(recipe), *r.overrides,
                f"run.dir={folder / 'runs' / name}", "checkpoint.resume=auto", "log.progress=false"]

    _build_deepspeed_ops()
    _stop_on_sigterm()
    # torch's threads: one per core a run is pinned to (CPU: one core each; accelerators: a share)
    threads = max(1, len(os.sched_getaffinity(0)) // args.slots) if devices else 1
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    print(f"bench {spec.name}: {len(runs)} runs, {args.slots} at a time, switching every {args.quantum:.0f} s; "
          f"folder {folder}", flush=True)
    records = Interleaver(folder, list(runs), command, args.slots, args.quantum, spec.settings(), env,
                          log=lambda m: print(m, flush=True), devices=devices,
                          legacy_fingerprint=spec.fingerprint).run()
    failed = [r.name for r in records if r.status == "failed"]
    _report(folder, spec, args.results)
    if failed:
        print(f"bench: failed runs {failed}: see {folder / 'logs'}", file=sys.stderr)
        return 1
    return 0


def _stop_on_sigterm() -> None:
    """SIGTERM (``kill``, ``timeout``, a job scheduler) ends the benchmark as Ctrl-C does: its runs
    are stopped and bench.json keeps their progress. By default it would end this process alone and
    leave the runs, each in its own session, training on unseen. (A benchmark started in the
    background by a non-interactive shell, ``cmd &``, ignores SIGINT from birth, as every such job
    does: SIGTERM is the signal that reaches it.)"""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


def _accelerators() -> int:
    """How many accelerators the runs train on: DeepSpeed's (0 with DS_ACCELERATOR=cpu: the cores)."""
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    return 0 if acc.device_name() == "cpu" else acc.device_count()


def _default_slots() -> int:
    """One run per accelerator DeepSpeed would train on (DS_ACCELERATOR=cpu: one per core)."""
    from dsvit.bench.scheduler import default_slots
    from deepspeed.accelerator import get_accelerator
    return default_slots(get_accelerator().device_name(), _accelerators(), len(os.sched_getaffinity(0)))


def _build_deepspeed_ops() -> None:
    """Compile DeepSpeed's communication op (CPU: shared-memory all-reduce) once, here: left to the
    runs, the first would build it under a file lock while the others wait on it, and a run stopped
    while holding the lock stalls the rest, all of it counted as their start-up time."""
    try:
        from deepspeed.comm.torch import build_shm_op
        from dsvit.engine.comm_op import quiet_when_cached
        quiet_when_cached(build_shm_op)
    except Exception as e:   # an accelerator without the op: the runs say so themselves
        print(f"bench: could not pre-build DeepSpeed's comm op ({e}); the first run will", flush=True)


def cmd_report(args) -> int:
    folder = Path(args.dir).resolve()
    _report(folder, _spec(folder), args.results)
    return 0


def _report(folder: Path, spec, results: str) -> None:
    from dsvit.bench import report as R
    state = json.loads((folder / "bench.json").read_text())
    records = {r["name"]: r for r in state["runs"]}
    done = {}
    for run in spec.runs:
        rec = records.get(run.name)
        if rec and rec["status"] == "done":
            done[run.name] = R.run_times(rec, folder / "runs" / run.name / "tb" / "metrics.jsonl")
    cfg = C.load_config(str(folder / "recipes" / f"{spec.runs[0].name}.yaml"), list(spec.runs[0].overrides))
    global_batch = cfg.train.batch_size   # global per optimizer step
    variant_of = {r.name: r.variant for r in spec.runs}
    apart = R.apart_from_baseline({n: records[n] for n in done}, variant_of, spec.baseline)
    try:
        rows = R.table(done, variant_of, spec.baseline, global_batch, spec.notes(), apart)
    except ValueError as e:   # e.g. --only without the baseline: the runs are kept, there is no table
        print(f"bench: no table: {e} (ratios need it: run it too, with --only {spec.baseline},...)", flush=True)
        return
    png = folder / "top1_vs_time.png"
    R.plot(done, variant_of, png)
    missing = [r.name for r in spec.runs if r.name not in done]
    body = (f"`dsvit bench run {_rel(Path(json.loads((folder / 'bench_args.json').read_text())['spec']))}` "
            f"({len(done)} runs, {state['slots']} at a time, switched every {state['quantum_s']:.0f} s)\n\n"
            + R.markdown(rows, spec.baseline)
            + "\nWhere the wall time goes (seconds of active time, share of end to end):\n\n"
            + R.time_table(done, variant_of, apart)
            + (f"\nRan apart from the baseline (added to the folder later: their times are not side by side "
               f"with its first seed, their accuracy is comparable): {', '.join(apart)}\n" if apart else "")
            + (f"\nNot finished: {', '.join(missing)}\n" if missing else ""))
    (folder / "report.md").write_text(body)
    print(body)
    print(f"plot: {png}")
    if results:
        path = Path(results)
        path.write_text(R.replace_section(path.read_text() if path.exists() else "", spec.name, body))
        print(f"wrote the table into {path}")


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)
