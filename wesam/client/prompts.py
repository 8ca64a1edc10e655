"""Prompts as callers hold them (lists, arrays, masks) -> the arrays and JSON values the service takes.

Only shapes are checked here, to fail early with a clear ``ValueError`` instead of a round trip; the
values (coordinates inside the image, label values, counts against the server's limits) are the
server's to check, and it answers 422 ``invalid_prompt`` saying what is wrong.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Sequence, Union

import numpy as np

ArrayLike = Union[Sequence[Sequence[float]], np.ndarray]
# One entry per prompt: a bool mask (H, W) at the image size, low-res logits (L, L) float as a
# previous answer returned them (``SegmentResult.low_res_logits``), or a wire entry
# ({"rle": {...}} / {"low_res_logits": "<base64 .npy>"}).
MaskPrompt = Union[np.ndarray, dict]


def rows(values: ArrayLike | None, width: int, name: str) -> np.ndarray | None:
    """(N, width) float array, or ``None`` when not given or empty."""
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return None
    if arr.ndim != 2 or arr.shape[1] != width:
        form = "[x0, y0, x1, y1]" if width == 4 else "[x, y]"
        raise ValueError(f"{name} must be a list of {form} (an ({'N' if width == 4 else 'K'}, {width}) array), "
                         f"got shape {arr.shape}")
    return arr


def labels(point_labels: Sequence[int] | np.ndarray | None, count: int) -> np.ndarray:
    """K labels (1 foreground, 0 background); ``None`` means every point is foreground."""
    if point_labels is None:
        return np.ones(count, np.int32)
    arr = np.asarray(point_labels).reshape(-1)
    if arr.size != count:
        raise ValueError(f"point_labels must have one label per point ({count}), got {arr.size}")
    return arr.astype(np.int32)


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool -> COCO RLE with ``counts`` as a string, as the service reads it."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def npy_b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def mask_entries(mask_input: Sequence[MaskPrompt] | np.ndarray | None) -> list[dict[str, Any]] | None:
    """``mask_input`` as the service's list of ``{"rle": ...}`` / ``{"low_res_logits": ...}``.

    A bool or integer (0/1) array is a binary mask at the image size (sent as COCO RLE, a few hundred
    bytes instead of H x W); a float array is low-res logits (sent as base64 ``.npy``, float32). A 3-D
    array is one entry per prompt along its first axis.
    """
    if mask_input is None:
        return None
    items: list[Any] = list(mask_input) if not isinstance(mask_input, np.ndarray) or mask_input.ndim == 3 \
        else [mask_input]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            out.append(item)
            continue
        arr = np.asarray(item)
        if arr.ndim != 2:
            raise ValueError(f"mask_input[{i}] must be a 2-D array (a mask or low-res logits), got {arr.shape}")
        if arr.dtype == bool or np.issubdtype(arr.dtype, np.integer):
            out.append({"rle": rle_encode(arr.astype(bool))})
        elif np.issubdtype(arr.dtype, np.floating):
            out.append({"low_res_logits": npy_b64(arr.astype(np.float32))})
        else:
            raise ValueError(f"mask_input[{i}] has dtype {arr.dtype}: give a bool mask or float logits")
    return out or None


def prompt_fields(boxes: ArrayLike | None, points: ArrayLike | None, point_labels: Any,
                  mask_input: Any) -> dict[str, Any]:
    """The JSON prompt fields of a /segment request (absent ones left out)."""
    out: dict[str, Any] = {}
    box_rows = rows(boxes, 4, "boxes")
    if box_rows is not None:
        out["boxes"] = box_rows.tolist()
    point_rows = rows(points, 2, "points")
    if point_rows is not None:
        out["points"] = point_rows.tolist()
        out["point_labels"] = labels(point_labels, len(point_rows)).tolist()
    elif point_labels is not None and len(point_labels):
        raise ValueError("point_labels given without points")
    masks = mask_entries(mask_input)
    if masks is not None:
        out["mask_input"] = masks
    if not out:
        raise ValueError("no prompt: give boxes, points or mask_input")
    return out
