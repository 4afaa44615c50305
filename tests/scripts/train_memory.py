"""Train on an in-memory dataset (engine tests), alone or under the deepspeed launcher.

    python train_memory.py [--stop-at K] [--kill-in-save K] [section.key=value ...]

--stop-at K       exit cleanly right after the checkpoint of step K is complete (a stopped job)
--kill-in-save K  SIGKILL this process in the middle of writing the checkpoint of step K
--dump-rebuilds   every rank writes RUN_DIR/rebuild{N}_rank{R}.pt around each engine rebuild: the
                  optimizer snapshot before and after, the request, LRs, weight decays, host RSS
--dump-plugins    every rank writes RUN_DIR/plugins_rank{R}.pt at the end: each plugin's state_dict
                  and rank_state_dict as this rank holds them
--dump-resumed    every rank writes RUN_DIR/resumed_rank{R}.pt right after the trainer is built (the
                  checkpoint loaded): the optimizer snapshot by parameter name, each parameter
                  group's weight decay and its parameters' names, the step; then trains on
Rank 0 writes RUN_DIR/final_logits.pt: the trained model's logits on 8 fixed training images.
"""
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import probe_plugin  # noqa: E402,F401  (registers the 'probe' test plugin)
import rebuild_probe  # noqa: E402,F401  (registers the 'rebuild_probe' test plugin)

from dsvit import config as C  # noqa: E402
from dsvit.cli import init_distributed  # noqa: E402
from dsvit.engine.setup import close_world  # noqa: E402
from dsvit.data.memory import MemoryEvalData, MemoryTrainData, random_dataset  # noqa: E402
from dsvit.engine import optimizer_state as rb  # noqa: E402
from dsvit.engine.rebuild import host_rss_mib  # noqa: E402
from dsvit.engine.trainer import RunObserver, Trainer  # noqa: E402
from dsvit.registry import build_plugins  # noqa: E402


def flag(args, name):
    if name in args:
        i = args.index(name)
        value = int(args[i + 1])
        del args[i:i + 2]
        return value
    return None


class Observer(RunObserver):
    """The trainer's extension points: dumps around rebuilds, a stop after a checkpoint, a SIGKILL
    inside a checkpoint write (DeepSpeed's files written, ours and the marker not yet)."""

    def __init__(self, run_dir, rank, dump=False, stop_at=None, kill_at=None):
        self.run_dir, self.rank, self.dump = run_dir, rank, dump
        self.stop_at, self.kill_at, self.count = stop_at, kill_at, 0

    def rebuilding(self, trainer, request):
        if not self.dump:
            return
        self.lr_before = [g["lr"] for g in trainer.optimizer.param_groups]
        self.supplied = (None if request.weights == "masters" else
                         {k: v.detach().clone() for k, v in request.weights.items()})
        self.ema_before = trainer.ema.state_dict() if trainer.ema is not None else None
        self.before = rb.capture(trainer.engine)

    def rebuilt(self, trainer, request, derived):
        if not self.dump:
            return
        self.count += 1
        after = rb.capture(trainer.engine)
        torch.save({"before": self.before.__dict__, "after": after.__dict__, "lr_before": self.lr_before,
                    "weight_decay": trainer.weight_decay,
                    "lr_after": [g["lr"] for g in trainer.optimizer.param_groups], "param_map": derived.param_map,
                    "block_map": request.block_map, "fresh": sorted(derived.fresh),
                    "request": self.supplied, "ema_before": self.ema_before,
                    "ema_after": trainer.ema.state_dict() if trainer.ema is not None else None,
                    "no_weight_decay": sorted(trainer.engine.module.no_weight_decay()),
                    "rss_mib": host_rss_mib(), "step": trainer.state.step},
                   os.path.join(self.run_dir, f"rebuild{self.count}_rank{self.rank}.pt"))

    def engine_files_saved(self, trainer, tag_dir):
        if trainer.state.step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)   # files written, marker not yet

    def checkpointed(self, trainer, tag_dir):
        if self.stop_at is not None and trainer.state.step == self.stop_at:
            # a stopped job: its checkpoint is complete, and leaving at once is the point (no
            # clean end: close_world is for that, as at the end of main)
            trainer.logger.close()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    stop_at, kill_at = flag(args, "--stop-at"), flag(args, "--kill-in-save")
    dump = "--dump-rebuilds" in args
    dump_plugins = "--dump-plugins" in args
    dump_resumed = "--dump-resumed" in args
    args = [a for a in args if a not in ("--dump-rebuilds", "--dump-plugins", "--dump-resumed")]
    cfg = C.load_config("tiny_test", args)
    world = init_distributed(None)
    C.validate(cfg, world.world_size)
    images, labels = random_dataset(512, cfg.model.img_size, 10, seed=1)
    t = cfg.train
    micro = t.batch_size // (world.world_size * t.grad_accum)
    train = MemoryTrainData(images, labels, rank=world.rank, world_size=world.world_size,
                            local_batch=micro, seed=cfg.run.seed, batches_multiple=t.grad_accum)
    ev = MemoryEvalData(images[:100], labels[:100], rank=world.rank, world_size=world.world_size,
                        local_batch=t.eval_batch_size // world.world_size)
    trainer = Trainer(cfg, world, build_plugins(cfg), train_data=train, eval_data=ev, num_classes=10,
                      observer=Observer(cfg.run.dir, world.rank, dump, stop_at, kill_at))
    if dump_resumed:
        torch.save({"snapshot": rb.capture(trainer.engine).__dict__, "step": trainer.state.step,
                    "weight_decay": [g["weight_decay"] for g in trainer.optimizer.param_groups],
                    "built_weight_decay": trainer.weight_decay},
                   os.path.join(cfg.run.dir, f"resumed_rank{world.rank}.pt"))

    trainer.fit()
    if dump_plugins:
        torch.save({p.name: {"state": p.state_dict(), "rank": p.rank_state_dict()} for p in trainer.plugins},
                   os.path.join(cfg.run.dir, f"plugins_rank{world.rank}.pt"))
    trainer.engine.eval()
    with torch.no_grad():
        logits = trainer.engine(images[:8].to(trainer.device, trainer.model_dtype)).float().cpu()
    if world.rank == 0:
        torch.save(logits, os.path.join(cfg.run.dir, "final_logits.pt"))
    close_world(world)   # as dsvit train ends: without it a gloo thread may abort the exit (setup.close_world)


if __name__ == "__main__":
    main()
