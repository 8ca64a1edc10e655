"""The adapters layer's errors (a leaf module: artifacts, the registry and refs all raise them)."""

from __future__ import annotations

from wesam.errors import WesamError


class AdapterError(WesamError, RuntimeError):
    """An adapter artifact is missing, malformed, tampered with, or for another base model."""

    kind = "adapter"


class InvalidAdapterRef(AdapterError, ValueError):
    """A domain name or ``domain@vN`` reference that is not well formed."""

    kind = "invalid_adapter_ref"
