"""Image corruptions for the natural-corrupted benchmark (COCO-C style, WeSAM §10).

``imagecorruptions`` provides the ImageNet-C definitions. Under numpy 2 and current
scikit-image its ``fog``, ``gaussian_blur`` and ``glass_blur`` fail (``np.float_`` and the
removed ``multichannel`` argument), so ``fog`` is re-implemented here with the same
parameters (plasma-fractal haze, severity table of ImageNet-C) and a seeded generator;
``gaussian_blur`` is re-implemented with OpenCV. The package imports only with
``setuptools<81`` (it uses ``pkg_resources``). All corruptions run on RGB and are seeded
per image, so a corrupted set is reproducible.
"""

from __future__ import annotations

import warnings

import cv2
import numpy as np

# impulse_noise is left out: imagecorruptions draws it from an unseeded generator.
SUPPORTED = ("gaussian_noise", "motion_blur", "fog", "jpeg_compression", "gaussian_blur",
             "shot_noise", "defocus_blur", "brightness", "contrast", "pixelate")
_FOG = [(1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)]
_GAUSSIAN_BLUR_SIGMA = [1, 2, 3, 4, 6]


def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map, (size, size) float64 in [0, 1]; size is a power of two."""
    if size & (size - 1):
        raise ValueError("plasma_fractal size must be a power of two")
    grid = np.zeros((size, size))
    step, amplitude = size, 100.0
    while step >= 2:
        half = step // 2
        corners = grid[0:size:step, 0:size:step]
        square = corners + np.roll(corners, -1, 0)
        square = square + np.roll(square, -1, 1)
        grid[half:size:step, half:size:step] = square / 4 + amplitude * rng.uniform(-amplitude, amplitude, square.shape)
        centres = grid[half:size:step, half:size:step]
        corners = grid[0:size:step, 0:size:step]
        left = centres + np.roll(centres, 1, 0) + corners + np.roll(corners, -1, 1)
        grid[0:size:step, half:size:step] = left / 4 + amplitude * rng.uniform(-amplitude, amplitude, left.shape)
        top = centres + np.roll(centres, 1, 1) + corners + np.roll(corners, -1, 0)
        grid[half:size:step, 0:size:step] = top / 4 + amplitude * rng.uniform(-amplitude, amplitude, top.shape)
        step //= 2
        amplitude /= decay
    grid -= grid.min()
    return grid / max(grid.max(), 1e-12)


def fog(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    strength, decay = _FOG[severity - 1]
    h, w = image.shape[:2]
    size = 1 << int(np.ceil(np.log2(max(h, w))))
    x = image.astype(np.float64) / 255.0
    peak = x.max()
    x = x + strength * plasma_fractal(size, decay, rng)[:h, :w, None]
    return (np.clip(x * peak / (peak + strength), 0, 1) * 255).astype(np.uint8)


def gaussian_blur(image: np.ndarray, severity: int) -> np.ndarray:
    sigma = _GAUSSIAN_BLUR_SIGMA[severity - 1]
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


def corrupt(image: np.ndarray, name: str, severity: int = 5, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> corrupted (H, W, 3) uint8, deterministic for (image, name, severity, seed)."""
    if name not in SUPPORTED:
        raise ValueError(f"unsupported corruption {name!r}; supported: {', '.join(SUPPORTED)}")
    if not 1 <= severity <= 5:
        raise ValueError("severity must be 1..5")
    rng = np.random.default_rng(seed)
    if name == "fog":
        return fog(image, severity, rng)
    if name == "gaussian_blur":
        return gaussian_blur(image, severity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from imagecorruptions import corrupt as ic_corrupt

        # imagecorruptions draws from numpy's global generator; pin it for reproducibility.
        state = np.random.get_state()
        np.random.seed(seed % (2**32))
        try:
            out = ic_corrupt(image, corruption_name=name, severity=severity)
        finally:
            np.random.set_state(state)
    out = np.asarray(out)
    if out.shape[:2] != image.shape[:2]:  # some ImageNet-C ops return a different size
        out = cv2.resize(out.astype(np.uint8), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    return np.clip(out, 0, 255).astype(np.uint8)
