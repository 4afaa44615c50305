"""Evaluation speed per image against the batch size, one core, the cifar10-bench ViT (issue 28).

Why: evaluation is part of every run's end-to-end time; on this CPU a batch of 500 images cost 30 %
more per image than 250 (cache), so cifar10-bench evaluates at 250 (benchmarks/RESULTS.md).

    taskset -c 0 .venv/bin/python benchmarks/eval_batch_speed.py
"""
import time

import timm
import torch

torch.set_num_threads(1)
model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=96, depth=12,
                          num_heads=3, num_classes=10).eval()


def ms_per_image(batch: int, images: int = 2000) -> float:
    x = torch.randn(batch, 3, 32, 32)
    model(x)                                    # warm-up
    n = max(1, images // batch)
    t = time.perf_counter()
    for _ in range(n):
        model(x)
    return (time.perf_counter() - t) / (n * batch) * 1000


if __name__ == "__main__":
    with torch.no_grad():
        for rnd in range(4):
            print(rnd, " ".join(f"b{b}:{ms_per_image(b):.3f}" for b in (64, 128, 250, 500, 1000)), flush=True)
