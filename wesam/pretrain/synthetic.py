"""Procedural scenes with exact instance masks, for teaching sam-mini "objecthood".

A scene is a textured background, a little unlabelled clutter, 1..8 textured objects of many
shape families painted back to front (later objects occlude earlier ones), maybe a few more
clutter marks on top, then camera-like degradations. Instance masks hold the *visible* pixels
of each object, so they are exact and mutually exclusive by construction (a label map is
painted alongside the image and split at the end).

Everything is seeded: ``SyntheticScenes(seed).sample(index)`` draws from
``np.random.default_rng([seed, index])`` and nothing else. Pure NumPy + OpenCV, a few ms per
256 px scene on one core.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .augment import (
    channel_affine,
    gaussian_blur,
    gaussian_noise,
    jpeg_compress,
    motion_blur,
)

# Seed of the fixed held-out set. Training streams must use any *other* seed; streams with
# different seeds are statistically independent (NumPy SeedSequence on [seed, index]).
VALIDATION_SEED = 20241121

MAX_INSTANCES = 8
MIN_VISIBLE_FRACTION = 0.003  # instances with less visible area are dropped
AREA_RANGE = (0.01, 0.40)  # target object area as a fraction of the image

SHAPES = ("ellipse", "rect", "convex", "concave", "star", "blob", "thin", "ring")
_SHAPE_P = np.array([0.15, 0.13, 0.13, 0.13, 0.1, 0.16, 0.1, 0.1])
TEXTURES = ("flat", "gradient", "stripes", "dots", "checker", "noise")
_TEXTURE_P = np.array([0.3, 0.2, 0.14, 0.1, 0.1, 0.16])


# --------------------------------------------------------------------------- colours


def _random_color(rng: np.random.Generator) -> np.ndarray:
    """(3,) float32 RGB in [0, 255]: saturated hues, arbitrary RGB or near-greys."""
    u = rng.random()
    if u < 0.45:
        hsv = np.array([[[rng.integers(0, 180), rng.integers(60, 256), rng.integers(50, 256)]]],
                       np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
    if u < 0.85:
        return rng.uniform(0, 255, 3).astype(np.float32)
    return np.clip(rng.uniform(10, 245) + rng.normal(0, 8, 3), 0, 255).astype(np.float32)


def _near_color(rng: np.random.Generator, ref: np.ndarray, spread: float) -> np.ndarray:
    """(3,) float32 colour within about ``spread`` levels of ``ref``: low-contrast cases."""
    return np.clip(ref + rng.normal(0, spread, 3), 0, 255).astype(np.float32)


# --------------------------------------------------------------------------- textures
# Textures are built as a uint8 weight map t (h, w) and coloured through a 256-entry lookup
# table; float (h, w, 3) arithmetic was the main cost of a scene before.


def _lowfreq(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 1) -> np.ndarray:
    """Smooth noise: a random grid of about ``cells`` cells upsampled to (h, w).

    Returns uint8 over [0, 255], (h, w) for one channel else (h, w, channels).
    """
    gh = max(2, round(cells * h / max(h, w)))
    gw = max(2, round(cells * w / max(h, w)))
    grid = rng.integers(0, 256, (gh, gw, channels), dtype=np.uint8)
    # Bicubic to <= 8 px per cell, then bilinear: looks the same as one bicubic step (the
    # field is already smooth at that scale) but OpenCV's bicubic from tiny grids is ~6x slower.
    mh, mw = min(h, gh * 8), min(w, gw * 8)
    out = cv2.resize(grid, (mw, mh), interpolation=cv2.INTER_CUBIC)
    if (mh, mw) != (h, w):
        out = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)
    return out.reshape(h, w) if channels == 1 else out.reshape(h, w, channels)


def _rotated_coords(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotated pixel coordinates (u, v), each (h, w) float32."""
    a = rng.uniform(0, math.pi)
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    c, s = np.float32(math.cos(a)), np.float32(math.sin(a))
    return xs * c + ys * s, ys * c - xs * s


def _unit_to_u8(t: np.ndarray) -> np.ndarray:
    """Weight map in [0, 1] (float or bool) -> uint8 [0, 255]."""
    if t.dtype == bool:
        return t.view(np.uint8) * np.uint8(255)
    return cv2.convertScaleAbs(t, alpha=255.0)


