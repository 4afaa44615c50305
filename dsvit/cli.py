"""``dsvit`` command line: train, eval, export, shards.

    dsvit train [--config RECIPE.yaml|NAME] [section.key=value ...]
    dsvit eval RUN_DIR [--tag TAG] [--ema] [--keep-rate R[,R...]] [section.key=value ...]
    dsvit export RUN_DIR OUT.safetensors [--tag TAG] [--ema]
    dsvit shards {imagefolder,npz,verify,synthetic} ...
    dsvit bench {run,report,throughput} ...

Under the DeepSpeed launcher: ``deepspeed --num_gpus N --module dsvit train ...`` (the launcher's
``--local_rank`` is accepted). The distributed world comes from the launcher's environment, read
here once and passed down.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from dsvit import config as C


def _epilog() -> str:
    return ("recipes shipped: " + ", ".join(C.list_recipes()) +
            "\nconfig sections (override with section.key=value):\n" + C.describe_sections())


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


def init_distributed(args):
    import deepspeed
    world = _world_from_env(args)
    deepspeed.init_distributed(verbose=False)
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
        world_size = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        print("\n".join(make_plan(cfg, world_size, build_plugins, describe).lines))
        return 0
    if cfg.run.deterministic:   # read by cuBLAS when CUDA starts: before anything touches the GPU
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    world = init_distributed(args)
    C.validate(cfg, world.world_size)
    from dsvit.engine import failure, preemption
    from dsvit.engine.disk_space import CheckpointWriteError
    from dsvit.engine.trainer import Trainer
    from dsvit.registry import build_plugins
    failure.set_collective_timeout(cfg.run.collective_timeout_s)
    run_dir = Path(cfg.run.dir)
    peers = failure.Peers(world) if world.world_size > 1 else None
    stop = preemption.StopSignals(world.world_size)   # SIGTERM/SIGUSR1: checkpoint, exit 128+signal
    try:
        trainer = Trainer(cfg, world, build_plugins(cfg), stop_signals=stop)
        metrics = trainer.fit()
    except preemption.Preempted as p:   # every rank, after the checkpoint is complete
        if world.rank == 0:
            print(p.line, file=sys.stderr, flush=True)
        return p.exit_status
    except CheckpointWriteError as e:   # a full disk: one line (every rank has it; rank 0 says it)
        if world.rank == 0:
            print(f"dsvit: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:   # torch.distributed's errors are RuntimeErrors
        line = failure.explain(e, peers, cfg, world.rank)
        if line is None:
            raise
        failure.exit_now(line)
    finally:
        stop.restore()
        if peers is not None:
            peers.stop()
    if world.rank == 0:
        print(f"\nfinal top-1 {metrics.get('top1', float('nan')):.2f}%  top-5 "
              f"{metrics.get('top5', float('nan')):.2f}%  (best {trainer.best_top1:.2f}%)")
        print(f"TensorBoard logs: {run_dir / 'tb'}")
        print(f"checkpoint:       {trainer.last_checkpoint}")
        print(f"view:             tensorboard --logdir {run_dir / 'tb'}")
    return 0


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
    world = init_distributed(args)
    return run_eval(Path(args.run_dir), args.overrides, world, build_plugins, tag=args.tag,
                    ema=args.ema, sweep=sweep)


def _dest(plugin: str, key: str) -> str:
    return f"eval_{plugin}_{key}"


def cmd_export(args) -> int:
    from dsvit.engine.export import export
    print(export(Path(args.run_dir), Path(args.out), tag=args.tag, ema=args.ema))
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="dsvit", description="Efficient ViT training on DeepSpeed",
                                     formatter_class=fmt, epilog=_epilog())
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a ViT", formatter_class=fmt, epilog=_epilog())
    p.add_argument("--config", "-c", default="default", help="recipe name or YAML path")
    p.add_argument("--check", action="store_true",
                   help="validate the recipe and overrides and print the plan (steps, schedules, memory "
                        "per rank) without training, DeepSpeed or the data; exit 2 on a config error")
    p.add_argument("--world-size", type=int, default=0,
                   help="ranks to plan --check for (default: WORLD_SIZE from the launcher, else 1)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run's checkpoint", formatter_class=fmt, epilog=_epilog())
    p.add_argument("run_dir")
    p.add_argument("--tag", default="", help="checkpoint tag (default: latest complete)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    for name, key, flag, text in _eval_options():   # declared by the plugins (e.g. --keep-rate)
        p.add_argument(flag, dest=_dest(name, key), default="",
                       help=f"{text} (plugin {name}; a comma-separated list sweeps)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value (e.g. data.root=...)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write final (or EMA) weights as a timm safetensors file")
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--tag", default="")
    p.add_argument("--ema", action="store_true")
    p.set_defaults(func=cmd_export)

    from dsvit.bench.cli import add_bench_parser
    add_bench_parser(sub)

    try:
        from dsvit.data.cli import add_shards_parser
    except ImportError:
        pass
    else:
        add_shards_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["bench", "throughput"]:   # its own flags: argparse's REMAINDER would eat them
        from dsvit.bench.throughput import main as throughput_main
        return throughput_main(argv[2:], lambda: init_distributed(None))
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (``eval RUN --keep-rate 0.5 data.root=...``)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except C.ConfigError as e:
        print(f"dsvit: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        if args.command not in ("eval", "export"):
            raise
        print(f"dsvit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
