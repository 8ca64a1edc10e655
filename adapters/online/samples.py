"""Captured samples as training data: :class:`CapturedSample` -> the trainer's :class:`AdaptSample`.

A captured request holds the image already downscaled to the model's input size, its prompts in
that frame (``boxes`` (N, 4) xyxy, ``points`` (K, 2) xy and ``point_labels`` (K,) shared by every
box, see docs/online.md) and the mask the service served for each prompt (``masks``, COCO RLE,
with its predicted IoU in ``scores``). :func:`to_adapt_sample` turns that into an
:class:`~wesam.adapters.adapt.data.AdaptSample` whose weak label is the prompts themselves:

* boxes only -> ``WeakLabel("box", boxes=(N, 4))``;
* points only -> ``WeakLabel("point", point_coords=(1, K, 2), point_labels=(1, K))`` (one prompt);
* one box and points -> ``WeakLabel("box", ...)`` with point_coords (1, K, 2): what the service
  decoded (the trainer feeds both to the prompt encoder). Points that a request shared among
  several boxes cannot be attributed to one of them: such a request keeps its boxes only.

``AdaptSample.instances`` is filled with the **served** masks, (N, H, W) bool, only because the
trainer's data structure needs an array of that shape (flips and instance sub-sampling move it
along with the prompts). They are the model's own past answers, not ground truth: nothing in the
online worker uses them as labels (the WeSAM losses use the teacher's and the anchor's masks;
``oracle`` training is refused by the worker). Reliability filters read them as *what was served*.

A sample that cannot be used raises :class:`UnusableSample` with a short ``reason`` (counted by
the worker as ``filtered:<reason>``).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from wesam.data.weak import WeakLabel

from ..adapt.data import AdaptSample
from .store import CapturedSample


class UnusableSample(ValueError):
    """A captured sample the worker cannot train on; ``reason`` is a short metric-label token."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class ServedPrompts:
    """What one captured request asked and got, in the stored image's frame.

    boxes: (N, 4) float32 xyxy inclusive, or None; point_coords: (N, K, 2) float32 xy, or None;
    point_labels: (N, K) int32 (1 positive, 0 negative, -1 padding), or None; masks: (N, H, W)
    bool, the served mask of each prompt; scores: (N,) float32 (NaN when not recorded);
    multimask: whether the request asked for three masks (the served one is the best-scored).
    """

    boxes: np.ndarray | None
    point_coords: np.ndarray | None
    point_labels: np.ndarray | None
    masks: np.ndarray
    scores: np.ndarray
    multimask: bool

    def __len__(self) -> int:
        return len(self.masks)

    def subset(self, keep: np.ndarray) -> ServedPrompts:
        """Only the prompts at indices ``keep`` (int array)."""
        pick = lambda x: None if x is None else x[keep]
        return ServedPrompts(pick(self.boxes), pick(self.point_coords), pick(self.point_labels),
                             self.masks[keep], self.scores[keep], self.multimask)

    def weak_label(self) -> WeakLabel:
        """The prompts as the trainer's weak label (kind "box" when there are boxes, else "point")."""
        kind = "box" if self.boxes is not None else "point"
        return WeakLabel(kind, boxes=self.boxes, point_coords=self.point_coords, point_labels=self.point_labels)


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> (H, W, 3) uint8 RGB; UnusableSample("undecodable") if they do not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise UnusableSample("undecodable", f"stored image does not decode: {exc}") from None


def decode_rle(rle: Any, size: tuple[int, int]) -> np.ndarray:
    """A stored COCO RLE (``counts`` as str, or an uncompressed int list) -> (H, W) bool.

    Raises UnusableSample("bad_mask") when it is malformed or not of ``size`` (H, W).
    """
    from pycocotools import mask as mask_utils

    if not isinstance(rle, dict) or list(rle.get("size") or []) != [int(size[0]), int(size[1])]:
        raise UnusableSample("bad_mask", f"served mask is not an RLE of size {list(size)}")
    counts = rle.get("counts")
    try:
        with warnings.catch_warnings():  # pycocotools' numpy-2 copy= DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            if isinstance(counts, list):
                obj = mask_utils.frPyObjects({"size": list(size), "counts": counts}, size[0], size[1])
            elif isinstance(counts, str):
                obj = {"size": list(size), "counts": counts.encode("ascii")}
            else:
                raise TypeError("counts must be a str or a list of ints")
            return mask_utils.decode(obj).astype(bool)
    except Exception as exc:  # pycocotools raises assorted types on malformed input
        raise UnusableSample("bad_mask", f"served mask does not decode: {exc}") from None


