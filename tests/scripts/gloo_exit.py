"""Two gloo ranks run 200 all-reduces of temporary tensors and leave; with ``--close`` they destroy
the process groups first, as every clean end of ``dsvit train`` and ``dsvit eval`` does
(``dsvit.engine.setup.close_world``). Started by torchrun from tests/test_clean_exit.py."""
import sys

import torch
import torch.distributed as dist

from dsvit.engine.setup import World, close_world

dist.init_process_group("gloo")
held = dist.new_group(backend="gloo")   # a group something still refers to at exit, as DeepSpeed's are
for i in range(200):
    dist.all_reduce(torch.ones(1000), group=held if i % 2 else None)   # dropped as soon as it returns
if "--close" in sys.argv:
    close_world(World(rank=dist.get_rank(), world_size=dist.get_world_size()))
