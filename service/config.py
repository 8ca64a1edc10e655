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
CAPTURE_FORMATS = ("jpeg", "png")


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
    # Non-active adapter versions kept loaded for requests that name them (``polyp@v2``: operator
    # previews, service/previews.py), least recently used unloaded first; 0 refuses such requests.
    preview_slots: int = 2
    poll_seconds: float = 2.0
    workers: int = 1
    runtime_threads: int = 2  # model threads: one runs encoder batches, the others prompt-only decodes
    max_batch_size: int = 8
    max_latency_ms: int = 10_000  # admission bound: a request predicted to wait longer is refused (503)
    max_queue: int = 32  # requests waiting for the model, per lane (new images, prompt-only); more: 503
    timeout_s: int = 60
    grpc_port: int | None = None
    grpc_host: str = "127.0.0.1"
    # Capture of served requests for online self-training (service/capture.py, docs/online.md).
    # Off unless a store is set, and then only for the domains listed (``base``: no-domain requests).
    capture_store: str | None = field(default=None, repr=False)  # a Redis URL may hold a password
    capture_domains: tuple[str, ...] = ()
    capture_rate: float = 1.0  # share of eligible requests kept, by a hash of the request id
    capture_domain_cap: int = 1000  # samples per domain per rolling hour (0: no cap)
    capture_client_cap: int = 100  # samples per client and domain per rolling hour (0: no cap)
    capture_queue: int = 64  # requests waiting for the capture thread; more are dropped
    capture_queue_mb: float = 256.0  # bytes of images and masks those requests hold
    capture_format: str = "jpeg"
    capture_jpeg_quality: int = 90
    capture_max_age_s: float = 30 * 86400.0  # retention (0: keep); applied with store.purge
    capture_max_per_domain: int = 100_000  # retention (0: no limit)
    capture_purge_s: float = 600.0  # how often the capture thread applies retention

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"{PREFIX}RUNTIME must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        positive = {"workers": self.workers, "runtime_threads": self.runtime_threads,
                    "max_prompts": self.max_prompts, "max_points": self.max_points,
                    "max_image_pixels": self.max_image_pixels, "timeout_s": self.timeout_s,
                    "max_mask_pixels": self.max_mask_pixels,
                    "max_latency_ms": self.max_latency_ms, "max_queue": self.max_queue}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{PREFIX}{name.upper()} must be >= 1, got {value}")
        # A batch of one is no batching: say so instead of silently serialising every encoder call.
        if self.max_batch_size < 2:
            raise ConfigError(f"{PREFIX}MAX_BATCH_SIZE must be >= 2, got {self.max_batch_size}")
        if self.cache_mb < 0 or self.max_image_mb <= 0 or self.poll_seconds < 0:
            raise ConfigError(f"{PREFIX}CACHE_MB must be >= 0, {PREFIX}MAX_IMAGE_MB > 0 and "
                              f"{PREFIX}POLL_SECONDS >= 0")
        if self.preview_slots < 0:
            raise ConfigError(f"{PREFIX}PREVIEW_SLOTS must be >= 0 (0: no previews), got {self.preview_slots}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"{PREFIX}THREADS must be >= 1, got {self.threads}")
        if self.grpc_port is not None and not 0 < self.grpc_port < 65536:
            raise ConfigError(f"{PREFIX}GRPC_PORT must be a TCP port, got {self.grpc_port}")
        self._check_capture()

    def _check_capture(self) -> None:
        from wesam.adapters.ref import DOMAIN_PATTERN

        if self.capture_store is not None:
            from wesam.adapters.online import SampleStoreError, parse_store_url

            try:
                parse_store_url(self.capture_store)
            except SampleStoreError as e:
                raise ConfigError(f"{PREFIX}CAPTURE_STORE: {e}") from None
        bad = [d for d in self.capture_domains if not DOMAIN_PATTERN.match(d)]
        if bad:
            raise ConfigError(f"{PREFIX}CAPTURE_DOMAINS: {bad[0]!r} is not a domain name (or 'base')")
        if not 0.0 <= self.capture_rate <= 1.0:
            raise ConfigError(f"{PREFIX}CAPTURE_RATE must be in [0, 1], got {self.capture_rate}")
        if self.capture_format not in CAPTURE_FORMATS:
            raise ConfigError(f"{PREFIX}CAPTURE_FORMAT must be one of {', '.join(CAPTURE_FORMATS)}, "
                              f"got {self.capture_format!r}")
        if not 1 <= self.capture_jpeg_quality <= 95:
            raise ConfigError(f"{PREFIX}CAPTURE_JPEG_QUALITY must be in [1, 95], got {self.capture_jpeg_quality}")
        if self.capture_queue < 1 or self.capture_queue_mb <= 0 or self.capture_purge_s <= 0:
            raise ConfigError(f"{PREFIX}CAPTURE_QUEUE must be >= 1, {PREFIX}CAPTURE_QUEUE_MB and "
                              f"{PREFIX}CAPTURE_PURGE_S > 0")
        for name in ("capture_domain_cap", "capture_client_cap", "capture_max_age_s", "capture_max_per_domain"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{PREFIX}{name.upper()} must be >= 0 (0: no limit), got {getattr(self, name)}")

    @property
    def single_process(self) -> bool:
        """One worker: the HTTP front holds the model itself (no runtime process, no hop between them)."""
        return self.workers == 1

    @property
    def request_deadline_s(self) -> float:
        """How long a request may wait for the model before it is answered 503 ``overloaded``: short
        of ``timeout_s``, so BentoML's bare 504 (sent at ``timeout_s``) is never what a client sees."""
        return max(0.5 * self.timeout_s, self.timeout_s - 2.0)

    @property
    def capture_enabled(self) -> bool:
        """A capture store is configured (the domains listed decide what is captured)."""
        return bool(self.capture_store)

    @property
    def capture_queue_bytes(self) -> int:
        return int(self.capture_queue_mb * 1024 * 1024)

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
        d["capture_domains"] = list(self.capture_domains)
        if self.capture_store:
            from wesam.adapters.online.store import redact_url

            d["capture_store"] = redact_url(self.capture_store)
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
