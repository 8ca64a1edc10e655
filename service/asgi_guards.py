"""ASGI middleware that answers what no route of the service can see, in wesam's error format.

BentoML mounts the admin app at ``/`` with Starlette's ``Mount``, whose path pattern
(``^/(?P<path>.*)$``) cannot match a newline: a request path with a percent-encoded ``%0A`` (found by
the schemathesis test) matched nothing and got Starlette's plain-text 404. No wesam route takes
control characters, so such a path is refused here, before routing, as a JSON 400.
"""

from __future__ import annotations

import json
import re
from typing import Any, Awaitable, Callable

from .errors import BadRequest

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class RejectControlCharacterPaths:
    """400 ``bad_request`` for HTTP requests whose decoded path holds a control character."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or not _CONTROL.search(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        error = BadRequest("the request path contains a control character (e.g. an encoded newline); "
                           "no route takes one")
        body = json.dumps(error.to_json()).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
