"""Errors the service answers with: an HTTP status, a stable ``kind`` and a message for humans.

The ``kind`` is what clients and the ``wesam_errors_total{kind}`` metric key on; the message may
change. Every error a request can cause is one of these, so no bad input reaches a 500.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A request that cannot be served, with the HTTP status to answer it with."""

    status: int = 400
    kind: str = "bad_request"

    def __init__(self, message: str, *, status: int | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if kind is not None:
            self.kind = kind

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, "kind": self.kind, "status": self.status}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ServiceError":
        return cls(str(data.get("error", "error")), status=int(data.get("status", 500)),
                   kind=str(data.get("kind", "internal")))


class BadRequest(ServiceError):
    status, kind = 400, "bad_request"


class InvalidImage(ServiceError):
    status, kind = 400, "invalid_image"


class PayloadTooLarge(ServiceError):
    status, kind = 413, "too_large"


class InvalidPrompt(ServiceError):
    status, kind = 422, "invalid_prompt"


class UnknownDomain(ServiceError):
    status, kind = 404, "unknown_domain"


class UnknownImageId(ServiceError):
    status, kind = 404, "unknown_image_id"


class AdapterUnavailable(ServiceError):
    status, kind = 503, "adapter_unavailable"


class Unauthorized(ServiceError):
    status, kind = 401, "unauthorized"


class Forbidden(ServiceError):
    status, kind = 403, "forbidden"


class Overloaded(ServiceError):
    status, kind = 503, "overloaded"


class Internal(ServiceError):
    status, kind = 500, "internal"
