"""Segmentation metrics following the WeSAM evaluation protocol.

mIoU/F1 are "micro-imagewise": per-instance scores are averaged within an
image first, then image scores are averaged over the dataset, so images with
many instances do not dominate.
"""

from __future__ import annotations

import numpy as np


def _as_bool(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == bool:
        return x
    if np.issubdtype(x.dtype, np.integer):
        return x != 0
    # Probabilities/logits need an explicit threshold; guessing one hides bugs.
    raise ValueError(f"{name} must be bool or integer 0/1 masks, got dtype {x.dtype}")


def _scores(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-mask IoU, F1 and empty-both flag over the last two axes."""
    tp = (pred & gt).sum(axis=(-2, -1)).astype(np.float64)
    fp = (pred & ~gt).sum(axis=(-2, -1)).astype(np.float64)
    fn = (~pred & gt).sum(axis=(-2, -1)).astype(np.float64)
    empty = (tp + fp + fn) == 0
    # Predicting nothing for an empty target is a perfect answer.
    iou = np.where(empty, 1.0, tp / np.maximum(tp + fp + fn, 1))
    f1 = np.where(empty, 1.0, 2 * tp / np.maximum(2 * tp + fp + fn, 1))
    return iou, f1, empty


def iou_f1(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """IoU = TP/(TP+FP+FN) and F1 = 2TP/(2TP+FP+FN) of two (H,W) bool masks.

    Both are 1.0 when pred and gt are empty. Raises ValueError on shape mismatch.
    """
    pred, gt = _as_bool(pred, "pred"), _as_bool(gt, "gt")
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must be equal (H,W) shapes")
    iou, f1, _ = _scores(pred, gt)
    return float(iou), float(f1)


class SegmentationMeter:
    """Accumulates per-image mean instance IoU/F1.

    Attributes:
        image_iou, image_f1: per-image means, in ``add_image`` order.
    """

    def __init__(self) -> None:
        self.image_iou: list[float] = []
        self.image_f1: list[float] = []
        self.n_instances = 0
        self.n_empty_both = 0

    def add_image(self, preds: np.ndarray, gts: np.ndarray) -> tuple[float, float]:
        """Score one image's (N,H,W) predictions against (N,H,W) ground truth.

        Returns the image's (mean IoU, mean F1). Raises ValueError on shape
        mismatch or N == 0 (an image without instances has no score).
        """
        preds, gts = _as_bool(preds, "preds"), _as_bool(gts, "gts")
        if preds.shape != gts.shape or preds.ndim != 3:
            raise ValueError(f"preds {preds.shape} and gts {gts.shape} must be equal (N,H,W) shapes")
        if preds.shape[0] == 0:
            raise ValueError("add_image needs at least one instance")
        iou, f1, empty = _scores(preds, gts)
        self.image_iou.append(float(iou.mean()))
        self.image_f1.append(float(f1.mean()))
        self.n_instances += len(iou)
        self.n_empty_both += int(empty.sum())
        return self.image_iou[-1], self.image_f1[-1]

    def summary(self) -> dict[str, float | int]:
        """{"miou", "f1", "n_images", "n_instances", "n_empty_both"}; scores NaN if no images."""
        n = len(self.image_iou)
        return {
            "miou": float(np.mean(self.image_iou)) if n else float("nan"),
            "f1": float(np.mean(self.image_f1)) if n else float("nan"),
            "n_images": n,
            "n_instances": self.n_instances,
            "n_empty_both": self.n_empty_both,
        }


def box_filled_masks(boxes: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """The "box filled as the mask" baseline predictor.

    Args:
        boxes: (N,4) xyxy with inclusive max; rounded to the nearest integer.
        hw: (H, W).
    Returns:
        (N,H,W) bool; the parts of a box outside the image are clipped away.
    """
    h, w = hw
    b = np.rint(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)).astype(np.int64)
    # Comparisons against index ranges clip implicitly, and a box lying fully
    # outside the image stays empty instead of collapsing onto the border.
    cols = np.arange(w)[None, :]
    rows = np.arange(h)[None, :]
    in_x = (cols >= b[:, 0:1]) & (cols <= b[:, 2:3])  # (N,W)
    in_y = (rows >= b[:, 1:2]) & (rows <= b[:, 3:4])  # (N,H)
    return in_y[:, :, None] & in_x[:, None, :]
