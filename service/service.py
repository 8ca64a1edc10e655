"""The BentoML services: ``Segmenter`` (HTTP API, entry point) and, with several workers,
``SamRuntime`` (the model process).

One worker (the default): ``Segmenter`` holds the model itself (``host.ModelHost``: engine, batcher,
gRPC endpoint), so a request never leaves the process. ``WESAM_SERVE_WORKERS`` > 1: the ``Segmenter``
workers parse requests and call one ``SamRuntime`` process that holds the resident base model, its
adapters, the embedding cache, the batcher and the gRPC endpoint, so every front worker sees the same
cache (an ``image_id`` from any worker works on all of them) and the GPU holds one copy of the model.
Either way all requests go through one ``batcher.Batcher``, which merges concurrent requests into
encoder batches that the engine splits by adapter, and refuses what it cannot serve in time (503
``overloaded`` with ``Retry-After``).

Both classes are thin: the work is in ``wesam.service.front.Frontend``, ``wesam.service.host.ModelHost``
and ``wesam.service.engine.SegmentEngine``. Configuration: ``WESAM_SERVE_*`` environment variables
(``wesam.service.config``), read at import (in every process, so all agree on the layout).
Run: ``wesam serve`` or ``bentoml serve wesam.service.service:Segmenter``.
"""

from __future__ import annotations

import logging
from typing import Any

import bentoml
from pydantic import PrivateAttr

from wesam.errors import WesamError
from wesam.service.asgi_guards import RejectControlCharacterPaths
from wesam.service.capture import REQUEST_ID_HEADER, RequestMeta, request_meta
from wesam.service.config import ServeConfig
from wesam.service.errors import ServiceError, retry_after_s, to_service_error
from wesam.service.messages import InferItem, InferResult
from wesam.service.requests import FORM_TYPES, read_fields
from wesam.service.schemas import EmbedRequest, EmbedResponse, SegmentRequest, SegmentResponse

CONFIG = ServeConfig.from_env()
log = logging.getLogger("wesam.service")
# BentoML's logging config passes WARNING and up from other libraries; adapter loads, refusals and
# reloads are worth seeing at INFO.
log.setLevel(logging.INFO)


class _Body(bentoml.IODescriptor):
    """A request body read by wesam instead of BentoML's serde (no URL fetching, byte-limited).

    BentoML calls ``from_http_request`` with the raw request; the JSON schema of the subclass
    (the public request model) is what the OpenAPI document shows.
    """

    _fields: Any = PrivateAttr(default=None)
    _form: bool = PrivateAttr(default=False)
    _meta: Any = PrivateAttr(default=None)

    @classmethod
    async def from_http_request(cls, request: Any, serde: Any) -> "_Body":
        body = cls.model_construct()
        body._meta = request_meta(request.headers)  # X-Request-Id, X-Wesam-Client, X-Wesam-Capture
        content_type = request.headers.get("content-type", "application/json")
        body._form = content_type.split(";")[0].strip().lower() in FORM_TYPES
        try:
            body._fields = await read_fields(content_type, request.stream(), request.headers, CONFIG.max_body_bytes)
        except ServiceError as e:
            body._fields = e
        return body


class SegmentBody(_Body, SegmentRequest):
    pass


class EmbedBody(_Body, EmbedRequest):
    pass


def _json(status: int, body: dict[str, Any], meta: RequestMeta | None = None) -> Any:
    from starlette.responses import JSONResponse

    headers = {REQUEST_ID_HEADER: meta.request_id} if meta is not None else {}
    retry = retry_after_s(body) if status >= 400 else None
    if retry is not None:
        headers["Retry-After"] = str(retry)
    return JSONResponse({k: v for k, v in body.items() if v is not None}, status_code=status, headers=headers)


def _start_model() -> Any:
    from wesam.service.host import ModelHost
    from wesam.service.metrics import get_metrics

    return ModelHost.start(CONFIG, get_metrics())


