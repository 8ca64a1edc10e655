"""The HTTP front's work, free of BentoML: parse bodies, call the runtime, format answers.

``Frontend`` takes the runtime as a ``messages.RuntimeClient`` (``LocalRuntime`` over the engine
and its batcher in the same process with one worker, BentoML's dependency proxy to the model
process with several) and answers ``(status, json)``; the service class only moves bytes in and out.

The front is thin on purpose: it validates the request (fields, prompts) and base64-decodes the
image, and sends the encoded file to the runtime; the runtime decodes it once and answers with the
masks already encoded (``messages``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import anyio

from wesam.errors import WesamError

from . import codec
from .config import ServeConfig
from .errors import Internal, Overloaded, ServiceError, to_service_error
from .messages import InferItem, InferResult, RuntimeClient
from .metrics import domain_label
from .requests import ParsedRequest, parse_embed, parse_segment

if TYPE_CHECKING:
    from .batcher import Batcher
    from .capture import RequestMeta
    from .engine import SegmentEngine
    from .metrics import Metrics

log = logging.getLogger("wesam.service")


class Frontend:
    SERVED_TTL_S = 5.0

    def __init__(self, config: ServeConfig, runtime: RuntimeClient, metrics: Metrics | None = None) -> None:
        self.config = config
        self.runtime = runtime
        self.metrics = metrics
        self._served: tuple[float, set[str]] = (0.0, set())

    async def served_domains(self) -> set[str]:
        """Domains the runtime serves (cached a few seconds): bounds the metrics' domain label."""
        at, domains = self._served
        if time.monotonic() - at > self.SERVED_TTL_S:
            try:
                status = await self.runtime.status()
                domains = {d["domain"] for d in status.get("domains", []) if d.get("serving")}
            except Exception:  # metrics labels must not fail a request
                pass
            self._served = (time.monotonic(), domains)
        return domains

    async def segment(self, fields: dict[str, Any] | ServiceError, form: bool = False,
                      meta: RequestMeta | None = None) -> tuple[int, dict[str, Any]]:
        """``meta``: the request's id, client and capture opt-out (``capture.request_meta`` of its
        headers); they travel to the runtime with the request."""
        return await self._handle("segment", fields, form, meta)

    async def embed(self, fields: dict[str, Any] | ServiceError, form: bool = False,
                    meta: RequestMeta | None = None) -> tuple[int, dict[str, Any]]:
        return await self._handle("embed", fields, form, meta)

    async def _handle(self, endpoint: str, fields: dict[str, Any] | ServiceError,
                      form: bool, meta: RequestMeta | None = None) -> tuple[int, dict[str, Any]]:
        t0 = time.perf_counter()
        domain: str | None = None
        adapter = "none"
        try:
            if isinstance(fields, ServiceError):
                raise fields
            raw_domain = fields.get("domain")
            domain = raw_domain if isinstance(raw_domain, str) else None
            check = getattr(self.runtime, "check", None)
            if check is not None:  # the model is in this process: refuse before any parsing when it is full
                check(endpoint == "embed" or fields.get("image") is not None)
            parse = parse_segment if endpoint == "segment" else parse_embed
            # Validation, base64 and prompt arrays take a fraction of a millisecond for box and point
            # prompts: done here, a hop to a worker thread would cost as much. A mask_input can mean
            # decoding RLE at the image size, and form bodies are larger: those go to a thread.
            if form or fields.get("mask_input"):
                parsed: ParsedRequest = await anyio.to_thread.run_sync(lambda: parse(fields, self.config, form=form))
            else:
                parsed = parse(fields, self.config, form=form)
            if meta is not None:
                parsed.item.request_id, parsed.item.client, parsed.item.capture = (meta.request_id, meta.client,
                                                                                   meta.capture)
            t_parsed = time.perf_counter()
            result = await self._call_runtime(parsed.item)
            t_runtime = time.perf_counter()
            if result.error is not None:
                raise ServiceError.from_json(result.error)
            adapter = result.adapter or "base"
            if endpoint == "segment":
                body = self.format_segment(parsed, result)
            else:
                body = self.format_embed(result)
            t_end = time.perf_counter()
            body["timings_ms"] = {
                "parse": (t_parsed - t0) * 1000,
                **result.timings_ms,
                "runtime": (t_runtime - t_parsed) * 1000,
                "total": (t_end - t0) * 1000,
            }
            status = 200
        except Exception as e:  # never a bare 500 page: a JSON error with its kind
            err = to_service_error(e, endpoint)
            status, body = err.status, err.to_json()
            if self.metrics is not None:
                self.metrics.error(err.kind, endpoint)
        if self.metrics is not None:
            if status == 200:
                label = domain_label(body.get("domain"))
            else:
                label = domain_label(domain, await self.served_domains())
            self.metrics.request(endpoint, label, adapter, status, time.perf_counter() - t0)
        return status, body

    async def _call_runtime(self, item: InferItem) -> InferResult:
        """The runtime's answer, or ``Overloaded`` when it cannot give one in time.

        Within ``config.request_deadline_s``, short of BentoML's own request timeout, so a client never
        gets BentoML's bare 504: a request still waiting then is cancelled (a queued one is never
        computed) and answered 503 ``overloaded``. There are no retries: a runtime call that fails at
        the connection level is a fault to fix, not to hide (see ``service._steady_sessions``).
        """
        deadline = self.config.request_deadline_s
        try:
            with anyio.fail_after(deadline):
                if item.image is None and item.image_bytes is None:
                    return await self.runtime.decode(item)  # prompt-only: never queued behind encodes
                return (await self.runtime.infer([item]))[0]
        except TimeoutError:
            raise Overloaded(f"no answer from the model within {deadline:g} s; retry later") from None
        except WesamError:
            raise
        except Exception as e:
            # BentoML's client raises with the runtime's HTTP status; a connection-level failure has none.
            code = getattr(e, "error_code", None)
            code = int(code) if code is not None else None
            log.warning("runtime call failed: %s: %s", type(e).__name__, e)
            # The runtime is unreachable (restarting) or timed out: the client should retry.
            # Anything else is a server bug.
            if code is None or code in (429, 503, 504):
                raise Overloaded(f"model runtime unavailable or overloaded ({type(e).__name__}); "
                                 "retry later") from None
            raise Internal(f"model runtime failed ({code}); see the server log") from None

    def format_segment(self, parsed: ParsedRequest, result: InferResult) -> dict[str, Any]:
        if result.encoded_masks is not None:  # encoded by the runtime (HTTP requests ask it to)
            masks = result.encoded_masks
        else:
            masks = codec.mask_answers(result.masks, result.scores, parsed.output, result.logits,
                                       result.low_res_logits)
        return {"masks": masks, "adapter": result.adapter, "domain": result.domain, "image_id": result.image_id,
                "image_size": list(result.image_size), "cached": result.cached}

    @staticmethod
    def format_embed(result: InferResult) -> dict[str, Any]:
        return {"image_id": result.image_id, "adapter": result.adapter, "domain": result.domain,
                "image_size": list(result.image_size), "cached": result.cached}


