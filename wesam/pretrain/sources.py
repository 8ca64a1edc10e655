"""Natural-image source data for pretraining: train splits only, held in memory.

The shifted target domains (Kvasir-SEG, CVC-ClinicDB) are never read here. A validation
subset is carved from each natural train split (by video sequence where frames are
correlated) to select checkpoints; test splits are used only for the final report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import DataError, FolderDataset
from ..data.splits import carve_validation as carve_groups

SOURCE_SETS = ("coco128_seg", "davis2016", "camvid")
FORBIDDEN_SETS = ("kvasir_seg", "cvc_clinicdb")
VAL_FRACTION = 0.12
# Semantic "stuff" regions (CamVid: sky, building, road, pavement, tree, fence) are not
# objects a user boxes or clicks; as instances they taught the model to fill boxes.
STUFF_CLASSES: dict[str, tuple[int, ...]] = {"camvid": (1, 2, 4, 5, 6, 8)}


@dataclass
class SourceImage:
    stem: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    instances: np.ndarray  # (N, H, W) bool


def _group(name: str, stem: str) -> str:
    """Frames of one video go to the same side of the train/val carve."""
    if name == "davis2016":
        return stem.rsplit("_", 1)[0]
    return stem


def carve_validation(name: str, stems: list[str], fraction: float = VAL_FRACTION,
                     seed: int = 0) -> tuple[list[str], list[str]]:
    """Split a train split's stems into (train, val), deterministically."""
    return carve_groups(stems, lambda s: _group(name, s), fraction, seed)


def load_source(root: Path, name: str, part: str, min_area_frac: float = 0.001,
                things_only: bool = False) -> list[SourceImage]:
    """Load ``part`` ("train", "val" or "test") of one natural set into memory.

    ``things_only`` drops the set's :data:`STUFF_CLASSES` (images left without an object are
    skipped).
    """
    if name in FORBIDDEN_SETS:
        raise ValueError(f"{name} is a target domain and must not be used to pretrain the source model")
    split = "test" if part == "test" else "train"
    # A few source masks are empty after instance extraction; they carry no training signal.
    ds = FolderDataset(root / name, split=split, min_area_frac=min_area_frac, skip_bad=True)
    stems = list(ds.stems)
    if part != "test":
        # Carved on all usable stems, stuff or not, so that dropping stuff never moves an image
        # between the train and validation sides.
        train, val = carve_validation(name, stems)
        stems = train if part == "train" else val
    ignore = STUFF_CLASSES.get(name, ()) if things_only else ()
    if ignore:  # the same files, read with the stuff classes as void
        ds = FolderDataset(root / name, min_area_frac=min_area_frac, stems=stems, ignore_classes=ignore)
    wanted, out = set(stems), []
    for i, stem in enumerate(ds.stems):
        if stem not in wanted:
            continue
        try:
            smp = ds[i]
        except DataError:  # only stuff in this image: nothing left to prompt
            continue
        out.append(SourceImage(smp.stem, smp.image, smp.instances))
    return out
