"""Weak labels (prompts) derived from ground-truth instance masks.

Everything random takes an explicit ``np.random.Generator``;
:func:`derive_weak_labels` seeds it from ``(seed, key)`` so an image's
prompts are reproducible and independent of iteration order.

Box convention: xyxy float32 pixel coordinates with *inclusive* max
(x0 = min column, y0 = min row, x1 = max column, y1 = max row), as
segment_anything's ``batched_mask_to_box``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import cv2
import numpy as np

WEAK_KINDS = ("box", "point", "coarse", "coarse-box", "ellipse")


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected an (H,W) mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Tight inclusive boxes of (N,H,W) bool masks -> (N,4) float32 xyxy; empty -> zeros."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"expected (N,H,W) masks, got shape {masks.shape}")
    n, h, w = masks.shape
    rows = masks.any(axis=2)  # (N,H)
    cols = masks.any(axis=1)  # (N,W)
    y0 = rows.argmax(axis=1)
    y1 = h - 1 - rows[:, ::-1].argmax(axis=1)
    x0 = cols.argmax(axis=1)
    x1 = w - 1 - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)
    boxes[~rows.any(axis=1)] = 0.0
    return boxes.reshape(n, 4)


def jitter_boxes(
    boxes: np.ndarray,
    image_hw: tuple[int, int],
    rng: np.random.Generator,
    std_frac: float = 0.1,
    max_px: float = 20.0,
) -> np.ndarray:
    """SAM-paper box noise: per-coordinate N(0, std_frac * side) clipped to ±max_px.

    Args:
        boxes: (N,4) xyxy inclusive.
        image_hw: (H, W); results are clipped to [0, W-1] x [0, H-1].
    Returns:
        (N,4) float32 with x0 <= x1 and y0 <= y1.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    h, w = image_hw
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.stack([bw, bh, bw, bh], axis=1)
    noise = rng.standard_normal(boxes.shape) * std_frac * side
    out = boxes + np.clip(noise, -max_px, max_px)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w - 1)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h - 1)
    # Large noise on a thin box can cross the corners; re-order rather than
    # reject so every instance keeps a prompt.
    x0, x1 = np.minimum(out[:, 0], out[:, 2]), np.maximum(out[:, 0], out[:, 2])
    y0, y1 = np.minimum(out[:, 1], out[:, 3]), np.maximum(out[:, 1], out[:, 3])
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


