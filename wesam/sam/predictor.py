"""Batched SAM inference: encode images once, decode many prompts per image.

Shapes: N prompts per image, K points per prompt, M masks per prompt (1, or 3 with
multimask), L = low-res mask side (img_size / 4), (H, W) = original image size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from segment_anything.modeling import Sam

from .transforms import SamTransform, upscale_logits


@dataclass
class Prompts:
    """Prompts for one image, in original-image pixels; one mask set per row.

    point_coords: (N, K, 2) float xy; point_labels: (N, K) int (1 fg, 0 bg, -1 padding);
    boxes: (N, 4) float xyxy; mask_inputs: (N, 1, L, L) float logits in the padded input frame.
    Any field may be None; all given fields share N.
    """

    point_coords: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    boxes: np.ndarray | None = None
    mask_inputs: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.point_coords is not None:
            self.point_coords = np.asarray(self.point_coords, dtype=np.float32)
            if self.point_coords.ndim == 2:
                self.point_coords = self.point_coords[None]
            if self.point_labels is None:
                raise ValueError("point_labels are required with point_coords")
            self.point_labels = np.asarray(self.point_labels, dtype=np.int32).reshape(
                self.point_coords.shape[:2])
        if self.boxes is not None:
            self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        if self.mask_inputs is not None:
            self.mask_inputs = np.asarray(self.mask_inputs, dtype=np.float32)
        counts = {len(x) for x in (self.point_coords, self.boxes, self.mask_inputs) if x is not None}
        if len(counts) > 1:
            raise ValueError(f"prompt fields disagree on the number of prompts: {sorted(counts)}")
        if not counts and self.mask_inputs is None:
            raise ValueError("no prompt given: pass points, boxes or a mask input")

    def __len__(self) -> int:
        for x in (self.point_coords, self.boxes, self.mask_inputs):
            if x is not None:
                return len(x)
        return 0

    def subset(self, index: np.ndarray | slice) -> "Prompts":
        pick = lambda x: None if x is None else x[index]  # noqa: E731
        return Prompts(pick(self.point_coords), pick(self.point_labels), pick(self.boxes),
                       pick(self.mask_inputs))


@dataclass
class ImageEmbedding:
    """Encoder output for one image: features (1, C, g, g) plus the frames it was computed in."""

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.features.element_size() * self.features.nelement()


@dataclass
class Prediction:
    """masks: (N, M, H, W) bool (or float logits with return_logits); scores: (N, M);
    low_res_logits: (N, M, L, L)."""

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray

    def best(self) -> "Prediction":
        """Keep, per prompt, the mask with the highest predicted IoU (M becomes 1)."""
        idx = self.scores.argmax(axis=1)
        rows = np.arange(len(idx))
        return Prediction(self.masks[rows, idx][:, None], self.scores[rows, idx][:, None],
                          self.low_res_logits[rows, idx][:, None])


class SamPredictorCore:
    """Stateless predictor over a SAM model; safe to share between requests."""

    def __init__(self, sam: Sam, device: str | torch.device = "cpu") -> None:
        self.sam = sam.to(device).eval()
        self.device = torch.device(device)
        self.img_size = sam.image_encoder.img_size
        self.transform = SamTransform(self.img_size, sam.prompt_encoder.mask_input_size[0])

    @torch.inference_mode()
    def encode_batch(self, images: Sequence[np.ndarray]) -> list[ImageEmbedding]:
        """Encode several (H, W, 3) uint8 RGB images in one encoder forward."""
        if not images:
            return []
        tensors, sizes = zip(*(self.transform.image_to_tensor(im) for im in images))
        feats = self.sam.image_encoder(torch.stack(tensors).to(self.device))
        return [ImageEmbedding(feats[i: i + 1], (im.shape[0], im.shape[1]), sizes[i])
                for i, im in enumerate(images)]

    def encode(self, image: np.ndarray) -> ImageEmbedding:
        return self.encode_batch([image])[0]

    def _prompt_tensors(self, emb: ImageEmbedding, prompts: Prompts):
        t = self.transform
        dev = self.device
        points = boxes = masks = None
        if prompts.point_coords is not None:
            coords = torch.as_tensor(t.coords(prompts.point_coords, emb.original_size), dtype=torch.float, device=dev)
            labels = torch.as_tensor(prompts.point_labels, dtype=torch.int, device=dev)
            points = (coords, labels)
        if prompts.boxes is not None:
            boxes = torch.as_tensor(t.boxes(prompts.boxes, emb.original_size), dtype=torch.float, device=dev)
        if prompts.mask_inputs is not None:
            masks = torch.as_tensor(prompts.mask_inputs, dtype=torch.float, device=dev)
        return points, boxes, masks

    @torch.inference_mode()
    def decode(self, emb: ImageEmbedding, prompts: Prompts, multimask: bool = False,
               return_logits: bool = False) -> Prediction:
        """Decode all prompts of one image in a single mask-decoder call."""
        points, boxes, masks = self._prompt_tensors(emb, prompts)
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=masks)
        low_res, iou = self.sam.mask_decoder(
            image_embeddings=emb.features.to(self.device),
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        full = upscale_logits(low_res, self.img_size, emb.input_size, emb.original_size)
        out = full if return_logits else full > self.sam.mask_threshold
        return Prediction(out.cpu().numpy(), iou.float().cpu().numpy(), low_res.float().cpu().numpy())

    def predict(self, image: np.ndarray, prompts: Prompts, multimask: bool = False,
                return_logits: bool = False) -> Prediction:
        return self.decode(self.encode(image), prompts, multimask, return_logits)
