"""Helpers for the adaptation tests: a tiny polyp-like folder dataset and a sam-micro base file."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from wesam.sam.zoo import resolve_model, save_safetensors


def make_adapt_setup(tmp: Path, n_images: int, n_train: int) -> tuple[Path, Path, Path]:
    """``(tmp, dataset root, sam-micro weights)``: ``n_images`` 48x64 images with one reddish ellipse
    each (its mask in masks/), the first ``n_train`` in the train split, the rest in test."""
    root = tmp / "polyps"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    stems = [f"p{i}" for i in range(n_images)]
    for i, stem in enumerate(stems):
        img = rng.integers(60, 120, (48, 64, 3), dtype=np.uint8)
        mask = np.zeros((48, 64), np.uint8)
        cv2.ellipse(mask, (20 + 2 * i, 24), (10, 7), 0, 0, 360, 255, -1)
        img[mask > 0] = (200, 90, 80)
        cv2.imwrite(str(root / "images" / f"{stem}.jpg"), img[..., ::-1])
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask)
    (root / "split.json").write_text(json.dumps({"train": stems[:n_train], "test": stems[n_train:]}))
    m = resolve_model("sam-micro", seed=0)
    model_path = tmp / "micro.safetensors"
    save_safetensors(m.sam, model_path, name="sam-micro", config=m.config)
    return tmp, root, model_path
