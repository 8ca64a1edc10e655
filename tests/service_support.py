"""Helpers for the service tests: a sam-micro base file, published adapters, test images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from wesam.adapters.artifact import save_adapter
from wesam.adapters.lora import LoraConfig, add_adapter, delete_adapter, lora_layers
from wesam.adapters.registry import Registry
from wesam.sam.zoo import LoadedModel, resolve_model, save_safetensors


def make_base(directory: Path) -> Path:
    """sam-micro saved to a file, so it has a SHA-256 like real bases."""
    m = resolve_model("sam-micro", seed=0)
    path = directory / "micro.safetensors"
    save_safetensors(m.sam, path, name="sam-micro", config=m.config)
    return path


def randomise_lora_b(sam: torch.nn.Module, name: str, seed: int, scale: float = 1.0) -> None:
    """Give adapter ``name``'s B factors seeded random values (they start at zero, so the adapter
    would change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(sam):
            for key in layer.keys_of(name):
                w = layer.lora_B[key].weight
                w.copy_(torch.randn(w.shape, generator=g) * scale)


def publish_adapter(base_path: Path, registry: Path, domain: str, seed: int, scale: float = 2.0,
                    activate: bool = True, targets: tuple[str, ...] = ("q", "v")) -> int:
    """A LoRA adapter with random (non-zero) B weights, published as the next version of ``domain``."""
    model = resolve_model(str(base_path))
    add_adapter(model.sam, "a", LoraConfig(rank=2, targets=targets))
    randomise_lora_b(model.sam, "a", seed, scale)
    reg = Registry(registry)
    with reg.staging(domain) as staged:
        save_adapter(staged, model, "a", domain=domain)
    version = reg.publish(staged, domain, activate=activate).version
    delete_adapter(model.sam, "a")
    return version


def corrupt_weights(registry: Path, domain: str, version: int) -> None:
    f = registry / domain / f"v{version}" / "adapter.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))


def make_image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """Noise with a bright rectangle, so a random-init model gives non-trivial masks."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
    img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] += 120
    return img


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def reference_model(base_path: Path, registry: Path | None = None, ref: str | None = None) -> LoadedModel:
    """A fresh in-process model, with adapter ``ref`` attached and active when given."""
    from wesam.adapters.artifact import attach_adapter
    from wesam.adapters.lora import set_adapter

    model = resolve_model(str(base_path))
    if ref is not None:
        name = attach_adapter(model, Registry(registry).resolve(ref))
        set_adapter(model.sam, name)
    return model
