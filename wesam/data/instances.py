"""Turn a label image into a stack of per-instance boolean masks."""

from __future__ import annotations

import cv2
import numpy as np

MASK_KINDS = ("binary", "instance", "semantic")


def _components(fg: np.ndarray, min_area: float) -> list[np.ndarray]:
    """8-connected components of a (H,W) bool image with area >= min_area.

    Returned in component-label order (raster order of each component's first
    pixel), which makes the instance order deterministic.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats(
        fg.astype(np.uint8), connectivity=8
    )
    out = []
    for lab in range(1, n):  # label 0 is the background
        if stats[lab, cv2.CC_STAT_AREA] >= min_area:
            out.append(labels == lab)
    return out


def _binary_foreground(mask: np.ndarray) -> np.ndarray:
    if mask.dtype == bool:
        return mask
    if mask.ndim == 3:
        # Colour masks (e.g. Kvasir-SEG ships RGB masks): any bright channel
        # counts, alpha is not a label.
        mask = mask[..., :3].max(axis=2)
    # 0/1 masks would be all-background with the 0/255 threshold.
    if mask.size and mask.max() <= 1:
        return mask > 0
    return mask > 127


def instances_from_mask(
    mask: np.ndarray, kind: str, min_area_frac: float = 0.001, ignore_classes: tuple[int, ...] = ()
) -> np.ndarray:
    """Split a label image into instance masks.

    Args:
        mask: (H,W) integer/bool label image (binary 0/255 or 0/1, instance
            ids, or semantic class ids). For ``kind="binary"`` an (H,W,C)
            colour mask is also accepted.
        kind: ``"binary"`` (8-connected foreground components),
            ``"instance"`` (each non-zero id, ascending) or ``"semantic"``
            (8-connected components of each non-zero class, class 0 = void).
        min_area_frac: components smaller than ``min_area_frac * H * W``
            pixels are dropped (binary/semantic only; specks from JPEG-ish
            mask noise must not become instances).
        ignore_classes: semantic class ids treated as void (e.g. "stuff" such as road or
            sky, which is not an object a user would prompt).

    Returns:
        (N,H,W) bool array, N >= 0.

    Raises:
        ValueError: unknown kind or a mask of the wrong rank.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; valid kinds: {', '.join(MASK_KINDS)}")
    mask = np.asarray(mask)
    if kind == "binary":
        if mask.ndim not in (2, 3):
            raise ValueError(f"binary mask must be (H,W) or (H,W,C), got shape {mask.shape}")
    elif mask.ndim != 2:
        raise ValueError(f"{kind} mask must be single-channel (H,W), got shape {mask.shape}")
    h, w = mask.shape[:2]
    min_area = min_area_frac * h * w

    if kind == "binary":
        inst = _components(_binary_foreground(mask), min_area)
    elif kind == "instance":
        ids = np.unique(mask)
        # np.unique drops absent ids already; the != 0 check removes background.
        inst = [mask == i for i in ids if i != 0]
    else:  # semantic
        inst = []
        for cls in np.unique(mask):
            if cls != 0 and int(cls) not in ignore_classes:
                inst.extend(_components(mask == cls, min_area))

    if not inst:
        return np.zeros((0, h, w), dtype=bool)
    return np.stack(inst).astype(bool, copy=False)