def _colorize(t8: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """Blend c1 -> c2 by weight map t8 (h, w) uint8: (h, w, 3) uint8."""
    ramp = np.arange(256, dtype=np.float32)[:, None] / 255.0
    lut = np.clip(c1 + ramp * (c2 - c1), 0, 255).astype(np.uint8)
    return np.take(lut, t8, axis=0)


def _texture(rng: np.random.Generator, h: int, w: int, c1: np.ndarray, c2: np.ndarray,
             period_scale: float = 1.0, kind: str | None = None) -> np.ndarray:
    """A fill pattern between colours c1 and c2 ((3,) float): (h, w, 3) uint8.

    ``kind`` is one of TEXTURES (random if None); ``period_scale`` stretches pattern periods
    (backgrounds use coarser patterns).
    """
    if kind is None:
        kind = TEXTURES[rng.choice(len(TEXTURES), p=_TEXTURE_P)]
    if kind == "flat":  # flat colour plus smooth per-channel noise of random strength
        amp = rng.uniform(0, 35)
        if amp < 4:
            tex = np.empty((h, w, 3), np.uint8)
            tex[:] = np.clip(c1, 0, 255).astype(np.uint8)
        else:
            noise = _lowfreq(rng, h, w, int(rng.integers(2, 12)), 3)
            ramp = np.arange(256, dtype=np.float32)[:, None] / 255.0 - 0.5
            lut = np.clip(c1 + ramp * (2 * amp), 0, 255).astype(np.uint8)
            tex = cv2.LUT(noise, lut.reshape(256, 1, 3))
    elif kind == "gradient":
        if rng.random() < 0.6:
            u, _ = _rotated_coords(rng, h, w)
            lo, hi = float(u.min()), float(u.max())
            t8 = cv2.convertScaleAbs(u, alpha=255.0 / max(hi - lo, 1.0), beta=-255.0 * lo / max(hi - lo, 1.0))
        else:  # radial
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ys = (np.arange(h, dtype=np.float32)[:, None] - cy) ** 2
            xs = (np.arange(w, dtype=np.float32)[None, :] - cx) ** 2
            t8 = cv2.convertScaleAbs(np.sqrt(ys + xs), alpha=255.0 / max(h, w))
        tex = _colorize(t8, c1, c2)
    elif kind in ("stripes", "checker", "dots"):
        period = rng.uniform(4, 24) * period_scale
        u, v = _rotated_coords(rng, h, w)
        if kind == "stripes":
            wave = np.sin(u * np.float32(2 * math.pi / period) + np.float32(rng.uniform(0, 6.3)))
            if rng.random() < 0.5:
                t8 = _unit_to_u8(wave > rng.uniform(-0.6, 0.6))  # hard, random duty cycle
            else:
                t8 = cv2.convertScaleAbs(wave, alpha=127.5, beta=127.5)
        elif kind == "checker":
            t8 = _unit_to_u8((np.floor(u / period) + np.floor(v / period)) % 2 > 0.5)
        else:
            du = np.mod(u, period) - period / 2
            dv = np.mod(v, period) - period / 2
            t8 = _unit_to_u8(du * du + dv * dv < (period * rng.uniform(0.15, 0.42)) ** 2)
        tex = _colorize(t8, c1, c2)
    else:  # two-colour smooth noise, sometimes thresholded into camouflage patches
        t8 = _lowfreq(rng, h, w, int(rng.integers(3, 16)))
        if rng.random() < 0.4:
            t8 = _unit_to_u8(t8 > 127)
        tex = _colorize(t8, c1, c2)
    if rng.random() < 0.35:  # soft shading so objects are not always flat
        shade = cv2.convertScaleAbs(_lowfreq(rng, h, w, int(rng.integers(2, 4))),
                                    alpha=0.6 / 1.3, beta=0.7 / 1.3 * 255)
        tex = cv2.multiply(tex, cv2.merge((shade, shade, shade)), scale=1.3 / 255)
    return tex


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A background image (size, size, 3) uint8 of one of four families."""
    kind = rng.choice(4, p=[0.2, 0.3, 0.2, 0.3])
    c1, c2 = _random_color(rng), _random_color(rng)
    if rng.random() < 0.3:
        c2 = _near_color(rng, c1, 25)
    if kind == 0:  # smooth gradient, linear or radial
        return _texture(rng, size, size, c1, c2, kind="gradient")
    if kind == 1:  # low-frequency colour noise; per-channel ranges keep it from being grey
        noise = _lowfreq(rng, size, size, int(rng.integers(2, 20)), 3)
        lo = np.minimum(c1, c2)
        span = np.maximum(np.abs(c2 - c1), 20)
        ramp = np.arange(256, dtype=np.float32)[:, None] / 255.0
        lut = np.clip(lo + ramp * span, 0, 255).astype(np.uint8)
        return cv2.LUT(noise, lut.reshape(256, 1, 3))
    if kind == 2:  # stripes / checkerboard / dots
        pattern = ("stripes", "checker", "dots")[rng.integers(0, 3)]
        return _texture(rng, size, size, c1, c2, period_scale=rng.uniform(0.7, 3.0), kind=pattern)
    # Random crop of 2-3 textures blended through soft or sharpened low-frequency masks.
    big = int(size * rng.uniform(1.0, 1.3))
    tex = _texture(rng, big, big, c1, c2, period_scale=rng.uniform(0.7, 3.0))
    for _ in range(int(rng.integers(1, 3))):
        other = _texture(rng, big, big, _random_color(rng), _random_color(rng),
                         period_scale=rng.uniform(0.7, 3.0))
        alpha = _lowfreq(rng, big, big, int(rng.integers(2, 7))).astype(np.float32) / 255.0
        if rng.random() < 0.3:
            # Sharpened, but kept soft-edged: crisp blend boundaries would look like
            # unlabelled objects rather than background stuff.
            alpha = np.clip((alpha - 0.5) * np.float32(rng.uniform(2, 8)) + 0.5, 0, 1)
        tex = cv2.blendLinear(other, tex, alpha, 1.0 - alpha)
    y0, x0 = rng.integers(0, big - size + 1, 2)
    return np.ascontiguousarray(tex[y0:y0 + size, x0:x0 + size])


# --------------------------------------------------------------------------- shapes
# Each drawer paints value 1 into a zeroed (size, size) uint8 canvas, centred near (cx, cy),
# covering roughly ``area`` pixels before clipping at the image border.


def _poly(canvas: np.ndarray, pts: np.ndarray) -> None:
    # 4 fractional bits: sub-pixel vertices keep small polygons from snapping to the grid.
    cv2.fillPoly(canvas, [np.round(pts * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)


def _rotate(pts: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _draw_ellipse(rng: np.random.Generator, canvas: np.ndarray, cx: float, cy: float,
                  area: float) -> None:
    aspect = rng.uniform(0.3, 1.0)
    a = math.sqrt(area / (math.pi * aspect))
    cv2.ellipse(canvas, ((cx, cy), (2 * a, 2 * a * aspect), rng.uniform(0, 180)), 1, -1)


def _draw_rect(rng: np.random.Generator, canvas: np.ndarray, cx: float, cy: float,
               area: float) -> None:
    aspect = rng.uniform(0.25, 1.0)
    w = math.sqrt(area / aspect)
    _poly(canvas, cv2.boxPoints(((cx, cy), (w, w * aspect), rng.uniform(0, 180))))


def _ring_angles(rng: np.random.Generator, n: int) -> np.ndarray:
    """n increasing angles, evenly spaced plus jitter, so polygons never fold over."""
    return np.linspace(0, 2 * math.pi, n, endpoint=False) + rng.uniform(0, 0.8 * 2 * math.pi / n, n)


def _draw_convex(rng: np.random.Generator, canvas: np.ndarray, cx: float, cy: float,
                 area: float) -> None:
    n = int(rng.integers(3, 10))
    aspect = rng.uniform(0.5, 1.0)
    t = _ring_angles(rng, n)
    # Points in angular order on an ellipse always bound a convex polygon.
    r = math.sqrt(area / (math.pi * aspect * 0.8))
    pts = np.stack([np.cos(t) * r, np.sin(t) * r * aspect], 1)
    _poly(canvas, _rotate(pts, rng.uniform(0, math.pi)) + (cx, cy))


def _draw_concave(rng: np.random.Generator, canvas: np.ndarray, cx: float, cy: float,
                  area: float) -> None:
    n = int(rng.integers(5, 15))
    t = _ring_angles(rng, n)
    rho = rng.uniform(0.3, 1.0, n)
    r = math.sqrt(area / (math.pi * float(np.mean(rho ** 2)) * 0.9))
    pts = np.stack([np.cos(t), np.sin(t)], 1) * (rho * r)[:, None]
    _poly(canvas, pts + (cx, cy))


def _draw_star(rng: np.random.Generator, canvas: np.ndarray, cx: float, cy: float,
               area: float) -> None:
    n = int(rng.integers(4, 10))
    inner = rng.uniform(0.3, 0.6)
    t = np.linspace(0, 2 * math.pi, 2 * n, endpoint=False) + rng.uniform(0, math.pi)
    # Area of a star polygon with outer radius r and inner radius inner*r.
    r = math.sqrt(area / (n * inner * math.sin(math.pi / n)))
    rho = np.where(np.arange(2 * n) % 2 == 0, r, r * inner)
    _poly(canvas, np.stack([np.cos(t), np.sin(t)], 1) * rho[:, None] + (cx, cy))


def _draw_blob(rng: np.random.Generator, canvas: np.ndarray, cx: float, cy: float,
               area: float) -> None:
    size = canvas.shape[0]
    g = 48
    # Smooth noise minus a radial bowl: thresholding gives one organic central lump.
    field = _lowfreq(rng, g, g, int(rng.integers(3, 7)))
    d = (np.arange(g, dtype=np.float32) - (g - 1) / 2) / (g / 2)
    field = field - np.float32(rng.uniform(0.5, 1.2)) * (d[:, None] ** 2 + d[None, :] ** 2)
    aspect = rng.uniform(0.5, 1.0)
    bw = int(math.sqrt(area / aspect) * 1.6) + 4
    bh = max(4, int(bw * aspect))
    frac = min(0.9, area / (bw * bh))
    thr = np.partition(field.ravel(), int((1 - frac) * g * g))[int((1 - frac) * g * g)]
    if rng.random() < 0.5:
        bw, bh = bh, bw
    blob = (cv2.resize(field, (bw, bh), interpolation=cv2.INTER_CUBIC) > thr).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(blob, connectivity=8)
    if n > 2:  # keep the biggest piece so an instance is one connected object
        blob = (lab == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
    x0, y0 = round(cx - bw / 2), round(cy - bh / 2)
    cx0, cy0 = max(0, x0), max(0, y0)
    cx1, cy1 = min(size, x0 + bw), min(size, y0 + bh)
    if cx1 > cx0 and cy1 > cy0:
        canvas[cy0:cy1, cx0:cx1] |= blob[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]


def _draw_thin(rng: np.random.Generator, canvas: np.ndarray, cx: float, cy: float,
               area: float) -> None:
    size = canvas.shape[0]
    area = min(area, 0.06 * size * size)  # "thin" stops being thin beyond this
    aspect = rng.uniform(0.03, 0.15)  # width / length
    length = min(math.sqrt(area / aspect), 1.2 * size)
    width = max(1.0, area / length)
    if rng.random() < 0.5:  # straight bar
        _poly(canvas, cv2.boxPoints(((cx, cy), (length, width), rng.uniform(0, 180))))
        return
    # Smooth curve: a random walk whose turning rate is itself smooth.
    n = 32
    turn = np.cumsum(rng.normal(0, 0.12, n))
    heading = rng.uniform(0, 2 * math.pi) + np.cumsum(turn * 0.3 + rng.normal(0, 0.05, n))
    pts = np.cumsum(np.stack([np.cos(heading), np.sin(heading)], 1) * (length / n), 0)
    pts = pts - pts.mean(0) + (cx, cy)
    cv2.polylines(canvas, [np.round(pts * 16).astype(np.int32)], False, 1, max(1, round(width)),
                  cv2.LINE_8, shift=4)


def _draw_ring(rng: np.random.Generator, canvas: np.ndarray, cx: float, cy: float,
               area: float) -> None:
    hole = rng.uniform(0.35, 0.75)  # inner/outer size ratio
    angle = rng.uniform(0, 180)
    aspect = rng.uniform(0.5, 1.0)
    if rng.random() < 0.3:  # rectangular frame
        w = math.sqrt(area / (aspect * (1 - hole * hole)))
        _poly(canvas, cv2.boxPoints(((cx, cy), (w, w * aspect), angle)))
        inner = cv2.boxPoints(((cx, cy), (w * hole, w * aspect * hole), angle))
        cv2.fillPoly(canvas, [np.round(inner * 16).astype(np.int32)], 0, cv2.LINE_8, shift=4)
        return
    a = math.sqrt(area / (math.pi * aspect * (1 - hole * hole)))
    cv2.ellipse(canvas, ((cx, cy), (2 * a, 2 * a * aspect), angle), 1, -1)
    # Slightly off-centre holes make rings less perfect.
    off = rng.normal(0, 0.08 * a * (1 - hole), 2)
    cv2.ellipse(canvas, ((cx + off[0], cy + off[1]), (2 * a * hole, 2 * a * aspect * hole), angle),
                0, -1)


_DRAWERS = {
    "ellipse": _draw_ellipse, "rect": _draw_rect, "convex": _draw_convex,
    "concave": _draw_concave, "star": _draw_star, "blob": _draw_blob, "thin": _draw_thin,
    "ring": _draw_ring,
}
_CLUTTER_SHAPES = ("ellipse", "rect", "convex", "concave", "thin")


def _shape_in_bbox(rng: np.random.Generator, kind: str, scratch: np.ndarray, cx: float,
                   cy: float, area: float) -> tuple[int, int, np.ndarray] | None:
    """Draw a shape on the scratch canvas.

    Returns (x, y, mask) with mask (h, w) uint8 in {0, 1} over the shape's bounding box at
    (x, y), or None if nothing landed in the image.
    """
    scratch[:] = 0
    _DRAWERS[kind](rng, scratch, cx, cy, area)
    x, y, w, h = cv2.boundingRect(scratch)
    if w == 0 or h == 0:
        return None
    return x, y, scratch[y:y + h, x:x + w].copy()


def _paste(dst: np.ndarray, src: np.ndarray, mask: np.ndarray) -> None:
    """dst[mask] = src[mask] in place (dst may be a view); mask (h, w) uint8 {0, 1}.

    cv2.copyTo is ~100x faster than boolean fancy indexing on (h, w, 3).
    """
    out = cv2.copyTo(src, mask, dst)
    if out is not dst:  # the binding had to reallocate: copy the result back
        dst[...] = out


# --------------------------------------------------------------------------- scene


def _clutter(rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, scratch: np.ndarray,
             erase_labels: bool) -> None:
    """One small unlabelled flat-coloured mark; if ``erase_labels`` it occludes instances."""
    size = image.shape[0]
    area = math.exp(rng.uniform(math.log(0.0002), math.log(0.0025))) * size * size
    kind = _CLUTTER_SHAPES[rng.integers(0, len(_CLUTTER_SHAPES))]
    drawn = _shape_in_bbox(rng, kind, scratch, rng.uniform(0, size), rng.uniform(0, size), area)
    if drawn is None:
        return
    x, y, m = drawn
    h, w = m.shape
    fill = np.empty((h, w, 3), np.uint8)
    fill[:] = _random_color(rng).astype(np.uint8)
    _paste(image[y:y + h, x:x + w], fill, m)
    if erase_labels:
        labels[y:y + h, x:x + w][m.view(bool)] = 0


def _vignette(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Darken towards the corners around a slightly off-centre point."""
    h, w = image.shape[:2]
    cy, cx = h / 2 * (1 + rng.uniform(-0.3, 0.3)), w / 2 * (1 + rng.uniform(-0.3, 0.3))
    ys = ((np.arange(h, dtype=np.float32) - cy) / (h / 2)) ** 2
    xs = ((np.arange(w, dtype=np.float32) - cx) / (w / 2)) ** 2
    gain = np.clip(1.0 - np.float32(rng.uniform(0.15, 0.5)) * (ys[:, None] + xs[None, :]), 0.2, 1.0)
    return (image * gain[..., None]).astype(np.uint8)


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera-like image degradations, each applied with its own probability."""
    gain, bias = np.ones(3, np.float32), np.zeros(3, np.float32)
    if rng.random() < 0.5:  # brightness/contrast about the mean level
        contrast = rng.uniform(0.65, 1.35)
        mean = float(np.mean(cv2.mean(image)[:3]))
        gain *= contrast
        bias += mean * (1 - contrast) + rng.uniform(-30, 30)
    if rng.random() < 0.3:  # colour cast
        gain *= 1 + rng.normal(0, 0.07, 3).astype(np.float32)
        bias += rng.normal(0, 8, 3).astype(np.float32)
    if not (np.all(gain == 1) and np.all(bias == 0)):
        image = channel_affine(image, gain, bias)
    if rng.random() < 0.15:
        image = _vignette(image, rng)
    if rng.random() < 0.25:
        image = gaussian_blur(image, rng.uniform(0.4, 1.8))
    elif rng.random() < 0.12:
        image = motion_blur(image, rng)
    if rng.random() < 0.35:
        image = gaussian_noise(image, rng, rng.uniform(2, 14))
    if rng.random() < 0.3:
        image = jpeg_compress(image, int(rng.integers(30, 91)))
    return image


def _try_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    image = _background(rng, size)
    labels = np.zeros((size, size), np.uint8)  # 0 = background, i = i-th painted object
    scratch = np.zeros((size, size), np.uint8)

    for _ in range(int(rng.integers(0, 16))):  # clutter under the objects: part of background
        _clutter(rng, image, labels, scratch, erase_labels=False)

    n = int(rng.integers(1, MAX_INSTANCES + 1))
    lo, hi = AREA_RANGE
    areas = np.exp(rng.uniform(math.log(lo), math.log(hi), n)) * size * size
    if rng.random() < 0.7:  # big ones behind usually; sometimes not, for heavy occlusion
        areas = np.sort(areas)[::-1]
    for i, area in enumerate(areas, start=1):
        kind = SHAPES[rng.choice(len(SHAPES), p=_SHAPE_P)]
        cx, cy = rng.uniform(0.05, 0.95, 2) * size
        drawn = _shape_in_bbox(rng, kind, scratch, cx, cy, float(area))
        if drawn is None:
            continue
        x, y, m = drawn
        h, w = m.shape
        region = image[y:y + h, x:x + w]
        if rng.random() < 0.2:  # low contrast against whatever it covers
            under = np.array(cv2.mean(region, mask=m)[:3], np.float32)
            c1 = _near_color(rng, under, rng.uniform(6, 20))
            c2 = _near_color(rng, c1, 10)
        else:
            c1 = _random_color(rng)
            c2 = _near_color(rng, c1, 35) if rng.random() < 0.4 else _random_color(rng)
        _paste(region, _texture(rng, h, w, c1, c2), m)
        labels[y:y + h, x:x + w][m.view(bool)] = i

    if rng.random() < 0.4:  # clutter on top: occludes instances, so erases their labels
        for _ in range(int(rng.integers(1, 5))):
            _clutter(rng, image, labels, scratch, erase_labels=True)

    image = _degrade(image, rng)

    visible = np.bincount(labels.ravel(), minlength=n + 1)
    keep = np.flatnonzero(visible[1:] >= MIN_VISIBLE_FRACTION * size * size) + 1
    if len(keep) == 0:
        return None
    masks = labels[None] == keep.astype(np.uint8)[:, None, None]
    return np.ascontiguousarray(image), masks


def generate_scene(rng: np.random.Generator, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One random scene.

    Returns image (size, size, 3) uint8 RGB and masks (N, size, size) bool with
    1 <= N <= MAX_INSTANCES, back-to-front order: visible pixels only, mutually exclusive,
    each covering at least MIN_VISIBLE_FRACTION of the image.
    """
    while True:  # redraw the rare scene where every object got clipped or occluded away
        scene = _try_scene(rng, size)
        if scene is not None:
            return scene


class SyntheticScenes:
    """Infinite, seeded stream of scenes: ``sample(i)`` depends only on (seed, i, size).

    Training streams must use a seed other than VALIDATION_SEED.
    """

    def __init__(self, seed: int, size: int = 256) -> None:
        self.seed = int(seed)
        self.size = int(size)

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Scene ``index``: image (size, size, 3) uint8, masks (N, size, size) bool."""
        return generate_scene(np.random.default_rng([self.seed, int(index)]), self.size)


def synthetic_validation_set(n: int = 200, seed: int = VALIDATION_SEED,
                             size: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
    """The fixed held-out synthetic set: scenes 0..n-1 of the VALIDATION_SEED stream.

    Training must draw from SyntheticScenes with any other seed so this set stays unseen.
    Returns a list of (image (size, size, 3) uint8, masks (N, size, size) bool).
    """
    stream = SyntheticScenes(seed, size)
    return [stream.sample(i) for i in range(n)]
