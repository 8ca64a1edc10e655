"""Pretraining augmentations keep image and instance masks aligned and valid."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from wesam.pretrain.augment import (
    MIN_AREA_PX,
    compose_training_sample,
    copy_paste,
    hflip,
    photometric,
    random_resized_crop,
    resize_longest,
)
from wesam.pretrain.synthetic import SyntheticScenes

BG = (128, 128, 128)
DST_COLORS = [(230, 20, 20), (20, 210, 30), (30, 40, 240), (240, 230, 20)]
SRC_COLORS = [(240, 20, 230), (20, 230, 230), (10, 10, 10), (250, 250, 250)]


def _painted_sample(h: int, w: int, colors: list[tuple[int, int, int]],
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Grey image with non-overlapping ellipses/rectangles, each a flat known colour."""
    rng = np.random.default_rng(seed)
    image = np.empty((h, w, 3), np.uint8)
    image[:] = BG
    masks = np.zeros((len(colors), h, w), bool)
    cols = len(colors)
    for i, color in enumerate(colors):
        canvas = np.zeros((h, w), np.uint8)
        cell_w = w // cols
        cx, cy = cell_w * i + cell_w // 2, int(rng.integers(h // 3, 2 * h // 3))
        rx, ry = int(cell_w * 0.4), int(h * rng.uniform(0.15, 0.3))
        if i % 2:
            cv2.rectangle(canvas, (cx - rx, cy - ry), (cx + rx, cy + ry), 1, -1)
        else:
            cv2.ellipse(canvas, (cx, cy), (rx, ry), 0, 0, 360, 1, -1)
        masks[i] = canvas.astype(bool)
        image[masks[i]] = color
    return image, masks


def _alignment(image: np.ndarray, masks: np.ndarray, palette: list[tuple[int, int, int]],
               erode_px: int = 1) -> tuple[float, list[int]]:
    """Fraction of eroded-mask pixels whose colour is nearest their instance's palette colour.

    The instance colour is the palette entry nearest the mask's median colour. Returns the
    fraction and the palette index of each mask.
    """
    pal = np.array([BG, *palette], np.float32)
    kernel = np.ones((2 * erode_px + 1, 2 * erode_px + 1), np.uint8)
    good = total = 0
    ids = []
    for m in masks:
        inner = cv2.erode(m.astype(np.uint8), kernel).astype(bool)
        if not inner.any():
            ids.append(-1)
            continue
        px = image[inner].astype(np.float32)
        nearest = np.argmin(((px[:, None, :] - pal[None]) ** 2).sum(-1), axis=1)
        ident = int(np.argmin(((np.median(px, 0) - pal) ** 2).sum(-1)))
        ids.append(ident - 1)
        good += int((nearest == ident).sum())
        total += len(px)
    return (good / total if total else 1.0), ids


def _check_masks(masks: np.ndarray, shape: tuple[int, int], min_area: int = MIN_AREA_PX) -> None:
    assert masks.dtype == bool and masks.ndim == 3 and masks.shape[1:] == shape
    if len(masks):
        assert masks.sum(axis=0).max() <= 1
        assert masks.reshape(len(masks), -1).sum(axis=1).min() >= min_area


def test_random_resized_crop_aligned_and_shaped() -> None:
    image, masks = _painted_sample(200, 300, DST_COLORS)
    for seed in range(25):
        rng = np.random.default_rng(seed)
        out, out_masks = random_resized_crop(image, masks, rng, out_size=256)
        assert out.dtype == np.uint8 and out.shape[2] == 3 and max(out.shape[:2]) == 256
        aspect = out.shape[1] / out.shape[0]
        assert 0.7 < aspect < 1.45  # the crop ratio range, give or take rounding
        _check_masks(out_masks, out.shape[:2])
        frac, ids = _alignment(out, out_masks, DST_COLORS)
        assert frac > 0.98, (seed, frac)
        assert len(set(ids) - {-1}) == len([i for i in ids if i != -1])  # distinct instances
    # A mask shifted by a few pixels fails the same check: the check has teeth.
    shifted = np.roll(masks, 6, axis=2)
    assert _alignment(image, shifted, DST_COLORS)[0] < 0.95


