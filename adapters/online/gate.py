"""The gate in front of every publish: is the candidate adapter at least as good as the active one?

Two kinds of evidence, both comparing the candidate with the adapter that serves now (the base
model when the domain has none):

(a) **Golden set** (when the domain has one: ``REGISTRY/<domain>/golden/``, wesam's folder layout
    ``images/``, ``masks/``, ``split.json``; every image of every split is used). Each image is
    segmented with its ground-truth tight boxes as prompts and scored (mean instance IoU, as
    ``wesam eval``). Non-inferiority: a paired bootstrap (seeded) of the mean per-image
    difference candidate - active; the gate passes when the lower bound of its two-sided
    ``confidence`` interval (95 %: the 2.5th percentile) is above ``-margin``.
(b) **Label-free checks** on held-out captured samples (never trained on), prompted with their
    own prompts: agreement with the weak label (share of mask pixels inside the box; positive
    points inside the mask, negative ones outside), the median mask-area ratio (mask / box, or
    mask / image for point prompts) must not drift, empty- and full-mask rates must not rise,
    and predictions must be stable under a horizontal flip (IoU of the prediction with the
    un-flipped prediction of the flipped image). Each has a tolerance; without a golden set the
    stricter :data:`WITHOUT_GOLDEN` tolerances apply, and too few held-out prompts fail the gate
    (there would be no evidence at all). With a golden set, too few held-out prompts skip (b).

Also: the candidate's weights are finite, and its drift from the pinned adapter is under a cap.
:func:`run_gate` returns a JSON-able report: per check the value for the active adapter, for the
candidate, the threshold and whether it passed; ``pass`` is the conjunction.

The model's own predicted IoU is not used: the WeSAM IoU head is trained on self-agreement.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from wesam.data import open_dataset
from wesam.data.folder import Sample
from wesam.data.weak import boxes_from_masks
from wesam.evaluation.evaluate import predict_instances
from wesam.evaluation.metrics import SegmentationMeter
from wesam.sam.predictor import Prompts, SamPredictorCore

from ..adapt.views import flip_view
from ..lora import adapter_state, use_adapter
from .filtering import Candidate

GOLDEN_DIR = "golden"


@dataclass(frozen=True)
class Tolerances:
    """How much worse than the active adapter a label-free statistic may get."""

    weak_agreement: float  # largest allowed drop of the mean weak-label agreement
    area_drift: float  # largest allowed |median area ratio (candidate) / (active) - 1|
    empty_rate: float  # largest allowed rise of the share of empty masks
    full_rate: float  # largest allowed rise of the share of box- or image-filling masks
    flip_stability: float  # largest allowed drop of the mean flip IoU


WITH_GOLDEN = Tolerances(weak_agreement=0.02, area_drift=0.15, empty_rate=0.03, full_rate=0.03, flip_stability=0.02)
WITHOUT_GOLDEN = Tolerances(weak_agreement=0.01, area_drift=0.08, empty_rate=0.01, full_rate=0.01,
                            flip_stability=0.01)


@dataclass(frozen=True)
class GateConfig:
    margin: float = 0.005  # non-inferiority margin on the golden set's mean per-image IoU
    resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0
    min_holdout_prompts: int = 8  # fewer held-out prompts: no label-free evidence
    max_drift: float | None = 0.5  # the candidate's relative distance to the pinned adapter (None: no cap)
    with_golden: Tolerances = WITH_GOLDEN
    without_golden: Tolerances = WITHOUT_GOLDEN
    # What counts as empty / full when measuring (as the reliability filters define them):
    empty_box_fill: float = 0.02  # mask inside its box < this share of the box
    empty_px: int = 4  # point prompts: mask smaller than this
    full_box_fill: float = 0.97  # mask inside its box >= this share of the box
    full_image_fill: float = 0.9  # point prompts: mask >= this share of the image

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def load_golden(registry_root: str | Path, domain: str) -> list[Sample] | None:
    """The domain's golden set, every image of every split of ``REGISTRY/<domain>/golden``, in
    memory; None when the domain has none. Bad files raise DataError (a broken golden set must
    not silently turn the gate into its stricter label-free mode)."""
    root = Path(registry_root) / domain / GOLDEN_DIR
    if not (root / "split.json").is_file():
        return None
    splits = json.loads((root / "split.json").read_text())
    stems = sorted({s for v in splits.values() if isinstance(v, list) for s in v if isinstance(s, str)})
    ds = open_dataset(root, "train", stems=stems)
    return [ds[i] for i in range(len(ds))]


def paired_bootstrap(diff: np.ndarray, resamples: int, confidence: float, seed: int) -> tuple[float, float, float]:
    """(mean, lower, upper): percentile bootstrap interval of the mean of paired differences (n,)."""
    diff = np.asarray(diff, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(diff.mean()), float(lo), float(hi)


class _Models:
    """One predictor over a SAM carrying several LoRA adapters; ``name`` None is the base model."""

    def __init__(self, sam: torch.nn.Module, device: str | torch.device) -> None:
        self.predictor = SamPredictorCore(sam, device)
        self.sam = sam

    def masks(self, name: str | None, image: np.ndarray, prompts: Prompts, multimask: bool) -> np.ndarray:
        """(N, H, W) bool, one mask per prompt (the best-scored of three with ``multimask``)."""
        with use_adapter(self.sam, name):
            return predict_instances(self.predictor, image, prompts, multimask)


def golden_ious(models: _Models, name: str | None, golden: Sequence[Sample]) -> np.ndarray:
    """Per-image mean instance IoU (n,) with each instance's tight box as its prompt."""
    meter = SegmentationMeter()
    for s in golden:
        pred = models.masks(name, s.image, Prompts(boxes=boxes_from_masks(s.instances)), False)
        meter.add_image(pred, s.instances)
    return np.asarray(meter.image_iou, dtype=np.float64)


