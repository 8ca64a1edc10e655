"""Save a grid of synthetic pretraining scenes with their instance masks, for eyeballing.

Each tile pairs the image with coloured mask outlines (left) and the instance map (right;
black = background). Usage: python -m wesam.bench.preview_synthetic --out /tmp/synthetic_preview.png
"""

from __future__ import annotations

import argparse
import pathlib

import cv2
import numpy as np

# Runnable as a plain script from anywhere: make the repo root importable.
from wesam.pretrain.synthetic import SyntheticScenes


def _palette(n: int) -> np.ndarray:
    """(n, 3) uint8 RGB, well-separated hues."""
    hues = (np.arange(n) * 180 * 0.618034) % 180
    hsv = np.stack([hues, np.full(n, 255), np.full(n, 255)], 1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def render_tile(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """image (H, W, 3) uint8, masks (N, H, W) bool -> (H, 2W + 2, 3) uint8 preview tile."""
    colors = _palette(max(len(masks), 1))
    outlined = image.copy()
    instance_map = np.zeros_like(image)
    for mask, color in zip(masks, colors):
        m8 = mask.astype(np.uint8)
        contours, _ = cv2.findContours(m8, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(outlined, contours, -1, tuple(int(c) for c in color), 1)
        instance_map[mask] = color
    gap = np.full((image.shape[0], 2, 3), 255, np.uint8)
    return np.concatenate([outlined, gap, instance_map], axis=1)


def preview_grid(seed: int, count: int, size: int, cols: int = 4) -> np.ndarray:
    """(rows * (size + 4), cols * (2 size + 6), 3) uint8 RGB grid of ``count`` scenes."""
    stream = SyntheticScenes(seed, size)
    tiles = [render_tile(*stream.sample(i)) for i in range(count)]
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % cols)
    pad = lambda t: cv2.copyMakeBorder(t, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=(40, 40, 40))  # noqa: E731
    rows = [np.concatenate([pad(t) for t in tiles[r:r + cols]], axis=1)
            for r in range(0, len(tiles), cols)]
    return np.concatenate(rows, axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output PNG path")
    parser.add_argument("--seed", type=int, default=0, help="scene stream seed")
    parser.add_argument("--count", type=int, default=16, help="number of scenes")
    parser.add_argument("--size", type=int, default=256, help="scene side in pixels")
    args = parser.parse_args()
    grid = preview_grid(args.seed, args.count, args.size)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), grid[..., ::-1]):
        raise SystemExit(f"could not write {out}")
    print(f"wrote {out} ({grid.shape[1]}x{grid.shape[0]})")


if __name__ == "__main__":
    main()
