"""SAM preprocessing and prompt transforms, shared by inference, training and export.

Images follow ``SamPredictor`` exactly: longest side resized to the model's input size with
PIL bilinear (``ResizeLongestSide.apply_image``), mean/std normalisation, zero padding at the
bottom/right. Prompts in original-image pixels are mapped into that resized frame.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
DEFAULT_MASK_PROMPT_LOGIT = 8.0


class SamTransform:
    """Maps images and prompts between original pixels and a SAM model's input frame."""

    def __init__(self, img_size: int, mask_prompt_size: int | None = None) -> None:
        self.img_size = img_size
        # The prompt encoder expects 4x the image-embedding grid (256 for SAM at 1024 px / patch 16).
        self.mask_prompt_size = mask_prompt_size or img_size // 4
        self.resizer = ResizeLongestSide(img_size)

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the resized image before padding."""
        return ResizeLongestSide.get_preprocess_shape(original_size[0], original_size[1], self.img_size)

    def image_to_tensor(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """(H, W, 3) uint8 RGB -> normalised, padded (3, S, S) float tensor and input (h, w)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        resized = self.resizer.apply_image(image)
        x = torch.as_tensor(resized).permute(2, 0, 1).float()
        return normalize_and_pad(x, self.img_size), (resized.shape[0], resized.shape[1])

    def coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 2) xy in original pixels -> input frame."""
        return self.resizer.apply_coords(np.asarray(coords, dtype=np.float64), original_size)

    def boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(N, 4) xyxy in original pixels -> input frame."""
        return self.resizer.apply_boxes(np.asarray(boxes, dtype=np.float64), original_size)

    def mask_to_prompt(self, masks: np.ndarray, original_size: tuple[int, int],
                       logit: float = DEFAULT_MASK_PROMPT_LOGIT) -> np.ndarray:
        """Binary masks (N, H, W) -> SAM mask-prompt logits (N, 1, L, L), L = mask_prompt_size.

        The mask is placed in the same padded frame as the image (resize longest side, pad
        bottom/right), then reduced to the low-res prompt grid; inside -> +logit, outside -> -logit.
        """
        masks = np.asarray(masks, dtype=np.float32)
        if masks.ndim == 2:
            masks = masks[None]
        h, w = self.input_size(original_size)
        t = torch.as_tensor(masks)[:, None]
        t = F.interpolate(t, (h, w), mode="bilinear", align_corners=False)
        t = F.pad(t, (0, self.img_size - w, 0, self.img_size - h))
        low = self.mask_prompt_size
        t = F.interpolate(t, (low, low), mode="area")
        return ((t > 0.5).float() * 2.0 - 1.0).mul(logit).numpy()


def normalize_and_pad(x: torch.Tensor, img_size: int) -> torch.Tensor:
    """(..., 3, h, w) float in [0, 255] -> normalised and zero-padded to (..., 3, S, S)."""
    mean = torch.tensor(PIXEL_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    x = (x - mean) / std
    h, w = x.shape[-2:]
    return F.pad(x, (0, img_size - w, 0, img_size - h))


def upscale_logits(low_res: torch.Tensor, img_size: int, input_size: tuple[int, int],
                   original_size: tuple[int, int]) -> torch.Tensor:
    """Decoder logits (B, C, L, L) -> (B, C, H, W) at the original size (as ``Sam.postprocess_masks``)."""
    x = F.interpolate(low_res, (img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, original_size, mode="bilinear", align_corners=False)
