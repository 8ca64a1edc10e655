"""Prompt validation shared by every protocol: lists from JSON or numpy arrays from tensors in,
validated ``PromptArrays`` out, or an ``InvalidPrompt`` (422) saying what is wrong.

The HTTP front calls :func:`validate_prompts` with the parsed JSON/form values and the gRPC
endpoint with the arrays of its KServe tensors, so the same bad prompt gets the same error on both.
What needs the image size (coordinates inside the image, mask size, the answer's size) cannot be
checked here; the engine checks that once the embedding is known. The predictor's own guards
(``wesam.sam.predictor.Prompts``) stay as a last line for callers that bypass the service.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike
from pydantic import ValidationError

from . import codec
from .config import ServeConfig
from .errors import InvalidPrompt, PayloadTooLarge, ServiceError
from .messages import PromptArrays
from .schemas import MaskInput

# Largest .npy of one low-res logits mask prompt (the request body limit bounds it first over HTTP).
MAX_LOGITS_BYTES = 64 * 1024 * 1024


def validate_prompts(config: ServeConfig, *, boxes: ArrayLike | None = None, points: ArrayLike | None = None,
                     point_labels: ArrayLike | None = None,
                     mask_input: Sequence[MaskInput | Mapping[str, Any]] | None = None) -> PromptArrays:
    """Shape, count and value checks, and the layout the engine takes.

    ``boxes`` (N, 4) and ``points`` (K, 2) as nested lists or arrays; ``point_labels`` K values
    (any shape, flattened: tensors may arrive as [K] or [1, K]); ``mask_input`` one entry per
    prompt, each ``{"rle": ...}`` or ``{"low_res_logits": ...}`` as in the HTTP schema. One mask
    set per box; points without boxes form one prompt; points with boxes join every box's prompt.
    """
    boxes_arr = points_arr = labels = None
    if _length(boxes):
        if _length(boxes) > config.max_prompts:
            raise InvalidPrompt(f"{_length(boxes)} boxes, over the limit of {config.max_prompts} prompts")
        boxes_arr = _finite_array(boxes, 4, "boxes", "[x0, y0, x1, y1]")
        if ((boxes_arr[:, 2] < boxes_arr[:, 0]) | (boxes_arr[:, 3] < boxes_arr[:, 1])).any():
            raise InvalidPrompt("boxes must be [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1")
    if _length(points):
        if _length(points) > config.max_points:
            raise InvalidPrompt(f"{_length(points)} points, over the limit of {config.max_points}")
        points_arr = _finite_array(points, 2, "points", "[x, y]")
        labels = _labels(point_labels, len(points_arr))
    elif _length(point_labels):
        raise InvalidPrompt("point_labels given without points")

    n = len(boxes_arr) if boxes_arr is not None else (1 if points_arr is not None else 0)
    out = PromptArrays()
    if boxes_arr is not None:
        out.boxes = boxes_arr.astype(np.float32)
    if points_arr is not None:
        out.point_coords = np.repeat(points_arr[None].astype(np.float32), n, axis=0)
        out.point_labels = np.repeat(labels[None], n, axis=0)
    if mask_input is not None and len(mask_input) > 0:
        _mask_inputs([_mask_entry(i, e) for i, e in enumerate(mask_input)], config, n, out)
    if out.count() == 0:
        raise InvalidPrompt("no prompt: give boxes, points (with point_labels) or mask_input")
    return out


def _length(values: Any) -> int:
    """Entries given: 0 for None, an empty list or a (0, 4) tensor ("no such prompt"); a scalar
    counts as one entry, refused by the shape check."""
    if values is None:
        return 0
    try:
        return len(values)
    except TypeError:
        return 1


def _finite_array(values: Any, width: int, what: str, form: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):  # ragged lists, strings
        arr = np.zeros((0, 0))
    if arr.ndim != 2 or arr.shape[1] != width:
        raise InvalidPrompt(f"{what} must be a list of {form} entries")
    if not np.isfinite(arr).all():
        raise InvalidPrompt(f"{what} contain NaN or infinite values")
    if (arr < 0).any():
        raise InvalidPrompt(f"{what} have negative coordinates (pixels start at 0)")
    return arr


def _labels(point_labels: Any, count: int) -> np.ndarray:
    raw = np.zeros(0)
    if point_labels is not None:
        try:
            # float64, flattened: a huge integer is refused as a label instead of overflowing int32
            raw = np.asarray(point_labels, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise InvalidPrompt("point_labels must be a list of 1 (foreground) or 0 (background)") from None
    if raw.size != count:
        raise InvalidPrompt(f"point_labels must have one label per point ({count}), got {raw.size}")
    if not np.isin(raw, (0, 1)).all():
        raise InvalidPrompt("point_labels must be 1 (foreground) or 0 (background)")
    return raw.astype(np.int32)


def _mask_entry(index: int, entry: MaskInput | Mapping[str, Any]) -> MaskInput:
    if isinstance(entry, MaskInput):
        return entry
    try:
        return MaskInput.model_validate(entry)
    except ValidationError as e:
        raise InvalidPrompt(f"mask_input[{index}]: {e.errors(include_url=False)[0]['msg']}") from None


def _mask_inputs(entries: list[MaskInput], config: ServeConfig, n: int, out: PromptArrays) -> None:
    if n and len(entries) != n:
        raise InvalidPrompt(f"mask_input needs one entry per prompt ({n}), got {len(entries)}")
    if len(entries) > config.max_prompts:
        raise InvalidPrompt(f"{len(entries)} mask inputs, over the limit of {config.max_prompts} prompts")
    kinds = {("rle" if e.rle is not None else "logits" if e.low_res_logits is not None else "none")
             for e in entries}
    if "none" in kinds or len(kinds) != 1:
        raise InvalidPrompt("every mask_input entry needs exactly one of `rle` or `low_res_logits`, "
                            "the same kind for all entries")
    if kinds == {"rle"}:
        # Sized from the RLE headers before decoding anything: a few bytes of RLE can claim gigapixels.
        pixels = sum(math.prod(e.rle.size) if len(e.rle.size) == 2 else 0 for e in entries)
        if pixels > 8 * config.max_image_pixels:
            raise PayloadTooLarge(f"mask_input totals {pixels} pixels, over the limit of "
                                  f"{8 * config.max_image_pixels}")
        masks = []
        for i, e in enumerate(entries):
            try:
                masks.append(codec.rle_decode(e.rle.model_dump()))
            except ValueError as err:
                raise InvalidPrompt(f"mask_input[{i}].rle: {err}") from None
        if len({m.shape for m in masks}) != 1:
            raise InvalidPrompt("mask_input masks have different sizes")
        out.mask_binary = np.stack(masks)
        return
    arrays = []
    for i, e in enumerate(entries):
        try:
            a = codec.npy_from_b64(e.low_res_logits, MAX_LOGITS_BYTES)
        except (ValueError, ServiceError) as err:
            raise InvalidPrompt(f"mask_input[{i}].low_res_logits: {err}") from None
        if a.ndim != 2 or a.shape[0] != a.shape[1] or not np.issubdtype(a.dtype, np.floating):
            raise InvalidPrompt(f"mask_input[{i}].low_res_logits must be a square float (L, L) array, "
                                f"got {a.shape} {a.dtype}")
        if not np.isfinite(a).all():
            raise InvalidPrompt(f"mask_input[{i}].low_res_logits contains NaN or infinite values")
        arrays.append(a.astype(np.float32))
    if len({a.shape for a in arrays}) != 1:
        raise InvalidPrompt("mask_input low_res_logits have different sizes")
    out.mask_logits = np.stack(arrays)[:, None]
