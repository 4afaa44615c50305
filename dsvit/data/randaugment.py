"""timm's RandAugment policy strings (``rand-m9-mstd0.5-inc1``): their magnitude, read and replaced.
Plugins that schedule the magnitude (growth's progressive AugReg, EfficientTrain++) share these; no
torch or timm import, so a config check stays light."""
from __future__ import annotations

import re
from typing import Optional

MAGNITUDE = re.compile(r"-m(\d+)")


def randaugment_magnitude(policy: str) -> Optional[int]:
    """The ``-mN`` of a policy string (None: it has none)."""
    m = MAGNITUDE.search(policy or "")
    return int(m.group(1)) if m else None


def with_magnitude(policy: str, magnitude: int) -> str:
    """``policy`` at another magnitude (its first ``-mN`` replaced)."""
    return MAGNITUDE.sub(f"-m{magnitude}", policy, count=1)
