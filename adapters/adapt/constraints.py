"""Weak labels as constraints on pseudo-labels, and the per-image confidence quantile.

Everything works on one image's N instances at loss resolution, (N, h, w), in the model's
input frame (the resized image before padding), the frame the trainer's logits are cropped to.

- :func:`box_region`: the pixels of each instance's box prompt, dilated by a margin. A box prompt
  is tight, so no pixel of the object lies outside it: clipping pseudo-labels to it is free and
  exact (up to the margin, which absorbs resampling).
- :func:`paint_points`: a small disk around each labelled point takes the point's label.
- :func:`ellipse_prior`: a shape prior drawn from each box, 1 − r² of the ellipse inscribed in it
  (1 at the centre, 0 on the ellipse, negative towards the corners). Added to a box-prompted
  model's logits with a weight, it decides where the model is unsure and yields where the model is
  sure: the ellipse alone is a better mask than a weak source's (the "ellipse" quality floor).
- :func:`quantile_weight`: ignore the ``q`` fraction of in-box pixels where the teacher is least
  sure (smallest |logit|), a rule on the model's own logit scale instead of a fixed threshold.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from wesam.sam.transforms import SamTransform


def input_frame_boxes(boxes: np.ndarray, original_size: tuple[int, int], transform: SamTransform) -> np.ndarray:
    """Inclusive pixel boxes (N, 4) xyxy in the original image -> inclusive pixel boxes in the input frame.

    An original pixel x covers [x, x + 1); after scaling by s it covers [x·s, (x + 1)·s), so the box's
    input-frame pixels run from floor(x0·s) to ceil((x1 + 1)·s) − 1 (exact under up- and down-scaling).
    """
    b = np.asarray(boxes, dtype=np.float64).copy()
    b[:, 2:] += 1.0
    b = transform.boxes(b, original_size)
    out = np.stack([np.floor(b[:, 0]), np.floor(b[:, 1]), np.ceil(b[:, 2]) - 1, np.ceil(b[:, 3]) - 1], 1)
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2])
    return out


def box_region(boxes: torch.Tensor, size: tuple[int, int], margin: int = 0) -> torch.Tensor:
    """(N, 4) inclusive pixel boxes xyxy -> (N, h, w) bool: inside the box dilated by ``margin`` pixels."""
    h, w = size
    ys = torch.arange(h, device=boxes.device)[None, :, None]
    xs = torch.arange(w, device=boxes.device)[None, None, :]
    b = boxes.round().long()[:, :, None, None]
    return ((xs >= b[:, 0] - margin) & (xs <= b[:, 2] + margin)
            & (ys >= b[:, 1] - margin) & (ys <= b[:, 3] + margin))


def ellipse_prior(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 4) inclusive pixel boxes xyxy -> (N, h, w) float: 1 − r², r the normalised radius of the
    ellipse inscribed in each box (r = 1 on it), drawn as :func:`wesam.data.weak.inscribed_ellipse_masks`
    draws the ellipse floor: ``ellipse_prior(...) >= 0`` is that mask in this frame."""
    h, w = size
    b = boxes.round().to(torch.float64)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    rx = ((b[:, 2] - b[:, 0] + 1) / 2).clamp_min(0.5)
    ry = ((b[:, 3] - b[:, 1] + 1) / 2).clamp_min(0.5)
    ys = torch.arange(h, device=boxes.device, dtype=torch.float64)
    xs = torch.arange(w, device=boxes.device, dtype=torch.float64)
    dy = ((ys[None, :] - cy[:, None]) / ry[:, None]) ** 2  # (N, h)
    dx = ((xs[None, :] - cx[:, None]) / rx[:, None]) ** 2  # (N, w)
    return (1.0 - dy[:, :, None] - dx[:, None, :]).to(torch.float32)


POINT_PRIOR_SCALE = 2.0  # standard deviations: uniform points in an ellipse of semi-axis a have σ = a/2 along it


