"""``dsvit`` command line: train, eval, export, shards.

    dsvit train [--config RECIPE.yaml|NAME] [section.key=value ...]
    dsvit eval RUN_DIR [--tag TAG] [--ema] [--keep-rate R[,R...]] [section.key=value ...]
    dsvit export RUN_DIR OUT.safetensors [--tag TAG] [--ema]
    dsvit shards {imagefolder,npz,verify,synthetic} ...
    dsvit bench {run,report,throughput} ...

Under the DeepSpeed launcher: ``deepspeed --num_gpus N --module dsvit train ...`` (the launcher's
``--local_rank`` is accepted). The distributed world comes from the launcher's environment, read
here once and passed down. What can be checked without DeepSpeed (config for the launcher's world
size, data.root, an eval's run folder, the plugins' composition) is checked before it starts. A
``dsvit.errors.UserError`` ends any command with one line, ``dsvit: error: ...``, exit status 2.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import sys
from pathlib import Path

from dsvit import config as C
from dsvit.errors import MissingFileError, UserError, one_line


def _world_from_env(args):
    from dsvit.engine.setup import World
    if "WORLD_SIZE" not in os.environ:   # plain `dsvit train`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", getattr(args, "local_rank", 0) or 0))
    return World(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                 local_rank=local_rank, master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                 master_port=int(os.environ.get("MASTER_PORT", "0")))


def extension_cache_dir(prefix: str, home: Path) -> Path:
    """Where torch JIT-builds DeepSpeed's ops for the Python environment at ``prefix``: one folder per
    environment. torch's default is one folder per op name for every environment; the build flags
    name the environment's torch, so two venvs (a CI clone, a benchmark's copy, a worktree) using
    the ops in turn rebuild them at every switch, inside some run's start-up: on cifar10-bench, 89.4 s
    of start-up for the first run after another venv's tests had built the op, 10.4 s for the next
    (benchmarks/RESULTS.md, "Issue 28", has both commands)."""
    import hashlib
    return home / ".cache" / "torch_extensions" / f"env-{hashlib.sha1(prefix.encode()).hexdigest()[:10]}"


def use_extension_cache_of_this_env() -> None:
    """TORCH_EXTENSIONS_DIR per environment, unless the user chose one."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extension_cache_dir(sys.prefix, Path.home())))


def init_distributed(args):
    use_extension_cache_of_this_env()   # before DeepSpeed loads its communication op
    import deepspeed
    world = _world_from_env(args)
    from dsvit.engine.comm_op import quiet_when_cached
    quiet_when_cached(lambda: deepspeed.init_distributed(verbose=False), announce=world.local_rank == 0)
    _release_shm_buffer_name(world.rank)
    from dsvit.engine.logging import setup_console
    setup_console(world.rank)
    return world


def _release_shm_buffer_name(rank: int) -> None:
    """Unlink this rank's /dev/shm name of DeepSpeed's CPU shm all-reduce buffer.

    With the deepspeed launcher and every rank on one host, DeepSpeed's CPU backend creates
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (66 MiB) while
    initialising and never removes it, so every run on a new master port leaves 66 MiB per rank
    behind (a test suite filled a 24 GiB /dev/shm). Each rank maps every peer's buffer before
    init_distributed returns, so after one barrier the names are no longer needed: the mappings stay
    valid until the processes exit, and nothing is left even when a run is killed."""
    import torch.distributed as dist
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    dist.barrier()      # on every rank, whether or not the buffer exists here (no mismatched barrier)
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def cmd_train(args) -> int:
    cfg = C.load_config(args.config, args.overrides)
    if args.check:   # the plan only: no distributed world, no DeepSpeed, no data read
        from dsvit.bench.timeline import describe
        from dsvit.engine.plan import make_plan
        from dsvit.registry import build_plugins
        world_size = args.world_size or _launcher_world_size()
        print("\n".join(make_plan(cfg, world_size, build_plugins, describe).lines))
        return 0
    # everything that can be checked without DeepSpeed, before its start-up (seconds; minutes when it
    # compiles its communication op): the config for the launcher's world size, the data, the plugins
    C.validate(cfg, _launcher_world_size())
    _check_data_root(cfg.data.root)
    from dsvit.engine.compose import check_composition
    from dsvit.registry import build_plugins
    plugins = build_plugins(cfg)
    check_composition(plugins, cfg)
    if cfg.run.deterministic:   # read by cuBLAS when CUDA starts: before anything touches the GPU
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    world = init_distributed(args)
    from dsvit.engine import failure, preemption
    from dsvit.engine.disk_space import CheckpointWriteError
    from dsvit.engine.trainer import Trainer
    failure.set_collective_timeout(cfg.run.collective_timeout_s)
    run_dir = Path(cfg.run.dir)
    peers = failure.Peers(world) if world.world_size > 1 else None
    stop = preemption.StopSignals(world.world_size)   # SIGTERM/SIGUSR1: checkpoint, exit 128+signal
    from dsvit.engine.setup import close_world
    ended_cleanly = False   # on every rank alike: then the process groups are destroyed (close_world)
    try:
        trainer = Trainer(cfg, world, plugins, stop_signals=stop)
        metrics = trainer.fit()
        ended_cleanly = True
    except preemption.Preempted as p:   # every rank, after the checkpoint is complete
        ended_cleanly = True
        if world.rank == 0:
            print(p.line, file=sys.stderr, flush=True)
        return p.exit_status
    except CheckpointWriteError as e:   # a full disk: one line (every rank has it; rank 0 says it)
        if world.rank == 0:
            print(f"dsvit: {e}", file=sys.stderr)
        return 1
    except UserError:   # one line, in main
        raise
    except RuntimeError as e:   # torch.distributed's errors are RuntimeErrors
        line = failure.explain(e, peers, cfg, world.rank)
        if line is None:
            raise
        failure.exit_now(line)
    finally:
        if peers is not None:
            peers.stop()
        if ended_cleanly:   # every rank: the check in flight waited for, then the groups destroyed
            stop.finish()
            close_world(world)
        else:
            stop.restore()
    if world.rank == 0:
        print(f"\nfinal top-1 {metrics.get('top1', float('nan')):.2f}%  top-5 "
              f"{metrics.get('top5', float('nan')):.2f}%  (best {trainer.best_top1:.2f}%)")
        print(f"TensorBoard logs: {run_dir / 'tb'}")
        print(f"checkpoint:       {trainer.last_checkpoint}")
        print(f"view:             tensorboard --logdir {run_dir / 'tb'}")
    return 0


