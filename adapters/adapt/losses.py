"""WeSAM losses (§6, with the spec's "Better" fixes) and the wesam+ weak-label terms.

All take logits for the N instances of one image at loss resolution, (N, H, W), and return
scalars. Pseudo-labels are hard and carry no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from wesam.losses import constant_alpha_focal, dice_loss, mask_iou

FOCAL_ALPHA = 0.8  # the reference's intended constant alpha (its call site passed n_m by mistake)
TEMPERATURE = 0.3


def _soft_dice(p: torch.Tensor, t: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - Dice of probabilities over all elements."""
    return 1 - (2 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)


def self_training_loss(student: torch.Tensor, pseudo: torch.Tensor, iou_pred: torch.Tensor,
                       weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Focal (x20 in the total) + dice + IoU-head MSE of the student against hard pseudo-labels.

    student: (N, H, W) logits; pseudo: (N, H, W) {0,1}; iou_pred: (N,);
    weight: optional (N, H, W) {0,1} pixel mask (confidence masking) applied to focal and dice.
    """
    if weight is None:
        focal = constant_alpha_focal(student, pseudo, alpha=FOCAL_ALPHA)
        dice = dice_loss(student, pseudo, smooth=1.0, per_mask=False)
    else:
        keep = weight > 0
        focal = constant_alpha_focal(student[keep], pseudo[keep], alpha=FOCAL_ALPHA) if keep.any() \
            else student.sum() * 0
        dice = _soft_dice(torch.sigmoid(student.float()) * weight, pseudo.float() * weight)
    with torch.no_grad():
        target_iou = mask_iou(student > 0, pseudo > 0.5)
    iou = F.mse_loss(iou_pred.float(), target_iou)
    return {"focal": focal, "dice": dice, "iou": iou}


def anchor_loss(student: torch.Tensor, teacher: torch.Tensor, anchor_labels: torch.Tensor) -> torch.Tensor:
    """½·Dice(S, Â) + ½·Dice(T, Â); the second half trains through the teacher pass (§6.4)."""
    return 0.5 * dice_loss(student, anchor_labels, per_mask=False) + 0.5 * dice_loss(teacher, anchor_labels,
                                                                                      per_mask=False)


ANCHOR_KINDS = ("dice", "logit", "prob")
ANCHOR_LOGIT_CLIP = 4.0


def _st_clamp(x: torch.Tensor, c: float) -> torch.Tensor:
    """clamp(x, -c, c) in value, identity in gradient (straight through)."""
    return x + (x.detach().clamp(-c, c) - x.detach())


def anchor_hold_loss(pred: torch.Tensor, anchor_logits: torch.Tensor, kind: str,
                     clip: float = ANCHOR_LOGIT_CLIP) -> torch.Tensor:
    """Hold one network's logits to the anchor's soft prediction (not only its hard mask).

    pred: (N, H, W) logits with gradient; anchor_logits: (N, H, W) target logits, no gradient.
    - ``logit``: smooth-L1 (beta 1) between both logits clamped to [-clip, clip], mean over pixels.
      The prediction is clamped straight-through, so pixels where both sides are beyond the same
      bound cost nothing, and a prediction beyond the bound on the wrong side is still pulled back.
    - ``prob``: MSE between sigmoid(pred) and sigmoid(anchor), mean over pixels.
    Both are 0 when pred equals the anchor.
    """
    target = anchor_logits.detach().float()
    if kind == "logit":
        return F.smooth_l1_loss(_st_clamp(pred.float(), clip), target.clamp(-clip, clip), beta=1.0)
    if kind == "prob":
        return F.mse_loss(torch.sigmoid(pred.float()), torch.sigmoid(target))
    raise ValueError(f"unknown anchor kind {kind!r}; choose from {', '.join(ANCHOR_KINDS[1:])}")


def _pool(embedding: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """embedding (C, g, g) L2-normalised per location; masks (K, g, g) {0,1} -> (K, C) mean-pooled."""
    num = torch.einsum("kij,cij->kc", masks, embedding)
    return num / masks.sum((1, 2)).clamp(min=1.0)[:, None]


def contrastive_loss(teacher_emb: torch.Tensor, anchor_emb: torch.Tensor, teacher_lr: torch.Tensor,
                     anchor_lr: torch.Tensor, tau: float = TEMPERATURE, background: bool = True) -> torch.Tensor:
    """Instance contrast between mask-pooled teacher and anchor embeddings (§6.5, fixed).

    teacher_emb/anchor_emb: (C, g, g) image embeddings (teacher with gradient, anchor without);
    teacher_lr/anchor_lr: (N, 1, L, L) low-res logits. Each network pools with its own masks.
    Fixes: a background instance (complement of the union of masks) so single-object images
    still give a signal, and the mean row-wise InfoNCE instead of one ratio of sums.
    """
    g = teacher_emb.shape[-1]

    def masks_of(lr: torch.Tensor) -> torch.Tensor:
        m = (F.interpolate(lr.detach().float(), (g, g), mode="bilinear", align_corners=False)[:, 0] > 0).float()
        if background:
            m = torch.cat([m, (1 - m.amax(0, keepdim=True))], 0)
        return m

    et = F.normalize(teacher_emb.float(), dim=0)
    ea = F.normalize(anchor_emb.float(), dim=0)
    vt = _pool(et, masks_of(teacher_lr))
    va = _pool(ea, masks_of(anchor_lr))
    sim = F.cosine_similarity(vt[:, None], va[None], dim=-1, eps=1e-8) / tau  # (K, K)
    return F.cross_entropy(sim, torch.arange(len(sim), device=sim.device))


def box_projection_loss(logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """BoxInst projection term: the mask's max-projections on x and y must match the box's.

    logits: (N, H, W); boxes: (N, 4) xyxy inclusive, in the same pixel frame.
    """
    n, h, w = logits.shape
    p = torch.sigmoid(logits.float())
    ys = torch.arange(h, device=p.device)[None]
    xs = torch.arange(w, device=p.device)[None]
    box_y = ((ys >= boxes[:, 1:2].floor()) & (ys <= boxes[:, 3:4].ceil())).float()  # (N, H)
    box_x = ((xs >= boxes[:, 0:1].floor()) & (xs <= boxes[:, 2:3].ceil())).float()  # (N, W)
    return 0.5 * (_soft_dice(p.amax(2), box_y) + _soft_dice(p.amax(1), box_x))


PAIRWISE_DILATION = 2
PAIRWISE_THETA = 2.0  # colour-similarity bandwidth in LAB units (BoxInst)
PAIRWISE_TAU = 0.3  # only edges at least this similar are pulled together


def _neighbour_offsets(dilation: int) -> list[tuple[int, int]]:
    return [(dy * dilation, dx * dilation) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x (..., H, W) -> y with y[..., i, j] = x[..., i + dy, j + dx] (edge pixels repeat)."""
    h, w = x.shape[-2:]
    ys = torch.arange(h, device=x.device).add(dy).clamp(0, h - 1)
    xs = torch.arange(w, device=x.device).add(dx).clamp(0, w - 1)
    return x.index_select(-2, ys).index_select(-1, xs)


def colour_affinity(lab: torch.Tensor, dilation: int = PAIRWISE_DILATION, theta: float = PAIRWISE_THETA
                    ) -> torch.Tensor:
    """Similarity of each pixel to its 8 neighbours at ``dilation``: lab (3, H, W) -> (8, H, W) in (0, 1].

    S = exp(-||c_i - c_j|| / theta) in CIE-LAB, as in BoxInst.
    """
    return torch.stack([torch.exp(-(lab - _shift(lab, dy, dx)).norm(dim=0) / theta)
                        for dy, dx in _neighbour_offsets(dilation)])


def pairwise_affinity_loss(logits: torch.Tensor, affinity: torch.Tensor, boxes: torch.Tensor,
                           dilation: int = PAIRWISE_DILATION, tau: float = PAIRWISE_TAU) -> torch.Tensor:
    """BoxInst pairwise term: similar-coloured neighbours inside the box take the same label.

    logits: (N, H, W); affinity: (8, H, W) from :func:`colour_affinity` in the same frame;
    boxes: (N, 4) xyxy inclusive. The loss is -log P(y_i = y_j) averaged over the kept edges
    (similarity >= tau, both ends inside the instance's box); 0 when there is none.
    """
    n, h, w = logits.shape
    ys = torch.arange(h, device=logits.device)[None, :, None]
    xs = torch.arange(w, device=logits.device)[None, None, :]
    b = boxes[:, :, None, None]
    inside = ((ys >= b[:, 1].floor()) & (ys <= b[:, 3].ceil()) & (xs >= b[:, 0].floor()) & (xs <= b[:, 2].ceil()))
    lp, ln = F.logsigmoid(logits.float()), F.logsigmoid(-logits.float())
    total, count = logits.new_zeros(()).float(), logits.new_zeros(()).float()
    for k, (dy, dx) in enumerate(_neighbour_offsets(dilation)):
        in_frame = ((ys + dy >= 0) & (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w))
        keep = ((affinity[k] >= tau)[None] & inside & _shift(inside, dy, dx) & in_frame).float()
        same = torch.logaddexp(lp + _shift(lp, dy, dx), ln + _shift(ln, dy, dx))  # log P(same label)
        total = total - (same * keep).sum()
        count = count + keep.sum()
    return total / count.clamp(min=1.0)


def point_loss(logits: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Partial labels: BCE at the labelled points only (1 inside, 0 outside; -1 ignored).

    logits: (N, H, W); coords: (N, K, 2) xy in the same frame; labels: (N, K).
    """
    n, h, w = logits.shape
    keep = labels >= 0
    if not keep.any():
        return logits.sum() * 0
    x = coords[..., 0].round().long().clamp(0, w - 1)
    y = coords[..., 1].round().long().clamp(0, h - 1)
    rows = torch.arange(n, device=logits.device)[:, None].expand_as(x)
    values = logits[rows[keep], y[keep], x[keep]]
    return F.binary_cross_entropy_with_logits(values.float(), labels[keep].float())


def coarse_agreement_loss(logits: torch.Tensor, coarse: torch.Tensor, band_px: int = 3) -> torch.Tensor:
    """BCE against the coarse mask outside its uncertain band (dilation minus erosion).

    logits: (N, H, W); coarse: (N, H, W) {0,1}.
    """
    c = coarse.float()[:, None]
    k = 2 * band_px + 1
    dilated = F.max_pool2d(c, k, stride=1, padding=band_px)
    eroded = -F.max_pool2d(-c, k, stride=1, padding=band_px)
    certain = (dilated == eroded)[:, 0]
    if not certain.any():
        return logits.sum() * 0
    return F.binary_cross_entropy_with_logits(logits[certain].float(), c[:, 0][certain])
