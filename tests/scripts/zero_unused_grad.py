"""Two layers a, b; step 1 uses both, step 2 only a. Writes b's fp32 master after step 2 to OUT.

    deepspeed tests/scripts/zero_unused_grad.py STAGE OUT [--no-clear]
"""
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param

from dsvit.cli import init_distributed
from dsvit.engine.setup import close_world
from dsvit.engine.setup import clear_stale_zero3_grads


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x, use_b=True):
        x = self.a(x)
        return self.b(x) if use_b else x


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    stage, out, clear = int(args[0]), args[1], "--no-clear" not in args
    world = init_distributed(None)   # gloo, and DeepSpeed's shm buffer name released as in dsvit train
    torch.manual_seed(0)
    model = TwoLayers()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    cfg = {"train_batch_size": 2, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    for use_b in (True, False):
        engine.backward(engine(torch.ones(2, 4), use_b).sum())
        engine.step()
        if clear:
            clear_stale_zero3_grads(engine)
    torch.save(safe_get_full_fp32_param(engine.module.b.weight).detach().clone(), out)
    close_world(world)   # as dsvit train ends (setup.close_world)


if __name__ == "__main__":
    main()
