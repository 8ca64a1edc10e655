"""Errors the service answers with: a stable ``kind``, a message for humans, and the HTTP status.

The ``kind`` is what clients and the ``wesam_errors_total{kind}`` metric key on; the message may
change. ``HTTP_STATUS`` is the one place where kinds become HTTP statuses (the gRPC endpoint has
its own table of gRPC codes, ``grpc_server.GRPC_CODES``). Every ``WesamError`` that reaches a
request boundary goes through :func:`to_service_error`, so a refused adapter or a malformed
adapter reference is answered by its kind, and no bad input reaches a 500.
"""

from __future__ import annotations

import logging
from typing import Any

from wesam.errors import WesamError

log = logging.getLogger("wesam.service")

# kind -> HTTP status. The gRPC table in grpc_server.py must name the same kinds (a test checks both
# cover every kind defined in the code).
HTTP_STATUS: dict[str, int] = {
    # the service's own kinds
    "bad_request": 400,
    "invalid_image": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "unknown_domain": 404,
    "unknown_version": 404,
    "unknown_image_id": 404,
    "unknown_model": 404,
    "unknown_sample": 404,  # admin API: no captured (or pending) sample with that request id
    "domain_mismatch": 409,
    "adapter_refused": 409,
    "no_registry": 409,
    "capture_disabled": 409,  # admin API: the server runs without a capture store
    "preview_disabled": 409,  # a request names a non-active version and WESAM_SERVE_PREVIEW_SLOTS is 0
    "too_large": 413,
    "unsupported_media_type": 415,
    "invalid_prompt": 422,
    "internal": 500,
    "adapter_unavailable": 503,
    "overloaded": 503,
    # wesam core errors reaching a request boundary: the client's fault -> 4xx, the server's -> 5xx
    "invalid_adapter_ref": 400,  # a malformed domain name or domain@vN
    "invalid_argument": 400,
    "invalid_data": 400,  # the only data a server reads per request is the client's
    "adapter": 409,  # an artifact that cannot be served here, as for adapter_refused
    "config": 500,  # the server's configuration, not the request
    "model_load": 500,
    "export": 500,
    "error": 500,  # WesamError without a more specific kind
    "interrupted": 503,  # shutting down: retry elsewhere
    "sample_store": 503,  # the captured-sample store is unreachable or failing
    "lease_held": 409,  # another online worker holds the domain (adapters/online/lease.py)
    "lease_lost": 409,  # the worker's domain lease file was removed or replaced
    "worker": 500,  # the online worker cannot run a round (adapters/online/worker.py)
    "non_finite_loss": 500,  # training diverged (adapters/adapt/trainer.py)
}
DEFAULT_STATUS = 500


def http_status(kind: str) -> int:
    return HTTP_STATUS.get(kind, DEFAULT_STATUS)


class ServiceError(WesamError):
    """A request that cannot be served. The status comes from ``HTTP_STATUS`` by ``kind``;
    ``status=`` overrides it for one instance (an error read back from another process).

    ``retry_after``: seconds after which a retry may succeed (``overloaded``); it travels in the JSON
    body as ``retry_after`` and becomes the HTTP ``Retry-After`` header and gRPC ``retry-after``
    trailing metadata.
    """

    kind: str = "bad_request"

    def __init__(self, message: str, *, kind: str | None = None, status: int | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message, kind=kind)
        self._status = status
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return self._status if self._status is not None else http_status(self.kind)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message, "kind": self.kind, "status": self.status}
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ServiceError":
        """The error the model runtime answered with (``InferResult.error``, ``activate``)."""
        retry = data.get("retry_after")
        return cls(str(data.get("error", "error")), status=int(data.get("status", DEFAULT_STATUS)),
                   kind=str(data.get("kind", "internal")), retry_after=int(retry) if retry is not None else None)


class BadRequest(ServiceError):
    kind = "bad_request"


class InvalidImage(ServiceError):
    kind = "invalid_image"


class PayloadTooLarge(ServiceError):
    kind = "too_large"


class UnsupportedMediaType(ServiceError):
    kind = "unsupported_media_type"


class InvalidPrompt(ServiceError):
    kind = "invalid_prompt"


class UnknownDomain(ServiceError):
    kind = "unknown_domain"


class UnknownVersion(ServiceError):
    kind = "unknown_version"


class UnknownImageId(ServiceError):
    kind = "unknown_image_id"


class UnknownModel(ServiceError):
    """A KServe model name or version this server does not have."""

    kind = "unknown_model"


class UnknownSample(ServiceError):
    """No captured sample (stored or waiting to be written) has that request id."""

    kind = "unknown_sample"


class CaptureDisabled(ServiceError):
    kind = "capture_disabled"


class DomainMismatch(ServiceError):
    kind = "domain_mismatch"


class AdapterRefused(ServiceError):
    kind = "adapter_refused"


class PreviewDisabled(ServiceError):
    """A request named a version other than the active one (``polyp@v2``) on a server whose
    preview slots are 0."""

    kind = "preview_disabled"


class NoRegistry(ServiceError):
    kind = "no_registry"


class AdapterUnavailable(ServiceError):
    kind = "adapter_unavailable"


class Unauthorized(ServiceError):
    kind = "unauthorized"


class Forbidden(ServiceError):
    kind = "forbidden"


class Overloaded(ServiceError):
    """The model cannot take the request now (queue full, predicted wait too long, runtime
    unreachable): answered at once with 503 and a ``Retry-After`` header (``retry_after`` seconds
    when the batcher estimated them, else ``DEFAULT_RETRY_AFTER_S``)."""

    kind = "overloaded"


DEFAULT_RETRY_AFTER_S = 1


def retry_after_s(body: dict[str, Any]) -> int | None:
    """The ``Retry-After`` seconds of an error answer: every ``overloaded`` answer has one."""
    if body.get("kind") != Overloaded.kind:
        return None
    return int(body.get("retry_after") or DEFAULT_RETRY_AFTER_S)


class Internal(ServiceError):
    kind = "internal"


def to_service_error(exc: BaseException, what: str = "request") -> ServiceError:
    """The answer for any exception at a request boundary (HTTP front, admin API, gRPC, runtime).

    ``WesamError``s keep their kind and message; anything else is a bug: logged with its traceback
    (``what`` says where) and answered 500 ``internal`` naming only the exception type.
    """
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, WesamError):
        return ServiceError(exc.message or str(exc), kind=exc.kind)
    log.error("%s failed", what, exc_info=exc)
    return Internal(f"internal error: {type(exc).__name__}")
