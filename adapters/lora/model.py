"""Injecting LoRA into a SAM model (image encoder, optionally mask decoder) and managing named adapters on it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.transformer import Attention
from torch import nn

from .config import DECODER_TARGETS, ENCODER_TARGETS, LoraConfig
from .layer import SEP, LoraLinear

_CONFIG_ATTR = "_wesam_lora_configs"


def _blocks(sam: Sam) -> nn.ModuleList:
    return sam.image_encoder.blocks


def _resolve(block: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parent = block
    *path, leaf = dotted.split(".")
    for name in path:
        parent = getattr(parent, name)
    return parent, leaf


def _decoder_attentions(sam: Sam) -> list[nn.Module]:
    return [m for m in sam.mask_decoder.transformer.modules() if isinstance(m, Attention)]


def _wrap(parent: nn.Module, leaf: str) -> LoraLinear:
    layer = getattr(parent, leaf)
    if not isinstance(layer, LoraLinear):
        layer = LoraLinear(layer)
        setattr(parent, leaf, layer)
    return layer


def lora_layers(sam: Sam) -> list[LoraLinear]:
    return [m for m in sam.modules() if isinstance(m, LoraLinear)]


def adapter_names(sam: Sam) -> list[str]:
    return list(getattr(sam, _CONFIG_ATTR, {}))


def add_adapter(sam: Sam, name: str, config: LoraConfig) -> None:
    """Add a named adapter (B = 0, so outputs are unchanged until it is trained or loaded).

    Wraps the targeted Linear layers in ``LoraLinear`` the first time; the base weights and
    every non-LoRA parameter stay frozen.
    """
    configs: dict[str, LoraConfig] = getattr(sam, _CONFIG_ATTR, {})
    if name in configs:
        raise ValueError(f"adapter {name!r} already exists")
    if "." in name or SEP in name or not name:
        raise ValueError(f"adapter names must be non-empty without '.' or '{SEP}': {name!r}")
    blocks = _blocks(sam)
    wanted = range(len(blocks)) if config.blocks is None else config.blocks
    for i in wanted:
        block = blocks[i]
        for target in config.encoder_targets:
            module_path, (lo, hi) = ENCODER_TARGETS[target]
            layer = _wrap(*_resolve(block, module_path))
            dim = layer.base.in_features if module_path != "mlp.lin2" else layer.base.out_features
            layer.add(name, target, (lo * dim, hi * dim), config.rank, config.scale)
    if config.decoder_targets:
        for attention in _decoder_attentions(sam):
            for target in config.decoder_targets:
                layer = _wrap(attention, DECODER_TARGETS[target])
                layer.add(name, target, (0, layer.base.out_features), config.rank, config.scale)
    configs[name] = config
    setattr(sam, _CONFIG_ATTR, configs)


def adapter_config(sam: Sam, name: str) -> LoraConfig:
    try:
        return getattr(sam, _CONFIG_ATTR)[name]
    except (AttributeError, KeyError):
        raise KeyError(f"no adapter {name!r}; have {adapter_names(sam)}") from None


def delete_adapter(sam: Sam, name: str) -> None:
    adapter_config(sam, name)
    for layer in lora_layers(sam):
        layer.remove(name)
    del getattr(sam, _CONFIG_ATTR)[name]


def set_adapter(sam: Sam, name: str | None) -> None:
    """Route every forward through adapter ``name`` (None: the base model)."""
    if name is not None:
        adapter_config(sam, name)
    for layer in lora_layers(sam):
        layer.active = name


def active_adapter(sam: Sam) -> str | None:
    layers = lora_layers(sam)
    return layers[0].active if layers else None


@contextmanager
def use_adapter(sam: Sam, name: str | None) -> Iterator[None]:
    previous = active_adapter(sam)
    set_adapter(sam, name)
    try:
        yield
    finally:
        set_adapter(sam, previous)


def merge_adapter(sam: Sam, name: str) -> None:
    """Fold adapter ``name`` into the base weights (zero runtime overhead) and activate it."""
    adapter_config(sam, name)
    for layer in lora_layers(sam):
        layer.merge(name)
    set_adapter(sam, name)


def unmerge_adapter(sam: Sam) -> None:
    """Exact inverse of ``merge_adapter``; the adapter stays resident and active."""
    for layer in lora_layers(sam):
        layer.unmerge()


def adapter_state(sam: Sam, name: str) -> dict[str, torch.Tensor]:
    """Tensors of one adapter, keyed ``{module path}.{target}.lora_{A|B}``.

    Encoder keys read ``image_encoder.blocks.{i}.{module}.{target}.lora_{A|B}`` (as before decoder
    targets existed, so older adapters load unchanged); decoder keys
    ``mask_decoder.transformer.{attention}.{q|k|v|out}_proj.dec_{q|k|v|out}.lora_{A|B}``.
    """
    adapter_config(sam, name)
    out: dict[str, torch.Tensor] = {}
    for path, m in lora_named_layers(sam):
        for key in m.keys_of(name):
            target = key.rsplit(SEP, 1)[1]
            out[f"{path}.{target}.lora_A"] = m.lora_A[key].weight.detach()
            out[f"{path}.{target}.lora_B"] = m.lora_B[key].weight.detach()
    return out


def lora_named_layers(sam: Sam) -> list[tuple[str, LoraLinear]]:
    """(module path in ``sam``, layer) for every LoRA-wrapped Linear."""
    return [(p, m) for p, m in sam.named_modules() if isinstance(m, LoraLinear)]


def load_adapter_state(sam: Sam, name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors from ``adapter_state`` output into adapter ``name`` (same config)."""
    own = adapter_state(sam, name)
    if set(own) != set(state):
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"adapter tensors do not match its config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise ValueError(f"{k}: expected shape {tuple(own[k].shape)}, got {tuple(v.shape)}")
            own[k].copy_(v.to(own[k].dtype))


def trainable_parameters(sam: Sam, name: str) -> list[nn.Parameter]:
    """The LoRA parameters of ``name``; everything else in the model is frozen."""
    for p in sam.parameters():
        p.requires_grad_(False)
    params = []
    for layer in lora_layers(sam):
        for key in layer.keys_of(name):
            for p in (layer.lora_A[key].weight, layer.lora_B[key].weight):
                p.requires_grad_(True)
                params.append(p)
    return params
