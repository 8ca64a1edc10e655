"""Segmentation losses shared by pretraining and adaptation (all from logits, fp32)."""

from __future__ import annotations

import torch
from torchvision.ops import sigmoid_focal_loss


def focal_loss_per_mask(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                        gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss averaged over the last two (H, W) dims: (..., H, W) -> (...)."""
    loss = sigmoid_focal_loss(logits.float(), targets.float(), alpha=alpha, gamma=gamma, reduction="none")
    return loss.mean((-2, -1))


def dice_loss_per_mask(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - Dice over the last two (H, W) dims: (..., H, W) -> (...)."""
    p = torch.sigmoid(logits.float()).flatten(-2)
    t = targets.float().flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)


def constant_alpha_focal(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.8,
                         gamma: float = 2.0) -> torch.Tensor:
    """alpha * (1 - p_t)^gamma * BCE, alpha applied equally to both classes (WeSAM §6.1, fixed)."""
    return alpha * sigmoid_focal_loss(logits.float(), targets.float(), alpha=-1, gamma=gamma, reduction="mean")


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0,
              per_mask: bool = True) -> torch.Tensor:
    """1 - Dice of sigmoid(logits) vs targets.

    ``logits``/``targets``: (N, ..., H, W). ``per_mask`` averages the loss of each mask
    (flattening all but the first dim); otherwise one Dice over every pixel (WeSAM §6.2).
    Returns a scalar.
    """
    p = torch.sigmoid(logits.float())
    t = targets.float()
    if not per_mask:
        p, t = p.reshape(1, -1), t.reshape(1, -1)
    else:
        p, t = p.flatten(1), t.flatten(1)
    inter = (p * t).sum(1)
    return (1 - (2 * inter + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def mask_iou(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of binary masks (N, ..., H, W) -> (N, ...), flattening the last two dims."""
    pred, target = pred.bool(), target.bool()
    inter = (pred & target).flatten(-2).sum(-1).float()
    union = (pred | target).flatten(-2).sum(-1).float()
    return inter / (union + eps)