def test_random_resized_crop_deterministic() -> None:
    image, masks = _painted_sample(200, 300, DST_COLORS)
    a = random_resized_crop(image, masks, np.random.default_rng(5))
    b = random_resized_crop(image, masks, np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_random_resized_crop_drops_small_instances() -> None:
    image, masks = _painted_sample(200, 300, DST_COLORS[:2])
    tiny = np.zeros((1, 200, 300), bool)
    tiny[0, 10:16, 10:16] = True  # 36 px; ~9 px after halving the resolution
    masks = np.concatenate([masks, tiny])
    whole = (300 / 200, 300 / 200)  # ratio of the full image, so the crop is the full image
    out, out_masks = random_resized_crop(image, masks, np.random.default_rng(0), out_size=150,
                                         scale=(1.0, 1.0), ratio=whole)
    assert out.shape == (100, 150, 3)
    assert len(out_masks) == 2
    _, keep_all = random_resized_crop(image, masks, np.random.default_rng(0), out_size=150,
                                      scale=(1.0, 1.0), ratio=whole, min_area_px=1)
    assert len(keep_all) == 3


def test_resize_longest() -> None:
    image, masks = _painted_sample(200, 300, DST_COLORS)
    out, out_masks = resize_longest(image, masks, 128)
    assert out.shape == (85, 128, 3)
    _check_masks(out_masks, (85, 128))
    assert _alignment(out, out_masks, DST_COLORS)[0] > 0.98
    same, same_masks = resize_longest(image, masks, 300)
    assert np.array_equal(same, image) and np.array_equal(same_masks, masks)


def test_hflip() -> None:
    image, masks = _painted_sample(200, 300, DST_COLORS)
    out, out_masks = hflip(image, masks)
    assert np.array_equal(out, image[:, ::-1]) and np.array_equal(out_masks, masks[:, :, ::-1])
    assert _alignment(out, out_masks, DST_COLORS)[0] == 1.0
    back, back_masks = hflip(out, out_masks)
    assert np.array_equal(back, image) and np.array_equal(back_masks, masks)


def test_photometric() -> None:
    image, _ = SyntheticScenes(3).sample(0)
    before = image.copy()
    outs = [photometric(image, np.random.default_rng(s)) for s in range(10)]
    assert np.array_equal(image, before), "input must not be modified"
    for out in outs:
        assert out.shape == image.shape and out.dtype == np.uint8
    assert any(not np.array_equal(out, image) for out in outs)
    assert np.array_equal(photometric(image, np.random.default_rng(4)), outs[4])


def test_copy_paste_aligned_different_sizes() -> None:
    dst_image, dst_masks = _painted_sample(200, 300, DST_COLORS, seed=1)
    src_image, src_masks = _painted_sample(96, 128, SRC_COLORS, seed=2)
    saw_paste = False
    for seed in range(25):
        rng = np.random.default_rng(seed)
        out, out_masks = copy_paste(dst_image, dst_masks, src_image, src_masks, rng)
        assert out.shape == dst_image.shape and out.dtype == np.uint8
        _check_masks(out_masks, (200, 300))
        # Destination instances come first, pasted ones after.
        frac, ids = _alignment(out, out_masks, DST_COLORS + SRC_COLORS, erode_px=2)
        assert frac > 0.97, (seed, frac)
        kinds = [i >= len(DST_COLORS) for i in ids if i != -1]
        assert kinds == sorted(kinds)
        saw_paste |= any(kinds)
    assert saw_paste


def test_copy_paste_removes_covered_pixels() -> None:
    h, w = 128, 160
    src_image, src_masks = _painted_sample(h, w, SRC_COLORS, seed=3)
    dst_image = np.full((h, w, 3), 90, np.uint8)
    dst_masks = np.ones((1, h, w), bool)  # one instance covering everything
    for seed in range(10):
        out, out_masks = copy_paste(dst_image, dst_masks, src_image, src_masks,
                                    np.random.default_rng(seed))
        pasted = out_masks[1:].any(axis=0)
        assert len(out_masks) >= 2
        assert np.array_equal(out_masks[0], ~pasted)
        # The feathered blend never leaks into pixels far from the pasted objects.
        far = cv2.dilate(pasted.astype(np.uint8), np.ones((11, 11), np.uint8)) == 0
        assert np.all(out[far] == 90)
    assert np.array_equal(dst_masks, np.ones((1, h, w), bool)), "inputs must not be modified"


def test_copy_paste_drops_small_instances() -> None:
    h, w = 96, 120
    # Pasted instances that end up too small are dropped: a 6x6 object scaled by 0.5.
    dst_image, dst_masks = _painted_sample(h, w, DST_COLORS[:2])
    src_image = np.zeros((40, 40, 3), np.uint8)
    src_masks = np.zeros((1, 40, 40), bool)
    src_masks[0, 17:23, 17:23] = True
    out, out_masks = copy_paste(dst_image, dst_masks, src_image, src_masks,
                                np.random.default_rng(0), scale=(0.5, 0.5))
    assert np.array_equal(out_masks, dst_masks)

    # Destination instances cut below the minimum by a paste are dropped. The source object
    # fills its whole (dst-sized) image, so at scale 1 the paste is a rectangle whose edges
    # cut through a lattice of 6x6 destination blocks.
    blocks = []
    for y in range(2, h - 6, 9):
        for x in range(2, w - 6, 9):
            b = np.zeros((h, w), bool)
            b[y:y + 6, x:x + 6] = True
            blocks.append(b)
    dst_masks = np.stack(blocks)
    dst_image = np.full((h, w, 3), 50, np.uint8)
    src_full = np.ones((1, h, w), bool)
    saw_drop = saw_partial_keep = False
    for seed in range(20):
        _, out_masks = copy_paste(dst_image, dst_masks, np.full((h, w, 3), 200, np.uint8),
                                  src_full, np.random.default_rng(seed), scale=(1.0, 1.0))
        pasted = out_masks[-1]
        expected = [b & ~pasted for b in blocks]
        expected = [e for e in expected if e.sum() >= MIN_AREA_PX]
        saw_drop |= any(0 < (b & ~pasted).sum() < MIN_AREA_PX for b in blocks)
        saw_partial_keep |= any(MIN_AREA_PX <= (b & ~pasted).sum() < 36 for b in blocks)
        assert len(out_masks) == len(expected) + 1
        assert all(np.array_equal(o, e) for o, e in zip(out_masks[:-1], expected))
    assert saw_drop and saw_partial_keep


@pytest.mark.parametrize("with_paste", [False, True])
def test_compose_training_sample(with_paste: bool) -> None:
    stream = SyntheticScenes(11)
    source = None
    for seed in range(15):
        image, masks = stream.sample(seed)
        if with_paste:
            counter = iter(range(1000, 2000))
            source = lambda: stream.sample(next(counter))  # noqa: E731
        out, out_masks = compose_training_sample(image, masks, np.random.default_rng(seed),
                                                 out_size=192, paste_source=source)
        assert out.dtype == np.uint8 and max(out.shape[:2]) == 192
        _check_masks(out_masks, out.shape[:2])
        assert len(out_masks) >= 1
        if with_paste:
            counter = iter(range(1000, 2000))
        again = compose_training_sample(image, masks, np.random.default_rng(seed),
                                        out_size=192, paste_source=source)
        assert np.array_equal(again[0], out) and np.array_equal(again[1], out_masks)


def test_compose_keeps_an_instance_and_handles_none() -> None:
    image = np.full((256, 256, 3), 100, np.uint8)
    masks = np.zeros((1, 256, 256), bool)
    masks[0, 3:8, 250:254] = True  # 20 px in a corner: most crops lose it
    for seed in range(20):
        _, out_masks = compose_training_sample(image, masks, np.random.default_rng(seed))
        assert len(out_masks) >= 1
    out, out_masks = compose_training_sample(image, masks[:0], np.random.default_rng(0))
    assert out_masks.shape == (0, *out.shape[:2])
