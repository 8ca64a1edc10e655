"""A typed Python client of the wesam service (``wesam serve``).

::

    from wesam.client import Client

    with Client("http://127.0.0.1:3000") as c:
        r = c.segment("frame.jpg", boxes=[[185, 236, 276, 357]], domain="polyp")
        r.masks[0]          # prompt 0's mask, (H, W) bool

``Client`` (sync) and ``AsyncClient`` (asyncio/trio) speak the HTTP API with ``httpx``;
``GrpcClient`` speaks the KServe-v2 gRPC endpoint with ``tritonclient``'s messages. All three return
:class:`SegmentResult` and raise :class:`WesamClientError` subclasses (which are
``wesam.errors.WesamError``s) carrying the service's error ``kind``. See docs/client.md.

This package depends on nothing of the server (``wesam.service`` and below): a client machine needs
httpx, numpy, Pillow and pycocotools (and tritonclient[grpc] for gRPC), not torch at import.
"""

from .errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    ServerError,
    ServiceUnreachable,
    UnauthorizedError,
    UnavailableError,
    WesamClientError,
)
from .grpc import GrpcClient
from .http import AsyncClient, Client
from .results import EmbedResult, SegmentResult
from .retry import RetryPolicy

__all__ = [
    "AsyncClient", "Client", "GrpcClient", "SegmentResult", "EmbedResult", "RetryPolicy",
    "WesamClientError", "InvalidRequestError", "UnauthorizedError", "NotFoundError", "ConflictError",
    "ServerError", "UnavailableError", "OverloadedError", "ServiceUnreachable",
]