@bentoml.service(workers=1, threads=CONFIG.runtime_threads, traffic={"timeout": CONFIG.timeout_s})
class SamRuntime:
    """The model process (with several front workers): base model, adapters, embedding cache, the
    batcher every request goes through, and the gRPC endpoint."""

    def __init__(self) -> None:
        self.host = _start_model()
        self.engine = self.host.engine

    # async: the batcher queues the request and a model thread computes it; the event loop stays free
    # to take the next requests (and to refuse them at once when the queue is full).
    @bentoml.api
    async def infer(self, items: list[InferItem]) -> list[InferResult]:
        """Requests with an image: embeddings (batched, grouped by adapter, cached), then their prompts."""
        return await self.host.runtime.infer(items)

    @bentoml.api
    async def decode(self, item: InferItem) -> InferResult:
        """Prompt-only requests on a cached embedding: never queued behind encoder batches."""
        return await self.host.runtime.decode(item)

    @bentoml.api
    async def status(self) -> dict:
        # async: runs on the event loop, so health checks are answered while a batch is encoding
        return self.host.status()

    @bentoml.api
    def reload(self, force: bool = True) -> dict:
        report = self.engine.refresh(force=force)
        return {**report, "domains": self.engine.router.status()}

    @bentoml.api
    def activate(self, domain: str, version: int) -> dict:
        # A refusal travels back as JSON: exceptions do not cross BentoML's process boundary with their kind.
        try:
            return self.engine.activate(domain, version)
        except WesamError as e:
            return to_service_error(e).to_json()

    @bentoml.api
    def versions(self, domain: str) -> dict:
        try:
            return self.engine.versions(domain)
        except WesamError as e:
            return to_service_error(e).to_json()

    @bentoml.api
    def worker_control(self, domain: str, action: str, params: dict | None = None) -> dict:
        try:
            return self.engine.worker_control(domain, action, params)
        except WesamError as e:
            return to_service_error(e).to_json()

    @bentoml.api
    def capture_stats(self) -> dict:
        try:
            return self.engine.capture_stats()
        except WesamError as e:
            return to_service_error(e).to_json()

    @bentoml.api
    def capture_delete(self, request_id: str) -> dict:
        try:
            return self.engine.capture_delete(request_id)
        except WesamError as e:
            return to_service_error(e).to_json()

    @bentoml.api
    def capture_delete_client(self, domain: str, client: str) -> dict:
        try:
            return self.engine.capture_delete_client(domain, client)
        except WesamError as e:
            return to_service_error(e).to_json()

    def __is_ready__(self) -> bool:
        return bool(self.engine.ready)

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.host.close()


# The runtime's uvicorn closes idle keep-alive connections after 5 s (BentoML does not pass its
# --timeout-keep-alive to dependency services); the client must give up idle connections earlier.
RUNTIME_KEEPALIVE_S = 2.0


def _steady_sessions(proxy: Any) -> None:
    """Make BentoML's dependency client keep its connections to the runtime instead of recycling them.

    BentoML 1.4.30+ (``_bentoml_impl.client.proxy2.SessionManager``) replaces its aiohttp session
    every 100 requests or 5 minutes by *closing* it, and closing a session closes every connection of
    its pool, also those with a request in flight: under concurrent load each recycle failed all the
    runtime calls then running ("Server disconnected", "Can not write request body"), which the front
    used to retry. The session is kept for the life of the worker instead, with a connection pool that
    is not capped (the batcher bounds the work; a capped pool queued calls where nothing measured them)
    and that drops idle connections before the runtime's server does (``RUNTIME_KEEPALIVE_S``),
    so a connection is never reused just as the server closes it. A BentoML without these internals
    keeps its own behaviour (logged).
    """
    try:
        import aiohttp
        from _bentoml_impl.client.proxy2 import SessionManager
        from bentoml._internal.utils.uri import uri_to_path

        client = proxy.to_async
        old = client._session_manager
        if not isinstance(old, SessionManager):
            raise TypeError(type(old).__name__)
    except (ImportError, AttributeError, TypeError) as e:
        log.warning("cannot configure BentoML's runtime client (%s: %s); its sessions are recycled every 100 "
                    "requests, which aborts calls in flight under load", type(e).__name__, e)
        return

    class SteadySessionManager(SessionManager):
        def _should_refresh(self) -> bool:
            return False  # closing the session would abort every call in flight on it

        def _make_client(self) -> aiohttp.ClientSession:
            if self._app is None and self._parsed_url.scheme == "file":  # the runtime's Unix socket
                connector = aiohttp.UnixConnector(path=uri_to_path(self._parsed_url.geturl()), limit=0,
                                                  keepalive_timeout=RUNTIME_KEEPALIVE_S)
                return aiohttp.ClientSession(base_url="http://127.0.0.1:3000", headers=self._headers,
                                             timeout=self._timeout, connector=connector)
            return super()._make_client()

    steady = SteadySessionManager.__new__(SteadySessionManager)
    steady.__dict__.update(old.__dict__)
    client._session_manager = steady


