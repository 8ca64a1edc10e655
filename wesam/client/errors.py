"""The client's exceptions: one class per family of answers, each carrying wesam's error ``kind``.

Every non-2xx answer of the service is raised as a :class:`WesamClientError` subclass, chosen by the
HTTP status (the service derives the status from the kind, ``service/errors.py``), and a failure to get
any answer at all (connection refused, reset, timeout) as :class:`ServiceUnreachable`. The classes
derive from :class:`wesam.errors.WesamError`, so ``except WesamError`` catches them along with wesam's
other errors, and ``.kind`` is the service's stable ``kind`` string (``"overloaded"``,
``"unknown_domain"``, ...): key on it, not on the message.

gRPC answers carry no HTTP status: the endpoint sends the code of ``GRPC_CODES[kind]`` with details
``"[kind] message"``; the status is then looked up by kind in :data:`KIND_STATUS` (the service's
``HTTP_STATUS`` table, copied because the client must not import the service; a test keeps them equal),
so the same refusal raises the same class with the same ``.status`` over both protocols.
"""

from __future__ import annotations

import email.utils
import re
import time
from typing import Any, Mapping

from wesam.errors import WesamError

# kind -> HTTP status, as service/errors.py HTTP_STATUS (tests/test_client.py checks that this covers
# every kind of that table with the same status).
KIND_STATUS: dict[str, int] = {
    "bad_request": 400, "invalid_image": 400, "invalid_adapter_ref": 400, "invalid_argument": 400,
    "invalid_data": 400, "unauthorized": 401, "forbidden": 403,
    "unknown_domain": 404, "unknown_version": 404, "unknown_image_id": 404, "unknown_model": 404,
    "unknown_sample": 404,
    "domain_mismatch": 409, "adapter_refused": 409, "no_registry": 409, "capture_disabled": 409,
    "preview_disabled": 409, "adapter": 409, "lease_held": 409, "lease_lost": 409,
    "too_large": 413, "unsupported_media_type": 415, "invalid_prompt": 422,
    "internal": 500, "config": 500, "model_load": 500, "export": 500, "error": 500, "worker": 500,
    "non_finite_loss": 500,
    "adapter_unavailable": 503, "overloaded": 503, "interrupted": 503, "sample_store": 503,
}

# gRPC code -> (HTTP status, kind) for answers whose details carry no "[kind]" (grpcio's own errors,
# a proxy, KServe model routing): the nearest family.
GRPC_FALLBACK: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "bad_request"), "OUT_OF_RANGE": (400, "bad_request"),
    "UNAUTHENTICATED": (401, "unauthorized"), "PERMISSION_DENIED": (403, "forbidden"),
    "NOT_FOUND": (404, "not_found"), "ALREADY_EXISTS": (409, "conflict"),
    "FAILED_PRECONDITION": (409, "conflict"), "ABORTED": (409, "conflict"),
    "RESOURCE_EXHAUSTED": (413, "too_large"),  # grpcio's message size limits
    "UNIMPLEMENTED": (501, "unimplemented"), "INTERNAL": (500, "internal"), "UNKNOWN": (500, "internal"),
    "DATA_LOSS": (500, "internal"),
}

_KIND_DETAILS = re.compile(r"^\[([a-z0-9_]+)\] (.*)$", re.S)


class WesamClientError(WesamError):
    """An answer other than 2xx, or no answer.

    Attributes: ``status`` (HTTP status; ``None`` when no answer came), ``kind`` (the service's error
    kind), ``message`` (the service's ``error`` text), ``request_id`` (the answer's ``X-Request-Id`` /
    gRPC ``x-request-id``, to find the request in the server's log), ``retry_after`` (seconds the
    server asked to wait, ``Retry-After``; ``None`` when it did not say), ``body`` (the JSON error body;
    ``None`` when the answer was not wesam's JSON), ``headers`` (the HTTP answer's headers).
    """

    kind = "error"

    def __init__(self, message: str, *, status: int | None = None, kind: str | None = None,
                 request_id: str | None = None, retry_after: float | None = None,
                 body: dict[str, Any] | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message, kind=kind)
        self.status = status
        self.request_id = request_id
        self.retry_after = retry_after
        self.body = body
        self.headers = headers

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "no answer"
        rid = f", request id {self.request_id}" if self.request_id else ""
        return f"[{self.kind}] {self.message} ({where}{rid})"


class InvalidRequestError(WesamClientError):
    """The request was refused as malformed: 400 (bad body, image), 413 (too large), 415, 422
    (``invalid_prompt``) and other 4xx without a class of their own. Never retried."""

    kind = "bad_request"


