"""Merged weights: a base model with one LoRA adapter folded into its image encoder (and into its
mask decoder too, for an adapter with decoder targets).

The result is a plain ``segment_anything`` state dict (no ``LoraLinear`` wrappers, no LoRA
tensors), written as safetensors with wesam's metadata, so both ``resolve_model(path)`` and
``segment_anything`` classes (``sam_model_registry[...]``, ``wesam.sam.zoo.build_sam``) load it.
The merge itself is the LoRA package's (``wesam.adapters.lora.merge_and_unload``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from wesam.adapters.artifact import META_FILE, AdapterArtifact, merged_sam
from wesam.sam.zoo import LoadedModel, save_safetensors, sha256_file

from .common import ExportError, progress, safe_name, utc_now, wesam_version, write_json

MANIFEST_FILE = "merged.json"
FORMAT_VERSION = 1
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    sam = merged_sam(model, artifact)
    name = merged_name(model, artifact)
    filename = filename or f"{safe_name(model.name)}_{safe_name(str(artifact.ref))}.safetensors"
    progress(f"writing {out / filename} ({dtype})")
    digest = save_safetensors(sam, out / filename, name=name, config=model.config, dtype=DTYPES[dtype],
                              extra_meta={"wesam_base_sha256": model.sha256 or "",
                                          "wesam_adapter": str(artifact.ref)})
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
            "ref": str(artifact.ref),
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
