"""Predict a stack's MAC reduction and step speed-up on cifar10-bench before running it (issue 28).

Why: a `dsvit bench` candidate costs 10-30 minutes of this CPU; this model costs a second, so the
candidates in benchmarks/stack3x_bench.yaml were chosen with it. It walks the 1,170 steps and, per
step, counts a ViT block's multiply-accumulates (12 N D^2 + 2 N^2 D for N tokens of width D) under:
growth's depth (four equal stages), EfficientTrain++'s side (its own stage table,
dsvit.plugins.efficienttrain.schedule), ToE's keep rate before block 1 and the token level's keep
rate at 1/4, 1/2, 3/4 of the depth (dsvit.plugins.levels, the plugin's own functions). Step time is
modelled as 0.035 s + 0.01255 s per MMAC per image (fitted to cifar10-bench steps on one core of this
machine, read off the logged step times: 0.123 s at 7 MMAC, stack's first stage run alone; 1.24 s at
96, the baseline's unstopped logging windows in the 12-05 morning run); it over-predicts the measured in-step speed-ups of stack
and stack-et by 1.09x and 1.08x (RESULTS.md, issue 28). The MAC column matches the runs' logged
`train/block_gmacs_per_image` sums to 0.01x (stack 3.03x vs 3.04x, stack-et-toe 3.38x vs 3.38x).

    .venv/bin/python benchmarks/stack_mac_model.py
"""
import math

from dsvit.plugins.efficienttrain import schedule as ET
from dsvit.plugins.levels import keep_rate, pruning_blocks
from dsvit.plugins.token_pruning import TokenPruningConfig

TOKENS = TokenPruningConfig()   # the token level's ramp and blocks as the recipes leave them

STEPS, WIDTH, SIDE, PATCH = 1170, 96, 32, 4
STEP_S, STEP_S_PER_MMAC = 0.035, 0.01255


def block_macs(tokens: int) -> int:
    return 12 * tokens * WIDTH ** 2 + 2 * tokens ** 2 * WIDTH


def image_macs(side: int, depth: int, toe_keep: float, token_keep: float) -> int:
    patches = (side // PATCH) ** 2
    tokens, total = patches + 1, block_macs(patches + 1)        # block 0 sees every token
    if toe_keep < 1:
        tokens = 1 + round(toe_keep * patches)
    cuts = pruning_blocks(depth, TOKENS.block_fractions) if token_keep < 1 else []
    for b in range(1, depth):
        if b in cuts:
            tokens = 1 + math.ceil(token_keep * (tokens - 1))
        total += block_macs(tokens)
    return total


def run(sides=None, toe=((0.0, 0.5), (0.625, 0.75), (0.875, 1.0)), token_keep=0.9,
        depths=(6, 8, 10, 12), growth_sides=None):
    """(MAC reduction, modelled step speed-up) against 1,170 steps of the 12-block, 32 px baseline."""
    if sides:
        px = ET.stage_sides(sides, SIDE, PATCH)
        starts = ET.stage_starts(STEPS, px, SIDE)
    macs = seconds = 0.0
    for step in range(STEPS):
        quarter = min(3, step * 4 // STEPS)
        side = growth_sides[quarter] if growth_sides else SIDE
        if sides:
            side = px[max(i for i, s in enumerate(starts) if s <= step)]
        toe_keep = [k for f, k in toe if step >= f * STEPS][-1]
        keep = keep_rate(step, STEPS, token_keep, TOKENS.warmup, TOKENS.decay) if token_keep < 1 else 1.0
        m = image_macs(side, depths[quarter], toe_keep, keep)
        macs += m
        seconds += STEP_S + STEP_S_PER_MMAC * m / 1e6
    base = image_macs(SIDE, 12, 1.0, 1.0)
    return STEPS * base / macs, STEPS * (STEP_S + STEP_S_PER_MMAC * base / 1e6) / seconds


NO_TOE = ((0.0, 1.0),)
ET_244 = [0.5, 0.5, 0.75, 0.75, 0.75, 0.75, 1, 1, 1, 1]
ET_253 = [0.5, 0.5, 0.75, 0.75, 0.75, 0.75, 0.75, 1, 1, 1]
ET_343 = [0.5, 0.5, 0.5, 0.75, 0.75, 0.75, 0.75, 1, 1, 1]
CANDIDATES = {
    "stack (growth 16/20/28/32 px)": dict(growth_sides=(16, 20, 28, 32)),
    "stack-et (ET++ 16x2/24x4/32x4)": dict(sides=ET_244),
    "a: ET++ 16x2/24x5/32x3, tokens 0.8": dict(sides=ET_253, token_keep=0.8),
    "b: ET++ 16x3/24x4/32x3, tokens 0.8": dict(sides=ET_343, token_keep=0.8),
    "c: b without ToE, tokens 0.7": dict(sides=ET_343, token_keep=0.7, toe=NO_TOE),
}

if __name__ == "__main__":
    for name, kw in CANDIDATES.items():
        mac, speed = run(**kw)
        print(f"{name:40s} MAC reduction {mac:5.2f}x   modelled step speed-up {speed:5.2f}x")
