"""`wesam adapt`: weakly supervised LoRA adaptation of SAM to one target domain.

Three views of SAM per image (WeSAM §2): a frozen anchor (the base model, weak view), the
teacher (LoRA model, weak view, *with* gradient) and the student (the same LoRA model, strong
view). Methods, from weakest to strongest supervision:

- ``self-training``: student vs the teacher's hard pseudo-labels (focal + dice + IoU head);
- ``anchor``: + dice of student and teacher against the anchor's masks;
- ``wesam``: + instance contrast of mask-pooled teacher and anchor embeddings;
- ``wesam+``: + the weak label as supervision (box projections, labelled points, coarse mask
  outside its uncertain band); ``ema_decay`` and ``confidence`` add an EMA teacher and
  confidence-masked pseudo-labels as separate ablations;
- ``oracle``: the same LoRA trained on ground-truth masks (the upper bound).

Options that leave the faithful method as the default (docs/adaptation.md, "Adaptation v2"):
``clip_to_box``/``respect_points`` apply the weak label to the pseudo-labels and anchor labels,
``box_prior`` adds a weighted inscribed-ellipse shape prior to the teacher's and anchor's logits
before they become labels (see :func:`.constraints.ellipse_prior`), ``point_prior`` the ellipse of
the positive points' spread (:func:`.constraints.points_prior`),
``confidence_quantile`` ignores the least confident fraction of each image's box pixels,
``anchor_kind`` holds the anchor's soft prediction (logit/prob) instead of its hard mask (dice),
``select="fixed"`` publishes the last step instead of the best on validation. Every run
reports its speed (steps/s and the share of step time per phase). ``grad_checkpointing``
recomputes the encoder blocks of passes with gradient during the backward pass instead of keeping
their activations (``auto``: on for 1024 px models), see :mod:`.checkpointing`.

Hooks for the online worker (wesam.adapters.online), all optional: ``data=`` trains on samples
held in memory instead of loading ``cfg.data``; ``model=`` uses an already loaded base model;
``init=`` starts the adapter (and the EMA teacher) from a given LoRA state instead of zero;
``pin=`` with ``cfg.pull > 0`` adds a pull towards a pinned adapter whose weight grows with the
drift from it (PeTTA). A non-finite loss raises :class:`NonFiniteLoss` before anything is updated.

Data order and augmentations of step ``t`` depend only on (seed, t): runs are deterministic on
CPU and a resumed run continues exactly. Under ``torchrun`` each rank takes a slice of every
batch and LoRA gradients are all-reduced (averaged) before each step, which is what DDP does.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from wesam.errors import Interrupted, WesamError
from wesam.evaluation.evaluate import PromptSpec, evaluate
from wesam.sam.predictor import SamPredictorCore
from wesam.sam.transforms import SamTransform
from wesam.sam.zoo import LoadedModel, resolve_model

from ..artifact import save_adapter
from ..lora import (
    DEFAULT_ADAPT_TARGETS,
    LoraConfig,
    LoraLinear,
    adapter_state,
    add_adapter,
    load_adapter_state,
    lora_named_layers,
    set_adapter,
    trainable_parameters,
    use_adapter,
)
from ..lora.layer import SEP
from ..registry import Registry
from . import DEFAULT_LR, DEFAULT_METHOD, METHODS
from . import checkpointing as GC
from . import constraints as C
from . import losses as L
from .data import AdaptSample, load_adaptation_data
from .views import flip_view, strong_photometric

ADAPTER = "train"
EMA_ADAPTER = "ema"
SELECT_RULES = ("best", "fixed")
# Settings that do not change the training trajectory: a resumed run may change them.
RESUME_IGNORED = {"steps", "work_dir", "registry", "eval_every", "device", "select", "grad_checkpointing"}


@dataclass
class AdaptConfig:
    data: str
    domain: str
    model: str = "sam-mini"
    checkpoint: str | None = None
    split: str = "train"
    prompt: str = "box"
    method: str = DEFAULT_METHOD
    registry: str | None = "registry"
    steps: int = 400
    batch_size: int = 4
    lr: float = DEFAULT_LR
    weight_decay: float = 1e-4
    warmup_steps: int = 25
    grad_clip: float = 1.0
    lora_rank: int = 4
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = DEFAULT_ADAPT_TARGETS  # encoder q, v + the mask decoder
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 50
    max_instances: int = 40
    n_points: tuple[int, int] = (5, 5)
    val_fraction: float = 0.12
    ema_decay: float | None = None
    confidence: float | None = None  # ignore pseudo-label pixels with |teacher logit| below this
    pairwise: bool = False  # wesam+ with boxes: add BoxInst's colour-affinity pairwise term
    # Weak labels as constraints on the teacher's pseudo-labels and the anchor's labels:
    clip_to_box: bool = False  # box prompts: background outside the box dilated by clip_margin px
    clip_margin: int = 2  # px at the model's input frame
    respect_points: bool = False  # point prompts: a disk of point_radius px takes the point's label
    point_radius: int = 2  # px at the model's input frame
    # Box prompts: add box_prior * (1 - r^2) of each box's inscribed ellipse to the teacher's and the
    # anchor's logits before they become labels (None: off). The model's own logits inside a box
    # are near +-0.3 on a weak source, so a weight of 2 lets the prior decide until the model is sure.
    box_prior: float | None = None
    # Point prompts: the same with 1 - m^2/4 of the ellipse two standard deviations around each
    # instance's positive points (m: Mahalanobis distance under their covariance); None: off.
    point_prior: float | None = None
    # Ignore this fraction of in-box pixels with the smallest |teacher logit| (per image):
    confidence_quantile: float | None = None
    anchor_kind: str = "dice"  # dice (the reference), logit (clamped smooth-L1) or prob (MSE)
    anchor_clip: float = L.ANCHOR_LOGIT_CLIP  # logit range of anchor_kind="logit"
    select: str = "best"  # best: best-on-validation state; fixed: the state at exactly `steps`
    # Recompute the image encoder's blocks in the backward pass instead of keeping their activations
    # (auto: on when the model's input is >= 1024 px, i.e. the official models; off for sam-mini).
    grad_checkpointing: str = "auto"
    weights: dict[str, float] = field(default_factory=lambda: {
        "focal": 20.0, "dice": 1.0, "iou": 1.0, "anchor": 1.0, "contrast": 1.0,
        "box": 1.0, "pairwise": 1.0, "point": 1.0, "coarse": 1.0, "oracle_focal": 20.0, "oracle_dice": 1.0})
    work_dir: str | None = None
    limit: int | None = None
    skip_bad: bool = False
    # Pull towards a pinned adapter (the online worker's anchor; 0: off). The term is
    # pull * (1 + drift / drift_scale) * drift**2, drift = ||dW - dW_pin|| / ||W0 + dW_pin|| over the
    # adapted weight slices (dW = scale * B @ A): the weight grows with the drift (PeTTA).
    pull: float = 0.0
    drift_scale: float = 0.1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.prompt not in ("box", "point", "coarse", "coarse-box"):
            raise ValueError(f"unknown prompt {self.prompt!r}")
        if self.anchor_kind not in L.ANCHOR_KINDS:
            raise ValueError(f"unknown anchor kind {self.anchor_kind!r}; choose from {', '.join(L.ANCHOR_KINDS)}")
        if self.select not in SELECT_RULES:
            raise ValueError(f"unknown selection rule {self.select!r}; choose from {', '.join(SELECT_RULES)}")
        if self.confidence_quantile is not None and not 0.0 <= self.confidence_quantile < 1.0:
            raise ValueError(f"confidence quantile must be in [0, 1), got {self.confidence_quantile}")
        if self.box_prior is not None and not (0.0 < self.box_prior < float("inf")):
            raise ValueError(f"box prior weight must be finite and > 0, got {self.box_prior}")
        if self.box_prior is not None and self.prompt not in ("box", "coarse-box"):
            raise ValueError(f"a box prior needs box prompts (--prompt box or coarse-box), not {self.prompt!r}")
        if self.point_prior is not None and not (0.0 < self.point_prior < float("inf")):
            raise ValueError(f"point prior weight must be finite and > 0, got {self.point_prior}")
        if self.point_prior is not None and self.prompt != "point":
            raise ValueError(f"a point prior needs point prompts (--prompt point), not {self.prompt!r}")
        if self.clip_margin < 0 or self.point_radius < 0 or self.anchor_clip <= 0:
            raise ValueError("clip margin and point radius must be >= 0 and the anchor clip > 0")
        if self.grad_checkpointing not in GC.MODES:
            raise ValueError(f"unknown grad-checkpointing mode {self.grad_checkpointing!r}; "
                             f"choose from {', '.join(GC.MODES)}")
        if self.pull < 0 or self.drift_scale <= 0:
            raise ValueError(f"pull must be >= 0 and drift_scale > 0, got {self.pull} and {self.drift_scale}")
        self.lora_targets = tuple(self.lora_targets)
        self.n_points = tuple(self.n_points)

    @property
    def run_name(self) -> str:
        extra = (f"-ema{self.ema_decay}" if self.ema_decay else "") + (f"-conf{self.confidence}" if self.confidence else "")
        extra += "-pairwise" if self.pairwise else ""
        extra += f"-clip{self.clip_margin}" if self.clip_to_box else ""
        extra += f"-prior{self.box_prior:g}" if self.box_prior else ""
        extra += f"-pprior{self.point_prior:g}" if self.point_prior else ""
        extra += f"-pts{self.point_radius}" if self.respect_points else ""
        extra += f"-confq{self.confidence_quantile}" if self.confidence_quantile else ""
        extra += f"-anchor{self.anchor_kind}" if self.anchor_kind != "dice" else ""
        extra += "-fixed" if self.select != "best" else ""
        return f"{self.domain}-{self.method}{extra}-{self.prompt}-r{self.lora_rank}-{'+'.join(self.lora_targets)}-s{self.seed}"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        d["n_points"] = list(self.n_points)
        return d


class AdaptInterrupted(Interrupted):
    """Ctrl-C: the checkpoint is saved, nothing is published."""


class NonFiniteLoss(WesamError, FloatingPointError):
    """The training loss (or its gradient) is NaN or infinite; the step was not applied."""

    kind = "non_finite_loss"


#: A LoRA adapter as data: its config and its tensors keyed as :func:`adapter_state` keys them.
AdapterState = tuple[LoraConfig, dict[str, torch.Tensor]]


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class _View:
    """One image prepared for the model: tensors in the padded input frame at loss resolution."""

    image: torch.Tensor  # (3, S, S) normalised
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    points: tuple[torch.Tensor, torch.Tensor] | None
    boxes: torch.Tensor | None
    mask_prompt: torch.Tensor | None
    gt: torch.Tensor  # (N, h, w) {0,1} at the input frame (oracle and evaluation only)
    box_input: torch.Tensor | None  # (N, 4) in the input frame
    coords_input: torch.Tensor | None  # (N, K, 2)
    point_labels: torch.Tensor | None
    coarse_input: torch.Tensor | None  # (N, h, w)
    affinity: torch.Tensor | None = None  # (8, h, w) colour similarity to neighbours (pairwise loss)
    box_pixels: torch.Tensor | None = None  # (N, 4) the box prompts as inclusive pixel boxes, input frame


class _Clock:
    """Perf counters: accumulated seconds per phase (CUDA is synchronised at each reading)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}
        self.steps = 0

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def add(self, key: str, seconds: float) -> None:
        self.totals[key] = self.totals.get(key, 0.0) + seconds

    @contextlib.contextmanager
    def __call__(self, key: str):
        t = self.now()
        try:
            yield
        finally:
            self.add(key, self.now() - t)


