"""What the plugins with stage schedules share (growth, EfficientTrain++): which stage holds a step."""
from __future__ import annotations

from bisect import bisect_right


def stage_of(step: int, starts) -> int:
    """The stage holding ``step`` (``starts``: each stage's first step, ascending; the last of empty
    stages sharing a start; stage 0 before the first start)."""
    return max(0, bisect_right(starts, step) - 1)
