"""Region scenes: smooth shapes cut out of natural images and laid onto other natural images.

The natural source sets hold about 700 training images; the procedural scenes of
:mod:`.synthetic` are unlimited but their textures are not natural. A region scene takes the
best of both: its background is a crop of a natural training image, its objects are
random smooth shapes (blobs, ellipses, convex and concave polygons, rounded rectangles) whose
pixels come from *another* place of a natural image (sometimes the same image, which makes a
low-contrast, camouflage-like object), with optional shading (a 3-D bump or dent) and a
feathered boundary of random softness. The instance masks are the visible parts of the
shapes, exact by construction; whatever objects the background image already held stay
unlabelled, as clutter.

What it teaches is what a box prompt on a shifted domain needs most: find the region inside
the box whose appearance differs from its surroundings, with a shape prior for compact objects,
on natural image statistics. Why not only copy-paste of real instances (which the pipeline
also does)? The real instances are few (about 2,000 across the three sets) and mostly small;
random shapes over random natural textures are unlimited.

Everything is drawn from the ``rng`` the caller passes, so a sample depends only on the
caller's seed. Pure NumPy + OpenCV, about 1 ms per 256 px scene.
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

from .augment import channel_affine, gaussian_blur, gaussian_noise
from .synthetic import MIN_VISIBLE_FRACTION, _shape_in_bbox

# Compact shapes dominate: a user's box usually holds one compact object.
REGION_SHAPES = ("blob", "ellipse", "convex", "concave", "rect")
_REGION_SHAPE_P = np.array([0.35, 0.25, 0.15, 0.15, 0.10])
AREA_RANGE = (0.004, 0.35)  # object area as a fraction of the image
MAX_OBJECTS = 4


def _random_crop(rng: np.random.Generator, image: np.ndarray, out_w: int, out_h: int,
                 min_scale: float = 0.15) -> np.ndarray:
    """A random window of ``image`` with the aspect of (out_w, out_h), resized to it."""
    h, w = image.shape[:2]
    aspect = out_w / out_h
    # The largest window of that aspect that fits, shrunk by a random factor.
    cw_max = min(w, h * aspect)
    s = math.sqrt(rng.uniform(min_scale, 1.0))
    cw = max(2, int(cw_max * s))
    ch = max(2, min(h, int(round(cw / aspect))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    window = image[y0:y0 + ch, x0:x0 + cw]
    interp = cv2.INTER_AREA if cw > out_w else cv2.INTER_LINEAR
    return cv2.resize(window, (out_w, out_h), interpolation=interp)


def _shading(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A smooth multiplicative gain over the shape's box: a lit bump (>1 in the middle) or a dent.

    mask (h, w) uint8; returns gain (h, w, 1) float32.
    """
    h, w = mask.shape
    ys = (np.arange(h, dtype=np.float32) - rng.uniform(0.3, 0.7) * h) / (h / 2)
    xs = (np.arange(w, dtype=np.float32) - rng.uniform(0.3, 0.7) * w) / (w / 2)
    r2 = np.clip(ys[:, None] ** 2 + xs[None, :] ** 2, 0, 1)
    amp = np.float32(rng.uniform(0.1, 0.35) * (1 if rng.random() < 0.7 else -1))
    return (1.0 + amp * (1.0 - r2) - amp / 2)[..., None]


def region_scene(rng: np.random.Generator, pool: Sequence[np.ndarray],
                 size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One region scene from natural images in ``pool`` ((H, W, 3) uint8 RGB each).

    Returns image (size, size, 3) uint8 and masks (N, size, size) bool, 1 <= N <= MAX_OBJECTS,
    visible pixels only (later shapes occlude earlier ones), each at least
    MIN_VISIBLE_FRACTION of the image.
    """
    if not pool:
        raise ValueError("region scenes need at least one natural image")
    while True:  # redraw the rare scene where every shape got occluded or clipped away
        scene = _try_region_scene(rng, pool, size)
        if scene is not None:
            return scene


def _try_region_scene(rng: np.random.Generator, pool: Sequence[np.ndarray],
                      size: int) -> tuple[np.ndarray, np.ndarray] | None:
    bg_index = int(rng.integers(len(pool)))
    image = _random_crop(rng, pool[bg_index], size, size, min_scale=0.3).astype(np.float32)
    labels = np.zeros((size, size), np.uint8)
    scratch = np.zeros((size, size), np.uint8)

    n = int(rng.integers(1, MAX_OBJECTS + 1))
    lo, hi = AREA_RANGE
    areas = np.sort(np.exp(rng.uniform(math.log(lo), math.log(hi), n)))[::-1] * size * size
    for i, area in enumerate(areas, start=1):
        kind = REGION_SHAPES[rng.choice(len(REGION_SHAPES), p=_REGION_SHAPE_P)]
        cx, cy = rng.uniform(0.1, 0.9, 2) * size
        drawn = _shape_in_bbox(rng, kind, scratch, cx, cy, float(area))
        if drawn is None:
            continue
        x, y, m = drawn
        h, w = m.shape
        # Texture: another image, or (a third of the time) elsewhere in the background's own
        # image, which gives objects that differ from their surroundings only a little.
        src = bg_index if rng.random() < 0.33 else int(rng.integers(len(pool)))
        tex = _random_crop(rng, pool[src], w, h, min_scale=0.02).astype(np.float32)
        if rng.random() < 0.5:
            tex = tex * _shading(rng, m)
        if rng.random() < 0.3:  # a colour/brightness shift of the object alone
            tex = tex * (1 + rng.normal(0, 0.12, 3)).astype(np.float32) + rng.normal(0, 12, 3)
        # Feathered boundary: from a crisp edge to a soft one several pixels wide.
        sigma = float(rng.uniform(0.5, 1.2) if rng.random() < 0.6 else rng.uniform(1.2, 3.5))
        pad = int(math.ceil(3 * sigma))
        # Blur over the box plus a margin so the soft edge reaches outside the shape.
        x0, y0 = max(0, x - pad), max(0, y - pad)
        x1, y1 = min(size, x + w + pad), min(size, y + h + pad)
        full = np.zeros((y1 - y0, x1 - x0), np.float32)
        full[y - y0:y - y0 + h, x - x0:x - x0 + w] = m
        alpha = cv2.GaussianBlur(full, (0, 0), sigmaX=sigma)[..., None]
        tex_full = cv2.copyMakeBorder(tex, y - y0, y1 - (y + h), x - x0, x1 - (x + w),
                                      cv2.BORDER_REFLECT)
        roi = image[y0:y1, x0:x1]
        roi[...] = alpha * tex_full + (1 - alpha) * roi
        labels[y:y + h, x:x + w][m.view(bool)] = i

    out = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.2:
        out = gaussian_blur(out, rng.uniform(0.4, 1.2))
    if rng.random() < 0.25:
        out = gaussian_noise(out, rng, rng.uniform(2, 8))
    if rng.random() < 0.2:
        gain = (1 + rng.normal(0, 0.06, 3)).astype(np.float32)
        out = channel_affine(out, gain, rng.normal(0, 6, 3).astype(np.float32))

    visible = np.bincount(labels.ravel(), minlength=n + 1)
    keep = np.flatnonzero(visible[1:] >= MIN_VISIBLE_FRACTION * size * size) + 1
    if len(keep) == 0:
        return None
    masks = labels[None] == keep.astype(np.uint8)[:, None, None]
    return np.ascontiguousarray(out), masks