def _launcher_world_size() -> int:
    """WORLD_SIZE as the deepspeed/torchrun launcher sets it (1 without a launcher)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise C.ConfigError(f"WORLD_SIZE={value!r} is not a number: start dsvit with the deepspeed "
                            f"launcher, or unset WORLD_SIZE") from None


def _check_data_root(root: str) -> None:
    """A local data.root must be a shard folder (its ``_info.json`` read and checked as a run
    reads it); the embedded dataset and remote roots (``s3://``, ``pipe:``) are a run's to check."""
    if root == "synthetic" or "://" in root or root.startswith("pipe:"):
        return
    if not Path(root).is_dir():
        raise MissingFileError(f"data.root={root} does not exist: give a shard folder written by "
                               f"`dsvit shards ...` (or data.root=synthetic)")
    from dsvit.data.pipeline import read_info
    read_info(root)


def _eval_options():
    """(plugin name, config key, flag, help) of every evaluation option plugins declare."""
    from dsvit.registry import plugin_registry
    return [(name, key, flag, text) for name, cls in sorted(plugin_registry().items())
            for flag, key, text in cls.eval_options]


def cmd_eval(args) -> int:
    from dsvit.engine.eval_run import run_eval
    from dsvit.registry import build_plugins
    given = [(name, key, flag, getattr(args, _dest(name, key)))
             for name, key, flag, _ in _eval_options() if getattr(args, _dest(name, key))]
    if len(given) > 1:
        raise C.ConfigError(f"sweep one evaluation option at a time, got {[g[2] for g in given]}")
    sweep = ()
    if given:
        name, key, flag, text = given[0]
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values:
            raise C.ConfigError(f"{flag} needs one value or a comma-separated list, got {text!r}")
        sweep = (name, key, flag, values)
    tag = _check_eval_run(Path(args.run_dir), args.tag, args.overrides)
    world = init_distributed(args)
    status = run_eval(Path(args.run_dir), args.overrides, world, build_plugins, tag=tag,
                      ema=args.ema, sweep=sweep)
    from dsvit.engine.setup import close_world
    close_world(world)
    return status


def _check_eval_run(run_dir: Path, tag: str, overrides: list) -> str:
    """Before DeepSpeed: the run folder has its config and an intact checkpoint (its tag is
    returned), the overrides apply, and the data is there."""
    from dsvit.engine.export import resolve_tag
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise MissingFileError(f"{cfg_file} not found: {run_dir} is not a dsvit run folder; give the "
                               f"run.dir of a training run")
    tag_dir = resolve_tag(run_dir, tag)
    cfg = C.apply_overrides(C.load_resolved(cfg_file), overrides)
    _check_data_root(str(run_dir / "data") if cfg.data.root == "synthetic" else cfg.data.root)
    return tag_dir.name


def _dest(plugin: str, key: str) -> str:
    return f"eval_{plugin}_{key}"


def cmd_export(args) -> int:
    from dsvit.engine.export import export
    print(export(Path(args.run_dir), Path(args.out), tag=args.tag, ema=args.ema))
    return 0


COMMANDS = {"train": "train a ViT", "eval": "evaluate a run's checkpoint",
            "export": "write final (or EMA) weights as a timm safetensors file",
            "bench": "benchmark methods side by side (interleaved), or their throughput",
            "shards": "write/verify webdataset shard datasets"}


def build_parser(command: str = "") -> argparse.ArgumentParser:
    """The parser; only ``command``'s sub-parser is built in full (the others are listed): its
    help loads the plugins (torch, timm), which ``dsvit shards ...`` never needs."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="dsvit", description="Efficient ViT training on DeepSpeed", formatter_class=fmt,
        epilog="recipes shipped: " + ", ".join(C.list_recipes()) +
               "\n`dsvit train --help` lists every config key with the default recipe's value.")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    builders = {"train": _add_train, "eval": _add_eval, "export": _add_export, "bench": _add_bench,
                "shards": _add_shards}
    for name, text in COMMANDS.items():
        if name == command:
            builders[name](sub, text, fmt)
        else:
            sub.add_parser(name, help=text, add_help=False)
    return parser


def _add_train(sub, text, fmt) -> None:
    from dsvit.cli_help import train_epilog
    from dsvit.registry import plugin_registry
    p = sub.add_parser("train", help=text, formatter_class=fmt, epilog=train_epilog(plugin_registry()))
    p.add_argument("--config", "-c", default="default", metavar="RECIPE",
                   help="recipe name or YAML path (default: default, whose values are listed below)")
    p.add_argument("--check", action="store_true",
                   help="validate the recipe and overrides and print the plan (steps, schedules, memory "
                        "per rank) without training, DeepSpeed or the data; exit 2 on a config error")
    p.add_argument("--world-size", type=int, default=0,
                   help="ranks to plan --check for (default: WORLD_SIZE from the launcher, else 1)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (below)")
    p.set_defaults(func=cmd_train)


def _add_eval(sub, text, fmt) -> None:
    from dsvit.cli_help import eval_epilog
    p = sub.add_parser("eval", help=text, formatter_class=fmt, epilog=eval_epilog())
    p.add_argument("run_dir", help="the run.dir of a training run")
    p.add_argument("--tag", default="", help="checkpoint tag, e.g. step00000400 (default: latest complete)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    for name, key, flag, help_text in _eval_options():   # declared by the plugins (e.g. --keep-rate)
        p.add_argument(flag, dest=_dest(name, key), default="", metavar="RATE[,RATE...]",
                       help=f"{help_text} (plugin {name}; a comma-separated list sweeps)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="changes to the run's config.yaml (below), e.g. data.root=...")
    p.set_defaults(func=cmd_eval)


def _add_export(sub, text, fmt) -> None:
    p = sub.add_parser("export", help=text, description=text + "; prints the timm.create_model call "
                       "that loads it")
    p.add_argument("run_dir", help="the run.dir of a training run")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument("--tag", default="", help="checkpoint tag, e.g. step00000400 (default: latest complete)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (a run with train.ema_decay > 0)")
    p.set_defaults(func=cmd_export)


def _add_bench(sub, text, fmt) -> None:
    from dsvit.bench.cli import add_bench_parser
    add_bench_parser(sub)


def _add_shards(sub, text, fmt) -> None:
    from dsvit.data.cli import add_shards_parser
    add_shards_parser(sub)


def _command_of(argv: list) -> str:
    """The sub-command named in ``argv`` ('' when none): the first word that is not an option."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in ("--local_rank", "--local-rank"):
            skip = True
        elif not word.startswith("-"):
            return word
    return ""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    use_extension_cache_of_this_env()   # every command that may build a DeepSpeed op
    if argv[:2] == ["bench", "throughput"]:   # its own flags: argparse's REMAINDER would eat them
        from dsvit.bench.throughput import main as throughput_main
        return throughput_main(argv[2:], lambda: init_distributed(None))
    command = _command_of(argv)
    try:
        parser = build_parser(command)   # the train help loads the recipe: may raise a UserError
        args, extra = parser.parse_known_args(argv)
        # overrides may follow options (``eval RUN --keep-rate 0.5 data.root=...``)
        if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args)
    except UserError as e:   # a mistake the user can fix: one line naming it and the fix
        print(f"dsvit: error: {one_line(e)}", file=sys.stderr, flush=True)
        status = 2
    except KeyboardInterrupt:
        print(f"dsvit {command}: interrupted{_resume_hint(argv, command)}", file=sys.stderr, flush=True)
        status = 130
    # the run's DataLoader workers (daemon processes) ignore SIGTERM (dsvit.data.loader: the rank
    # decides about preemption), which is how multiprocessing ends daemons at exit before it joins
    # them: left alive by the error, they would keep this process from exiting
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if workers:   # torch's SIGCHLD handler would report their end as another error
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in workers:
        child.kill()
        child.join()
    return status


def _resume_hint(argv: list, command: str) -> str:
    if command == "bench" and "run" in argv:
        return ("; the runs were stopped and bench.json keeps their progress: run the same command "
                "again to resume")
    if command == "train":
        return "; continue from its last complete checkpoint with checkpoint.resume=auto"
    return ""


if __name__ == "__main__":
    sys.exit(main())