class UnauthorizedError(WesamClientError):
    """401 (admin token missing or malformed) or 403 (wrong token, or the admin API is disabled)."""

    kind = "unauthorized"


class NotFoundError(WesamClientError):
    """404: ``unknown_domain``, ``unknown_version``, ``unknown_image_id`` (evicted: send the image
    again), ``unknown_model``, ``unknown_sample``."""

    kind = "not_found"


class ConflictError(WesamClientError):
    """409: ``domain_mismatch``, ``adapter_refused`` (a version that does not load), ``adapter``,
    ``no_registry``, ``capture_disabled``, ``preview_disabled``, ``lease_held``, ``lease_lost``."""

    kind = "conflict"


class ServerError(WesamClientError):
    """5xx: the server's fault (``internal``, ``config``, ``model_load``, ...) or its state (503)."""

    kind = "internal"


class UnavailableError(ServerError):
    """503: the server cannot serve the request now (``interrupted``: shutting down;
    ``adapter_unavailable``; ``sample_store``; ``overloaded``, see :class:`OverloadedError`)."""

    kind = "unavailable"


class OverloadedError(UnavailableError):
    """503 ``overloaded``: the queue is full or the predicted wait too long; refused at once, before
    any work. ``retry_after``: seconds the server asked to wait (always set by wesam)."""

    kind = "overloaded"


class ServiceUnreachable(WesamClientError):
    """No answer: connection refused, name not resolved, connection lost, or the client's timeout.

    ``kind``: ``unreachable`` (no connection; the request was never sent), ``timeout`` or
    ``connection_lost`` (the request may have reached the server). ``sent`` says whether the request
    may have reached the server (only requests that surely did not are retried when not idempotent).
    """

    kind = "unreachable"

    def __init__(self, message: str, *, kind: str = "unreachable", sent: bool = False) -> None:
        super().__init__(message, kind=kind)
        self.sent = sent


def error_class(status: int, kind: str | None) -> type[WesamClientError]:
    """The exception class of an answer's status (and kind, for 503s)."""
    if (status == 503 and kind == "overloaded") or status == 429:  # 429: a proxy's rate limit, as overload
        return OverloadedError
    if status == 503:
        return UnavailableError
    if status >= 500:
        return ServerError
    if status in (401, 403):
        return UnauthorizedError
    if status == 404:
        return NotFoundError
    if status == 409:
        return ConflictError
    return InvalidRequestError


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds (what wesam sends) or an HTTP date."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from_http(status: int, body: Any, headers: Mapping[str, str]) -> WesamClientError:
    """The exception for an HTTP error answer: ``body`` is its decoded JSON (anything else when the
    answer was not wesam's JSON, e.g. a proxy's HTML page: the kind then comes from the class)."""
    wesam_body = body if isinstance(body, dict) and "kind" in body else None
    kind = str(wesam_body["kind"]) if wesam_body else None
    cls = error_class(status, kind)
    if wesam_body:
        message = str(wesam_body.get("error") or "error")
    else:
        message = f"HTTP {status}" + (f": {str(body)[:200]}" if body else "")
    retry = parse_retry_after(headers.get("retry-after"))
    if retry is None and wesam_body and wesam_body.get("retry_after") is not None:
        retry = float(wesam_body["retry_after"])
    return cls(message, status=status, kind=kind or cls.kind, request_id=headers.get("x-request-id"),
               retry_after=retry, body=wesam_body, headers=headers)


def error_from_grpc(code: str, details: str, trailing: Mapping[str, str],
                    request_id: str | None = None) -> WesamClientError:
    """The exception for a failed gRPC call: ``code`` is the ``grpc.StatusCode`` name, ``details``
    wesam's ``"[kind] message"``, ``trailing`` the trailing metadata (``retry-after`` on overload)."""
    match = _KIND_DETAILS.match(details or "")
    if match is None:
        if code in ("UNAVAILABLE", "CANCELLED"):  # grpcio: no connection / connection lost
            return ServiceUnreachable(f"gRPC {code}: {details}", kind="unreachable" if code == "UNAVAILABLE"
                                      else "connection_lost", sent=code != "UNAVAILABLE")
        if code == "DEADLINE_EXCEEDED":
            return ServiceUnreachable(f"gRPC {code}: {details}", kind="timeout", sent=True)
        status, kind = GRPC_FALLBACK.get(code, (500, "internal"))
        message = details or code
    else:
        kind, message = match.group(1), match.group(2)
        status = KIND_STATUS.get(kind, 503 if code == "UNAVAILABLE" else 500)
    retry = parse_retry_after(trailing.get("retry-after"))
    return error_class(status, kind)(message, status=status, kind=kind, request_id=request_id, retry_after=retry)
