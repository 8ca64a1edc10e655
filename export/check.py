"""``wesam export check``: ONNX Runtime against the PyTorch model on generated inputs.

The reference is the *unmerged* model: ``SamPredictorCore`` on the base model with the LoRA
adapter attached and active, so a check also proves that merging for export changed nothing.
The adapter stays active for decoding too, so an adapter with mask-decoder targets is compared
with its own ``decoder_<domain>.onnx`` (``ExportBundle.decoder_path_for``) and every other domain
with the shared ``decoder.onnx``: each domain's decoder is checked on that domain's cases.
Cases: generated images of several sizes and aspect ratios (smaller and larger than the model
input), 1, 5 and 64 prompts per image, and box / points / box+points / points+mask / mask
prompts; each is decoded both single-mask and multimask.

A case's mask IoU pools all its masks (sum of intersections over sum of unions, ORT vs PyTorch,
thresholded at the model's mask threshold). ``ok`` requires it to be at least ``min_iou`` for
every case and all outputs finite. Pooling keeps a one-pixel flip in a ten-pixel mask (possible
where a random-init test model has logits near 0) from failing a correct export; the worst
single-mask IoU is reported too (``single_mask_iou_min``).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from wesam.adapters.artifact import attach_adapter
from wesam.adapters.lora import delete_adapter, set_adapter
from wesam.sam.predictor import Prompts, SamPredictorCore
from wesam.sam.transforms import SamTransform
from wesam.sam.zoo import ZOO, LoadedModel

from .bundle import ExportBundle
from .common import ExportError, load_model, progress
from .errors import DEFAULT_MIN_IOU
from .runtime import OnnxSamPredictor

IMAGE_SIZES: tuple[tuple[int, int], ...] = ((37, 50), (96, 64), (150, 150), (240, 427))
PROMPT_COUNTS: tuple[int, ...] = (1, 5, 64)
PROMPT_KINDS: tuple[str, ...] = ("box", "points", "box+points", "points+mask", "mask")
POINTS_PER_PROMPT = 3


def generated_image(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8: a colour gradient with a few filled ellipses and rectangles (some structure
    for the encoder, unlike pure noise)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / max(w - 1, 1), yy / max(h - 1, 1), (xx + yy) / max(h + w - 2, 1)], -1) * 120 + 40
    for _ in range(4):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.1, 0.4) * h, rng.uniform(0.1, 0.4) * w
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1 if rng.random() < 0.6 else \
            (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        img[inside] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def generated_prompts(kind: str, n: int, size: tuple[int, int], transform: SamTransform,
                      rng: np.random.Generator) -> Prompts:
    """``n`` prompts of one kind for an image of ``size`` (H, W), in original pixels.

    Point prompts have ``POINTS_PER_PROMPT`` points; every second prompt ends with a padding
    point (label -1) so ragged point counts are exercised too.
    """
    h, w = size
    corners = np.sort(rng.uniform(0, [w, h], (n, 2, 2)), axis=1)  # per prompt: (x0, y0) <= (x1, y1)
    boxes = corners.reshape(n, 4).astype(np.float32)
    coords = rng.uniform(0, [w, h], (n, POINTS_PER_PROMPT, 2)).astype(np.float32)
    labels = rng.integers(0, 2, (n, POINTS_PER_PROMPT)).astype(np.int32)
    labels[:, 0] = 1
    labels[1::2, -1] = -1
    coords[1::2, -1] = 0.0
    masks = None
    if "mask" in kind:
        yy, xx = np.mgrid[0:h, 0:w]
        c = rng.uniform(0, [h, w], (n, 2))
        r = rng.uniform(0.15, 0.5, (n, 2)) * [h, w]
        binary = (((yy[None] - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2
                  + ((xx[None] - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2) <= 1
        masks = transform.mask_to_prompt(binary, size)
    use_points = "points" in kind
    return Prompts(point_coords=coords if use_points else None, point_labels=labels if use_points else None,
                   boxes=boxes if "box" in kind else None, mask_inputs=masks)


def mask_ious(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU per mask of two (..., H, W) boolean arrays; two empty masks agree perfectly (1.0)."""
    inter = np.logical_and(a, b).sum(axis=(-2, -1))
    union = np.logical_or(a, b).sum(axis=(-2, -1))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def pooled_iou(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(intersection, union) pixel counts over all masks of two boolean arrays."""
    return int(np.logical_and(a, b).sum()), int(np.logical_or(a, b).sum())


def default_model_ref(bundle: ExportBundle) -> str:
    """The recorded base model: its zoo name, or else the weights file it was loaded from."""
    base = bundle.base_model
    if base["name"] in ZOO or any(base["name"] in s.aliases for s in ZOO.values()):
        return base["name"]
    if base.get("source") and os.path.isfile(base["source"]):
        return base["source"]
    raise ExportError(f"the export was made from {base['name']!r} ({base.get('source')}), which is neither a "
                      "zoo model nor an existing file here; pass --model")


def load_reference_model(bundle: ExportBundle, model_ref: str | None = None,
                         checkpoint: str | None = None) -> LoadedModel:
    """Load the PyTorch model to check against, refusing one whose hash differs from the export's."""
    ref = model_ref or default_model_ref(bundle)
    progress(f"loading reference model {ref}")
    model = load_model(ref, checkpoint)
    want = bundle.base_model.get("sha256")
    if model.sha256 != want:
        raise ExportError(
            f"base model mismatch: {bundle.root} was exported from {bundle.base_model['name']} sha256 {want}, "
            f"but the model to check against ({ref}) is {model.name} from {model.source}, sha256 "
            f"{model.sha256 or 'none (random init)'}; "
            "pass --model with the exact base model the export was made from")
    return model


def _finite(*arrays: np.ndarray) -> bool:
    return all(np.isfinite(a).all() for a in arrays)


def _decode_cases(ort_pred: OnnxSamPredictor, torch_pred: SamPredictorCore, images: Sequence[np.ndarray],
                  ort_embs, torch_embs, kinds: Iterable[str], counts: Iterable[int], min_iou: float,
                  seed: int, domain: str) -> list[dict[str, Any]]:
    cases = []
    transform = torch_pred.transform
    for i, image in enumerate(images):
        size = (image.shape[0], image.shape[1])
        for n in counts:
            for k, kind in enumerate(kinds):
                rng = np.random.default_rng([seed, i, n, k])
                prompts = generated_prompts(kind, n, size, transform, rng)
                single, iou_diff, low_diff, finite = 1.0, 0.0, 0.0, True
                inter = union = 0
                for multimask in (False, True):
                    got = ort_pred.decode(ort_embs[i], prompts, multimask)
                    want = torch_pred.decode(torch_embs[i], prompts, multimask)
                    if got.masks.shape != want.masks.shape:
                        raise ExportError(f"decoder output shape {got.masks.shape} differs from PyTorch's "
                                          f"{want.masks.shape} ({kind}, {n} prompts, image {size})")
                    finite &= _finite(got.scores, got.low_res_logits, want.scores, want.low_res_logits)
                    single = min(single, float(mask_ious(got.masks, want.masks).min()))
                    i_, u_ = pooled_iou(got.masks, want.masks)
                    inter, union = inter + i_, union + u_
                    iou_diff = max(iou_diff, float(np.abs(got.scores - want.scores).max()))
                    low_diff = max(low_diff, float(np.abs(got.low_res_logits - want.low_res_logits).max()))
                iou = inter / union if union else 1.0
                cases.append({"domain": domain, "image": list(size), "prompts": n, "kind": kind,
                              "mask_iou": iou, "single_mask_iou_min": single, "iou_pred_max_abs_diff": iou_diff,
                              "low_res_max_abs_diff": low_diff, "ok": bool(finite and iou >= min_iou)})
    return cases


def check_export(bundle: ExportBundle, model: LoadedModel, *, domains: Sequence[str] | None = None,
                 min_iou: float = DEFAULT_MIN_IOU, seed: int = 0, image_sizes=IMAGE_SIZES,
                 prompt_counts=PROMPT_COUNTS, prompt_kinds=PROMPT_KINDS, threads: int | None = None) -> dict[str, Any]:
    """Compare every (selected) domain's graphs with PyTorch; returns the JSON report.

    ``model`` must be the export's base model (see ``load_reference_model``). It is returned
    unchanged: adapters are attached for the comparison and deleted afterwards. ``threads``
    sets both PyTorch's and ONNX Runtime's intra-op threads for the run (PyTorch's setting is
    restored afterwards).
    """
    if model.sha256 != bundle.base_model.get("sha256"):
        raise ExportError(f"base model mismatch: export made from sha256 {bundle.base_model.get('sha256')}, "
                          f"got {model.name} sha256 {model.sha256}")
    domains = list(domains or bundle.domains)
    for d in domains:
        bundle.encoder_path(d)  # unknown domains fail before any work
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _check(bundle, model, domains, min_iou, seed, image_sizes, prompt_counts, prompt_kinds, threads)
    finally:
        torch.set_num_threads(previous_threads)


def _check(bundle: ExportBundle, model: LoadedModel, domains: list[str], min_iou: float, seed: int,
           image_sizes, prompt_counts, prompt_kinds, threads: int | None) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    images = [generated_image(s, rng) for s in image_sizes]
    report: dict[str, Any] = {"domains": {}, "cases": []}
    for domain in domains:
        art = bundle.adapter(domain)
        name = attach_adapter(model, art) if art is not None else None
        # Active through decoding as well: LoRA on the mask decoder applies only while its adapter
        # is active, and the ONNX side decodes with the domain's own decoder graph when it has one.
        set_adapter(model.sam, name)
        try:
            progress(f"checking domain {domain}: {len(images)} images, "
                     f"{len(prompt_counts) * len(prompt_kinds)} prompt sets each")
            torch_pred = SamPredictorCore(model.sam)
            ort_pred = OnnxSamPredictor.from_bundle(bundle, domain, threads=threads)
            # One batched encoder run per backend also exercises the dynamic batch dimension.
            ort_embs = ort_pred.encode_batch(images)
            torch_embs = torch_pred.encode_batch(images)
            enc_diff = max(float((a.features - b.features).abs().max()) for a, b in zip(ort_embs, torch_embs))
            enc_finite = all(torch.isfinite(e.features).all() for e in ort_embs)
            cases = _decode_cases(ort_pred, torch_pred, images, ort_embs, torch_embs, prompt_kinds, prompt_counts,
                                  min_iou, seed, domain)
        finally:
            set_adapter(model.sam, None)
            if name is not None:
                delete_adapter(model.sam, name)
        report["domains"][domain] = {
            "adapter": str(art.ref) if art is not None else None,
            # Which graph decoded this domain's cases: its own when its adapter adapts the decoder.
            "decoder": bundle.decoder_graph(domain)["file"],
            "encoder_max_abs_diff": enc_diff,
            "encoder_finite": bool(enc_finite),
            "mask_iou_min": min(c["mask_iou"] for c in cases),
            "single_mask_iou_min": min(c["single_mask_iou_min"] for c in cases),
            "ok": bool(enc_finite) and all(c["ok"] for c in cases),
        }
        report["cases"].extend(cases)
    per = report["domains"].values()
    return {
        "encoder_max_abs_diff": max(d["encoder_max_abs_diff"] for d in per),
        "mask_iou_min": min(d["mask_iou_min"] for d in per),
        "ok": all(d["ok"] for d in per),
        "single_mask_iou_min": min(d["single_mask_iou_min"] for d in per),
        "min_iou": min_iou,
        "iou_pred_max_abs_diff": max(c["iou_pred_max_abs_diff"] for c in report["cases"]),
        "low_res_max_abs_diff": max(c["low_res_max_abs_diff"] for c in report["cases"]),
        "n_cases": len(report["cases"]),
        "failures": [c for c in report["cases"] if not c["ok"]],
        "model": {"name": model.name, "sha256": model.sha256, "source": model.source},
        "export": str(bundle.root),
        **report,
    }
