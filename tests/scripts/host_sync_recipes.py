"""Train every shipped recipe for a few epochs on small in-memory data under ``HostSyncGuard``
and write RUN_DIR/host_sync.json: per recipe, the first host sync found inside a training step (or
none) and the intended ones it passed (``allowed`` points). One process: one DeepSpeed start-up.

    deepspeed tests/scripts/host_sync_recipes.py run.dir=DIR [--recipes a,b]
"""
import json
import sys
import traceback
from pathlib import Path

from dsvit import config as C
from dsvit.cli import init_distributed
from dsvit.engine.setup import close_world
from dsvit.data.memory import MemoryEvalData, MemoryTrainData, random_dataset
from dsvit.engine.host_sync import HostSyncError, HostSyncGuard
from dsvit.engine.trainer import Trainer
from dsvit.registry import build_plugins

# recipe -> overrides that make its schedules play out in a few short epochs (256 samples, batch 32:
# 8 steps an epoch); everything else as shipped
RECIPES = {
    "default": [],
    "stack": [],
    "toe": [],
    "pss": ["plugins.pss.period_steps=4"],
    "toe_pss": [],
    "growth": [],
    "autoprog": ["plugins.growth.search_length=0.2", "plugins.growth.search_batches=1",
                 "plugins.growth.cost=flops"],
    "trilevel": ["plugins.example_pruning.round_epochs=[1,2]"],
    "infobatch": [],
    "efficienttrain": [],
    "stack-et": [],
}
COMMON = ["train.epochs=3", "train.batch_size=32", "train.eval_batch_size=64", "log.every_steps=4",
          "log.progress=false", "data.streams=1", "checkpoint.every_epochs=1"]


def run(recipe: str, run_dir: Path, world) -> dict:
    cfg = C.load_config(recipe, [*COMMON, *RECIPES[recipe], f"run.dir={run_dir / recipe}"])
    C.validate(cfg, world.world_size)
    images, labels = random_dataset(256, cfg.model.img_size, 10, seed=1)
    train = MemoryTrainData(images, labels, rank=world.rank, world_size=world.world_size,
                            local_batch=cfg.train.batch_size // world.world_size, seed=cfg.run.seed)
    ev = MemoryEvalData(images[:64], labels[:64], rank=world.rank, world_size=world.world_size, local_batch=32)
    trainer = Trainer(cfg, world, build_plugins(cfg), train_data=train, eval_data=ev, num_classes=10)
    guard = HostSyncGuard()
    try:
        with guard:
            trainer.fit()
    except HostSyncError as e:
        return {"sync": str(e), "allowed": sorted(set(guard.seen))}
    finally:
        trainer.destroy_engine()
    return {"sync": None, "steps": trainer.state.step, "total_steps": trainer.total_steps,
            "allowed": sorted(set(guard.seen))}


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    only = None
    if "--recipes" in args:
        i = args.index("--recipes")
        only = args[i + 1].split(",")
        del args[i:i + 2]
    run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("run.dir=")))
    run_dir.mkdir(parents=True, exist_ok=True)
    world = init_distributed(None)
    results = {}
    for recipe in only or RECIPES:
        try:
            results[recipe] = run(recipe, run_dir, world)
        except Exception:   # one broken recipe must not hide the others
            results[recipe] = {"error": traceback.format_exc()[-3000:]}
        if world.rank == 0:
            (run_dir / "host_sync.json").write_text(json.dumps(results, indent=1))
    close_world(world)   # as dsvit train ends (setup.close_world)


if __name__ == "__main__":
    main()
