"""Carving a validation part out of a train split, keeping correlated frames together."""

from __future__ import annotations

import random
from typing import Callable


def carve_validation(stems: list[str], group_of: Callable[[str], str], fraction: float, seed: int = 0
                     ) -> tuple[list[str], list[str]]:
    """Split ``stems`` into (train, val) deterministically.

    Whole groups (e.g. the frames of one video) go to one side; ``fraction`` of the groups
    (at least one) form the validation part. Order within each side follows ``stems``.
    """
    group = {s: group_of(s) for s in stems}
    keys = sorted(set(group.values()))
    random.Random(seed).shuffle(keys)
    val_keys = set(keys[:max(1, round(fraction * len(keys)))])
    return [s for s in stems if group[s] not in val_keys], [s for s in stems if group[s] in val_keys]
