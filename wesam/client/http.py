"""``Client`` and ``AsyncClient``: the service's HTTP API over one pooled ``httpx`` client each.

Both build their requests with :mod:`wesam.client.calls` and retry with :mod:`wesam.client.retry`;
they differ only in the transport call (``httpx.Client.request`` or ``await
httpx.AsyncClient.request``) and in waiting between retries (``time.sleep`` or ``anyio.sleep``).
Their public methods are one line each, so that both keep typed signatures and docstrings.
"""

from __future__ import annotations

from typing import Any, TypeVar

import httpx

from wesam.version import __version__

from . import calls
from .calls import Call, Output
from .images import ImageInput
from .results import EmbedResult, SegmentResult
from .retry import RetryPolicy, run_async, run_sync

T = TypeVar("T")
NO_RETRY = RetryPolicy(max_retries=0)
DEFAULT_URL = "http://127.0.0.1:3000"


class _Settings:
    """What both HTTP clients share: base URL, headers, admin token, timeouts, retry policy."""

    def __init__(self, url: str = DEFAULT_URL, *, admin_token: str | None = None,
                 timeout: float | httpx.Timeout = 120.0, max_retries: int = 3, backoff: float = 0.25,
                 backoff_max: float = 10.0, client_id: str | None = None, capture: bool = True,
                 headers: dict[str, str] | None = None) -> None:
        self.url = (url if "://" in url else f"http://{url}").rstrip("/")
        self.retry = RetryPolicy(max_retries=max_retries, backoff=backoff, backoff_max=backoff_max)
        # A dead host should fail in seconds, a slow answer may take the server's whole deadline.
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout,
                                                                                        connect=min(timeout, 10.0))
        self.headers = {"User-Agent": f"wesam-client/{__version__}", **(headers or {})}
        if client_id is not None:
            self.headers["X-Wesam-Client"] = client_id  # capture caps and deletion are per client
        if not capture:
            self.headers["X-Wesam-Capture"] = "off"  # never store this client's requests for self-training
        # Sent with admin calls only: the token has no business in every request's headers.
        self._admin = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        self._http = self._connect()

    def _connect(self) -> Any:
        raise NotImplementedError

    def _request(self, call: Call[Any]) -> dict[str, Any]:
        kwargs = call.request()
        if call.admin and self._admin:
            kwargs["headers"] = self._admin
        return kwargs

    def _policy(self, call: Call[Any]) -> RetryPolicy:
        return self.retry if call.retry else NO_RETRY

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


