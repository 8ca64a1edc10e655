"""SAM-style interactive prompt simulation for pretraining (one image at a time).

Each image gets one prompt mode for all its instances (SAM's prompt encoder needs equal
point counts per call): a jittered box, one click (ambiguous: multimask, min-loss over the
three masks), several clicks, or a coarse mask through the dense mask-prompt path. Box and
click prompts may get one refinement round: a corrective click from the error region plus
the previous low-res logits as mask input, as in SAM's interactive training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from ..data.weak import boxes_from_masks, coarse_mask, jitter_boxes
from ..losses import dice_loss_per_mask, focal_loss_per_mask, mask_iou
from ..transforms import SamTransform

MODES = ("box", "click", "clicks", "coarse")
MODE_WEIGHTS = (0.45, 0.25, 0.15, 0.15)
FOCAL_WEIGHT = 20.0
# Unbalanced focal: alpha = 0.25 (RetinaNet's default) biased a first run towards background
# (object logits stayed below 0 after 400 steps although objects were well separated).
FOCAL_ALPHA = -1.0


@dataclass
class PromptBatch:
    points: tuple[torch.Tensor, torch.Tensor] | None  # (N, K, 2) input frame, (N, K)
    boxes: torch.Tensor | None  # (N, 4) input frame
    masks: torch.Tensor | None  # (N, 1, L, L) logits
    multimask: bool


def _sample_pixels(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k (x, y) pixel positions drawn uniformly from a non-empty (H, W) bool mask."""
    ys, xs = np.nonzero(mask)
    idx = rng.integers(0, len(ys), size=k)
    return np.stack([xs[idx], ys[idx]], axis=1).astype(np.float32)


def initial_prompts(gts: np.ndarray, mode: str, rng: np.random.Generator, transform: SamTransform,
                    device: torch.device) -> PromptBatch:
    """gts: (N, h, w) bool in the resized (unpadded) input frame."""
    n, h, w = gts.shape
    if mode == "box":
        boxes = jitter_boxes(boxes_from_masks(gts), (h, w), rng, std_frac=0.1, max_px=20.0)
        return PromptBatch(None, torch.as_tensor(boxes, device=device), None, False)
    if mode in ("click", "clicks"):
        k = 1 if mode == "click" else int(rng.integers(2, 6))
        coords = np.stack([_sample_pixels(m, k, rng) for m in gts])
        labels = np.ones((n, k), dtype=np.int64)
        if mode == "clicks":  # some negatives from outside, as users do
            for i, m in enumerate(gts):
                n_neg = int(rng.integers(0, k))
                if n_neg and (~m).any():
                    coords[i, k - n_neg:] = _sample_pixels(~m, n_neg, rng)
                    labels[i, k - n_neg:] = 0
        pts = (torch.as_tensor(coords, device=device), torch.as_tensor(labels, device=device))
        return PromptBatch(pts, None, None, mode == "click")
    coarse = np.stack([coarse_mask(m, rng) for m in gts])
    logit = float(rng.uniform(4.0, 12.0))
    masks = transform.mask_to_prompt(coarse, (h, w), logit)
    return PromptBatch(None, None, torch.as_tensor(masks, device=device), False)


def corrective_prompts(prev: PromptBatch, pred: torch.Tensor, gts: torch.Tensor, low_res: torch.Tensor,
                       rng: np.random.Generator, scale: float = 1.0) -> PromptBatch:
    """Add one click from each prompt's error region; feed the previous logits back.

    pred: (N, R, R) bool of the chosen previous mask; gts: (N, R, R) bool, both in the padded
    frame at loss resolution R = S / scale; low_res: (N, 1, L, L) previous logits (detached).
    """
    n = gts.shape[0]
    err = (pred ^ gts).cpu().numpy()
    gt_np = gts.cpu().numpy()
    coords = np.zeros((n, 1, 2), dtype=np.float32)
    labels = np.full((n, 1), -1, dtype=np.int64)  # -1: "not a point" when nothing is left to fix
    for i in range(n):
        region = err[i] if err[i].any() else gt_np[i]
        if not region.any():  # object too small to survive the loss-resolution downsampling
            continue
        (x, y), = _sample_pixels(region, 1, rng)
        coords[i, 0] = ((x + 0.5) * scale, (y + 0.5) * scale)
        labels[i, 0] = int(gt_np[i, int(y), int(x)])
    dev = gts.device
    c, l = torch.as_tensor(coords, device=dev), torch.as_tensor(labels, device=dev)
    if prev.points is not None:
        c = torch.cat([prev.points[0], c], 1)
        l = torch.cat([prev.points[1], l], 1)
    return PromptBatch((c, l), prev.boxes, low_res, False)


def decode(sam: Sam, features: torch.Tensor, prompts: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """features (1, C, g, g) -> low-res logits (N, M, L, L), predicted IoU (N, M)."""
    sparse, dense = sam.prompt_encoder(points=prompts.points, boxes=prompts.boxes, masks=prompts.masks)
    return sam.mask_decoder(
        image_embeddings=features,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=prompts.multimask,
    )


def mask_losses(low_res: torch.Tensor, iou_pred: torch.Tensor, gts: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAM's loss for one decode: 20*focal + dice on the best of M masks, MSE on IoU for all.

    low_res: (N, M, L, L); iou_pred: (N, M); gts: (N, R, R) float targets in the padded frame
    at the loss resolution R (soft at object borders when downsampled).
    Returns (loss, chosen index per prompt (N,), chosen upsampled logits (N, R, R)).
    """
    n, m = low_res.shape[:2]
    res = gts.shape[-1]
    up = F.interpolate(low_res, (res, res), mode="bilinear", align_corners=False)
    target = gts[:, None].expand(-1, m, -1, -1)
    seg = FOCAL_WEIGHT * focal_loss_per_mask(up, target, alpha=FOCAL_ALPHA) + dice_loss_per_mask(up, target)
    best = seg.argmin(1) if m > 1 else torch.zeros(n, dtype=torch.long, device=up.device)
    rows = torch.arange(n, device=up.device)
    with torch.no_grad():
        actual_iou = mask_iou(up > 0, target > 0.5)
    loss = seg[rows, best].mean() + F.mse_loss(iou_pred.float(), actual_iou)
    return loss, best, up[rows, best]

