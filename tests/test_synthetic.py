"""Synthetic pretraining scenes: determinism, mask validity, the fixed validation set."""

from __future__ import annotations

import numpy as np
import pytest

from wesam.pretrain.synthetic import (
    MAX_INSTANCES,
    MIN_VISIBLE_FRACTION,
    VALIDATION_SEED,
    SyntheticScenes,
    generate_scene,
    synthetic_validation_set,
)


def _same(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    return a[0].shape == b[0].shape and a[1].shape == b[1].shape and bool(
        np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, np.ndarray]]:
    stream = SyntheticScenes(seed=123)
    return [stream.sample(i) for i in range(60)]


def test_shapes_dtypes_and_masks(scenes: list[tuple[np.ndarray, np.ndarray]]) -> None:
    min_area = MIN_VISIBLE_FRACTION * 256 * 256
    for image, masks in scenes:
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        assert image.flags.c_contiguous
        assert masks.dtype == bool and masks.ndim == 3 and masks.shape[1:] == (256, 256)
        assert 1 <= len(masks) <= MAX_INSTANCES
        assert masks.sum(axis=0).max() <= 1, "instance masks must be mutually exclusive"
        areas = masks.reshape(len(masks), -1).sum(axis=1)
        assert areas.min() >= min_area
        assert areas.max() <= 0.5 * 256 * 256
        assert image.std() > 1.0


def test_variety(scenes: list[tuple[np.ndarray, np.ndarray]]) -> None:
    counts = np.array([len(m) for _, m in scenes])
    assert counts.min() <= 2 and counts.max() >= 6
    fractions = np.concatenate([m.reshape(len(m), -1).mean(axis=1) for _, m in scenes])
    assert fractions.min() < 0.01 and fractions.max() > 0.15
    # Instances differ from their surroundings on average (they are drawn, not invented).
    contrast = []
    for image, masks in scenes[:20]:
        background = ~masks.any(axis=0)
        if background.sum() > 100:
            for m in masks:
                contrast.append(np.abs(image[m].mean(0) - image[background].mean(0)).max())
    assert np.median(contrast) > 10


def test_deterministic_per_seed_and_index() -> None:
    a, b = SyntheticScenes(7), SyntheticScenes(7)
    assert _same(a.sample(3), b.sample(3))
    assert _same(a.sample(3), a.sample(3))
    assert not _same(a.sample(3), a.sample(4))
    assert not _same(a.sample(3), SyntheticScenes(8).sample(3))
    # Sampling order does not matter: index i is always the same scene.
    c = SyntheticScenes(7)
    c.sample(10)
    assert _same(c.sample(3), a.sample(3))
    assert _same(a.sample(3), generate_scene(np.random.default_rng([7, 3])))


def test_other_size() -> None:
    image, masks = SyntheticScenes(1, size=128).sample(0)
    assert image.shape == (128, 128, 3) and masks.shape[1:] == (128, 128)
    assert len(masks) >= 1 and masks.sum(axis=0).max() <= 1


def test_validation_set_fixed() -> None:
    first = synthetic_validation_set(n=3)
    second = synthetic_validation_set(n=3)
    assert len(first) == 3
    assert all(_same(x, y) for x, y in zip(first, second))
    assert _same(first[1], SyntheticScenes(VALIDATION_SEED).sample(1))
    for training_seed in (0, 1, 123):
        assert not _same(first[0], SyntheticScenes(training_seed).sample(0))