class LocalRuntime:
    """A ``RuntimeClient`` over a ``SegmentEngine`` in this process: with its ``Batcher`` in the
    server (one worker, and the model process), straight to the engine in tests and scripts."""

    def __init__(self, engine: SegmentEngine, batcher: Batcher | None = None) -> None:
        self.engine = engine
        self.batcher = batcher

    async def infer(self, items: list[InferItem]) -> list[InferResult]:
        if self.batcher is not None:
            if len(items) == 1:
                return [await self.batcher.infer(items[0])]
            import asyncio

            return list(await asyncio.gather(*(self.batcher.infer(item) for item in items)))
        return await anyio.to_thread.run_sync(lambda: self.engine.infer(items, batch=True))

    async def decode(self, item: InferItem) -> InferResult:
        if self.batcher is not None:
            return await self.batcher.infer(item)
        return (await anyio.to_thread.run_sync(lambda: self.engine.infer([item])))[0]

    def check(self, has_image: bool) -> None:
        """Raise ``Overloaded`` when the batcher would refuse such a request now (see ``Batcher.check``)."""
        if self.batcher is not None:
            self.batcher.check(has_image)

    async def status(self) -> dict[str, Any]:
        status = self.engine.status()
        if self.batcher is not None:
            status["queue"] = self.batcher.status()
        return status

    async def reload(self, force: bool = True) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(lambda: self.engine.refresh(force=force))

    async def activate(self, domain: str, version: int) -> dict[str, Any]:
        return await self._answer(lambda: self.engine.activate(domain, version))

    async def versions(self, domain: str) -> dict[str, Any]:
        return await self._answer(lambda: self.engine.versions(domain))

    async def worker_control(self, domain: str, action: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._answer(lambda: self.engine.worker_control(domain, action, params))

    async def capture_stats(self) -> dict[str, Any]:
        return await self._answer(self.engine.capture_stats)

    async def capture_delete(self, request_id: str) -> dict[str, Any]:
        return await self._answer(lambda: self.engine.capture_delete(request_id))

    async def capture_delete_client(self, domain: str, client: str) -> dict[str, Any]:
        return await self._answer(lambda: self.engine.capture_delete_client(domain, client))

    @staticmethod
    async def _answer(call: Any) -> dict[str, Any]:
        """As the runtime process answers: a refusal as ``ServiceError.to_json()``, not raised."""
        try:
            return await anyio.to_thread.run_sync(call)
        except WesamError as e:
            return to_service_error(e).to_json()
