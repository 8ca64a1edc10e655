"""Activation (gradient) checkpointing of SAM's image encoder, for the adaptation trainer.

A ViT-B encoder at 1024 px keeps every block's activations for the backward pass, and its four
global-attention blocks each hold a 12 heads x 4096 x 4096 attention map (0.8 GB in float32):
two encoder passes with gradient (teacher and student) need several GB. With checkpointing only
each block's input is kept; the block is run again during the backward pass (one more encoder
forward per pass with gradient), so memory falls to about one block's activations at a time.

:func:`encode` runs exactly ``ImageEncoderViT.forward`` (patch embedding, absolute position
embedding, blocks, neck), with each block wrapped in non-reentrant
:func:`torch.utils.checkpoint.checkpoint` when it is asked for and a gradient will be needed;
otherwise it calls the encoder itself. segment_anything is not patched: the same module is used
by validation and serving unchanged. LoRA layers live inside the blocks (attention qkv, proj,
MLP), so they are recomputed with their block and receive the same gradients.

The recomputation reads the modules' state at backward time: the active LoRA adapter must be the
same during the backward pass as during the forward pass (the trainer only switches adapters for
passes without gradient).
"""

from __future__ import annotations

import torch
from segment_anything.modeling import ImageEncoderViT
from torch.utils.checkpoint import checkpoint

MODES = ("auto", "on", "off")
#: ``auto`` turns checkpointing on from this input size (the official 1024 px models).
AUTO_MIN_IMG_SIZE = 1024


def resolve(mode: str, img_size: int) -> bool:
    """Whether ``mode`` (auto/on/off) checkpoints an encoder of this input size."""
    if mode not in MODES:
        raise ValueError(f"unknown grad-checkpointing mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "auto":
        return img_size >= AUTO_MIN_IMG_SIZE
    return mode == "on"


def _needs_grad(encoder: torch.nn.Module, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in encoder.parameters()))


def encode(encoder: ImageEncoderViT, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """``encoder(x)``, with each transformer block checkpointed when ``checkpointing`` is set and
    the pass will be differentiated (grad mode on and a parameter or ``x`` requires grad)."""
    if not (checkpointing and _needs_grad(encoder, x)):
        return encoder(x)
    # ImageEncoderViT.forward, block by block (segment_anything/modeling/image_encoder.py).
    x = encoder.patch_embed(x)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for blk in encoder.blocks:
        x = checkpoint(blk, x, use_reentrant=False)
    return encoder.neck(x.permute(0, 3, 1, 2))
