"""When to send a request again, and after how long: one policy for the HTTP and gRPC clients.

Retried, up to ``max_retries`` times:

* ``overloaded`` (HTTP 503 / gRPC UNAVAILABLE; also a proxy's 429): the server refused the request
  at once, before doing any work, and said when to come back (``Retry-After``);
* ``interrupted`` (503: the server is shutting down; a retry reaches another replica or the restarted one);
* no answer because the connection failed or was lost (``ServiceUnreachable``, except timeouts).

Only requests whose repetition changes nothing (segment, embed, reads, activate, pin, freeze, ...)
are retried in the last two cases and on ``overloaded``; a request that is not (``rollback``: each
one steps back once more) is retried only when it surely never reached the server (no connection).
Never retried: 4xx answers (the same request gets the same answer), other 5xx, and the client's own
timeout (the caller's time budget is spent; sending again would multiply the server's load).

Delays: exponential, ``backoff`` x 2^attempt capped at ``backoff_max``, with jitter so that clients
refused together do not come back together; never earlier than the server's ``Retry-After``.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from .errors import OverloadedError, ServiceUnreachable, UnavailableError, WesamClientError

T = TypeVar("T")

RETRIED_503_KINDS = ("overloaded", "interrupted")


@dataclass(frozen=True)
class RetryPolicy:
    """``max_retries``: retries after the first attempt (0: none). ``backoff``: first delay in seconds
    (doubled per retry, up to ``backoff_max``)."""

    max_retries: int = 3
    backoff: float = 0.25
    backoff_max: float = 10.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff < 0 or self.backoff_max < 0:
            raise ValueError("max_retries, backoff and backoff_max must be >= 0")

    @staticmethod
    def retryable(error: WesamClientError, idempotent: bool) -> bool:
        if isinstance(error, ServiceUnreachable):
            if not error.sent:
                return True  # the request never left: sending it is always safe
            return idempotent and error.kind != "timeout"
        if not idempotent:
            return False
        return isinstance(error, OverloadedError) or (isinstance(error, UnavailableError)
                                                      and error.kind in RETRIED_503_KINDS)

    def delay(self, attempt: int, error: WesamClientError, idempotent: bool = True) -> float | None:
        """Seconds to wait before retry number ``attempt + 1``, or ``None``: raise ``error``."""
        if attempt >= self.max_retries or not self.retryable(error, idempotent):
            return None
        base = min(self.backoff_max, self.backoff * 2 ** attempt)
        if error.retry_after is not None:
            # as asked, plus up to half a step of jitter: a crowd refused together spreads out
            return error.retry_after + random.uniform(0, base / 2)
        return random.uniform(base / 2, base)


def run_sync(send: Callable[[], T], policy: RetryPolicy, idempotent: bool = True) -> T:
    """``send()`` (one attempt: a result, or a ``WesamClientError``) with the policy's retries."""
    attempt = 0
    while True:
        try:
            return send()
        except WesamClientError as e:
            delay = policy.delay(attempt, e, idempotent)
            if delay is None:
                raise
        attempt += 1
        time.sleep(delay)


async def run_async(send: Callable[[], Awaitable[T]], policy: RetryPolicy, idempotent: bool = True) -> T:
    """:func:`run_sync` for coroutines (the same policy; only the waiting differs)."""
    import anyio  # httpx's own dependency: works under asyncio and trio

    attempt = 0
    while True:
        try:
            return await send()
        except WesamClientError as e:
            delay = policy.delay(attempt, e, idempotent)
            if delay is None:
                raise
        attempt += 1
        await anyio.sleep(delay)
