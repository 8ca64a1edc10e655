"""Shared helpers of the export layer: errors, model/adapter loading, manifests, progress."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from wesam.adapters.artifact import AdapterArtifact, AdapterError, read_artifact
from wesam.adapters.registry import Registry
from wesam.sam.zoo import LoadedModel, ModelLoadError, resolve_model

from .errors import ExportError

# Errors that the CLI reports as ``error: ...`` with exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ExportError, ModelLoadError, AdapterError)


def progress(message: str) -> None:
    """Progress of long steps goes to stderr so stdout stays machine-readable (JSON)."""
    print(f"[export] {message}", file=sys.stderr, flush=True)


def wesam_version() -> str:
    from wesam.version import __version__

    return __version__


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def open_adapter(ref: str, registry: str | os.PathLike | None) -> AdapterArtifact:
    """An adapter directory, or ``DOMAIN[@vN]`` looked up in ``registry`` (newest if no ``@vN``)."""
    if Path(ref).is_dir():
        return read_artifact(ref)
    if registry is None:
        raise AdapterError(f"{ref!r} is not an adapter directory; pass --registry DIR to look it up")
    return Registry(registry).resolve(ref)


def load_model(ref: str, checkpoint: str | os.PathLike | None = None) -> LoadedModel:
    """Resolve a model reference (zoo name or weights file) in eval mode on the CPU."""
    model = resolve_model(ref, checkpoint)
    model.sam.eval()
    return model


def safe_name(text: str) -> str:
    """A file/model-name friendly version of ``text`` (Triton model names, file stems)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a reader never sees a half-written manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path} not found: is {path.parent} a {what}?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: invalid JSON ({e})") from None


def prepare_staging(out: Path, marker: str, what: str) -> Path:
    """A fresh staging directory beside ``out``, to be published by ``publish_dir``.

    ``out`` may be missing, empty, or an earlier output of the same kind (it holds ``marker``);
    anything else is refused so that a typo never deletes unrelated files.
    """
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise ExportError(f"{out} is not empty and is not a {what} (no {marker}); refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


@contextlib.contextmanager
def staged_output(out: Path, marker: str, what: str) -> Iterator[Path]:
    """Write an output directory through a staging directory, published only if the body succeeds.

    Yields the staging path; on any exception (Ctrl-C included) it is removed and ``out`` is left
    as it was.
    """
    staging = prepare_staging(out, marker, what)
    try:
        yield staging
        publish_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish_dir(staging: Path, out: Path) -> None:
    """Replace ``out`` by the finished staging directory: readers never see a half-written or
    mixed output, and an interrupted export leaves the previous one intact."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
