"""Weak and strong views of a training image (WeSAM §4.2).

Weak view: a uniformly random element of {identity, H-flip, V-flip, H+V-flip}, applied to the
image, the instance masks and the weak labels alike. Strong view: the weak image followed by
six photometric transforms, each with p = 0.5 (posterize 4 bits, equalize, sharpen, solarize,
brightness/contrast, random shadow), so geometry is identical and pseudo-labels align.
"""

from __future__ import annotations

import cv2
import numpy as np

from wesam.data.weak import WeakLabel


def flip_view(image: np.ndarray, masks: np.ndarray, label: WeakLabel, hflip: bool, vflip: bool
              ) -> tuple[np.ndarray, np.ndarray, WeakLabel]:
    """Flip image (H, W, 3), masks (N, H, W) and the label's prompts consistently."""
    h, w = image.shape[:2]
    boxes, coords, mask_in = label.boxes, label.point_coords, label.mask_inputs
    if hflip:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
        if boxes is not None:
            boxes = np.stack([w - 1 - boxes[:, 2], boxes[:, 1], w - 1 - boxes[:, 0], boxes[:, 3]], 1)
        if coords is not None:
            coords = coords.copy()
            coords[..., 0] = w - 1 - coords[..., 0]
        if mask_in is not None:
            mask_in = mask_in[:, :, ::-1]
    if vflip:
        image, masks = image[::-1], masks[:, ::-1]
        if boxes is not None:
            boxes = np.stack([boxes[:, 0], h - 1 - boxes[:, 3], boxes[:, 2], h - 1 - boxes[:, 1]], 1)
        if coords is not None:
            coords = coords.copy()
            coords[..., 1] = h - 1 - coords[..., 1]
        if mask_in is not None:
            mask_in = mask_in[:, ::-1]
    label = WeakLabel(label.kind, boxes=boxes, point_coords=coords, point_labels=label.point_labels,
                      mask_inputs=None if mask_in is None else np.ascontiguousarray(mask_in))
    return np.ascontiguousarray(image), np.ascontiguousarray(masks), label


def _sharpen(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    alpha, lightness = rng.uniform(0.2, 0.5), rng.uniform(0.5, 1.0)
    identity = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32)
    sharp = np.array([[-1, -1, -1], [-1, 8 + lightness, -1], [-1, -1, -1]], np.float32)
    kernel = (1 - alpha) * identity + alpha * sharp
    return np.clip(cv2.filter2D(image.astype(np.float32), -1, kernel), 0, 255).astype(np.uint8)


def _shadow(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    hls = cv2.cvtColor(image, cv2.COLOR_RGB2HLS)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        pts = np.stack([rng.uniform(0, w, 5), rng.uniform(h / 2, h, 5)], 1).astype(np.int32)
        cv2.fillPoly(mask, [pts], 255)
    light = hls[..., 1]
    light[mask > 0] = light[mask > 0] // 2
    return cv2.cvtColor(hls, cv2.COLOR_HLS2RGB)


def strong_photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The six WeSAM strong-view transforms, each applied with p = 0.5, in order."""
    out = image.copy()
    if rng.random() < 0.5:
        out = out & np.uint8(0xF0)  # posterize: keep the 4 high bits
    if rng.random() < 0.5:
        out = np.stack([cv2.equalizeHist(np.ascontiguousarray(out[..., c])) for c in range(3)], -1)
    if rng.random() < 0.5:
        out = _sharpen(out, rng)
    if rng.random() < 0.5:
        out = np.where(out >= 128, 255 - out, out).astype(np.uint8)  # solarize
    if rng.random() < 0.5:
        contrast, brightness = 1 + rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2) * 255
        out = np.clip(out.astype(np.float32) * contrast + brightness, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        out = _shadow(out, rng)
    return out
