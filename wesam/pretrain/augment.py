"""Augmentations for sam-mini pretraining samples: (image, instance masks) pairs.

Conventions shared by every function here:

* ``image``: (H, W, 3) uint8 RGB.
* ``masks``: (N, H, W) bool, one plane per instance; N may be 0.
* ``rng``: a ``np.random.Generator``; all randomness comes from it, so a sample is reproducible
  from its seed. Nothing uses OpenCV's or NumPy's global RNG state.

Geometric ops keep masks pixel-exact (nearest neighbour, hard masks) and aligned with the image:
masks are sampled at the same pixel centres the image interpolation uses. Pure NumPy + OpenCV.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist

import cv2
import numpy as np

MIN_AREA_PX = 16

# Inverse-CDF table turning uniform bytes into N(0, 1) samples: ~10x cheaper than
# rng.standard_normal for an image-sized draw, and 256 levels is plenty for pixel noise.
_NORMAL_FROM_BYTE = np.array(
    [NormalDist().inv_cdf((i + 0.5) / 256.0) for i in range(256)], dtype=np.float32
)


# --------------------------------------------------------------------------- primitives
# Small image-only degradations, also used by the synthetic scene generator.


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W, C) uint8 -> same, Gaussian blurred with std ``sigma`` px."""
    return cv2.GaussianBlur(image, (0, 0), sigmaX=float(sigma), borderType=cv2.BORDER_REFLECT_101)