def _prompts_of(label: Any) -> Prompts:
    return Prompts(point_coords=label.point_coords, point_labels=label.point_labels, boxes=label.boxes)


def _mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of (N, H, W) bool masks pairwise along N -> (N,); 1.0 where both are empty (as wesam eval)."""
    inter = (a & b).sum(axis=(1, 2)).astype(np.float64)
    union = (a | b).sum(axis=(1, 2)).astype(np.float64)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def _inside(mask: np.ndarray, box: np.ndarray, margin: int) -> int:
    h, w = mask.shape
    x0, y0 = max(int(np.floor(box[0])) - margin, 0), max(int(np.floor(box[1])) - margin, 0)
    x1, y1 = min(int(np.ceil(box[2])) + margin, w - 1), min(int(np.ceil(box[3])) + margin, h - 1)
    return int(mask[y0:y1 + 1, x0:x1 + 1].sum()) if x1 >= x0 and y1 >= y0 else 0


def prompt_stats(models: _Models, name: str | None, holdout: Sequence[Candidate], cfg: GateConfig
                 ) -> dict[str, np.ndarray]:
    """Per held-out prompt (P,): ``agreement`` (NaN when nothing to judge), ``area_ratio``, ``empty``,
    ``full``, ``flip_iou``, for adapter ``name``."""
    rows: dict[str, list[float]] = {k: [] for k in ("agreement", "area_ratio", "empty", "full", "flip_iou")}
    for c in holdout:
        image, label = c.sample.image, c.sample.label
        h, w = image.shape[:2]
        multimask = c.prompts.multimask
        pred = models.masks(name, image, _prompts_of(label), multimask)
        f_img, _, f_label = flip_view(image, c.sample.instances, label, True, False)
        flipped = models.masks(name, f_img, _prompts_of(f_label), multimask)[:, :, ::-1]
        flip_iou = _mask_ious(pred, flipped)
        for i, m in enumerate(pred):
            area = int(m.sum())
            judged: list[float] = []
            if label.boxes is not None:
                box = label.boxes[i]
                box_area = float((box[2] - box[0] + 1) * (box[3] - box[1] + 1))
                inside = _inside(m, box, 0)
                if area:
                    judged.append(_inside(m, box, 2) / area)
                rows["area_ratio"].append(area / max(box_area, 1.0))
                rows["empty"].append(float(inside < cfg.empty_box_fill * box_area))
                rows["full"].append(float(inside >= cfg.full_box_fill * box_area))
            else:
                rows["area_ratio"].append(area / float(h * w))
                rows["empty"].append(float(area < cfg.empty_px))
                rows["full"].append(float(area >= cfg.full_image_fill * h * w))
            if label.point_coords is not None:
                xy = np.rint(label.point_coords[i]).astype(int)
                on = m[xy[:, 1].clip(0, h - 1), xy[:, 0].clip(0, w - 1)]
                lab = label.point_labels[i]
                known = (lab == 0) | (lab == 1)
                if known.any():
                    judged.append(float((on[known] == (lab[known] == 1)).mean()))
            rows["agreement"].append(float(np.mean(judged)) if judged else float("nan"))
            rows["flip_iou"].append(float(flip_iou[i]))
    return {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()}


def _summary(stats: dict[str, np.ndarray]) -> dict[str, float]:
    judged = stats["agreement"][np.isfinite(stats["agreement"])]
    return {
        "weak_agreement": float(judged.mean()) if len(judged) else float("nan"),
        "area_ratio_median": float(np.median(stats["area_ratio"])) if len(stats["area_ratio"]) else float("nan"),
        "empty_rate": float(stats["empty"].mean()) if len(stats["empty"]) else float("nan"),
        "full_rate": float(stats["full"].mean()) if len(stats["full"]) else float("nan"),
        "flip_stability": float(stats["flip_iou"].mean()) if len(stats["flip_iou"]) else float("nan"),
    }


def _num(x: float | None) -> float | None:
    """JSON-safe number (NaN and infinities become None)."""
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def _check(active: float | None, candidate: float | None, threshold: float | None, passed: bool,
           **extra: Any) -> dict[str, Any]:
    return {"active": _num(active), "candidate": _num(candidate), "threshold": _num(threshold), "pass": bool(passed),
            **extra}


@dataclass
class GateInputs:
    """What the gate judges: adapter names on ``sam`` (None = the base model) and the evidence."""

    sam: torch.nn.Module
    candidate: str
    active: str | None
    golden: Sequence[Sample] | None
    holdout: Sequence[Candidate] = field(default_factory=list)
    drift: float | None = None  # the candidate's drift from the pinned adapter (None: not measured)
    device: str = "cpu"


def run_gate(inputs: GateInputs, cfg: GateConfig = GateConfig()) -> dict[str, Any]:
    """Judge the candidate against the active adapter; the JSON-able report (see the module doc).

    ``pass``: every check passed; ``failed``: the names of those that did not; ``checks``: per
    check ``active``, ``candidate``, ``threshold``, ``pass`` (and ``skipped`` where it applies).
    """
    models = _Models(inputs.sam, inputs.device)
    checks: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {"strict": not inputs.golden, "golden": None}

    state = adapter_state(inputs.sam, inputs.candidate)
    finite = all(bool(torch.isfinite(v).all()) for v in state.values())
    checks["finite_weights"] = _check(None, None, None, finite)
    if not finite:  # nothing else is meaningful (and NaN predictions would only add noise)
        report.update(checks=checks, failed=["finite_weights"], holdout={"samples": len(inputs.holdout)})
        report["pass"] = False
        return report
    if cfg.max_drift is not None and inputs.drift is not None:
        checks["drift"] = _check(None, inputs.drift, cfg.max_drift, inputs.drift <= cfg.max_drift)

    if inputs.golden:
        act = golden_ious(models, inputs.active, inputs.golden)
        cand = golden_ious(models, inputs.candidate, inputs.golden)
        mean, lo, hi = paired_bootstrap(cand - act, cfg.resamples, cfg.confidence, cfg.seed)
        ok = lo > -cfg.margin
        report["golden"] = {"n_images": len(act), "active_miou": _num(float(act.mean())),
                            "candidate_miou": _num(float(cand.mean())), "delta": _num(mean), "ci_low": _num(lo),
                            "ci_high": _num(hi), "confidence": cfg.confidence, "margin": cfg.margin,
                            "resamples": cfg.resamples}
        checks["golden_noninferiority"] = _check(float(act.mean()), float(cand.mean()), -cfg.margin, ok,
                                                 value=_num(lo), delta=_num(mean))

    tol = cfg.with_golden if inputs.golden else cfg.without_golden
    n_prompts = sum(len(c.prompts) for c in inputs.holdout)
    report["holdout"] = {"samples": len(inputs.holdout), "prompts": n_prompts}
    if n_prompts < cfg.min_holdout_prompts:
        # With a golden set the label-free checks are a second opinion; without one they are all
        # the evidence there is, and too little evidence is a rejection.
        checks["holdout_evidence"] = _check(None, float(n_prompts), float(cfg.min_holdout_prompts),
                                            bool(inputs.golden), skipped=bool(inputs.golden))
    else:
        a = _summary(prompt_stats(models, inputs.active, inputs.holdout, cfg))
        c = _summary(prompt_stats(models, inputs.candidate, inputs.holdout, cfg))
        if math.isfinite(a["weak_agreement"]) and math.isfinite(c["weak_agreement"]):
            checks["weak_agreement"] = _check(a["weak_agreement"], c["weak_agreement"],
                                              a["weak_agreement"] - tol.weak_agreement,
                                              c["weak_agreement"] >= a["weak_agreement"] - tol.weak_agreement)
        ma, mc = a["area_ratio_median"], c["area_ratio_median"]
        drift = 0.0 if ma == mc else (mc / ma - 1.0 if ma > 0 else float("inf"))
        checks["area_drift"] = _check(ma, mc, tol.area_drift, abs(drift) <= tol.area_drift, value=_num(drift))
        checks["empty_rate"] = _check(a["empty_rate"], c["empty_rate"], a["empty_rate"] + tol.empty_rate,
                                      c["empty_rate"] <= a["empty_rate"] + tol.empty_rate + 1e-12)
        checks["full_rate"] = _check(a["full_rate"], c["full_rate"], a["full_rate"] + tol.full_rate,
                                     c["full_rate"] <= a["full_rate"] + tol.full_rate + 1e-12)
        checks["flip_stability"] = _check(a["flip_stability"], c["flip_stability"],
                                          a["flip_stability"] - tol.flip_stability,
                                          c["flip_stability"] >= a["flip_stability"] - tol.flip_stability)
    report["checks"] = checks
    report["failed"] = [k for k, v in checks.items() if not v["pass"]]
    report["pass"] = not report["failed"]
    report["tolerances"] = asdict(tol)
    return report