def _array(value: Any, shape_tail: tuple[int, ...], what: str, dtype: Any) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError):
        raise UnusableSample("bad_prompts", f"{what} is not numeric") from None
    if arr.ndim != 1 + len(shape_tail) or arr.shape[1:] != shape_tail or not np.isfinite(arr).all():
        raise UnusableSample("bad_prompts", f"{what} has shape {arr.shape}, expected (n, {shape_tail})")
    return arr


def served_prompts(sample: CapturedSample, size: tuple[int, int]) -> ServedPrompts:
    """Parse ``sample.prompts`` for an image of ``size`` (H, W) in the stored frame.

    Raises UnusableSample: ``mask_input`` (a mask prompt cannot be replayed), ``no_prompts``,
    ``bad_prompts`` (malformed), ``no_served_mask`` / ``bad_mask`` (the served masks are missing or
    unreadable: the reliability filters need them).
    """
    p = sample.prompts
    if any(p.get(k) is not None for k in ("mask_input", "mask_inputs", "mask_logits")):
        raise UnusableSample("mask_input", "mask prompts cannot be replayed")
    boxes = coords = labels = None
    if p.get("boxes"):
        boxes = _array(p["boxes"], (4,), "boxes", np.float32)
        if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
            raise UnusableSample("bad_prompts", "boxes must have x0 <= x1 and y0 <= y1")
    # Points shared by several boxes cannot be attributed to one box (a positive point is on one
    # object only): such a request trains on its boxes alone.
    if p.get("points") and (boxes is None or len(boxes) == 1):
        pts = _array(p["points"], (2,), "points", np.float32)
        lab = _array(p.get("point_labels") or [], (), "point_labels", np.int64).astype(np.int32)
        if len(lab) != len(pts):
            raise UnusableSample("bad_prompts", f"{len(pts)} points but {len(lab)} point_labels")
        coords, labels = pts[None], lab[None]
    if boxes is None and coords is None:
        raise UnusableSample("no_prompts", "no boxes and no points")
    n = len(boxes) if boxes is not None else 1
    rles = p.get("masks")
    if rles is None and sample.mask_rle is not None and n == 1:
        rles = [sample.mask_rle]  # a one-prompt sample's union is its served mask
    if not isinstance(rles, list) or len(rles) != n:
        raise UnusableSample("no_served_mask", f"{n} prompts but no served mask for each")
    masks = np.stack([decode_rle(r, size) for r in rles])
    raw_scores = p.get("scores")
    if isinstance(raw_scores, list) and len(raw_scores) == n:
        scores = np.asarray([np.nan if s is None else float(s) for s in raw_scores], dtype=np.float32)
    elif sample.score is not None and n == 1:
        scores = np.asarray([sample.score], dtype=np.float32)
    else:
        scores = np.full(n, np.nan, dtype=np.float32)
    return ServedPrompts(boxes, coords, labels, masks, scores, bool(p.get("multimask", False)))


def to_adapt_sample(sample: CapturedSample, image: np.ndarray | None = None,
                    prompts: ServedPrompts | None = None) -> AdaptSample:
    """The trainer's sample for ``sample`` (``image``/``prompts``: already decoded / filtered).

    ``stem`` is the request id; ``instances`` are the served masks, shape placeholders only (see
    the module docstring: never ground truth). Raises UnusableSample.
    """
    if image is None:
        image = decode_image(sample.image)
    if prompts is None:
        prompts = served_prompts(sample, image.shape[:2])
    if not len(prompts):
        raise UnusableSample("no_prompts", "every prompt was filtered")
    return AdaptSample(sample.request_id, image, prompts.masks.copy(), prompts.weak_label())
