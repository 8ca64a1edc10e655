"""Which captured samples a round trains on: reliability filters, a held-out slice, per-client caps.

Every sample gets exactly one decision, in this order:

1. ``filtered:<reason>``: unusable (``undecodable``, ``no_prompts``, ``mask_input``, ...) or
   unreliable / suspicious. Filters look at each prompt with the mask the service served for it
   (:class:`FilterConfig`): a low served score, a box covering almost the whole image (the
   whole-image-box poisoning pattern), a degenerate box, a served mask that is empty or fills its
   box or the image, a served mask that leaks out of its box, a positive point outside the served
   mask or a negative one inside it. Unreliable prompts are dropped; a sample keeps its other
   prompts and is filtered only when none is left (its reason: the first dropped prompt's).
   Whole samples are also filtered as ``blank_image`` (near-constant pixels) and ``duplicate``
   (the same image and prompts as an earlier sample of the batch: one client repeating a sample).
2. ``holdout``: a keyed hash of the request id puts ``holdout_fraction`` (default 20 %) aside for
   the gate's label-free checks; those are never trained on. The key differs from the service's
   capture sampling hash, so which requests are captured says nothing about which are held out.
3. ``capped``: no client contributes more than ``max_client_share`` of the training samples of a
   round (:func:`client_quota`); a client over its quota keeps the samples with the smallest
   keyed hash of their request id, so the choice does not depend on arrival order.
4. ``used``: trained on.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from ..adapt.data import AdaptSample
from .samples import ServedPrompts, UnusableSample, decode_image, served_prompts, to_adapt_sample
from .store import CapturedSample

HOLDOUT_KEY = b"wesam-online-holdout"
CAP_KEY = b"wesam-online-client-cap"


@dataclass(frozen=True)
class FilterConfig:
    """Thresholds of the reliability filters (fractions unless marked px)."""

    min_score: float = 0.3  # served predicted IoU below this: unreliable (NaN scores are not judged)
    max_box_image_frac: float = 0.9  # box area / image area at or above this: whole-image box
    min_box_px: float = 2.0  # a box narrower or lower than this (px, stored frame) is degenerate
    min_mask_px: int = 4  # a served mask smaller than this (px) is empty
    min_box_fill: float = 0.02  # served mask / box area below this: empty for its box
    max_box_fill: float = 0.97  # served mask / box area at or above this: the box filled, not an object
    min_inside_box: float = 0.9  # share of the served mask inside its box (dilated 2 px) below this: leak
    max_image_fill: float = 0.9  # point prompts: served mask / image at or above this: the whole image
    min_image_std: float = 2.0  # pixel standard deviation below this: a blank image
    box_margin_px: int = 2  # dilation of boxes when measuring leaks (resampling of the stored mask)


@dataclass(frozen=True)
class SelectionConfig:
    holdout_fraction: float = 0.2
    max_client_share: float = 0.25  # 1.0 turns the cap off

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout fraction must be in [0, 1), got {self.holdout_fraction}")
        if not 0.0 < self.max_client_share <= 1.0:
            raise ValueError(f"max client share must be in (0, 1], got {self.max_client_share}")


@dataclass
class Candidate:
    """A captured sample that passed the filters, ready for the trainer or the gate."""

    captured: CapturedSample
    sample: AdaptSample
    prompts: ServedPrompts

    @property
    def request_id(self) -> str:
        return self.captured.request_id


@dataclass
class Selection:
    """The outcome of :func:`select`: training samples, held-out samples, and every decision."""

    train: list[Candidate] = field(default_factory=list)
    holdout: list[Candidate] = field(default_factory=list)
    decisions: dict[str, str] = field(default_factory=dict)  # request_id -> decision
    prompts_filtered: Counter = field(default_factory=Counter)  # reason -> dropped prompts

    def counts(self) -> dict[str, int]:
        """``{decision: number of samples}``, sorted by decision."""
        return dict(sorted(Counter(self.decisions.values()).items()))


def keyed_unit(request_id: str, key: bytes) -> float:
    """A uniform number in [0, 1) that depends only on (key, request_id)."""
    digest = hashlib.blake2b(request_id.encode(), key=key, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def is_holdout(request_id: str, fraction: float) -> bool:
    """Whether ``request_id`` belongs to the held-out slice (deterministic, about ``fraction``)."""
    return keyed_unit(request_id, HOLDOUT_KEY) < fraction


def _box_area(box: np.ndarray) -> float:
    """Pixel area of an inclusive xyxy box."""
    return float(max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0))


def _inside_box(mask: np.ndarray, box: np.ndarray, margin: int) -> int:
    """Pixels of (H, W) ``mask`` inside the inclusive box dilated by ``margin``."""
    h, w = mask.shape
    x0, y0 = max(int(np.floor(box[0])) - margin, 0), max(int(np.floor(box[1])) - margin, 0)
    x1, y1 = min(int(np.ceil(box[2])) + margin, w - 1), min(int(np.ceil(box[3])) + margin, h - 1)
    if x1 < x0 or y1 < y0:
        return 0
    return int(mask[y0:y1 + 1, x0:x1 + 1].sum())


def prompt_problem(prompts: ServedPrompts, i: int, image_hw: tuple[int, int], cfg: FilterConfig) -> str | None:
    """Why prompt ``i`` (with its served mask) is unreliable, or None when it is fine."""
    h, w = image_hw
    mask = prompts.masks[i]
    area = int(mask.sum())
    score = float(prompts.scores[i])
    if np.isfinite(score) and score < cfg.min_score:
        return "low_score"
    if prompts.boxes is not None:
        box = prompts.boxes[i]
        if box[2] - box[0] + 1 < cfg.min_box_px or box[3] - box[1] + 1 < cfg.min_box_px:
            return "tiny_box"
        box_area = _box_area(box)
        if box_area >= cfg.max_box_image_frac * h * w:
            return "whole_image_box"
        inside = _inside_box(mask, box, 0)
        if area < cfg.min_mask_px or inside < cfg.min_box_fill * box_area:
            return "empty_mask"
        if inside >= cfg.max_box_fill * box_area:
            return "full_box_mask"
        if _inside_box(mask, box, cfg.box_margin_px) < cfg.min_inside_box * area:
            return "mask_outside_box"
    else:
        if area < cfg.min_mask_px:
            return "empty_mask"
        if area >= cfg.max_image_fill * h * w:
            return "full_image_mask"
    if prompts.point_coords is not None:
        xy = np.rint(prompts.point_coords[i]).astype(int)
        xs, ys = xy[:, 0].clip(0, w - 1), xy[:, 1].clip(0, h - 1)
        on = mask[ys, xs]
        labels = prompts.point_labels[i]
        if (on[labels == 1] == 0).any():
            return "positive_point_outside_mask"
        if on[labels == 0].any():
            return "negative_point_inside_mask"
    return None


def prepare(sample: CapturedSample, cfg: FilterConfig, prompt_reasons: Counter | None = None) -> Candidate:
    """Decode, parse and filter one captured sample -> a :class:`Candidate` with its reliable prompts.

    Raises UnusableSample with the reason the whole sample is dropped. Dropped prompts of a kept
    sample are counted in ``prompt_reasons``.
    """
    image = decode_image(sample.image)
    if float(image.std()) < cfg.min_image_std:
        raise UnusableSample("blank_image", "the image is (nearly) constant")
    prompts = served_prompts(sample, image.shape[:2])
    reasons = [prompt_problem(prompts, i, image.shape[:2], cfg) for i in range(len(prompts))]
    keep = np.asarray([i for i, r in enumerate(reasons) if r is None], dtype=int)
    dropped = [r for r in reasons if r is not None]
    if not len(keep):
        raise UnusableSample(dropped[0], f"every prompt is unreliable ({', '.join(sorted(set(dropped)))})")
    if prompt_reasons is not None:
        prompt_reasons.update(dropped)
    if len(keep) < len(prompts):
        prompts = prompts.subset(keep)
    return Candidate(sample, to_adapt_sample(sample, image, prompts), prompts)


def _content_key(sample: CapturedSample) -> str:
    """Identity of what a sample shows and asks (image bytes and prompts), not of the request."""
    h = hashlib.sha256(sample.image)
    p = sample.prompts
    h.update(repr((p.get("boxes"), p.get("points"), p.get("point_labels"))).encode())
    return h.hexdigest()


def client_quota(counts: dict[str, int], share: float) -> int:
    """The largest per-client quota q such that no client exceeds ``share`` of the selection.

    With n_c eligible samples per client the selection has S(q) = sum_c min(n_c, q) samples; q is
    the largest value with q <= share * S(q) (S grows with q, so scanning down finds it). With
    fewer than 1 / share clients the answer can be 0: one client alone never trains a round.
    """
    if share >= 1.0 or not counts:
        return max(counts.values(), default=0)
    for q in range(max(counts.values()), 0, -1):
        if q <= share * sum(min(n, q) for n in counts.values()) + 1e-9:
            return q
    return 0


def select(samples: Iterable[CapturedSample], filters: FilterConfig, sel: SelectionConfig) -> Selection:
    """Decide every sample of a round (see the module docstring); deterministic in its input."""
    out = Selection()
    seen: set[str] = set()
    eligible: list[Candidate] = []
    for s in samples:
        try:
            key = _content_key(s)
            if key in seen:
                raise UnusableSample("duplicate", "same image and prompts as an earlier sample")
            seen.add(key)
            cand = prepare(s, filters, out.prompts_filtered)
        except UnusableSample as exc:
            out.decisions[s.request_id] = f"filtered:{exc.reason}"
            continue
        if is_holdout(s.request_id, sel.holdout_fraction):
            out.decisions[s.request_id] = "holdout"
            out.holdout.append(cand)
        else:
            eligible.append(cand)
    per_client: dict[str, list[Candidate]] = {}
    for c in eligible:
        per_client.setdefault(c.captured.client, []).append(c)
    quota = client_quota({k: len(v) for k, v in per_client.items()}, sel.max_client_share)
    chosen: set[str] = set()
    for group in per_client.values():
        ranked = sorted(group, key=lambda c: (keyed_unit(c.request_id, CAP_KEY), c.request_id))
        chosen.update(c.request_id for c in ranked[:quota])
    for c in eligible:  # keep the store's order for training
        if c.request_id in chosen:
            out.decisions[c.request_id] = "used"
            out.train.append(c)
        else:
            out.decisions[c.request_id] = "capped"
    return out
