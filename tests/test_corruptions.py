"""Benchmark corruptions: reproducible, shape-preserving, and actually corrupting."""

from __future__ import annotations

import numpy as np
import pytest

from wesam.data.corruptions import SUPPORTED, corrupt, plasma_fractal


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.zeros((70, 90, 3), np.uint8)
    img[10:50, 20:70] = (200, 60, 40)
    return np.clip(img + rng.integers(0, 30, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", SUPPORTED)
def test_corruption_is_seeded_and_keeps_shape(image, name) -> None:
    a = corrupt(image, name, severity=5, seed=3)
    assert a.shape == image.shape and a.dtype == np.uint8
    assert np.array_equal(a, corrupt(image, name, severity=5, seed=3))
    assert np.abs(a.astype(int) - image).mean() > 1.0


def test_fog_depends_on_seed_and_severity(image) -> None:
    assert not np.array_equal(corrupt(image, "fog", 5, seed=1), corrupt(image, "fog", 5, seed=2))
    mild = np.abs(corrupt(image, "fog", 1, seed=1).astype(int) - image).mean()
    strong = np.abs(corrupt(image, "fog", 5, seed=1).astype(int) - image).mean()
    assert strong > mild


def test_plasma_fractal_range_and_validation() -> None:
    m = plasma_fractal(64, 1.4, np.random.default_rng(0))
    assert m.shape == (64, 64) and m.min() == 0.0 and m.max() == 1.0
    with pytest.raises(ValueError):
        plasma_fractal(60, 1.4, np.random.default_rng(0))


def test_unknown_corruption(image) -> None:
    with pytest.raises(ValueError, match="unsupported corruption"):
        corrupt(image, "snowstorm")
    with pytest.raises(ValueError, match="severity"):
        corrupt(image, "fog", severity=6)
