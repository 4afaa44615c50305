"""An in-process driver for plugins.example_pruning: the trainer's event order for one data plugin
on in-memory (or shard) data, with deterministic fake logits and losses (no DeepSpeed)."""
import io

import torch

from dsvit.config import load_config, validate
from dsvit.data.memory import MemoryTrainData, random_dataset
from dsvit.engine.plugin import Batch, State
from dsvit.engine.plugin_set import PluginSet
from dsvit.plugins.example_pruning import ExamplePruning


class Log:
    def __init__(self):
        self.scalars, self.hists, self.images, self.lines, self.writer = {}, {}, {}, [], None

    def scalar(self, k, v):
        self.scalars.setdefault(k, []).append(v)

    def histogram(self, k, v):
        self.hists[k] = v

    def image(self, k, v):
        self.images[k] = v

    def info(self, msg, *a):
        self.lines.append(msg % a)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Identity()])
        self.w = torch.nn.Parameter(torch.zeros(1))


def make_cfg(*overrides, epochs=4, batch=16):
    cfg = load_config("tiny_test", [f"train.epochs={epochs}", f"train.batch_size={batch}",
                                    "plugins.example_pruning.enabled=true",
                                    "plugins.example_pruning.tie_break=uid", *overrides])
    validate(cfg)
    return cfg


class Run:
    """The trainer's event order for one data plugin, on in-memory data, with fake logits."""

    def __init__(self, cfg, n=200, rank=0, world=1, data=None):
        self.cfg, t = cfg, cfg.train
        if data is None:
            images, labels = random_dataset(n, 4, 10, seed=0)
            data = MemoryTrainData(images, labels, rank=rank, world_size=world,
                                   local_batch=t.batch_size // (world * t.grad_accum), seed=cfg.run.seed)
        self.data, n = data, data.num_samples
        self.plugin = ExamplePruning(cfg.plugins["example_pruning"], cfg)
        self.set = PluginSet([self.plugin])
        plan = self.plugin.plan_epochs(n, t.epochs)
        self.steps = [self.data.batches_for(k) // t.grad_accum for k in plan]
        self.state = State(rank=rank, world_size=world, model=Tiny(), logger=Log(), data=self.data,
                           num_classes=10, epoch_steps=tuple(self.steps), total_steps=sum(self.steps))
        self.seen, self.keeps = {}, {}

    def fit(self, stop=None):
        s, ga = self.state, self.cfg.train.grad_accum
        self.set.fire("fit_start", s)
        while s.epoch < len(self.steps):
            self.set.fire("epoch_start", s)
            k = self.data.keep
            self.keeps[s.epoch] = None if k is None else (k.numpy() if torch.is_tensor(k) else k).copy()
            need = self.steps[s.epoch] * ga
            assert self.data.batches_per_epoch >= need      # the trainer's check
            it = self.data.epoch_batches(s.epoch, s.step_in_epoch * ga, need)
            while s.step_in_epoch < self.steps[s.epoch]:
                if stop is not None and s.step == stop:
                    return
                self.set.fire("step_start", s)
                for _ in range(ga):
                    images, labels, uids = next(it)
                    self.seen.setdefault(s.epoch, []).extend(uids.tolist())
                    s.batch = Batch(images, torch.zeros(len(labels), 10), labels, uids)
                    right = (uids * 7 + s.epoch * 3) % 4 != 0       # deterministic correctness
                    s.logits = torch.nn.functional.one_hot(torch.where(right, labels, (labels + 1) % 10), 10).float()
                    s.loss_per_sample = ((uids * 37 + s.epoch * 11) % 101).float() / 100
                    self.set.fire("after_loss", s)
                    self.last_loss = s.loss_per_sample
                s.step += 1
                s.step_in_epoch += 1
            self.set.fire("epoch_end", s)
            s.epoch, s.step_in_epoch = s.epoch + 1, 0
        self.set.fire("fit_end", s)


FORGET = ["plugins.example_pruning.round_epochs=[1,2]", "plugins.example_pruning.window_presentations=3",
          "plugins.example_pruning.remove_fraction=0.1"]
INFOB = ["plugins.example_pruning.policy=infobatch", "plugins.example_pruning.anneal_fraction=0.25"]


def checkpointed(obj):
    """``obj`` through torch.save / torch.load(weights_only=True), as a checkpoint keeps it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