def _pick(flat_idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if n == 0 or len(flat_idx) == 0:
        return flat_idx[:0]
    return flat_idx[rng.choice(len(flat_idx), size=n, replace=len(flat_idx) < n)]


def sample_points(
    mask: np.ndarray,
    n_pos: int,
    n_neg: int,
    rng: np.random.Generator,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Uniform positive points in ``mask`` and negative points outside it.

    Sampling is without replacement when the region has enough pixels, with
    replacement otherwise. Negatives are restricted to ``valid`` if given.

    Args:
        mask: (H,W) bool.
        valid: optional (H,W) bool region allowed for negatives.
    Returns:
        coords: (n_pos+n_neg, 2) float32 as (x=col, y=row) integer pixel indices.
        labels: (n_pos+n_neg,) int32, 1s then 0s. If a region is empty (e.g.
            the mask covers the whole image) its slots are padding points at
            (0, 0) with label -1, which SAM's prompt encoder ignores.
    """
    mask = _check_mask(mask)
    w = mask.shape[1]
    neg_region = ~mask if valid is None else (~mask & _check_mask(valid))
    coords = np.zeros((n_pos + n_neg, 2), dtype=np.float32)
    labels = np.full(n_pos + n_neg, -1, dtype=np.int32)
    for start, n, region, lab in ((0, n_pos, mask, 1), (n_pos, n_neg, neg_region, 0)):
        idx = _pick(np.flatnonzero(region), n, rng)
        k = len(idx)
        coords[start:start + k, 0] = idx % w
        coords[start:start + k, 1] = idx // w
        labels[start:start + k] = lab
    return coords, labels


def _fill_box(mask: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = boxes_from_masks(mask[None])[0].astype(int)
    out = np.zeros_like(mask)
    out[y0:y1 + 1, x0:x1 + 1] = True
    return out


def coarse_mask(
    mask: np.ndarray,
    rng: np.random.Generator,
    eps_frac: tuple[float, float] = (0.02, 0.05),
    morph_frac: tuple[float, float] = (0.02, 0.05),
) -> np.ndarray:
    """Degrade a mask into a coarse "scribble" mask prompt (kind ``"coarse"``).

    Outer contours are simplified with approxPolyDP (epsilon a uniform
    random ``eps_frac`` fraction of each contour's perimeter) and filled,
    then randomly dilated or eroded by a uniform random ``morph_frac``
    fraction of the object size (sqrt of its area, at least 1 px).

    Args:
        mask: (H,W) bool.
    Returns:
        (H,W) bool; non-empty whenever ``mask`` is (falls back to the filled
        bounding box). An empty input gives an empty output.
    """
    mask = _check_mask(mask)
    if not mask.any():
        return mask.copy()
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    eps = rng.uniform(*eps_frac)
    canvas = np.zeros(mask.shape, dtype=np.uint8)
    polys = [cv2.approxPolyDP(c, eps * cv2.arcLength(c, True), True) for c in contours]
    cv2.fillPoly(canvas, polys, 1)

    radius = max(1, int(round(rng.uniform(*morph_frac) * np.sqrt(mask.sum()))))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    op = cv2.dilate if rng.random() < 0.5 else cv2.erode
    out = op(canvas, kernel).astype(bool)
    if not out.any():  # erosion of a thin object, or a sliver polygon
        out = _fill_box(mask)
    return out


def coarse_box_of_polygon(mask: np.ndarray) -> np.ndarray:
    """The WeSAM reference "coarse-box" prompt of one mask -> (4,) float32 xyxy.

    First contour of findContours(RETR_TREE, CHAIN_APPROX_SIMPLE), simplified
    with approxPolyDP(epsilon=max(0.05 * perimeter, 3), closed); the prompt
    is the inclusive bounding box of the polygon's vertices. A degenerate
    (zero width or height) box falls back to the mask's tight box.
    """
    mask = _check_mask(mask)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return np.zeros(4, dtype=np.float32)
    c = contours[0]
    poly = cv2.approxPolyDP(c, max(0.05 * cv2.arcLength(c, True), 3.0), True).reshape(-1, 2)
    x0, y0 = poly.min(axis=0)
    x1, y1 = poly.max(axis=0)
    if x1 == x0 or y1 == y0:
        return boxes_from_masks(mask[None])[0]
    return np.array([x0, y0, x1, y1], dtype=np.float32)


@dataclass
class WeakLabel:
    """One prompt per instance; fields not used by ``kind`` are None.

    Attributes:
        kind: "box" | "point" | "coarse" | "coarse-box" | "ellipse".
        boxes: (N,4) float32 xyxy inclusive ("box", "coarse-box").
        point_coords: (N,K,2) float32 (x, y) ("point").
        point_labels: (N,K) int32, 1 positive / 0 negative / -1 padding ("point").
        mask_inputs: (N,H,W) bool ("coarse"; "ellipse": the ellipse inscribed in the tight box).
    """

    kind: str
    boxes: np.ndarray | None = None
    point_coords: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    mask_inputs: np.ndarray | None = None


def weak_rng(seed: int, key: str) -> np.random.Generator:
    """Generator depending only on (seed, key), e.g. key = image stem."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def inscribed_ellipse_masks(boxes: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """The ellipse inscribed in each box: (N,4) xyxy inclusive (rounded) -> (N,H,W) bool.

    Centre ((x0+x1)/2, (y0+y1)/2), semi-axes half the box's pixel extent (at least half a
    pixel), as ``shared/tools/box_baseline.py`` draws it: the "ellipse" quality floor and,
    through the mask-prompt path, the "ellipse" weak prompt.
    """
    h, w = hw
    b = np.rint(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    rx = np.maximum((b[:, 2] - b[:, 0] + 1) / 2, 0.5)
    ry = np.maximum((b[:, 3] - b[:, 1] + 1) / 2, 0.5)
    dy = ((np.arange(h)[None, :] - cy[:, None]) / ry[:, None]) ** 2  # (N,H)
    dx = ((np.arange(w)[None, :] - cx[:, None]) / rx[:, None]) ** 2  # (N,W)
    return dy[:, :, None] + dx[:, None, :] <= 1.0


def derive_weak_labels(
    instances: np.ndarray,
    kind: str,
    *,
    seed: int = 0,
    key: str = "",
    n_points: tuple[int, int] = (5, 5),
    box_jitter: float = 0.0,
) -> WeakLabel:
    """Derive one weak prompt per ground-truth instance.

    Args:
        instances: (N,H,W) bool.
        kind: one of :data:`WEAK_KINDS`.
        seed, key: RNG seed; labels depend only on (seed, key, instances).
        n_points: (n_pos, n_neg) per instance for ``"point"`` (reference: 5+5).
            Negatives are drawn from outside the instance itself.
        box_jitter: ``std_frac`` of :func:`jitter_boxes` for ``"box"``; 0 = tight.
    Raises:
        ValueError: unknown kind or bad shape.
    """
    if kind not in WEAK_KINDS:
        raise ValueError(f"unknown weak label kind {kind!r}; valid kinds: {', '.join(WEAK_KINDS)}")
    instances = np.asarray(instances, dtype=bool)
    if instances.ndim != 3:
        raise ValueError(f"expected (N,H,W) instances, got shape {instances.shape}")
    n, h, w = instances.shape
    rng = weak_rng(seed, key)

    if kind == "box":
        boxes = boxes_from_masks(instances)
        if box_jitter > 0:
            boxes = jitter_boxes(boxes, (h, w), rng, std_frac=box_jitter)
        return WeakLabel(kind, boxes=boxes)
    if kind == "coarse-box":
        boxes = np.zeros((n, 4), dtype=np.float32)
        for i, m in enumerate(instances):
            boxes[i] = coarse_box_of_polygon(m)
        return WeakLabel(kind, boxes=boxes)
    if kind == "point":
        n_pos, n_neg = n_points
        coords = np.zeros((n, n_pos + n_neg, 2), dtype=np.float32)
        labels = np.zeros((n, n_pos + n_neg), dtype=np.int32)
        for i, m in enumerate(instances):
            coords[i], labels[i] = sample_points(m, n_pos, n_neg, rng)
        return WeakLabel(kind, point_coords=coords, point_labels=labels)
    if kind == "ellipse":
        return WeakLabel(kind, mask_inputs=inscribed_ellipse_masks(boxes_from_masks(instances), (h, w)))
    # coarse
    masks = np.zeros((n, h, w), dtype=bool)
    for i, m in enumerate(instances):
        masks[i] = coarse_mask(m, rng)
    return WeakLabel(kind, mask_inputs=masks)