SPEED_PHASES = ("encoder_forward", "encoder_backward", "decoder_forward", "decoder_backward")


class AdaptationTrainer:
    def __init__(self, cfg: AdaptConfig, log: Callable[[str], None] = print, *,
                 data: tuple[list[AdaptSample], list[AdaptSample], str] | None = None,
                 model: LoadedModel | None = None, init: AdapterState | None = None,
                 pin: AdapterState | None = None) -> None:
        """``data``: (train, val, fingerprint) held in memory instead of loading ``cfg.data``;
        ``model``: a loaded base model to train on (it is modified: LoRA is added to it);
        ``init``: start the adapter and the EMA teacher from this LoRA state (its config replaces
        ``cfg.lora_*``); ``pin``: the pinned adapter ``cfg.pull`` pulls towards (None: the base)."""
        self.cfg = cfg
        self.rank, self.world = _dist()
        self.log = log if self.rank == 0 else (lambda *_: None)
        torch.manual_seed(cfg.seed)
        self.base: LoadedModel = model if model is not None else resolve_model(cfg.model, cfg.checkpoint)
        self.device = torch.device(cfg.device)
        sam = self.base.sam.to(self.device)
        # The anchor is copied before LoRA exists: it is exactly the source model.
        self.anchor = copy.deepcopy(sam).eval()
        for p in self.anchor.parameters():
            p.requires_grad_(False)
        self.lora_cfg = init[0] if init is not None else LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                                                                    targets=cfg.lora_targets)
        add_adapter(sam, ADAPTER, self.lora_cfg)
        if cfg.ema_decay:
            add_adapter(sam, EMA_ADAPTER, self.lora_cfg)
        if init is not None:
            load_adapter_state(sam, ADAPTER, init[1])
            if cfg.ema_decay:  # the teacher starts where the student does
                load_adapter_state(sam, EMA_ADAPTER, init[1])
        self.params = trainable_parameters(sam, ADAPTER)
        set_adapter(sam, ADAPTER)
        self.sam = sam
        self.grad_checkpointing = GC.resolve(cfg.grad_checkpointing, sam.image_encoder.img_size)
        self.transform = SamTransform(sam.image_encoder.img_size, sam.prompt_encoder.mask_input_size[0])
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self._pin = self._pin_targets(pin) if cfg.pull > 0 else None
        if data is not None:
            self.train, self.val, self.fingerprint = list(data[0]), list(data[1]), data[2]
        else:
            self.train, self.val, self.fingerprint = load_adaptation_data(
                cfg.data, cfg.split, cfg.prompt, seed=cfg.seed, n_points=cfg.n_points,
                val_fraction=cfg.val_fraction, skip_bad=cfg.skip_bad, limit=cfg.limit)
        if not self.train:
            raise ValueError(f"no adaptation images in {cfg.data} split {cfg.split!r}")
        self.work = Path(cfg.work_dir or Path("runs") / "adapt" / cfg.run_name)
        self.step = 0
        self.best_val = -1.0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, Any]] = []
        self.val_before: dict[str, Any] | None = None
        self.seconds = 0.0
        self.best_step = 0
        self.clock = _Clock(self.device)

    # -- pull towards a pinned adapter
    @torch.no_grad()
    def _pin_targets(self, pin: AdapterState | None) -> tuple[list[tuple[LoraLinear, str, torch.Tensor]], float]:
        """Per adapted weight slice: (layer, key of the trained adapter, the pinned dW); and
        ||W0 + dW_pin||^2 summed over the slices (the drift's denominator; the base is frozen).

        Drift compares effective updates dW = scale * B @ A, not the factors A and B: LoRA factors
        are not identifiable (B A = (B M)(M^-1 A)), and the base model (``pin=None``) has none.
        """
        pinned: dict[str, torch.Tensor] = {}
        if pin is not None:
            pin_cfg, state = pin
            for key, a in state.items():
                if key.endswith(".lora_A"):
                    b = state[key[:-len("lora_A")] + "lora_B"]
                    pinned[key[:-len(".lora_A")]] = pin_cfg.scale * (b.float() @ a.float()).to(self.device)
        entries, den = [], 0.0
        for path, m in lora_named_layers(self.sam):
            for key in m.keys_of(ADAPTER):
                name = f"{path}.{key.rsplit(SEP, 1)[1]}"
                s0, s1 = m.slices[key]
                dw = pinned.pop(name, None)
                dw = torch.zeros_like(m.base.weight[s0:s1], dtype=torch.float32) if dw is None else dw
                if dw.shape != m.base.weight[s0:s1].shape:
                    raise ValueError(f"pinned adapter: {name} has shape {tuple(dw.shape)}, "
                                     f"expected {tuple(m.base.weight[s0:s1].shape)}")
                entries.append((m, key, dw))
                den += float(((m.base.weight[s0:s1].float() + dw) ** 2).sum())
        if pinned:
            raise ValueError(f"the pinned adapter adapts weights the trained adapter does not: {sorted(pinned)[:3]}")
        return entries, max(den, 1e-12)

    def _pull_term(self) -> tuple[torch.Tensor, float]:
        """(drift**2 with gradient, drift as a number); see :attr:`AdaptConfig.pull`."""
        entries, den = self._pin
        sq = sum((((m.delta_weight(key).float() - dw) ** 2).sum() for m, key, dw in entries),
                 torch.zeros((), device=self.device))
        rel2 = sq / den
        return rel2, float(rel2.detach().sqrt())

    @torch.no_grad()
    def drift(self) -> float | None:
        """The trained adapter's relative distance to the pinned one (None without a pull)."""
        return None if self._pin is None else self._pull_term()[1]

    # -- data
    def _view(self, sample: AdaptSample, rng: np.random.Generator) -> tuple[_View, _View | None]:
        cfg, t = self.cfg, self.transform
        image, masks, label = flip_view(sample.image, sample.instances, sample.label,
                                        bool(rng.random() < 0.5), bool(rng.random() < 0.5))
        n = len(masks)
        if n > cfg.max_instances:  # the reference caps instances per training image (§7)
            keep = np.sort(rng.choice(n, cfg.max_instances, replace=False))
            masks = masks[keep]
            label = type(label)(label.kind,
                                boxes=None if label.boxes is None else label.boxes[keep],
                                point_coords=None if label.point_coords is None else label.point_coords[keep],
                                point_labels=None if label.point_labels is None else label.point_labels[keep],
                                mask_inputs=None if label.mask_inputs is None else label.mask_inputs[keep])
        strong = strong_photometric(image, rng)
        orig = image.shape[:2]
        dev = self.device

        def make(img: np.ndarray) -> _View:
            x, in_size = t.image_to_tensor(img)
            h, w = in_size
            gt = F.interpolate(torch.as_tensor(masks, dtype=torch.float32)[:, None], (h, w), mode="nearest")[:, 0]
            points = boxes = mask_prompt = box_in = coords_in = labels = coarse_in = None
            if label.boxes is not None:
                box_in = torch.as_tensor(t.boxes(label.boxes, orig), dtype=torch.float32, device=dev)
                boxes = box_in
            if label.point_coords is not None:
                coords_in = torch.as_tensor(t.coords(label.point_coords, orig), dtype=torch.float32, device=dev)
                labels = torch.as_tensor(label.point_labels, dtype=torch.int64, device=dev)
                points = (coords_in, labels)
            if label.mask_inputs is not None:
                mask_prompt = torch.as_tensor(t.mask_to_prompt(label.mask_inputs, orig), device=dev)
                coarse_in = F.interpolate(torch.as_tensor(label.mask_inputs, dtype=torch.float32)[:, None], (h, w),
                                          mode="nearest")[:, 0].to(dev)
            return _View(x.to(dev), in_size, orig, points, boxes, mask_prompt, gt.to(dev), box_in, coords_in,
                         labels, coarse_in)

        weak, strong_view = make(image), make(strong)
        if label.boxes is not None:
            weak.box_pixels = strong_view.box_pixels = torch.as_tensor(
                C.input_frame_boxes(label.boxes, orig, t), dtype=torch.float32, device=dev)
        if cfg.pairwise and cfg.method == "wesam+" and label.boxes is not None:
            # Colours of the weak view: the strong view's photometric changes would fake edges.
            h, w = weak.input_size
            small = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
            lab = torch.as_tensor(cv2.cvtColor(small, cv2.COLOR_RGB2LAB)).permute(2, 0, 1)
            strong_view.affinity = L.colour_affinity(lab).to(dev)
        return weak, strong_view

    # -- model passes
    def _decode(self, sam, emb: torch.Tensor, v: _View) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """emb (1, C, g, g) -> low-res (N, 1, L, L), full logits cropped to the input (N, h, w), IoU (N,)."""
        with self.clock("decoder_forward"):
            return self._decode_untimed(sam, emb, v)

    def _decode_untimed(self, sam, emb: torch.Tensor, v: _View) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sparse, dense = sam.prompt_encoder(points=v.points, boxes=v.boxes, masks=v.mask_prompt)
        low, iou = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=False)
        s = sam.image_encoder.img_size
        full = F.interpolate(low, (s, s), mode="bilinear", align_corners=False)[:, 0, :v.input_size[0], :v.input_size[1]]
        return low, full, iou[:, 0]

    def _image_losses(self, weak: _View, strong: _View, e_a, e_t, e_s) -> dict[str, torch.Tensor]:
        cfg, w = self.cfg, self.cfg.weights
        sam = self.sam
        out: dict[str, torch.Tensor] = {}
        s_low, s_full, s_iou = self._decode(sam, e_s, strong)
        if cfg.method == "oracle":
            out["oracle_focal"] = L.constant_alpha_focal(s_full, weak.gt, alpha=L.FOCAL_ALPHA)
            out["oracle_dice"] = L.dice_loss(s_full, weak.gt, per_mask=False)
            with torch.no_grad():
                target = L.mask_iou(s_full > 0, weak.gt > 0.5)
            out["iou"] = F.mse_loss(s_iou.float(), target)
            return out
        if cfg.ema_decay:
            with torch.no_grad(), use_adapter(sam, EMA_ADAPTER):
                t_low, t_full, _ = self._decode(sam, e_t, weak)
        else:
            t_low, t_full, _ = self._decode(sam, e_t, weak)
        region = self._box_region(weak)
        prior = self._prior(weak)
        pseudo = self._constrain((t_full.detach() + prior > 0).float(), weak, region, 1.0, 0.0)
        weight = (t_full.detach().abs() >= cfg.confidence).float() if cfg.confidence else None
        if cfg.confidence_quantile:
            q = C.quantile_weight(t_full.detach(), cfg.confidence_quantile, region)
            weight = q if weight is None else weight * q
        out.update(L.self_training_loss(s_full, pseudo, s_iou, weight))
        if cfg.method in ("anchor", "wesam", "wesam+"):
            with torch.no_grad():
                a_low, a_full, _ = self._decode(self.anchor, e_a, weak)
            if cfg.anchor_kind == "dice":
                a_lab = self._constrain((a_full + prior > 0).float(), weak, region, 1.0, 0.0)
                if cfg.ema_decay:  # the EMA teacher has no gradient: tie the student only
                    out["anchor"] = L.dice_loss(s_full, a_lab, per_mask=False)
                else:
                    out["anchor"] = L.anchor_loss(s_full, t_full, a_lab)
            else:  # hold the anchor's soft prediction; constraints set saturated logits
                a_tgt = self._constrain(a_full + prior, weak, region, 1e4, -1e4)
                out["anchor"] = L.anchor_hold_loss(s_full, a_tgt, cfg.anchor_kind, cfg.anchor_clip)
                if not cfg.ema_decay:
                    out["anchor"] = 0.5 * out["anchor"] + 0.5 * L.anchor_hold_loss(
                        t_full, a_tgt, cfg.anchor_kind, cfg.anchor_clip)
            if cfg.method in ("wesam", "wesam+"):
                if cfg.ema_decay:
                    out["contrast"] = L.contrastive_loss(e_s[0], e_a[0], s_low, a_low)
                else:
                    out["contrast"] = L.contrastive_loss(e_t[0], e_a[0], t_low, a_low)
        if cfg.method == "wesam+":
            if strong.box_input is not None:
                out["box"] = L.box_projection_loss(s_full, strong.box_input)
                if strong.affinity is not None:
                    out["pairwise"] = L.pairwise_affinity_loss(s_full, strong.affinity, strong.box_input)
            if strong.coords_input is not None:
                out["point"] = L.point_loss(s_full, strong.coords_input, strong.point_labels)
            if strong.coarse_input is not None:
                out["coarse"] = L.coarse_agreement_loss(s_full, strong.coarse_input)
        return out

    def _box_region(self, v: _View) -> torch.Tensor | None:
        """(N, h, w) bool: each instance's box prompt dilated by clip_margin; None without box prompts."""
        if v.box_pixels is None or not (self.cfg.clip_to_box or self.cfg.confidence_quantile):
            return None
        return C.box_region(v.box_pixels, v.input_size, self.cfg.clip_margin)

    def _prior(self, v: _View) -> torch.Tensor | float:
        """(N, h, w) shape prior added to logits before they become labels, or 0.0 (none):
        box_prior * (1 - r²) of each box's inscribed ellipse, point_prior * (1 - m²/4) of the
        positive points' spread."""
        if self.cfg.box_prior and v.box_pixels is not None:
            return self.cfg.box_prior * C.ellipse_prior(v.box_pixels, v.input_size)
        if self.cfg.point_prior and v.coords_input is not None:
            return self.cfg.point_prior * C.points_prior(v.coords_input, v.point_labels, v.input_size)
        return 0.0

    def _constrain(self, x: torch.Tensor, v: _View, region: torch.Tensor | None, pos: float, neg: float
                   ) -> torch.Tensor:
        """Apply the weak label to labels/logits x (N, h, w): ``neg`` outside the dilated box (clip_to_box),
        ``pos``/``neg`` in a disk around each positive/negative labelled point (respect_points)."""
        if self.cfg.clip_to_box and region is not None:
            x = torch.where(region, x, torch.full_like(x, neg))
        if self.cfg.respect_points and v.coords_input is not None:
            x = C.paint_points(x, v.coords_input, v.point_labels, self.cfg.point_radius, pos, neg)
        return x

    def train_step(self) -> dict[str, float]:
        start = self.clock.now()
        terms = self._train_step()
        self.clock.add("step", self.clock.now() - start)
        self.clock.steps += 1
        return terms

    def _train_step(self) -> dict[str, float]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, self.step])
        picks = rng.choice(len(self.train), cfg.batch_size, replace=len(self.train) < cfg.batch_size)
        mine = picks[self.rank::self.world]
        views = [self._view(self.train[i], np.random.default_rng([cfg.seed, self.step, int(j)]))
                 for j, i in zip(range(self.rank, cfg.batch_size, self.world), mine)]
        weak = torch.stack([v[0].image for v in views])
        strong = torch.stack([v[1].image for v in views])
        sam = self.sam
        ckpt = self.grad_checkpointing  # only passes with gradient are checkpointed (teacher, student)
        needs_teacher_grad = cfg.method in ("anchor", "wesam", "wesam+") and not cfg.ema_decay
        e_a = e_t = None
        with self.clock("encoder_forward"):
            if cfg.method != "oracle":
                if cfg.method != "self-training":
                    with torch.no_grad():
                        e_a = self.anchor.image_encoder(weak)
                if cfg.ema_decay:
                    with torch.no_grad(), use_adapter(sam, EMA_ADAPTER):
                        e_t = sam.image_encoder(weak)
                elif needs_teacher_grad:
                    e_t = GC.encode(sam.image_encoder, weak, ckpt)
                else:
                    with torch.no_grad():
                        e_t = sam.image_encoder(weak)
            e_s = GC.encode(sam.image_encoder, strong, ckpt)
        total = torch.zeros((), device=self.device)
        terms: dict[str, float] = {}
        for i, (wv, sv) in enumerate(views):
            losses = self._image_losses(wv, sv, None if e_a is None else e_a[i:i + 1],
                                        None if e_t is None else e_t[i:i + 1], e_s[i:i + 1])
            for k, v in losses.items():
                total = total + cfg.weights.get(k, 1.0) * v
                terms[k] = terms.get(k, 0.0) + float(v.detach()) / len(views)
        total = total / max(len(views), 1)
        if self._pin is not None:
            rel2, drift = self._pull_term()
            # The weight is a number, not a function of the weights (PeTTA adapts lambda, it does
            # not differentiate through it).
            pull = cfg.pull * (1.0 + drift / cfg.drift_scale) * rel2
            terms["pull"], terms["drift"] = float(pull.detach()), drift
            total = total + pull
        bad = (~torch.isfinite(total.detach())).float().reshape(1)
        if self.world > 1:  # every rank stops together (one rank raising alone would hang the others)
            dist.all_reduce(bad)
        if bad.item() > 0:
            raise NonFiniteLoss(f"non-finite loss at step {self.step}: "
                                + ", ".join(f"{k}={v:.4g}" for k, v in terms.items()))
        lr = cfg.lr * min(1.0, (self.step + 1) / max(cfg.warmup_steps, 1))
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        # The gradient reaches the image embeddings once the decoder's backward is done (autograd runs
        # later-created nodes first); what follows is the encoders' backward. With two encoder passes with
        # gradient (teacher and student) the split is the *first* embedding reached: the student's encoder
        # backward runs before the teacher's embedding hook fires, and belongs to the encoder.
        reached: list[float] = []
        for e in (e_t, e_s):
            if e is not None and e.requires_grad:
                e.register_hook(lambda g: reached.append(self.clock.now()))
        b0 = self.clock.now()
        total.backward()
        b1 = self.clock.now()
        split = min(reached) if reached else b1
        self.clock.add("decoder_backward", split - b0)
        self.clock.add("encoder_backward", b1 - split)
        if self.world > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= self.world
        if cfg.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            if not torch.isfinite(norm):
                self.opt.zero_grad(set_to_none=True)
                raise NonFiniteLoss(f"non-finite gradient at step {self.step}")
        self.opt.step()
        if cfg.ema_decay:
            self._ema_update()
        self.step += 1
        terms["loss"] = float(total.detach())
        return terms

    @torch.no_grad()
    def _ema_update(self) -> None:
        d = self.cfg.ema_decay
        src = adapter_state(self.sam, ADAPTER)
        dst = adapter_state(self.sam, EMA_ADAPTER)
        for k, v in dst.items():
            v.mul_(d).add_(src[k], alpha=1 - d)

    # -- evaluation
    def evaluate_val(self, adapter: str | None = ADAPTER) -> dict[str, Any]:
        cfg = self.cfg
        with use_adapter(self.sam, adapter):
            pred = SamPredictorCore(self.sam, self.device)
            spec = PromptSpec(cfg.prompt, n_points=cfg.n_points, seed=cfg.seed)
            return evaluate(pred, self.val, spec)

    # -- checkpoints
    @property
    def ckpt_path(self) -> Path:
        return self.work / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        self.work.mkdir(parents=True, exist_ok=True)
        state = {
            "adapter": adapter_state(self.sam, ADAPTER),
            "ema": adapter_state(self.sam, EMA_ADAPTER) if self.cfg.ema_decay else {},
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "seconds": self.seconds,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "best_state": self.best_state or {},
            "history": json.dumps(self.history),
            "val_before": json.dumps(self.val_before),
            "config": json.dumps(self.cfg.to_json()),
            # The model's name alone does not identify it: the shipped sam-mini changes between
            # releases, and a LoRA resumed onto other base weights would be meaningless.
            "base_sha256": self.base.sha256 or "",
        }
        tmp = self.ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_path)

    def resume(self) -> bool:
        if not self.ckpt_path.is_file():
            return False
        state = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        saved = json.loads(state["config"])
        mine = self.cfg.to_json()
        # A setting the checkpoint predates counts as its default.
        defaults = {f.name: f.default for f in dataclasses.fields(AdaptConfig) if f.default is not dataclasses.MISSING}
        diff = {k for k in mine if k not in RESUME_IGNORED and saved.get(k, defaults.get(k)) != mine[k]}
        if diff:
            raise RuntimeError(f"{self.ckpt_path} was made with different settings ({', '.join(sorted(diff))}); "
                               "use another --work-dir or --no-resume")
        saved_base = state.get("base_sha256")
        if saved_base is not None and saved_base != (self.base.sha256 or ""):
            raise RuntimeError(f"{self.ckpt_path} was trained on other base weights of {self.cfg.model!r} "
                               f"(sha256 {saved_base[:12] or 'random'}…, now {(self.base.sha256 or 'random')[:12]}…); "
                               "use another --work-dir or --no-resume")
        load_adapter_state(self.sam, ADAPTER, state["adapter"])
        if self.cfg.ema_decay and state["ema"]:
            load_adapter_state(self.sam, EMA_ADAPTER, state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.seconds = int(state["step"]), float(state["seconds"])
        self.best_val = float(state["best_val"])
        self.best_step = int(state.get("best_step", 0))
        self.best_state = state["best_state"] or None
        self.history = json.loads(state["history"])
        self.val_before = json.loads(state["val_before"])
        self.log(f"resumed {self.ckpt_path} at step {self.step}")
        return True

    def _validate_and_keep(self, train_terms: dict[str, float] | None) -> dict[str, Any]:
        res = self.evaluate_val()
        row = {"step": self.step, "val_miou": res["miou"], "val_f1": res["f1"], "train": train_terms}
        self.history.append(row)
        if res["miou"] > self.best_val:
            self.best_val = res["miou"]
            self.best_state = {k: v.clone() for k, v in adapter_state(self.sam, ADAPTER).items()}
            self.best_step = self.step
            row["best"] = True
        self.log(f"step {self.step}: val mIoU {res['miou']:.4f} (best {self.best_val:.4f})")
        return res

    # -- main
    def run(self, resume: bool = True, publish: bool = True) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg
        if resume:
            self.resume()
        if self.val_before is None and self.rank == 0 and self.val:
            self.val_before = self.evaluate_val(adapter=None)
            self.best_val = self.val_before["miou"]  # the adapter must beat doing nothing
            self.best_state = {k: v.clone() for k, v in adapter_state(self.sam, ADAPTER).items()}
            self.log(f"direct (no adapter) val mIoU {self.best_val:.4f} on {len(self.val)} images")
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", disable=self.rank != 0,
                   desc=f"adapt {cfg.domain} ({cfg.method}, {cfg.prompt})", dynamic_ncols=True)
        t0 = time.monotonic() - self.seconds
        terms: dict[str, float] | None = None
        try:
            while self.step < cfg.steps:
                terms = self.train_step()
                self.seconds = time.monotonic() - t0
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in terms.items()}, refresh=False)
                if self.rank == 0 and self.val and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    with self.clock("validation"):
                        self._validate_and_keep(terms)
                    self.save_checkpoint()
        except KeyboardInterrupt:
            bar.close()
            self.save_checkpoint()
            raise AdaptInterrupted(f"interrupted at step {self.step}; checkpoint {self.ckpt_path}; nothing published")
        bar.close()
        self.save_checkpoint()
        if self.rank != 0:
            return {}
        if cfg.select == "best" and self.best_state is not None:
            load_adapter_state(self.sam, ADAPTER, self.best_state)
            selected = self.best_step
        else:  # "fixed": the state at exactly `steps` (validation was only logged)
            selected = self.step
        after = self.evaluate_val() if self.val else None
        speed = self.speed_report()
        summary = {
            "domain": cfg.domain, "method": cfg.method, "prompt": cfg.prompt, "steps": self.step,
            "select": cfg.select, "selected_step": selected,
            "seconds": round(self.seconds, 1), "val_before": _brief(self.val_before), "val_after": _brief(after),
            "n_train": len(self.train), "n_val": len(self.val), "speed": speed,
            "grad_checkpointing": self.grad_checkpointing,
        }
        self.log(f"published state: step {selected} ({cfg.select})")
        if speed["steps"]:
            sh = speed["share"]
            self.log(f"speed: {speed['steps']} steps in {speed['train_seconds']:.1f} s ({speed['steps_per_s']:.3f} "
                     f"steps/s, validation {speed['validation_seconds']:.1f} s); encoder forward "
                     f"{sh['encoder_forward']:.0%}, encoder backward {sh['encoder_backward']:.0%}, decoder forward "
                     f"{sh['decoder_forward']:.0%}, decoder backward {sh['decoder_backward']:.0%}, rest {sh['rest']:.0%}")
        if publish and cfg.registry:
            art = self._publish(summary)
            summary["adapter"] = str(art.ref)
            summary["adapter_path"] = str(art.path)
        return summary

    def speed_report(self) -> dict[str, Any]:
        """Training steps run by this process, their rate, and each phase's share of training-step time.

        Shares (of the time inside training steps, validation excluded) are encoder forward (anchor,
        teacher, student), encoder backward, decoder forward (prompt encoder + mask decoder +
        upsampling, all networks), decoder backward, and the rest (views, losses, optimiser); they
        sum to 1. A resumed run reports the steps since it resumed.
        """
        c = self.clock
        step_s = c.totals.get("step", 0.0)
        share = {k: (c.totals.get(k, 0.0) / step_s if step_s > 0 else 0.0) for k in SPEED_PHASES}
        scale = sum(share.values())
        if scale > 1.0:  # timer overlap rounding: keep the shares a partition
            share = {k: v / scale for k, v in share.items()}
        share["rest"] = max(0.0, 1.0 - sum(share.values()))
        return {"steps": c.steps, "train_seconds": round(step_s, 3),
                "steps_per_s": round(c.steps / step_s, 4) if step_s > 0 else 0.0,
                "validation_seconds": round(c.totals.get("validation", 0.0), 3), "share": share}

    def _publish(self, summary: dict[str, Any]):
        cfg = self.cfg
        reg = Registry(cfg.registry)
        extra = {
            "method": cfg.method + (f"+ema{cfg.ema_decay}" if cfg.ema_decay else "")
            + (f"+conf{cfg.confidence}" if cfg.confidence else "")
            + ("+clip" if cfg.clip_to_box else "") + ("+points" if cfg.respect_points else "")
            + (f"+prior{cfg.box_prior:g}" if cfg.box_prior else "")
            + (f"+pprior{cfg.point_prior:g}" if cfg.point_prior else "")
            + (f"+confq{cfg.confidence_quantile}" if cfg.confidence_quantile else "")
            + (f"+anchor-{cfg.anchor_kind}" if cfg.anchor_kind != "dice" else ""),
            "prompt": cfg.prompt,
            "supervision": supervision_of(cfg),
            "data": {"path": str(cfg.data), "split": cfg.split, "fingerprint": self.fingerprint,
                     "n_train": len(self.train), "n_val": len(self.val)},
            "steps": self.step, "seed": cfg.seed, "train_seconds": round(self.seconds, 1),
            "selection": {"rule": cfg.select, "step": summary["selected_step"]},
            "grad_checkpointing": self.grad_checkpointing,
            "metrics": {"before": summary["val_before"], "after": summary["val_after"],
                        "measured_on": "validation split carved from the adaptation data"},
            "config": cfg.to_json(),
        }
        with reg.staging(cfg.domain) as staged:
            save_adapter(staged, self.base, ADAPTER, domain=cfg.domain, extra=extra)
        return reg.publish(staged, cfg.domain)


def supervision_of(cfg: AdaptConfig) -> dict[str, str]:
    """What labels an adapter was trained from, for its ``adapter.json`` (readers should not have
    to know that ``oracle`` means ground-truth masks)."""
    if cfg.method == "oracle":
        return {"kind": "full", "labels": "ground-truth masks of the adaptation split"}
    labels = {
        "box": "tight boxes of the ground-truth instances (no masks)",
        "point": f"{cfg.n_points[0]} positive + {cfg.n_points[1]} negative points per instance (no masks)",
        "coarse": "coarse masks (degraded ground truth)",
        "coarse-box": "coarse masks and their boxes (degraded ground truth)",
    }.get(cfg.prompt, cfg.prompt)
    return {"kind": "weak", "labels": labels}


def _brief(res: dict[str, Any] | None) -> dict[str, Any] | None:
    if res is None:
        return None
    return {"miou": res["miou"], "f1": res["f1"], "n_images": res["n_images"], "n_instances": res["n_instances"]}
