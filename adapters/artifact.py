"""Adapter artifacts: a directory with ``adapter.safetensors`` and ``adapter.json``.

The JSON says what the tensors adapt (base model name and SHA-256, LoRA config), how they
were made (method, prompt, data fingerprint, steps, seed, code version) and how well (metrics
before and after), plus the SHA-256 of the tensor file so tampering is detected.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from segment_anything.modeling import Sam

from wesam.sam.zoo import LoadedModel, sha256_file

from .errors import AdapterError
from .lora import LoraConfig, adapter_state, add_adapter, delete_adapter, load_adapter_state, merge_and_unload
from .lora.model import adapter_config
from .ref import AdapterRef

FORMAT_VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"


def code_version() -> str:
    from wesam.version import __version__

    return __version__


@dataclass
class AdapterArtifact:
    path: Path
    meta: dict[str, Any]

    @property
    def domain(self) -> str:
        return self.meta["domain"]

    @property
    def version(self) -> int | None:
        return self.meta.get("version")

    @property
    def ref(self) -> AdapterRef:
        return AdapterRef(self.domain, self.version or None)

    @property
    def lora(self) -> LoraConfig:
        return LoraConfig.from_json(self.meta["lora"])

    @property
    def base_sha256(self) -> str | None:
        return self.meta["base_model"].get("sha256")


def save_adapter(out_dir: str | os.PathLike, model: LoadedModel, adapter: str, *, domain: str,
                 extra: dict[str, Any] | None = None) -> AdapterArtifact:
    """Write adapter ``adapter`` of ``model.sam`` as an artifact directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu().float() for k, v in adapter_state(model.sam, adapter).items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "wesam-lora"})
    os.chmod(out / WEIGHTS_FILE, 0o644)  # safetensors writes 0600; servers may run as another user
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "domain": domain,
        "base_model": {"name": model.name, "sha256": model.sha256},
        "lora": adapter_config(model.sam, adapter).to_json(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "files": {WEIGHTS_FILE: sha256_file(out / WEIGHTS_FILE)},
    }
    meta.update(extra or {})
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / META_FILE)
    return AdapterArtifact(out, meta)


def read_artifact(path: str | os.PathLike) -> AdapterArtifact:
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise AdapterError(f"{path} is not an adapter: {META_FILE} missing")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{meta_path}: invalid JSON ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{meta_path}: unsupported format_version {meta.get('format_version')!r} "
                           f"(this wesam reads {FORMAT_VERSION})")
    for key in ("domain", "base_model", "lora", "files"):
        if key not in meta:
            raise AdapterError(f"{meta_path}: missing field {key!r}")
    return AdapterArtifact(path, meta)


def verify_artifact(art: AdapterArtifact, base: LoadedModel | None = None) -> dict[str, Any]:
    """Re-hash the files and, given the base model, check it is the one the adapter was made for."""
    problems: list[str] = []
    for name, digest in art.meta["files"].items():
        f = art.path / name
        if not f.is_file():
            problems.append(f"{name} missing")
        elif sha256_file(f) != digest:
            problems.append(f"{name} SHA-256 differs from {META_FILE} (file modified or corrupted)")
    if base is not None and art.base_sha256 != base.sha256:
        problems.append(f"base model mismatch: adapter made for {art.meta['base_model'].get('name')} "
                        f"sha256 {art.base_sha256}, loaded {base.name} sha256 {base.sha256}")
    return {"adapter": str(art.ref), "path": str(art.path), "ok": not problems, "problems": problems}


def attach_adapter(model: LoadedModel, art: AdapterArtifact, name: str | None = None) -> str:
    """Verify and load an artifact into ``model.sam`` as adapter ``name`` (default: its ref)."""
    report = verify_artifact(art, model)
    if not report["ok"]:
        raise AdapterError(f"refusing adapter {art.path}: " + "; ".join(report["problems"]))
    name = name or str(art.ref).replace(".", "_")
    add_adapter(model.sam, name, art.lora)
    try:
        load_adapter_state(model.sam, name, load_file(str(art.path / WEIGHTS_FILE)))
    except Exception as e:
        delete_adapter(model.sam, name)
        raise AdapterError(f"adapter {art.path}: {e}") from e
    return name


def merged_sam(model: LoadedModel, artifact: AdapterArtifact | None = None) -> Sam:
    """A plain ``Sam`` equal to ``model`` with ``artifact`` merged (the base model without one).

    The artifact is verified against the base (hashes) on attach, merged with
    :func:`~wesam.adapters.lora.merge_and_unload`, and detached again: ``model`` is unchanged.
    """
    if artifact is None:
        return merge_and_unload(model.sam, model.config)
    name = attach_adapter(model, artifact)
    try:
        return merge_and_unload(model.sam, model.config, name)
    finally:
        delete_adapter(model.sam, name)
