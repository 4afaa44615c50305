"""``dsvit train`` through ``dsvit.cli.main`` in this process, then a line per rank saying whether a
process group is still up (``close_world`` should have destroyed it on a clean end of a multi-rank
run). Started by the deepspeed launcher from tests/test_clean_exit.py: ARGS = OUT_DIR, train args."""
import os
import sys
from pathlib import Path

import torch.distributed as dist

from dsvit.cli import main

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
out, train_args = Path(args[0]), args[1:]
status = main(["train", *train_args])
rank = int(os.environ["RANK"])
(out / f"rank{rank}.txt").write_text(f"status={status} initialized={dist.is_initialized()}\n")
