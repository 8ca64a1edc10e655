"""Serving configuration: one frozen object, read from ``WESAM_SERVE_*`` environment variables.

Environment variables are how configuration reaches BentoML workers: ``bentoml serve`` starts each
service in its own processes, and all of them inherit the environment of ``wesam serve``. The
decorator arguments (workers, batch size, latency budget) are read at import time, so they come
from the same place. ``docs/serving.md`` lists every variable.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from wesam.errors import ConfigError  # noqa: F401  (serving config errors are wesam config errors)

PREFIX = "WESAM_SERVE_"
RUNTIMES = ("torch", "onnx")
BASE = "base"  # the domain name that means "no adapter" (also used by export bundles)


@dataclass(frozen=True)
class ServeConfig:
    """Everything the HTTP front, the model runtime and the gRPC endpoint need to know."""

    model: str = "sam-mini"
    checkpoint: str | None = None
    registry: str | None = "registry"
    runtime: str = "torch"
    device: str = "auto"
    threads: int | None = None  # torch intra-op threads in the runtime process (None: torch's default)
    onnx_cache: str | None = None
    admin_token: str | None = field(default=None, repr=False)
    cache_mb: float = 512.0
    max_image_mb: float = 20.0
    max_image_pixels: int = 4096 * 4096
    max_prompts: int = 64
    max_points: int = 64
    max_mask_pixels: int = 1 << 27  # masks x height x width per response (bounds memory per request)
    fallback_domain: str | None = None
    merged_domains: tuple[str, ...] = ()
    poll_seconds: float = 2.0
    workers: int = 1
    runtime_threads: int = 2
    max_batch_size: int = 8
    max_latency_ms: int = 10_000
    timeout_s: int = 60
    grpc_port: int | None = None
    grpc_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"{PREFIX}RUNTIME must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        positive = {"workers": self.workers, "runtime_threads": self.runtime_threads,
                    "max_prompts": self.max_prompts, "max_points": self.max_points,
                    "max_image_pixels": self.max_image_pixels, "timeout_s": self.timeout_s,
                    "max_mask_pixels": self.max_mask_pixels,
                    "max_latency_ms": self.max_latency_ms}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{PREFIX}{name.upper()} must be >= 1, got {value}")
        # BentoML refuses max_batch_size=1 for batchable APIs (and older releases crashed on it).
        if self.max_batch_size < 2:
            raise ConfigError(f"{PREFIX}MAX_BATCH_SIZE must be >= 2, got {self.max_batch_size}")
        if self.cache_mb < 0 or self.max_image_mb <= 0 or self.poll_seconds < 0:
            raise ConfigError(f"{PREFIX}CACHE_MB must be >= 0, {PREFIX}MAX_IMAGE_MB > 0 and "
                              f"{PREFIX}POLL_SECONDS >= 0")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"{PREFIX}THREADS must be >= 1, got {self.threads}")
        if self.grpc_port is not None and not 0 < self.grpc_port < 65536:
            raise ConfigError(f"{PREFIX}GRPC_PORT must be a TCP port, got {self.grpc_port}")

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_mb * 1024 * 1024)

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 1024 * 1024)

    @property
    def max_body_bytes(self) -> int:
        """Largest request body read: a base64 image (4/3 of the bytes) plus prompts and form overhead."""
        return self.max_image_bytes * 4 // 3 + 4 * 1024 * 1024

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ServeConfig":
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, raw, f.type)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment that makes ``from_env`` return this config (unset fields left out)."""
        out: dict[str, str] = {}
        for name, value in asdict(self).items():
            if value is None:
                continue
            if isinstance(value, (tuple, list)):
                value = ",".join(value)
            out[PREFIX + name.upper()] = str(value)
        return out

    def public(self) -> dict[str, Any]:
        """The configuration as JSON, without secrets (for ``GET /adapters`` and logs)."""
        d = asdict(self)
        d["admin_token"] = "set" if self.admin_token else None
        d["merged_domains"] = list(self.merged_domains)
        return d


def _parse(name: str, raw: str, annotation: Any) -> Any:
    text = str(annotation)
    try:
        if "tuple" in text:
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        if text.startswith("int"):
            return int(raw)
        if text.startswith("float"):
            return float(raw)
    except ValueError:
        raise ConfigError(f"{PREFIX}{name.upper()}={raw!r} is not a number") from None
    return raw
