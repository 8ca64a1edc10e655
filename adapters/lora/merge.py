"""Merge-and-unload: a plain ``segment_anything`` model with one LoRA adapter folded in.

PEFT's ``merge_and_unload`` for wesam's LoRA: the result has no ``LoraLinear`` wrappers and no
LoRA tensors, so ``segment_anything`` classes, ONNX export and serving treat it as any SAM.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from segment_anything.modeling import MaskDecoder, Sam

from wesam.sam.zoo import SamConfig, build_sam

from ..errors import AdapterError
from .model import (
    active_adapter,
    lora_layers,
    lora_named_layers,
    merge_adapter,
    set_adapter,
    unmerge_adapter,
)


@contextmanager
def _merged(sam: Sam, name: str) -> Iterator[None]:
    """Adapter ``name`` merged into ``sam`` inside the block; afterwards ``sam`` is as found, bit for bit.

    The base weights are restored from a snapshot rather than by unmerging alone, because
    ``W + d - d`` is not always ``W`` in floating point and a second domain merged from the same
    model must start from the exact weights.
    """
    previous = active_adapter(sam)
    snapshot = [(layer.base.weight, layer.base.weight.detach().clone()) for layer in lora_layers(sam)]
    merge_adapter(sam, name)
    try:
        yield
    finally:
        unmerge_adapter(sam)
        with torch.no_grad():
            for live, saved in snapshot:
                live.copy_(saved)
        set_adapter(sam, previous)


def merged_decoder(sam: Sam, name: str | None) -> MaskDecoder:
    """A plain copy of ``sam.mask_decoder`` (eval mode, no gradients, no LoRA) with adapter ``name`` folded in.

    What a server needs to decode for an adapter with decoder targets without switching the
    resident model's adapter per call (decoding runs beside encoding, which does switch it). The
    decoder is small (about 4 M parameters in sam-mini and the official vit_b/l/h alike), so a
    copy per such adapter is cheap. ``sam`` is left as it was found.
    """
    if name is None:
        decoder = copy.deepcopy(sam.mask_decoder)
    else:
        with _merged(sam, name):
            decoder = copy.deepcopy(sam.mask_decoder)
    wrapped = [p for p, _ in lora_named_layers(decoder)]
    for path in wrapped:  # the copies were taken while merged: each base holds W + scale * B @ A
        owner, _, leaf = path.rpartition(".")
        parent = decoder.get_submodule(owner) if owner else decoder
        setattr(parent, leaf, getattr(parent, leaf).base)
    for p in decoder.parameters():
        p.requires_grad_(False)
    return decoder.eval()


def plain_state_dict(sam: Sam) -> dict[str, torch.Tensor]:
    """``sam.state_dict()`` in the plain segment_anything layout (tensors are cloned).

    ``LoraLinear`` wrappers are unwrapped (``...qkv.base.weight`` -> ``...qkv.weight``) and the
    LoRA tensors dropped. With an adapter merged, the base weights hold ``W + scale * B @ A``;
    without one this is the base model. Cloning matters: ``unmerge_adapter`` later edits the
    live parameters in place.
    """
    wrapped = [f"{p}." for p, _ in lora_named_layers(sam)]
    out: dict[str, torch.Tensor] = {}
    for key, value in sam.state_dict().items():
        prefix = next((w for w in wrapped if key.startswith(w)), None)
        if prefix is None:
            out[key] = value.detach().clone()
            continue
        rest = key[len(prefix):]
        if rest.startswith("base."):
            out[prefix + rest[len("base."):]] = value.detach().clone()
        elif not rest.startswith(("lora_A.", "lora_B.")):
            raise AdapterError(f"unexpected tensor {key} inside a LoRA layer; cannot unwrap it")
    return out


def _check_layout(sd: dict[str, torch.Tensor], config: SamConfig) -> None:
    """Refuse anything a plain segment_anything model would not load strictly."""
    with torch.device("meta"):
        ref = {k: tuple(v.shape) for k, v in build_sam(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if ref != got:
        missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
        wrong = sorted(k for k in set(ref) & set(got) if ref[k] != got[k])
        raise AdapterError(f"merged state dict does not match the plain SAM layout: missing {missing[:3]}, "
                           f"unexpected {extra[:3]}, wrong shapes {wrong[:3]}")


def merge_and_unload(sam: Sam, config: SamConfig, name: str | None = None) -> Sam:
    """A new plain ``Sam`` (eval mode, no gradients) equal to ``sam`` with adapter ``name`` merged.

    ``name=None`` copies the base model. ``sam`` is left as it was found, bit for bit: the
    adapter is merged with ``merge_adapter`` (the one merge implementation), copied out, and
    unmerged with the base weights restored from a snapshot (``_merged``). The copy is built on
    the meta device and filled by assignment, so a ViT-H is not randomly initialised only to be
    overwritten.
    """
    if name is None:
        sd = plain_state_dict(sam)
    else:
        with _merged(sam, name):
            sd = plain_state_dict(sam)
    _check_layout(sd, config)
    with torch.device("meta"):
        plain = build_sam(config)
    plain.load_state_dict(sd, strict=True, assign=True)
    # Non-persistent buffers (pixel_mean/std) are in no state dict: take them from the source.
    persistent = set(sd)
    for key, buf in sam.named_buffers():
        if key not in persistent:
            owner, _, leaf = key.rpartition(".")
            module = plain.get_submodule(owner) if owner else plain
            module.register_buffer(leaf, buf.detach().clone(), persistent=False)
    left = [k for k, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if left:
        raise AdapterError(f"merged model has uninitialised tensors: {left[:3]}")
    for p in plain.parameters():
        p.requires_grad_(False)
    return plain.eval()
