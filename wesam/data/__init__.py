"""Dataset reading, instance extraction and weak-label derivation (numpy/OpenCV/PIL only)."""

from .errors import DataError
from .folder import (
    CocoJsonDataset,
    FolderDataset,
    Sample,
    open_dataset,
    read_image_rgb,
    read_mask,
)
from .instances import MASK_KINDS, instances_from_mask
from .weak import (
    WEAK_KINDS,
    WeakLabel,
    boxes_from_masks,
    coarse_box_of_polygon,
    coarse_mask,
    derive_weak_labels,
    jitter_boxes,
    sample_points,
    weak_rng,
)

__all__ = [
    "DataError",
    "CocoJsonDataset",
    "FolderDataset",
    "Sample",
    "open_dataset",
    "read_image_rgb",
    "read_mask",
    "MASK_KINDS",
    "instances_from_mask",
    "WEAK_KINDS",
    "WeakLabel",
    "boxes_from_masks",
    "coarse_box_of_polygon",
    "coarse_mask",
    "derive_weak_labels",
    "jitter_boxes",
    "sample_points",
    "weak_rng",
]
