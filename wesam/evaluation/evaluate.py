"""Prompted evaluation: weak prompts from ground truth -> masks -> mIoU / F1 (WeSAM §8).

Predictions are thresholded at logit > 0 (SAM's ``mask_threshold``) and scored at the
original image resolution. The "box filled as the mask" baseline is computed in the same
pass so every report carries its trivial reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Protocol

import numpy as np

from wesam.data.weak import WeakLabel, boxes_from_masks, derive_weak_labels, inscribed_ellipse_masks
from wesam.sam.predictor import Prompts, SamPredictorCore

from .metrics import SegmentationMeter, box_filled_masks

PROMPT_KINDS = ("box", "point", "coarse", "coarse-box", "ellipse")
MAX_PROMPTS_PER_CALL = 64


class SampleLike(Protocol):
    stem: str
    image: np.ndarray  # (H, W, 3) uint8
    instances: np.ndarray  # (N, H, W) bool


@dataclass(frozen=True)
class PromptSpec:
    """How weak prompts are derived at evaluation time."""

    kind: str = "box"
    n_points: tuple[int, int] = (5, 5)  # (positive, negative) for kind == "point"
    seed: int = 0
    mask_logit: float = 8.0  # magnitude of the coarse-mask prompt logits

    def __post_init__(self) -> None:
        if self.kind not in PROMPT_KINDS:
            raise ValueError(f"unknown prompt {self.kind!r}; choose from {', '.join(PROMPT_KINDS)}")

    @property
    def multimask(self) -> bool:
        """A single click is ambiguous: take SAM's best-scored of its three masks."""
        return self.kind == "point" and sum(self.n_points) == 1


def prompts_from_weak(label: WeakLabel, predictor: SamPredictorCore, original_size: tuple[int, int],
                      mask_logit: float = 8.0) -> Prompts:
    if label.mask_inputs is not None:
        return Prompts(mask_inputs=predictor.transform.mask_to_prompt(label.mask_inputs, original_size, mask_logit))
    if label.point_coords is not None:
        return Prompts(point_coords=label.point_coords, point_labels=label.point_labels)
    return Prompts(boxes=label.boxes)


def predict_instances(predictor: SamPredictorCore, image: np.ndarray, prompts: Prompts,
                      multimask: bool, return_logits: bool = False) -> np.ndarray:
    """One (H, W) bool mask (float logits with ``return_logits``) per prompt row -> (N, H, W)."""
    emb = predictor.encode(image)
    out = []
    for start in range(0, len(prompts), MAX_PROMPTS_PER_CALL):
        pred = predictor.decode(emb, prompts.subset(slice(start, start + MAX_PROMPTS_PER_CALL)), multimask,
                                return_logits=return_logits)
        if multimask:
            pred = pred.best()
        out.append(pred.masks[:, 0])
    return np.concatenate(out)


def evaluate(predictor: SamPredictorCore, samples: Iterable[SampleLike], spec: PromptSpec,
             progress: Any = None) -> dict[str, Any]:
    """Score the predictor and the box-filled baseline on ``samples``.

    Returns ``{"miou", "f1", "n_images", "n_instances", "n_empty_both", "box_filled": {...},
    "ellipse": {...}}``: the two quality floors drawn from each tight box (filled, and the
    inscribed ellipse), scored the same way.
    ``progress`` is an optional callable wrapping the iterable (e.g. ``tqdm``).
    """
    meter, baseline, ellipse = SegmentationMeter(), SegmentationMeter(), SegmentationMeter()
    iterable = progress(samples) if progress else samples
    for s in iterable:
        gts = s.instances
        hw = gts.shape[1:]
        label = derive_weak_labels(gts, spec.kind, seed=spec.seed, key=s.stem, n_points=spec.n_points)
        prompts = prompts_from_weak(label, predictor, hw, spec.mask_logit)
        meter.add_image(predict_instances(predictor, s.image, prompts, spec.multimask), gts)
        tight = boxes_from_masks(gts)
        baseline.add_image(box_filled_masks(tight, hw), gts)
        ellipse.add_image(inscribed_ellipse_masks(tight, hw), gts)
        if progress is not None and hasattr(iterable, "set_postfix"):
            iterable.set_postfix(miou=f"{np.mean(meter.image_iou):.3f}", refresh=False)
    result = meter.summary()
    result["box_filled"] = baseline.summary()
    result["ellipse"] = ellipse.summary()
    return result


def inbox_logit_health(predictor: SamPredictorCore, samples: Iterable[SampleLike],
                       pixels_per_instance: int = 256, seed: int = 0) -> dict[str, float]:
    """Median logit on object and on background pixels *inside* tight-box prompts.

    A box-prompted model that has learnt only "inside the box" puts both near the same value;
    a model that separates the object from its box keeps them far apart on either side of 0.
    Up to ``pixels_per_instance`` pixels of each side are drawn per instance (seeded).
    Returns ``{"inbox_object_logit", "inbox_background_logit"}`` (NaN when no pixel exists).
    """
    rng = np.random.default_rng(seed)
    obj: list[np.ndarray] = []
    bg: list[np.ndarray] = []
    for s in samples:
        gts = s.instances
        boxes = boxes_from_masks(gts)
        logits = predictor.predict(s.image, Prompts(boxes=boxes), return_logits=True).masks[:, 0]
        for gt, box, lg in zip(gts, boxes.astype(int), logits):
            x0, y0, x1, y1 = box
            g, l = gt[y0:y1 + 1, x0:x1 + 1], lg[y0:y1 + 1, x0:x1 + 1]
            for side, out in ((l[g], obj), (l[~g], bg)):
                if len(side):
                    out.append(rng.choice(side, min(len(side), pixels_per_instance), replace=False))
    def median(parts: list[np.ndarray]) -> float:
        return float(np.median(np.concatenate(parts))) if parts else float("nan")
    return {"inbox_object_logit": median(obj), "inbox_background_logit": median(bg)}