def points_prior(coords: torch.Tensor, labels: torch.Tensor, size: tuple[int, int],
                 scale: float = POINT_PRIOR_SCALE) -> torch.Tensor:
    """(N, K, 2) xy points and (N, K) labels -> (N, h, w) float: 1 − m² / scale², m the Mahalanobis
    distance under the covariance of each instance's positive points (+1 px², never singular).

    ``points_prior(...) >= 0`` is the ellipse ``scale`` standard deviations wide around the positive
    points, the shape a point label alone gives (`wesam bench pseudo-label-prior`'s "points ellipse").
    An instance without a positive point gets 0 everywhere (no prior).
    """
    h, w = size
    n = coords.shape[0]
    out = torch.zeros((n, h, w), dtype=torch.float64, device=coords.device)
    ys = torch.arange(h, device=coords.device, dtype=torch.float64)
    xs = torch.arange(w, device=coords.device, dtype=torch.float64)
    for i in range(n):
        pos = coords[i][labels[i] == 1].to(torch.float64)
        if not len(pos):
            continue
        mu = pos.mean(0)
        cov = (torch.cov(pos.T) if len(pos) > 1 else torch.zeros((2, 2), dtype=torch.float64, device=pos.device))
        inv = torch.linalg.inv(cov + torch.eye(2, dtype=torch.float64, device=pos.device))
        dx, dy = xs[None, :] - mu[0], ys[:, None] - mu[1]  # (1, w), (h, 1)
        m2 = inv[0, 0] * dx * dx + (inv[0, 1] + inv[1, 0]) * dx * dy + inv[1, 1] * dy * dy
        out[i] = 1.0 - m2 / (scale * scale)
    return out.to(torch.float32)


def _disk(radius: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    r = int(radius)
    d = torch.arange(-r, r + 1, device=device)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    keep = dy * dy + dx * dx <= r * r
    return dy[keep], dx[keep]


def paint_points(x: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor, radius: int,
                 pos_value: float = 1.0, neg_value: float = 0.0) -> torch.Tensor:
    """Set a disk of ``radius`` px around every labelled point of instance n in x[n] to its label.

    x: (N, h, w); coords: (N, K, 2) xy in the same frame; labels: (N, K), 1 positive, 0 negative,
    anything else ignored. Negatives are painted first, so a positive disk wins where two overlap.
    Returns a new tensor; pixels away from the points are unchanged.
    """
    out = x.clone()
    n, h, w = x.shape
    dy, dx = _disk(radius, x.device)
    cx = coords[..., 0].round().long()[..., None] + dx  # (N, K, D)
    cy = coords[..., 1].round().long()[..., None] + dy
    rows = torch.arange(n, device=x.device)[:, None, None].expand_as(cx)
    inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
    for value, lab in ((neg_value, 0), (pos_value, 1)):
        sel = inside & (labels == lab)[..., None]
        if sel.any():
            out[rows[sel], cy[sel], cx[sel]] = value
    return out


def quantile_weight(logits: torch.Tensor, q: float, region: torch.Tensor | None = None) -> torch.Tensor:
    """(N, h, w) {0,1} weight that ignores the ``q`` fraction of ``region``'s elements with the smallest |logit|.

    region: (N, h, w) bool (the instances' boxes), or None for every element. The k = round(q·|region|)
    smallest |logit| in the region (all instances of the image pooled) get weight 0; ties at the
    k-th value are ignored too. Elements outside the region keep weight 1.
    """
    conf = logits.detach().abs().float()
    weight = torch.ones_like(conf)
    pool = conf[region] if region is not None else conf.reshape(-1)
    k = math.floor(q * pool.numel() + 0.5)
    if k <= 0:
        return weight
    thr = pool.kthvalue(min(k, pool.numel())).values
    low = conf <= thr
    if region is not None:
        low &= region
    weight[low] = 0.0
    return weight