class Client(_Settings):
    """Synchronous client of a wesam server's HTTP API.

    ``url``: the server (default ``http://127.0.0.1:3000``). ``admin_token``: bearer token of the
    admin calls (``WESAM_SERVE_ADMIN_TOKEN`` of the server). ``timeout``: seconds per attempt (or an
    ``httpx.Timeout``; connecting gives up after at most 10 s). ``max_retries`` (0 disables),
    ``backoff``, ``backoff_max``: see :mod:`wesam.client.retry`. ``client_id``: sent as
    ``X-Wesam-Client`` (the server's capture counts and deletes samples per client); ``capture=False``:
    opt every request out of capture (``X-Wesam-Capture: off``).

    Use it as a context manager (``with Client(url) as c:``) or call :meth:`close`: it holds a pool
    of keep-alive connections. Thread-safe (``httpx.Client`` is).
    """

    def _connect(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=self.timeout, headers=self.headers)

    def _run(self, call: Call[T]) -> T:
        def once() -> T:
            try:
                response = self._http.request(**self._request(call))
            except httpx.TransportError as e:
                raise calls.transport_error(e) from e
            return call.answer(response)

        return run_sync(once, self._policy(call), call.idempotent)

    # -- inference --------------------------------------------------------------------------------
    def segment(self, image: ImageInput | None = None, *, image_id: str | None = None, boxes: Any = None,
                points: Any = None, point_labels: Any = None, mask_input: Any = None, multimask: bool = False,
                return_logits: bool = False, domain: str | None = None, output: Output = "rle") -> SegmentResult:
        """Masks for prompts on ``image`` (path, encoded bytes, PIL image, uint8 (H, W, 3) / (H, W)
        array) or on the cached embedding ``image_id`` (exactly one of the two).

        Prompts, pixels of the original image (x right, y down): ``boxes`` (N, 4) ``[x0, y0, x1, y1]``
        (one prompt each); ``points`` (K, 2) ``[x, y]`` with ``point_labels`` K values (1 foreground,
        0 background; default all 1): without boxes they form one prompt, with boxes they join every
        box's prompt; ``mask_input``: one entry per prompt, a bool (H, W) mask at the image size or
        the (L, L) ``low_res_logits`` of a previous answer (alone, they form the prompts).
        ``multimask``: three masks per prompt. ``return_logits``: also ``logits`` and
        ``low_res_logits`` per mask. ``domain``: use that domain's active adapter (``None``: the base
        model; with ``image_id``: the domain it was embedded for). ``output``: the masks' wire format
        (``rle``, ``png``, ``polygons``; ``masks`` decodes any of them).
        """
        return self._run(calls.segment(image, image_id=image_id, boxes=boxes, points=points,
                                       point_labels=point_labels, mask_input=mask_input, multimask=multimask,
                                       return_logits=return_logits, domain=domain, output=output))

    def embed(self, image: ImageInput, domain: str | None = None) -> EmbedResult:
        """Compute and cache the embedding of ``image`` for ``domain``; follow up with
        ``segment(image_id=result.image_id, ...)`` (no image sent, no encoder run)."""
        return self._run(calls.embed(image, domain))

    # -- state ------------------------------------------------------------------------------------
    def health(self) -> bool:
        """``True`` when the server is ready (``/readyz`` 200), ``False`` when it answers otherwise;
        ``ServiceUnreachable`` when it does not answer. Not retried."""
        return self._run(calls.health())

    def adapters(self) -> dict[str, Any]:
        """``GET /adapters``: the served model, every domain with its active and loaded versions,
        the cache and queue state."""
        return self._run(calls.adapters())

    def domains(self) -> list[dict[str, Any]]:
        """The domains rows of :meth:`adapters`: ``domain``, ``serving`` (``domain@vN``), ``version``,
        ``active``, ``versions``, ``error`` (a refused version)."""
        return self.adapters().get("domains", [])

    def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text."""
        return self._run(calls.metrics())

    # -- admin (token) ----------------------------------------------------------------------------
    def reload(self) -> dict[str, Any]:
        """Re-read the registry now (refused versions are retried)."""
        return self._run(calls.reload())

    def activate(self, domain: str, version: int | str) -> dict[str, Any]:
        """Serve ``version`` (``2`` or ``"v2"``) of ``domain``: loaded first, refused (409) if it does
        not load. Answers ``{"domain", "serving", "previous"}``."""
        return self._run(calls.activate(domain, version))

    def control(self, domain: str) -> dict[str, Any]:
        """The online worker's controls of ``domain`` (pinned version, frozen and why); no token."""
        return self._run(calls.worker(domain, "control"))

    def lineage(self, domain: str) -> dict[str, Any]:
        """The active version's ancestry (parents, samples, gate results); no token."""
        return self._run(calls.worker(domain, "lineage"))

    def pin(self, domain: str, version: int | str) -> dict[str, Any]:
        """Anchor the domain's online worker to ``version``."""
        return self._run(calls.worker(domain, "pin", {"version": version}))

    def unpin(self, domain: str) -> dict[str, Any]:
        return self._run(calls.worker(domain, "unpin"))

    def freeze(self, domain: str, reason: str | None = None) -> dict[str, Any]:
        """Stop the worker's rounds and publications for ``domain``."""
        return self._run(calls.worker(domain, "freeze", {"reason": reason}))

    def unfreeze(self, domain: str) -> dict[str, Any]:
        return self._run(calls.worker(domain, "unfreeze"))

    def rollback(self, domain: str, *, freeze: bool = True, reason: str | None = None) -> dict[str, Any]:
        """Serve the active version's lineage parent (else the previous version), freezing the domain
        first unless ``freeze=False``. Not idempotent: retried only when it surely was not sent."""
        return self._run(calls.worker(domain, "rollback", {"freeze": freeze, "reason": reason}))

    def capture_stats(self) -> dict[str, Any]:
        return self._run(calls.capture_stats())

    def capture_delete(self, request_id: str) -> dict[str, Any]:
        """Delete the captured sample of one request (404 ``unknown_sample`` if there is none)."""
        return self._run(calls.capture_delete(request_id))

    def capture_delete_client(self, domain: str, client: str) -> dict[str, Any]:
        """Delete every captured sample of ``client`` in ``domain``."""
        return self._run(calls.capture_delete_client(domain, client))

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Settings):
    """:class:`Client` for asyncio (or trio): the same arguments and methods, as coroutines.

    ``async with AsyncClient(url) as c: r = await c.segment(...)``. One ``httpx.AsyncClient``
    (a connection pool) per instance; use it from one event loop.
    """

    def _connect(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=self.timeout, headers=self.headers)

    async def _run(self, call: Call[T]) -> T:
        async def once() -> T:
            try:
                response = await self._http.request(**self._request(call))
            except httpx.TransportError as e:
                raise calls.transport_error(e) from e
            return call.answer(response)

        return await run_async(once, self._policy(call), call.idempotent)

    async def segment(self, image: ImageInput | None = None, *, image_id: str | None = None, boxes: Any = None,
                      points: Any = None, point_labels: Any = None, mask_input: Any = None, multimask: bool = False,
                      return_logits: bool = False, domain: str | None = None,
                      output: Output = "rle") -> SegmentResult:
        """As :meth:`Client.segment`."""
        return await self._run(calls.segment(image, image_id=image_id, boxes=boxes, points=points,
                                             point_labels=point_labels, mask_input=mask_input, multimask=multimask,
                                             return_logits=return_logits, domain=domain, output=output))

    async def embed(self, image: ImageInput, domain: str | None = None) -> EmbedResult:
        """As :meth:`Client.embed`."""
        return await self._run(calls.embed(image, domain))

    async def health(self) -> bool:
        return await self._run(calls.health())

    async def adapters(self) -> dict[str, Any]:
        return await self._run(calls.adapters())

    async def domains(self) -> list[dict[str, Any]]:
        return (await self.adapters()).get("domains", [])

    async def metrics(self) -> str:
        return await self._run(calls.metrics())

    async def reload(self) -> dict[str, Any]:
        return await self._run(calls.reload())

    async def activate(self, domain: str, version: int | str) -> dict[str, Any]:
        return await self._run(calls.activate(domain, version))

    async def control(self, domain: str) -> dict[str, Any]:
        return await self._run(calls.worker(domain, "control"))

    async def lineage(self, domain: str) -> dict[str, Any]:
        return await self._run(calls.worker(domain, "lineage"))

    async def pin(self, domain: str, version: int | str) -> dict[str, Any]:
        return await self._run(calls.worker(domain, "pin", {"version": version}))

    async def unpin(self, domain: str) -> dict[str, Any]:
        return await self._run(calls.worker(domain, "unpin"))

    async def freeze(self, domain: str, reason: str | None = None) -> dict[str, Any]:
        return await self._run(calls.worker(domain, "freeze", {"reason": reason}))

    async def unfreeze(self, domain: str) -> dict[str, Any]:
        return await self._run(calls.worker(domain, "unfreeze"))

    async def rollback(self, domain: str, *, freeze: bool = True, reason: str | None = None) -> dict[str, Any]:
        return await self._run(calls.worker(domain, "rollback", {"freeze": freeze, "reason": reason}))

    async def capture_stats(self) -> dict[str, Any]:
        return await self._run(calls.capture_stats())

    async def capture_delete(self, request_id: str) -> dict[str, Any]:
        return await self._run(calls.capture_delete(request_id))

    async def capture_delete_client(self, domain: str, client: str) -> dict[str, Any]:
        return await self._run(calls.capture_delete_client(domain, client))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