def motion_blur(image: np.ndarray, rng: np.random.Generator, max_length: int = 9) -> np.ndarray:
    """(H, W, C) uint8 -> same, blurred along a random direction over 3..max_length px."""
    length = int(rng.integers(3, max(3, max_length) + 1))
    kernel = np.zeros((length, length), np.float32)
    c = (length - 1) / 2.0
    angle = rng.uniform(0.0, math.pi)
    dx, dy = math.cos(angle) * c, math.sin(angle) * c
    # Antialiased line keeps short kernels at odd angles from collapsing to a few pixels.
    cv2.line(kernel, (round((c - dx) * 16), round((c - dy) * 16)),
             (round((c + dx) * 16), round((c + dy) * 16)), 1.0, 1, cv2.LINE_AA, shift=4)
    kernel /= max(float(kernel.sum()), 1e-6)
    return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def gaussian_noise(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """(H, W, C) uint8 -> same plus i.i.d. per-pixel, per-channel N(0, sigma^2) noise.

    Samples are quantised to whole grey levels (what a uint8 image keeps anyway).
    """
    levels = np.round(_NORMAL_FROM_BYTE * np.float32(sigma))
    # Positive and negative parts as two uint8 tables: per element only one is non-zero, so
    # saturating add-then-subtract equals clip(image + noise) without any int16/float pass.
    pos = np.clip(levels, 0, 255).astype(np.uint8)
    neg = np.clip(-levels, 0, 255).astype(np.uint8)
    u = np.frombuffer(rng.bytes(image.size), np.uint8).reshape(image.shape)
    return cv2.subtract(cv2.add(image, cv2.LUT(u, pos)), cv2.LUT(u, neg))


def jpeg_compress(image: np.ndarray, quality: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> same after a JPEG encode/decode round trip at ``quality``."""
    # OpenCV's codec assumes BGR; chroma subsampling would otherwise hit the wrong channels.
    ok, buf = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - only on a broken OpenCV build
        return image.copy()
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


def channel_affine(image: np.ndarray, gain: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> clip(image * gain + bias) per channel; gain, bias: (3,) float.

    Done through a per-channel lookup table, which is several times faster than float maths.
    """
    levels = np.arange(256, dtype=np.float32)[:, None]
    lut = np.clip(levels * np.asarray(gain, np.float32) + np.asarray(bias, np.float32), 0, 255)
    return cv2.LUT(image, lut.astype(np.uint8).reshape(256, 1, 3))


def brightness_contrast(image: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
    """(H, W, 3) uint8 -> contrast scaled about the mean grey level, then ``brightness`` added."""
    mean = float(np.mean(cv2.mean(image)[:3]))
    gain = np.full(3, contrast, np.float32)
    return channel_affine(image, gain, np.full(3, mean * (1.0 - contrast) + brightness, np.float32))


def hue_saturation(image: np.ndarray, hue_shift: float, saturation: float) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> hue rotated by ``hue_shift`` (fraction of the circle), saturation scaled."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)  # uint8 hue lives in [0, 180)
    levels = np.arange(256, dtype=np.float32)
    lut = np.empty((256, 1, 3), np.uint8)
    lut[:, 0, 0] = np.mod(levels + round(hue_shift * 180.0), 180).astype(np.uint8)
    lut[:, 0, 1] = np.clip(levels * saturation, 0, 255).astype(np.uint8)
    lut[:, 0, 2] = levels.astype(np.uint8)
    return cv2.cvtColor(cv2.LUT(hsv, lut), cv2.COLOR_HSV2RGB)


def grayscale(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 with all channels equal to luma."""
    return cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


# --------------------------------------------------------------------------- geometry


def _nearest_index(out_len: int, in_len: int, offset: int = 0) -> np.ndarray:
    """Source index of each output pixel under pixel-centre-aligned scaling (as cv2 linear/area)."""
    idx = ((np.arange(out_len, dtype=np.float64) + 0.5) * (in_len / out_len)).astype(np.intp)
    return offset + np.minimum(idx, in_len - 1)


def _keep_large(masks: np.ndarray, min_area_px: int) -> np.ndarray:
    """(N, H, W) bool -> the planes with at least ``min_area_px`` pixels (``masks`` itself if all)."""
    # Per-plane count_nonzero takes NumPy's fast path; the axis= variant is ~10x slower.
    keep = [i for i, plane in enumerate(masks) if np.count_nonzero(plane) >= min_area_px]
    return masks if len(keep) == len(masks) else masks[keep]


def _longest_side_shape(h: int, w: int, out_size: int) -> tuple[int, int]:
    """(h, w) scaled so the longest side is ``out_size``, aspect ratio kept."""
    if w >= h:
        return max(1, round(out_size * h / w)), out_size
    return out_size, max(1, round(out_size * w / h))


def _crop_resize(image: np.ndarray, masks: np.ndarray, x0: int, y0: int, cw: int, ch: int,
                 out_size: int, min_area_px: int) -> tuple[np.ndarray, np.ndarray]:
    oh, ow = _longest_side_shape(ch, cw, out_size)
    crop = image[y0:y0 + ch, x0:x0 + cw]
    if (oh, ow) == (ch, cw):
        out = crop.copy()
    else:
        # Area averaging when shrinking avoids aliasing; it maps pixel centres like linear does.
        interp = cv2.INTER_AREA if ow * oh < cw * ch else cv2.INTER_LINEAR
        out = cv2.resize(crop, (ow, oh), interpolation=interp)
    rows = _nearest_index(oh, ch, y0)
    cols = _nearest_index(ow, cw, x0)
    # Two 1-D takes are much cheaper than one 2-D fancy index on (N, H, W).
    out_masks = np.take(np.take(masks, rows, axis=1), cols, axis=2)
    return out, _keep_large(out_masks, min_area_px)


def resize_longest(image: np.ndarray, masks: np.ndarray, out_size: int = 256,
                   min_area_px: int = MIN_AREA_PX) -> tuple[np.ndarray, np.ndarray]:
    """Resize so the longest side is ``out_size`` (aspect kept); masks by nearest neighbour.

    Returns image (h, w, 3) uint8 with max(h, w) == out_size and masks (M, h, w) bool, M <= N,
    instances under ``min_area_px`` pixels after resizing dropped.
    """
    h, w = image.shape[:2]
    return _crop_resize(image, masks, 0, 0, w, h, out_size, min_area_px)


def random_resized_crop(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator,
                        out_size: int = 256, scale: tuple[float, float] = (0.3, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        min_area_px: int = MIN_AREA_PX) -> tuple[np.ndarray, np.ndarray]:
    """SAM-style scale jitter: crop a random window, resize its longest side to ``out_size``.

    The window covers ``scale`` of the image area with width/height in ``ratio`` (torchvision's
    sampling; after 10 misses the whole image is used). The output keeps the window's aspect
    ratio, so it is (h, w, 3) with max(h, w) == out_size; SAM preprocessing pads it later.
    Returns masks (M, h, w) bool: instances smaller than ``min_area_px`` after cropping are
    dropped, so M may be 0.
    """
    h, w = image.shape[:2]
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        r = math.exp(rng.uniform(log_lo, log_hi))
        cw, ch = round(math.sqrt(target * r)), round(math.sqrt(target / r))
        if 0 < cw <= w and 0 < ch <= h:
            x0 = int(rng.integers(0, w - cw + 1))
            y0 = int(rng.integers(0, h - ch + 1))
            return _crop_resize(image, masks, x0, y0, cw, ch, out_size, min_area_px)
    return _crop_resize(image, masks, 0, 0, w, h, out_size, min_area_px)


def hflip(image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right: image (H, W, 3) and masks (N, H, W), both returned as new arrays."""
    # cv2.flip is several times faster than copying a negative-stride NumPy view.
    flipped = np.empty_like(masks)
    for src, dst in zip(masks.view(np.uint8), flipped.view(np.uint8)):
        cv2.flip(src, 1, dst=dst)
    return cv2.flip(image, 1), flipped


# --------------------------------------------------------------------------- photometric


def photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random colour/quality jitter of an (H, W, 3) uint8 RGB image; returns a new array.

    Brightness/contrast and hue/saturation jitter (each p=0.8), grayscale (p=0.05), Gaussian
    blur, Gaussian noise and JPEG compression (each p=0.2), in that order.
    """
    out = image
    if rng.random() < 0.8:
        out = brightness_contrast(out, rng.uniform(-32, 32), rng.uniform(0.6, 1.4))
    if rng.random() < 0.8:
        out = hue_saturation(out, rng.uniform(-0.05, 0.05), rng.uniform(0.5, 1.5))
    if rng.random() < 0.05:
        out = grayscale(out)
    if rng.random() < 0.2:
        out = gaussian_blur(out, rng.uniform(0.3, 1.5))
    if rng.random() < 0.2:
        out = gaussian_noise(out, rng, rng.uniform(2.0, 10.0))
    if rng.random() < 0.2:
        out = jpeg_compress(out, int(rng.integers(30, 91)))
    return out.copy() if out is image else out


# --------------------------------------------------------------------------- copy-paste


def copy_paste(dst_image: np.ndarray, dst_masks: np.ndarray, src_image: np.ndarray,
               src_masks: np.ndarray, rng: np.random.Generator, max_objects: int = 3,
               min_area_px: int = MIN_AREA_PX,
               scale: tuple[float, float] = (0.3, 1.5)) -> tuple[np.ndarray, np.ndarray]:
    """Paste 1..max_objects random source instances onto the destination.

    dst_image (H, W, 3) uint8, dst_masks (N, H, W) bool; src_image (Hs, Ws, 3) uint8,
    src_masks (Ns, Hs, Ws) bool, any size. Each pasted instance is rescaled by a factor in
    ``scale`` (shrunk further if needed to fit in the destination) and placed with its centre
    anywhere in the image (so it may be cut at the border). Pixels are alpha-blended through a
    ~1-2 px feathered mask so a hard seam is no shortcut, but the instance's mask is the hard
    mask. Destination (and earlier pasted) instances lose the pixels a paste covers.

    Returns image (H, W, 3) uint8 and masks (M, H, W) bool: surviving destination instances in
    their original order, then surviving pasted ones; any under ``min_area_px`` are dropped.
    """
    out = dst_image.copy()
    h, w = out.shape[:2]
    n_src = len(src_masks)
    if n_src == 0 or max_objects < 1:
        return out, _keep_large(dst_masks.copy(), min_area_px)
    k = int(rng.integers(1, min(max_objects, n_src) + 1))
    chosen = rng.choice(n_src, size=k, replace=False)

    n_dst = len(dst_masks)
    masks = np.zeros((n_dst + k, h, w), bool)
    masks[:n_dst] = dst_masks
    count = n_dst  # planes filled so far: destination ones, then each successful paste
    for i in chosen:
        src_mask = np.ascontiguousarray(src_masks[i], dtype=bool).view(np.uint8)
        bx, by, bw, bh = cv2.boundingRect(src_mask)
        if bw == 0 or bh == 0:
            continue
        s = min(rng.uniform(scale[0], scale[1]), w / bw, h / bh)
        pw, ph = bw * s, bh * s
        px = rng.uniform(-pw / 2, w - pw / 2)  # top-left of the scaled box in dst
        py = rng.uniform(-ph / 2, h - ph / 2)
        # Destination ROI: the scaled box plus room for the feather, clipped to the image.
        pad = 3
        x0, y0 = max(0, math.floor(px) - pad), max(0, math.floor(py) - pad)
        x1, y1 = min(w, math.ceil(px + pw) + pad), min(h, math.ceil(py + ph) + pad)
        if x1 <= x0 or y1 <= y0:
            continue
        # Source region around the object with a margin wide enough for the feather.
        m = math.ceil(pad / s) + 2
        sx0, sy0 = max(0, bx - m), max(0, by - m)
        sx1, sy1 = min(src_image.shape[1], bx + bw + m), min(src_image.shape[0], by + bh + m)
        src_patch = src_image[sy0:sy1, sx0:sx1]
        if s < 0.8:  # pre-filter against aliasing; warpAffine samples bilinearly
            src_patch = gaussian_blur(src_patch, 0.45 / s)
        # dst_roi = s * (src_region - (bx - sx0, by - sy0)) + (px - x0, py - y0)
        tx, ty = px - x0 - s * (bx - sx0), py - y0 - s * (by - sy0)
        affine = np.array([[s, 0.0, tx], [0.0, s, ty]], np.float64)
        size = (x1 - x0, y1 - y0)
        patch = cv2.warpAffine(src_patch, affine, size, flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)
        hard = cv2.warpAffine(np.ascontiguousarray(src_mask[sy0:sy1, sx0:sx1]), affine, size,
                              flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if not hard.any():
            continue
        alpha = cv2.GaussianBlur(hard.astype(np.float32), (0, 0), sigmaX=rng.uniform(0.6, 1.2))
        alpha = alpha[..., None]
        roi = out[y0:y1, x0:x1]
        roi[...] = (alpha * patch + (1.0 - alpha) * roi + 0.5).astype(np.uint8)

        hard_bool = hard.view(bool)
        masks[:count, y0:y1, x0:x1] &= ~hard_bool  # only the ROI can change
        masks[count, y0:y1, x0:x1] = hard_bool
        count += 1

    # Order is destination instances first, pasted ones after.
    return out, _keep_large(masks[:count], min_area_px)


# --------------------------------------------------------------------------- pipeline


def compose_training_sample(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator,
                            out_size: int = 256,
                            paste_source: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None,
                            min_area_px: int = MIN_AREA_PX) -> tuple[np.ndarray, np.ndarray]:
    """The pretraining augmentation pipeline for one (image, masks) sample.

    1. random_resized_crop (p=0.8; up to 5 tries to keep >= 1 instance), else resize_longest;
    2. hflip (p=0.5);
    3. copy_paste from ``paste_source()`` (p=0.5, only if given; called with no arguments and
       must return (image (Hs, Ws, 3) uint8, masks (Ns, Hs, Ws) bool));
    4. photometric (p=0.8).

    Returns image (h, w, 3) uint8 with max(h, w) == out_size and masks (M, h, w) bool. If the
    input had an instance the output has at least one, unless every instance vanishes even in
    a plain resize (sub-pixel objects after a large downscale).
    """
    had_any = len(masks) > 0
    sample = None
    if rng.random() < 0.8:
        for _ in range(5):
            img, m = random_resized_crop(image, masks, rng, out_size=out_size,
                                         min_area_px=min_area_px)
            if len(m) > 0 or not had_any:
                sample = (img, m)
                break
    if sample is None:
        sample = resize_longest(image, masks, out_size, min_area_px)
        if had_any and len(sample[1]) == 0:
            # Only tiny instances: keep whatever survives rather than return none.
            sample = resize_longest(image, masks, out_size, min_area_px=1)
    img, m = sample

    if rng.random() < 0.5:
        img, m = hflip(img, m)
    if paste_source is not None and rng.random() < 0.5:
        src_img, src_m = paste_source()
        pasted_img, pasted_m = copy_paste(img, m, src_img, src_m, rng, min_area_px=min_area_px)
        if len(pasted_m) > 0 or not had_any:
            img, m = pasted_img, pasted_m
    if rng.random() < 0.8:
        img = photometric(img, rng)
    return img, m
