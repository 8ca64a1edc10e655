"""Merged weights: a base model with one LoRA adapter folded into its image encoder.

The result is a plain ``segment_anything`` state dict (no ``LoraLinear`` wrappers, no LoRA
tensors), written as safetensors with wesam's metadata, so both ``resolve_model(path)`` and
``segment_anything`` classes (``sam_model_registry[...]``, ``adapters.zoo.build_sam``) load it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import Sam

from adapters.artifact import META_FILE, AdapterArtifact, attach_adapter
from adapters.lora import LoraLinear, delete_adapter, lora_layers, merge_adapter, set_adapter, unmerge_adapter
from adapters.zoo import LoadedModel, SamConfig, build_sam, save_safetensors, sha256_file

from .common import ExportError, progress, safe_name, utc_now, wesam_version, write_json

MANIFEST_FILE = "merged.json"
FORMAT_VERSION = 1
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def plain_state_dict(sam: Sam) -> dict[str, torch.Tensor]:
    """``sam.state_dict()`` in the plain segment_anything layout (tensors are cloned).

    ``LoraLinear`` wrappers are unwrapped (``...qkv.base.weight`` -> ``...qkv.weight``) and the
    LoRA tensors dropped. With an adapter merged, the base weights hold ``W + scale * B @ A``;
    without one this is the base model. Cloning matters: ``unmerge_adapter`` later edits the
    live parameters in place.
    """
    wrapped = [f"image_encoder.{p}." for p, m in sam.image_encoder.named_modules() if isinstance(m, LoraLinear)]
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
            raise ExportError(f"unexpected tensor {key} inside a LoRA layer; cannot unwrap it")
    return out


def _check_layout(sd: dict[str, torch.Tensor], config: SamConfig) -> None:
    """Refuse to write anything a plain segment_anything model would not load strictly."""
    with torch.device("meta"):
        ref = {k: tuple(v.shape) for k, v in build_sam(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if ref != got:
        missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
        wrong = sorted(k for k in set(ref) & set(got) if ref[k] != got[k])
        raise ExportError(f"merged state dict does not match the plain SAM layout: missing {missing[:3]}, "
                          f"unexpected {extra[:3]}, wrong shapes {wrong[:3]}")


def plain_sam(model: LoadedModel, artifact: AdapterArtifact | None = None) -> Sam:
    """A plain ``Sam`` (no LoRA modules) equal to ``model`` with ``artifact`` merged, in eval mode.

    ``model`` is left as it was found, bit for bit: the adapter is attached, merged with
    ``merge_adapter`` (the one merge implementation), copied out, unmerged, and the base weights
    are restored from a snapshot, because ``W + d - d`` is not always ``W`` in floating point
    and a second domain exported from the same model must start from the file's exact weights.
    The copy is built on the meta device and filled by assignment, so a ViT-H is not randomly
    initialised only to be overwritten.
    """
    name = None
    snapshot: list[tuple[torch.Tensor, torch.Tensor]] = []
    if artifact is not None:
        name = attach_adapter(model, artifact)  # verifies hashes and the base model
        snapshot = [(layer.base.weight, layer.base.weight.detach().clone()) for layer in lora_layers(model.sam)]
        merge_adapter(model.sam, name)
    try:
        sd = plain_state_dict(model.sam)
    finally:
        if name is not None:
            unmerge_adapter(model.sam)
            with torch.no_grad():
                for live, saved in snapshot:
                    live.copy_(saved)
            set_adapter(model.sam, None)
            delete_adapter(model.sam, name)
    _check_layout(sd, model.config)
    with torch.device("meta"):
        sam = build_sam(model.config)
    sam.load_state_dict(sd, strict=True, assign=True)
    # Non-persistent buffers (pixel_mean/std) are in no state dict: take them from the source.
    persistent = set(sd)
    for key, buf in model.sam.named_buffers():
        if key not in persistent:
            owner, _, leaf = key.rpartition(".")
            module = sam.get_submodule(owner) if owner else sam
            module.register_buffer(leaf, buf.detach().clone(), persistent=False)
    left = [k for k, t in [*sam.named_parameters(), *sam.named_buffers()] if t.is_meta]
    if left:
        raise ExportError(f"merged model has uninitialised tensors: {left[:3]}")
    for p in sam.parameters():
        p.requires_grad_(False)
    return sam.eval()


def merged_name(model: LoadedModel, artifact: AdapterArtifact) -> str:
    """Model name recorded in the merged file, e.g. ``sam-mini+polyp@v2``."""
    return f"{model.name}+{artifact.ref}"


def export_merged(model: LoadedModel, artifact: AdapterArtifact, out_dir: str | os.PathLike, *,
                  dtype: str = "fp32", filename: str | None = None) -> dict[str, Any]:
    """Write ``<out_dir>/<base>_<adapter>.safetensors`` and ``merged.json``; returns the manifest."""
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    out = Path(out_dir)
    progress(f"merging {artifact.ref} into {model.name}")
    sam = plain_sam(model, artifact)
    name = merged_name(model, artifact)
    filename = filename or f"{safe_name(model.name)}_{safe_name(artifact.ref)}.safetensors"
    progress(f"writing {out / filename} ({dtype})")
    digest = save_safetensors(sam, out / filename, name=name, config=model.config, dtype=DTYPES[dtype],
                              extra_meta={"wesam_base_sha256": model.sha256 or "",
                                          "wesam_adapter": artifact.ref})
    # safetensors writes 0600 files; a deployable artifact should follow the umask like any other
    # file (serving containers often run as another user).
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(out / filename, 0o666 & ~mask)
    manifest = {
        "format": "wesam-merged",
        "format_version": FORMAT_VERSION,
        "file": filename,
        "sha256": digest,
        "bytes": (out / filename).stat().st_size,
        "dtype": dtype,
        "name": name,
        "config": model.config.to_json(),
        "base_model": {"name": model.name, "sha256": model.sha256, "source": model.source},
        "adapter": {
            "ref": artifact.ref,
            "domain": artifact.domain,
            "version": artifact.version,
            "path": str(artifact.path.resolve()),
            "adapter_json_sha256": sha256_file(artifact.path / META_FILE),
            "meta": artifact.meta,
        },
        "wesam_version": wesam_version(),
        "created": utc_now(),
    }
    write_json(out / MANIFEST_FILE, manifest)
    return manifest
