"""Prompts -> decoder-graph inputs, in exactly the token order ``SamPredictorCore`` produces.

SAM's prompt encoder turns (points, box) into a token sequence: the points, then either the two
box corners (labels 2 and 3) or, when there is no box, one padding point (label -1). The decoder
graph takes that sequence directly, in the resized input frame as segment-anything's ONNX export
does, so a client builds it once here (or by hand, see docs/export.md) and every prompt kind goes
through one graph.
"""

from __future__ import annotations

import numpy as np

from wesam.sam.predictor import Prompts
from wesam.sam.transforms import SamTransform

PAD_LABEL = -1.0
BOX_LABELS = (2.0, 3.0)


def prompt_tokens(prompts: Prompts) -> tuple[np.ndarray, np.ndarray]:
    """(N, K, 2) float coords in original pixels and (N, K) float32 labels.

    K = points + (2 if boxes else 1 if points else 0). Padding points inside
    ``prompts.point_labels`` (label -1) are kept: the predictor sees them too.
    """
    n = len(prompts)
    coords: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    if prompts.point_coords is not None:
        coords.append(prompts.point_coords.astype(np.float64))
        labels.append(prompts.point_labels.astype(np.float32))
        if prompts.boxes is None:
            # The prompt encoder appends this padding token itself when no box is given.
            coords.append(np.zeros((n, 1, 2), np.float64))
            labels.append(np.full((n, 1), PAD_LABEL, np.float32))
    if prompts.boxes is not None:
        coords.append(prompts.boxes.reshape(n, 2, 2).astype(np.float64))
        labels.append(np.tile(np.array(BOX_LABELS, np.float32), (n, 1)))
    if not coords:  # mask prompt only: no sparse tokens at all
        return np.zeros((n, 0, 2), np.float64), np.zeros((n, 0), np.float32)
    return np.concatenate(coords, axis=1), np.concatenate(labels, axis=1)


def decoder_feeds(image_embeddings: np.ndarray, prompts: Prompts, original_size: tuple[int, int],
                  img_size: int, low_res_size: int) -> dict[str, np.ndarray]:
    """All inputs of the decoder graph for one image.

    image_embeddings: (1, C, g, g) float32; original_size: (H, W); img_size: S; low_res_size: L.
    Coordinates go to the resized input frame as ``ResizeLongestSide(S).apply_coords`` maps them
    (the padding point (0, 0) stays (0, 0)). Without mask prompts a zero (1, 1, L, L)
    ``mask_input`` is sent with ``has_mask_input`` 0.
    """
    coords, labels = prompt_tokens(prompts)
    coords = SamTransform(img_size).coords(coords, original_size).astype(np.float32)
    if prompts.mask_inputs is not None:
        mask = prompts.mask_inputs.astype(np.float32).reshape(len(prompts), 1, low_res_size, low_res_size)
        has_mask = np.ones(1, np.float32)
    else:
        mask = np.zeros((1, 1, low_res_size, low_res_size), np.float32)
        has_mask = np.zeros(1, np.float32)
    return {
        "image_embeddings": np.ascontiguousarray(image_embeddings, dtype=np.float32),
        "point_coords": coords,
        "point_labels": labels,
        "mask_input": mask,
        "has_mask_input": has_mask,
        "orig_im_size": np.asarray(original_size, dtype=np.float32),
    }
