"""How good are a model's box-prompted pseudo-labels, and what does the box's shape prior add?

    wesam bench pseudo-label-prior --data ../shared/data/kvasir_seg [--weights 0 1 2 4] [--prompts box point]

On the validation part that `wesam adapt` carves from the train split (never the test split),
scores the masks the model predicts from each instance's tight box, clipped to the box dilated by
``--clip-margin`` px, with ``W·(1 − r²)`` of the box's inscribed ellipse added to the logits for
each weight W (``--box-prior W`` of `wesam adapt`), and the ellipse alone. mIoU as everywhere
(per instance, averaged per image, then over images). It is the measurement that chose the
``wesam +prior`` row's weight: labels at least as good as the ellipse floor are what a weak
method can teach a source whose own masks are below it. With point labels (5 + 5 per instance, as
`wesam adapt --prompt point` draws them) it scores the model's point-prompted masks, the same
with ``W·(1 − m²/4)`` of the ellipse of the positive points' spread added (``--point-prior W``),
and that ellipse alone, the shape prior that points alone give.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from wesam.adapters.adapt import constraints as C
from wesam.adapters.adapt.data import load_adaptation_data

from wesam.evaluation.evaluate import PromptSpec, predict_instances, prompts_from_weak
from wesam.evaluation.metrics import SegmentationMeter
from wesam.sam.predictor import Prompts, SamPredictorCore
from wesam.sam.zoo import resolve_model

DEFAULT_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def prior_label_quality(predictor: SamPredictorCore, samples: Sequence[Any], weights: Sequence[float],
                        clip_margin: int = 2, progress: bool = False) -> dict[str, float]:
    """mIoU of ``logits + W·(1 − r²) > 0`` inside the dilated box, for each W, plus ``unclipped``
    (the model alone) and ``ellipse`` (the prior alone). samples: objects with ``.image`` (H, W, 3)
    uint8, ``.instances`` (N, H, W) bool and ``.label`` with ``boxes`` (N, 4), as
    :func:`~wesam.adapters.adapt.data.load_adaptation_data` gives them."""
    meters = {f"W={w:g}": SegmentationMeter() for w in weights}
    meters["unclipped"], meters["ellipse"] = SegmentationMeter(), SegmentationMeter()
    for s in tqdm(samples, desc="pseudo-labels", disable=not progress):
        gts = s.instances
        if not len(gts):
            continue
        hw = gts.shape[1:]
        boxes = s.label.boxes  # the weak label `wesam adapt` trains from (tight boxes)
        logits = predictor.predict(s.image, Prompts(boxes=boxes), return_logits=True).masks[:, 0]
        b = torch.as_tensor(boxes, dtype=torch.float64)
        prior = C.ellipse_prior(b, hw).numpy()
        region = C.box_region(b, hw, clip_margin).numpy()
        for w in weights:
            meters[f"W={w:g}"].add_image((logits + w * prior > 0) & region, gts)
        meters["unclipped"].add_image(logits > 0, gts)
        meters["ellipse"].add_image(prior >= 0, gts)
    return {k: m.summary()["miou"] for k, m in meters.items()}


def points_ellipse_masks(coords: np.ndarray, labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """The ellipse two standard deviations around each instance's positive points (the trainer's
    point prior, :func:`~wesam.adapters.adapt.constraints.points_prior`, at >= 0): coords (N, K, 2)
    xy, labels (N, K) -> (N, H, W) bool. Uniform points in an ellipse of semi-axis a have a standard
    deviation of a/2 along it, so two estimate the object's own ellipse."""
    inside = (C.points_prior(torch.as_tensor(coords, dtype=torch.float64), torch.as_tensor(labels), hw) >= 0).numpy()
    has_positive = (np.asarray(labels) == 1).any(1)  # without one the prior is 0 (none), the mask empty
    return inside & has_positive[:, None, None]


def point_label_quality(predictor: SamPredictorCore, samples: Sequence[Any], weights: Sequence[float] = (),
                        progress: bool = False) -> dict[str, float]:
    """mIoU of the model's point-prompted masks (``model``), of ``logits + W·(1 − m²/4) > 0`` for each
    W (``--point-prior W`` of `wesam adapt`; m the Mahalanobis distance under the positive points'
    covariance) and of the positive points' 2σ ellipse alone (``points ellipse``). samples: as
    :func:`prior_label_quality`, with a point label (``point_coords`` (N, K, 2), ``point_labels`` (N, K))."""
    meters = {"model": SegmentationMeter(), **{f"W={w:g}": SegmentationMeter() for w in weights if w > 0},
              "points ellipse": SegmentationMeter()}
    spec = PromptSpec("point")  # 5 + 5 points, as load_adaptation_data draws them
    for s in tqdm(samples, desc="point labels", disable=not progress):
        gts = s.instances
        if not len(gts):
            continue
        hw = gts.shape[1:]
        # prompted exactly as `wesam eval` and the trainer's validation prompt them
        prompts = prompts_from_weak(s.label, predictor, hw, spec.mask_logit)
        logits = predict_instances(predictor, s.image, prompts, spec.multimask, return_logits=True)
        prior = C.points_prior(torch.as_tensor(s.label.point_coords, dtype=torch.float64),
                               torch.as_tensor(s.label.point_labels), hw).numpy()
        meters["model"].add_image(logits > predictor.sam.mask_threshold, gts)
        for w in weights:
            if w > 0:
                meters[f"W={w:g}"].add_image(logits + w * prior > predictor.sam.mask_threshold, gts)
        meters["points ellipse"].add_image(prior >= 0, gts)
    return {k: m.summary()["miou"] for k, m in meters.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wesam bench pseudo-label-prior", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, nargs="+", help="dataset folder(s); their train split's validation part")
    p.add_argument("--model", default="sam-mini")
    p.add_argument("--weights", type=float, nargs="+", default=list(DEFAULT_WEIGHTS))
    p.add_argument("--clip-margin", type=int, default=2)
    p.add_argument("--prompts", nargs="+", choices=["box", "point"], default=["box", "point"])
    p.add_argument("--json", default="bench/pseudo_label_prior.json")
    args = p.parse_args(argv)
    if any(w < 0 for w in args.weights):
        p.error("weights must be >= 0")
    model = resolve_model(args.model)
    predictor = SamPredictorCore(model.sam)
    out: dict[str, Any] = {"model": model.model_id, "clip_margin": args.clip_margin, "split": "validation part of train",
                           "results": {}}
    json_path = Path(args.json)
    if json_path.is_file():  # keep the cells of other datasets and prompts measured on the same model
        previous = json.loads(json_path.read_text())
        if (previous.get("model"), previous.get("clip_margin")) == (out["model"], out["clip_margin"]):
            out["results"] = previous.get("results", {})
    for data in args.data:
        name = Path(data).name
        out["results"].setdefault(name, {})
        for prompt in args.prompts:
            # skip_bad as `wesam bench adaptation` does: a few coco128 masks hold no instance above the size floor
            _, val, _ = load_adaptation_data(data, "train", prompt, skip_bad=True)
            if prompt == "box":
                res = prior_label_quality(predictor, val, args.weights, args.clip_margin, progress=True)
            else:
                res = point_label_quality(predictor, val, args.weights, progress=True)
            out["results"][name][prompt] = {"n_images": len(val), **res}
            print(name, prompt, json.dumps({k: round(v, 4) for k, v in res.items()}), flush=True)
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
