"""Adaptation data: a target-domain train split held in memory, with a carved validation part.

Weak labels are derived once per image from (seed, stem) and then stay fixed, as a user's
annotations would: a point-prompt run never sees points other than its own 5+5 per instance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from wesam.data import open_dataset
from wesam.data.splits import carve_validation
from wesam.data.weak import WeakLabel, derive_weak_labels

VAL_FRACTION = 0.12


@dataclass
class AdaptSample:
    stem: str
    image: np.ndarray  # (H, W, 3) uint8
    instances: np.ndarray  # (N, H, W) bool; only validation uses them as ground truth
    label: WeakLabel  # the weak label, one prompt per instance


def _group_of(root: Path) -> Callable[[str], str]:
    """Frames of one video sequence stay on one side of the carve (CVC-ClinicDB lists them)."""
    split = root / "split.json"
    seq = {}
    if split.is_file():
        seq = json.loads(split.read_text()).get("sequence_of_frame", {}) or {}
    return lambda s: f"seq{seq[s]}" if s in seq else s


def carve(root: Path, stems: list[str], fraction: float = VAL_FRACTION, seed: int = 0
          ) -> tuple[list[str], list[str]]:
    """Split adaptation stems into (train, val) deterministically; never touches the test split."""
    return carve_validation(stems, _group_of(root), fraction, seed)


def load_adaptation_data(root: str | Path, split: str, prompt: str, *, seed: int = 0,
                         n_points: tuple[int, int] = (5, 5), val_fraction: float = VAL_FRACTION,
                         skip_bad: bool = False, limit: int | None = None
                         ) -> tuple[list[AdaptSample], list[AdaptSample], str]:
    """(train samples, validation samples, data fingerprint) for one target domain."""
    root = Path(root)
    ds = open_dataset(root, split, skip_bad=skip_bad)
    stems = list(ds.stems)[:limit] if limit else list(ds.stems)
    train_stems, val_stems = carve(root, stems, val_fraction) if val_fraction > 0 else (stems, [])
    index = {s: i for i, s in enumerate(ds.stems)}

    def load(stem_list: list[str]) -> list[AdaptSample]:
        out = []
        for s in stem_list:
            smp = ds[index[s]]
            label = derive_weak_labels(smp.instances, prompt, seed=seed, key=smp.stem, n_points=n_points)
            out.append(AdaptSample(smp.stem, smp.image, smp.instances, label))
        return out

    return load(train_stems), load(val_stems), ds.fingerprint()
