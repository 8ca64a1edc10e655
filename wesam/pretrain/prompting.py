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

from wesam.sam.transforms import SamTransform

from ..data.weak import boxes_from_masks, coarse_mask, jitter_boxes
from ..losses import dice_loss_per_mask, focal_loss_per_mask, mask_iou

MODES = ("box", "click", "clicks", "coarse")
MODE_WEIGHTS = (0.45, 0.25, 0.15, 0.15)
FOCAL_WEIGHT = 20.0
# Unbalanced focal: alpha = 0.25 (RetinaNet's default) biased a first run towards background
# (object logits stayed below 0 after 400 steps although objects were well separated).
FOCAL_ALPHA = -1.0


@dataclass(frozen=True)
class BoxPromptRecipe:
    """How training boxes are drawn: users and evaluation give tight boxes, so a share of the
    boxes is exact and the rest carries SAM-scale noise (std ``std_frac`` of the side, capped
    at ``max_px`` in the input frame; SAM's 20 px cap at 1024 px is 5 px at 256 px)."""

    tight_frac: float = 0.5
    std_frac: float = 0.05
    max_px: float = 5.0


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
                    device: torch.device, box_recipe: BoxPromptRecipe = BoxPromptRecipe()) -> PromptBatch:
    """gts: (N, h, w) bool in the resized (unpadded) input frame."""
    n, h, w = gts.shape
    if mode == "box":
        boxes = boxes_from_masks(gts)
        noisy = jitter_boxes(boxes, (h, w), rng, std_frac=box_recipe.std_frac, max_px=box_recipe.max_px)
        tight = rng.random(n) < box_recipe.tight_frac
        boxes = np.where(tight[:, None], boxes, noisy).astype(np.float32)
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


def box_regions(boxes: torch.Tensor, res: int, scale: float) -> torch.Tensor:
    """(N, 4) xyxy boxes in the input frame -> (N, res, res) bool, True inside the box.

    ``scale`` = input size / res; a loss-resolution pixel is inside when its centre is.
    """
    centres = (torch.arange(res, device=boxes.device, dtype=torch.float32) + 0.5) * scale
    x0, y0, x1, y1 = (boxes[:, k, None] for k in range(4))
    # Boxes are inclusive pixel indices: the box spans [x0, x1 + 1) in continuous coordinates.
    inx = (centres[None] >= x0) & (centres[None] < x1 + 1)
    iny = (centres[None] >= y0) & (centres[None] < y1 + 1)
    return iny[:, :, None] & inx[:, None, :]


def inbox_balanced_bce(logits: torch.Tensor, gts: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Object vs background *inside the box*, each side weighted equally: (N, R, R) -> (N,).

    A box prompt makes everything outside the box easy; this term asks for a decision on the
    pixels the box leaves open, whatever the object's share of the box.
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), gts.float(), reduction="none")
    obj = region & (gts > 0.5)
    bg = region & (gts <= 0.5)
    def mean_over(sel: torch.Tensor) -> torch.Tensor:
        return (bce * sel).flatten(1).sum(1) / sel.flatten(1).sum(1).clamp(min=1)
    return 0.5 * (mean_over(obj) + mean_over(bg))


def mask_losses(low_res: torch.Tensor, iou_pred: torch.Tensor, gts: torch.Tensor,
                inbox: torch.Tensor | None = None, inbox_weight: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAM's loss for one decode: 20*focal + dice on the best of M masks, MSE on IoU for all.

    low_res: (N, M, L, L); iou_pred: (N, M); gts: (N, R, R) float targets in the padded frame
    at the loss resolution R (soft at object borders when downsampled). ``inbox``: (N, R, R)
    bool box regions of box prompts; with ``inbox_weight`` > 0 the chosen mask also gets
    :func:`inbox_balanced_bce`.
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
    chosen = up[rows, best]
    loss = seg[rows, best].mean() + F.mse_loss(iou_pred.float(), actual_iou)
    if inbox is not None and inbox_weight > 0:
        loss = loss + inbox_weight * inbox_balanced_bce(chosen, gts, inbox).mean()
    return loss, best, chosen

