"""The BentoML services: ``Segmenter`` (HTTP API, entry point) and ``SamRuntime`` (the model).

Two services, as BentoML recommends for a CPU front over a model: the ``Segmenter`` workers
(``WESAM_SERVE_WORKERS``) parse and validate requests, decode images and encode masks; one
``SamRuntime`` worker holds the resident base model, its adapters and the embedding cache, so
every front worker sees the same cache (an ``image_id`` from any worker works on all of them) and
the GPU holds one copy of the model. The front calls the runtime's batchable ``infer`` API, so
BentoML's adaptive batcher merges concurrent requests into one encoder batch; the engine splits
it by adapter.

Both classes are thin: the work is in ``wesam.service.front.Frontend`` and
``wesam.service.engine.SegmentEngine``. Configuration: ``WESAM_SERVE_*`` environment variables
(``wesam.service.config``), read at import.
Run: ``wesam serve`` or ``bentoml serve wesam.service.service:Segmenter``.
"""

from __future__ import annotations

import logging
from typing import Any

import bentoml
from pydantic import PrivateAttr

from wesam.errors import WesamError
from wesam.service.capture import REQUEST_ID_HEADER, RequestMeta, request_meta
from wesam.service.config import ServeConfig
from wesam.service.errors import ServiceError, to_service_error
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

    headers = {REQUEST_ID_HEADER: meta.request_id} if meta is not None else None
    return JSONResponse({k: v for k, v in body.items() if v is not None}, status_code=status, headers=headers)


@bentoml.service(workers=1, threads=CONFIG.runtime_threads, traffic={"timeout": CONFIG.timeout_s})
class SamRuntime:
    """The model process: base model, adapters, embedding cache; also hosts the gRPC endpoint."""

    def __init__(self) -> None:
        from wesam.service.engine import SegmentEngine
        from wesam.service.metrics import get_metrics

        self.metrics = get_metrics()
        self.engine = SegmentEngine.from_config(CONFIG, self.metrics)
        self.engine.start_watcher()
        self.grpc = None
        if CONFIG.grpc_port:
            from wesam.service.grpc_server import start_grpc_server

            self.grpc = start_grpc_server(self.engine, CONFIG, self.metrics)

    # max_latency_ms is BentoML's shedding bound (requests that would wait longer get 503), not a wait
    # target: the dispatcher waits only as long as its latency model says a bigger batch pays off.
    @bentoml.api(batchable=True, max_batch_size=CONFIG.max_batch_size, max_latency_ms=CONFIG.max_latency_ms)
    def infer(self, items: list[InferItem]) -> list[InferResult]:
        """Requests with an image: embeddings (grouped by adapter, cached), then their prompts."""
        return self.engine.infer(items, batch=True)

    @bentoml.api
    def decode(self, item: InferItem) -> InferResult:
        """Prompt-only requests on a cached embedding: never queued behind encoder batches."""
        return self.engine.infer([item])[0]

    @bentoml.api
    async def status(self) -> dict:
        # async: runs on the event loop, so health checks are answered while a batch is encoding
        return self.engine.status()

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
        if self.grpc is not None:
            self.grpc.stop(grace=2).wait(5)
        self.engine.close()  # after gRPC: requests it finished may still be queued for capture


class _RuntimeClient:
    """The ``messages.RuntimeClient`` of the front and the admin API: async calls through BentoML's
    dependency proxy."""

    def __init__(self, proxy: Any) -> None:
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

    async def capture_stats(self) -> dict:
        return await self.proxy.to_async.capture_stats()

    async def capture_delete(self, request_id: str) -> dict:
        return await self.proxy.to_async.capture_delete(request_id)

    async def capture_delete_client(self, domain: str, client: str) -> dict:
        return await self.proxy.to_async.capture_delete_client(domain, client)


def _admin_app():
    from wesam.service.admin import make_admin_app

    def runtime() -> _RuntimeClient:
        return bentoml.get_current_service().client

    return make_admin_app(runtime, CONFIG.admin_token)


@bentoml.asgi_app(_admin_app(), path="/")
@bentoml.service(workers=CONFIG.workers, traffic={"timeout": CONFIG.timeout_s})
class Segmenter:
    """wesam: Segment-Anything with per-domain LoRA adapters.

    POST /segment (masks for boxes/points/mask prompts), POST /embed (cache an embedding, get an
    image_id), GET /adapters, POST /adapters/reload, POST /adapters/{domain}/activate (admin
    token), GET /capture/stats, DELETE /capture/{request_id}, DELETE /capture/clients/{domain}/{client}
    (admin token), /livez, /readyz, /metrics. Errors are JSON: {"error", "kind", "status"}. Answers
    carry an X-Request-Id header.
    """

    runtime = bentoml.depends(SamRuntime)

    def __init__(self) -> None:
        from wesam.service.front import Frontend
        from wesam.service.metrics import get_metrics

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