class _RuntimeClient:
    """The ``messages.RuntimeClient`` of the front and the admin API with several workers: async
    calls through BentoML's dependency proxy to the ``SamRuntime`` process."""

    def __init__(self, proxy: Any) -> None:
        _steady_sessions(proxy)
        self.proxy = proxy

    async def infer(self, items: list[InferItem]) -> list[InferResult]:
        return await self.proxy.to_async.infer(items)

    async def decode(self, item: InferItem) -> InferResult:
        return await self.proxy.to_async.decode(item)

    async def status(self) -> dict:
        return await self.proxy.to_async.status()

    async def reload(self, force: bool = True) -> dict:
        return await self.proxy.to_async.reload(force)

    async def activate(self, domain: str, version: int) -> dict:
        return await self.proxy.to_async.activate(domain, version)

    async def versions(self, domain: str) -> dict:
        return await self.proxy.to_async.versions(domain)

    async def worker_control(self, domain: str, action: str, params: dict | None = None) -> dict:
        return await self.proxy.to_async.worker_control(domain, action, params)

    async def capture_stats(self) -> dict:
        return await self.proxy.to_async.capture_stats()

    async def capture_delete(self, request_id: str) -> dict:
        return await self.proxy.to_async.capture_delete(request_id)

    async def capture_delete_client(self, domain: str, client: str) -> dict:
        return await self.proxy.to_async.capture_delete_client(domain, client)


def _admin_app():
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse

    from wesam.service.admin import make_admin_app
    from wesam.service.errors import BadRequest

    def runtime() -> _RuntimeClient:
        return bentoml.get_current_service().client

    app = make_admin_app(runtime, CONFIG.admin_token)

    # FastAPI answers what it refuses before a handler runs with its own {"detail": ...}: a body it
    # cannot parse or validate (POST /adapters/{domain}/activate), a path or method that is not
    # routed (the app is mounted at / behind BentoML's routes). Answer those as every other error.
    async def invalid(request: Any, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ())) or 'body'}: {err.get('msg')}"
                             for err in exc.errors()[:5])
        return JSONResponse(BadRequest(f"invalid request: {problems}").to_json(), status_code=400)

    async def refused(request: Any, exc: HTTPException) -> JSONResponse:
        default = "bad_request" if exc.status_code < 500 else "internal"
        kind = {413: "too_large", 415: "unsupported_media_type"}.get(exc.status_code, default)
        error = ServiceError(str(exc.detail), kind=kind, status=exc.status_code)
        return JSONResponse(error.to_json(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, refused)
    return app


@bentoml.asgi_app(_admin_app(), path="/")
@bentoml.service(workers=CONFIG.workers, traffic={"timeout": CONFIG.timeout_s})
class Segmenter:
    """wesam: Segment-Anything with per-domain LoRA adapters.

    POST /segment (masks for boxes/points/mask prompts), POST /embed (cache an embedding, get an
    image_id), GET /adapters, GET /adapters/{domain}/versions, POST /adapters/reload, POST
    /adapters/{domain}/activate (admin token), GET /ui (the operator's page), GET /capture/stats,
    DELETE /capture/{request_id}, DELETE /capture/clients/{domain}/{client} (admin token), /livez,
    /readyz, /metrics. Errors are JSON: {"error", "kind", "status"}; 503
    `overloaded` answers carry Retry-After. Answers carry an X-Request-Id header.
    """

    if not CONFIG.single_process:  # several workers share one model process
        runtime = bentoml.depends(SamRuntime)

    def __init__(self) -> None:
        from wesam.service.front import Frontend
        from wesam.service.metrics import get_metrics

        self.host = None
        if CONFIG.single_process:
            self.host = _start_model()
            self.client = self.host.runtime
        else:
            self.client = _RuntimeClient(self.runtime)
        self.front = Frontend(CONFIG, self.client, get_metrics())

    @bentoml.api(route="/segment")
    async def segment(self, request: SegmentBody, /) -> SegmentResponse:
        """Masks for prompts on an image (JSON with base64 `image`, or multipart/form-data with an
        `image` file part), or on a cached embedding (`image_id`). One mask set per box; points
        without boxes form one prompt. `domain` picks the adapter. Masks are COCO RLE by default."""
        status, body = await self.front.segment(request._fields, request._form, request._meta)
        return _json(status, body, request._meta)

    @bentoml.api(route="/embed")
    async def embed(self, request: EmbedBody, /) -> EmbedResponse:
        """Compute and cache the embedding of (image, domain); returns the `image_id` to send with
        prompt-only /segment requests."""
        status, body = await self.front.embed(request._fields, request._form, request._meta)
        return _json(status, body, request._meta)

    async def __is_ready__(self) -> bool:
        try:
            return bool((await self.client.status()).get("ready"))
        except Exception:
            return False

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        if self.host is not None:
            self.host.close()


# Before routing: paths no route can match are answered as JSON too (service/asgi_guards.py).
Segmenter.add_asgi_middleware(RejectControlCharacterPaths)
