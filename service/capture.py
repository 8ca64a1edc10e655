"""Capture of served requests for online self-training, kept off the request path.

The HTTP front and the gRPC endpoint give every request an id, a client id and an opt-out flag
(:func:`request_meta`), which travel to the model runtime in the ``InferItem``. After the engine
has answered a request, :meth:`Capture.offer` decides in a few microseconds whether to keep it:

1. its served domain (``base`` without an adapter) is listed in ``WESAM_SERVE_CAPTURE_DOMAINS``;
2. it does not name an adapter version (``polyp@v2``: an operator's preview of a version, served by
   the version asked for rather than the one the domain serves, is never training data);
3. it did not opt out (``X-Wesam-Capture: off``);
4. it can be replayed: the image came with it (not an ``image_id`` follow-up) and its prompts are
   boxes and/or points (no ``mask_input``);
5. a hash of its request id falls under ``WESAM_SERVE_CAPTURE_RATE`` (every replica agrees);
6. its domain and its client are under their caps for the rolling hour;
7. the queue has room (count and bytes); it is never waited for.

It then puts references (the decoded image, the validated prompts, the answer's masks and scores)
into a bounded ``queue.Queue``. One daemon thread does the expensive part: downscale the image to
the model's input size, encode it, scale the prompts into that frame, encode the served masks as
COCO RLE at that size, and ``store.add`` a ``CapturedSample``; it also applies retention
(``store.purge``) periodically. Its errors are logged and counted, never raised into a request.
Every decision is counted in ``wesam_capture_total{domain,outcome}``. See docs/online.md.
"""

from __future__ import annotations

import hashlib
import io
import logging
import queue
import re
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from .config import BASE, ServeConfig
from .errors import UnknownSample

if TYPE_CHECKING:
    from wesam.adapters.online import CapturedSample, SampleStore

    from .messages import InferItem, InferResult, PromptArrays
    from .metrics import Metrics

log = logging.getLogger("wesam.service")

# HTTP headers (case-insensitive) and their gRPC metadata twins (lowercase, as gRPC sends them).
REQUEST_ID_HEADER = "X-Request-Id"
CLIENT_HEADER = "X-Wesam-Client"
CAPTURE_HEADER = "X-Wesam-Capture"
REQUEST_ID_KEY, CLIENT_KEY, CAPTURE_KEY = (h.lower() for h in (REQUEST_ID_HEADER, CLIENT_HEADER, CAPTURE_HEADER))
ANONYMOUS = "anonymous"
# Ids from clients are kept when they are short and safe in a URL path segment, a header and a log
# line; otherwise the request gets a fresh UUID (request id) or counts as anonymous (client id).
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}$")
OFF = frozenset({"off", "no", "false", "0"})

WINDOW_S = 3600.0  # the caps count the samples admitted in the last hour (rolling)
OPEN_RETRY_S = 30.0  # an unreachable store is tried again after this long
LOG_EVERY_S = 60.0  # repeated capture errors are logged at most this often
# What became of a served request, the `outcome` label of wesam_capture_total.
OUTCOMES = ("stored", "duplicate", "cancelled", "error", "domain_off", "preview", "opted_out", "unsupported",
            "sampled_out", "capped_domain", "capped_client", "queue_full")


# -- request identity ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RequestMeta:
    """Who asked: the request id the answer carries, the client, and whether capture is allowed."""

    request_id: str
    client: str = ANONYMOUS
    capture: bool = True


def new_request_id() -> str:
    return str(uuid.uuid4())


def safe_id(value: Any) -> str | None:
    """``value`` stripped if it is a sane id (:data:`SAFE_ID`), else None."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if SAFE_ID.match(value) else None


def request_meta(headers: Mapping[str, str] | Any, fallback_id: str | None = None) -> RequestMeta:
    """From HTTP headers (Starlette's case-insensitive ``Headers``) or a dict of gRPC metadata
    (lowercase keys). ``fallback_id``: a protocol-level id used when there is no header (KServe's
    ``ModelInferRequest.id``)."""
    rid = safe_id(headers.get(REQUEST_ID_KEY)) or safe_id(fallback_id) or new_request_id()
    client = safe_id(headers.get(CLIENT_KEY)) or ANONYMOUS
    flag = headers.get(CAPTURE_KEY)
    return RequestMeta(rid, client, not (isinstance(flag, str) and flag.strip().lower() in OFF))


def grpc_metadata(context: Any) -> dict[str, str]:
    """A gRPC call's invocation metadata as a dict (text values only, keys lowercased)."""
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out.setdefault(key.lower(), value)
    return out


# -- decisions -----------------------------------------------------------------------------------------

def sampled(request_id: str, rate: float) -> bool:
    """Keep this request? A pure function of its id, so every replica (and a retry) decides alike."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    h = int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "big")
    return h < rate * 2.0 ** 64


class RollingCaps:
    """At most ``domain_cap`` samples per domain and ``client_cap`` per (domain, client) in any
    rolling ``window`` seconds (0: no cap). Counts samples admitted to the queue, in this process."""

    def __init__(self, domain_cap: int, client_cap: int, window: float = WINDOW_S) -> None:
        self.domain_cap = domain_cap
        self.client_cap = client_cap
        self.window = window
        self._domains: dict[str, deque[float]] = {}
        self._clients: dict[tuple[str, str], deque[float]] = {}
        self._swept = 0.0

    def _count(self, table: dict[Any, deque[float]], key: Any, now: float) -> int:
        times = table.get(key)
        if times is None:
            return 0
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del table[key]
            return 0
        return len(times)

    def check(self, domain: str, client: str, now: float) -> str | None:
        """None if a sample may be admitted now, else the outcome (``capped_domain``/``capped_client``)."""
        if now - self._swept > 60.0:  # forget clients not seen for a window (memory stays bounded)
            for table in (self._domains, self._clients):
                for key in list(table):
                    self._count(table, key, now)
            self._swept = now
        if self.domain_cap and self._count(self._domains, domain, now) >= self.domain_cap:
            return "capped_domain"
        if self.client_cap and self._count(self._clients, (domain, client), now) >= self.client_cap:
            return "capped_client"
        return None

    def record(self, domain: str, client: str, now: float) -> None:
        if self.domain_cap:
            self._domains.setdefault(domain, deque()).append(now)
        if self.client_cap:
            self._clients.setdefault((domain, client), deque()).append(now)


# -- the expensive part (capture thread) ------------------------------------------------------------------

def stored_size(height: int, width: int, img_size: int) -> tuple[int, int]:
    """(h, w) of the stored image: the longest side brought down to ``img_size`` (the model's input
    frame, rounded as SAM's ``ResizeLongestSide``), aspect kept; smaller images are not enlarged."""
    from segment_anything.utils.transforms import ResizeLongestSide

    if max(height, width) <= img_size:
        return height, width
    h, w = ResizeLongestSide.get_preprocess_shape(height, width, img_size)
    return max(1, h), max(1, w)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> ``size`` (h, w), bilinear with antialiasing (PIL), as SAM's preprocessing."""
    from PIL import Image

    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool -> ``size`` (h, w): a pixel is set when at least half of what it covers is."""
    from PIL import Image

    if mask.shape == tuple(size):
        return np.asarray(mask, dtype=bool)
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(img) >= 128


def encode_image(image: np.ndarray, fmt: str, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(image).save(buf, format="PNG")
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _round(values: np.ndarray) -> list[Any]:
    return np.round(np.asarray(values, dtype=np.float64), 3).tolist()


def scaled_prompts(prompts: PromptArrays, sx: float, sy: float) -> dict[str, Any]:
    """Boxes and points in the request's layout (as ``/segment`` takes them), scaled by (sx, sy)."""
    out: dict[str, Any] = {}
    if prompts.boxes is not None:
        out["boxes"] = _round(np.asarray(prompts.boxes, dtype=np.float64) * [sx, sy, sx, sy])
    if prompts.point_coords is not None:  # (N, K, 2): the same K points repeated for every box
        out["points"] = _round(np.asarray(prompts.point_coords, dtype=np.float64)[0] * [sx, sy])
        out["point_labels"] = np.asarray(prompts.point_labels)[0].astype(int).tolist()
    return out


@dataclass
class Job:
    """References to what one served request was; built on the request path, read by the thread."""

    seq: int
    request_id: str
    domain: str
    client: str
    created: float
    adapter: str | None
    image: np.ndarray  # (H, W, 3) uint8, as decoded
    prompts: PromptArrays
    multimask: bool
    masks: np.ndarray  # (N, M, H, W) bool, as served
    scores: np.ndarray  # (N, M)
    nbytes: int = 0


def build_sample(job: Job, img_size: int, fmt: str = "jpeg", quality: int = 90) -> CapturedSample:
    """The ``CapturedSample`` of one served request, everything in the stored (downscaled) frame.

    ``prompts`` holds the request's boxes / points / point_labels, ``multimask``, and per prompt
    the served mask (the first mask, or the best-scored one of a multimask answer) as COCO RLE
    (``masks``) with its score (``scores``). ``mask_rle`` is the union of those masks (the served
    mask itself for a one-prompt request) and ``score`` their mean.
    """
    from wesam.adapters.online import CapturedSample

    from . import codec

    height, width = job.image.shape[:2]
    h, w = stored_size(height, width, img_size)
    image = encode_image(resize_image(np.ascontiguousarray(job.image), (h, w)), fmt, quality)
    prompts = scaled_prompts(job.prompts, w / width, h / height)
    masks = np.asarray(job.masks, dtype=bool)
    scores = np.asarray(job.scores, dtype=np.float64).reshape(masks.shape[:2])
    best = scores.argmax(axis=1) if masks.shape[1] > 1 else np.zeros(len(masks), dtype=int)
    served = [resize_mask(masks[i, best[i]], (h, w)) for i in range(len(masks))]
    prompts["multimask"] = bool(job.multimask)
    prompts["masks"] = [codec.rle_encode(m) for m in served]
    prompts["scores"] = [round(float(scores[i, best[i]]), 6) for i in range(len(masks))]
    union = np.logical_or.reduce(served) if served else np.zeros((h, w), bool)
    return CapturedSample(request_id=job.request_id, domain=job.domain, client=job.client, created=job.created,
                          image=image, image_size=(int(height), int(width)), prompts=prompts, adapter=job.adapter,
                          mask_rle=codec.rle_encode(union),
                          score=float(np.mean(prompts["scores"])) if served else None)


# -- the capture object ------------------------------------------------------------------------------

class Capture:
    """One per model-runtime process: :meth:`offer` on the request path, a daemon thread behind it.

    ``store``: an open ``SampleStore`` (tests); by default the thread opens
    ``config.capture_store`` itself, retrying every ``OPEN_RETRY_S`` while it is unreachable, so a
    store that is down never stops the server from serving. ``clock``: unix seconds (``created``,
    caps). ``start=False`` runs no thread: call :meth:`drain` (tests).
    """

    def __init__(self, config: ServeConfig, img_size: int, *, store: SampleStore | None = None,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time,
                 start: bool = True) -> None:
        self.config = config
        self.img_size = img_size
        self.domains = frozenset(config.capture_domains)
        self.rate = config.capture_rate
        self.metrics = metrics
        self.clock = clock
        self.caps = RollingCaps(config.capture_domain_cap, config.capture_client_cap)
        self.queue: queue.Queue[Job | None] = queue.Queue(config.capture_queue)
        self.max_bytes = config.capture_queue_bytes
        self._lock = threading.Lock()  # admission state, pending work, cancellations, counters
        self._done_cond = threading.Condition(self._lock)
        self._write_lock = threading.Lock()  # a store.add and an admin delete never interleave
        self._open_lock = threading.Lock()
        self._bytes = 0
        self._admitted = 0  # sequence number of the last admitted job
        self._finished = 0
        self._pending_ids: Counter[str] = Counter()
        self._pending_clients: Counter[tuple[str, str]] = Counter()
        self._cancel_ids: dict[str, int] = {}  # request id -> jobs admitted up to this seq are cancelled
        self._cancel_clients: dict[tuple[str, str], int] = {}
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self._store = store
        self._owns_store = store is None
        self._store_error: str | None = None
        self._next_open = 0.0
        self.last_purge: dict[str, Any] | None = None
        self._last_log = -LOG_EVERY_S
        self._suppressed = 0
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    # -- request path ------------------------------------------------------------------------------
    def offer(self, item: InferItem, result: InferResult) -> str:
        """Queue a served request for capture, or say why not; never blocks, never raises for a
        request's content. Returns ``queued`` or the outcome counted."""
        domain = result.domain or BASE
        if domain not in self.domains:
            return self._count(domain, "domain_off")
        if item.domain and "@" in item.domain:  # names a version (router.names_version): a preview
            return self._count(domain, "preview")
        if not item.capture:
            return self._count(domain, "opted_out")
        p = item.prompts
        if (item.image is None or p is None or result.masks is None or result.scores is None
                or p.mask_binary is not None or p.mask_logits is not None
                or (p.boxes is None and p.point_coords is None)):
            return self._count(domain, "unsupported")
        request_id = safe_id(item.request_id) or new_request_id()
        if not sampled(request_id, self.rate):
            return self._count(domain, "sampled_out")
        client = safe_id(item.client) or ANONYMOUS
        image, masks = np.asarray(item.image), np.asarray(result.masks)
        nbytes = int(image.nbytes + masks.nbytes)
        with self._lock:
            now = self.clock()
            capped = self.caps.check(domain, client, now)
            if capped is None and (self._closing.is_set()
                                   or (self._bytes and self._bytes + nbytes > self.max_bytes)):
                capped = "queue_full"
            if capped is None:
                job = Job(self._admitted + 1, request_id, domain, client, now,
                          result.adapter if result.domain else None, image, p, item.multimask, masks,
                          np.asarray(result.scores), nbytes)
                try:
                    self.queue.put_nowait(job)
                except queue.Full:
                    capped = "queue_full"
                else:
                    self._admitted += 1
                    self._bytes += nbytes
                    self._pending_ids[request_id] += 1
                    self._pending_clients[(domain, client)] += 1
                    self.caps.record(domain, client, now)
        if capped is not None:
            return self._count(domain, capped)
        self._depth()
        return "queued"

    def _count(self, domain: str, outcome: str) -> str:
        with self._lock:
            self.outcomes[(domain, outcome)] += 1
        if self.metrics is not None:
            self.metrics.capture_event(domain, outcome)
        return outcome

    def _depth(self) -> None:
        if self.metrics is not None:
            self.metrics.capture_queue_depth(self.queue.qsize())

    # -- the thread --------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="wesam-capture", daemon=True)
            self._thread.start()
            log.info("capturing domains %s into %s (rate %g, caps %s/domain, %s/client per hour)",
                     ", ".join(sorted(self.domains)) or "(none)", self.location, self.rate,
                     self.config.capture_domain_cap or "no cap", self.config.capture_client_cap or "no cap")

    def _run(self) -> None:
        next_purge = 0.0  # retention runs once at start, then every capture_purge_s
        while True:
            try:
                job = self.queue.get(timeout=0.5)
            except queue.Empty:
                job = None
            if job is not None:
                self.process(job)
            elif self._closing.is_set() and self.queue.empty():
                break
            if not self._closing.is_set() and time.monotonic() >= next_purge:
                next_purge = time.monotonic() + self.config.capture_purge_s
                self.purge()

    def drain(self) -> int:
        """Process what is queued in the calling thread (without a thread: tests); how many."""
        n = 0
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return n
            if job is not None:
                self.process(job)
                n += 1

    def process(self, job: Job) -> str:
        """Build and store one job's sample; returns its outcome (counted)."""
        outcome = "error"
        try:
            sample = build_sample(job, self.img_size, self.config.capture_format, self.config.capture_jpeg_quality)
            with self._write_lock:
                if self._cancelled(job):
                    outcome = "cancelled"
                else:
                    outcome = "stored" if self.store().add(sample) else "duplicate"
        except Exception as e:  # the capture must never fail a request nor kill its thread
            self._log_error(f"cannot capture request {job.request_id}", e)
        try:
            return self._count(job.domain, outcome)
        finally:
            self._finish(job)  # after counting: flush() returns with every outcome counted

    def _cancelled(self, job: Job) -> bool:
        with self._lock:
            return (job.seq <= self._cancel_ids.get(job.request_id, 0)
                    or job.seq <= self._cancel_clients.get((job.domain, job.client), 0))

    def _finish(self, job: Job) -> None:
        with self._lock:
            self._finished += 1
            self._bytes -= job.nbytes
            self._pending_ids[job.request_id] -= 1
            if self._pending_ids[job.request_id] <= 0:
                del self._pending_ids[job.request_id]
                self._cancel_ids.pop(job.request_id, None)
            key = (job.domain, job.client)
            self._pending_clients[key] -= 1
            if self._pending_clients[key] <= 0:
                del self._pending_clients[key]
                self._cancel_clients.pop(key, None)
            self._done_cond.notify_all()
        self._depth()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every admitted job was processed; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._finished < self._admitted:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done_cond.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Stop admitting, write what is queued (up to ``timeout``), stop the thread, close the store."""
        self._closing.set()
        try:
            self.queue.put_nowait(None)  # wakes the thread at once
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("capture: %d queued requests not written at shutdown", self.queue.qsize())
                return  # the daemon thread may still be using the store
            self._thread = None
        if self._owns_store and self._store is not None:
            try:
                self._store.close()
            except Exception as e:  # shutting down: nothing left to do about it
                log.debug("capture: closing the store failed: %s", e)
            self._store = None

    # -- the store ---------------------------------------------------------------------------------
    @property
    def location(self) -> str:
        if self._store is not None:
            return self._store.location
        from wesam.adapters.online.store import redact_url

        return redact_url(self.config.capture_store or "")

    def store(self) -> SampleStore:
        """The open store; opened on first use and again ``OPEN_RETRY_S`` after a failure."""
        if self._store is not None:
            return self._store
        from wesam.adapters.online import SampleStoreError, open_store

        with self._open_lock:
            if self._store is None:
                if time.monotonic() < self._next_open:
                    raise SampleStoreError(f"capture store {self.location} unavailable: {self._store_error}")
                try:
                    self._store = open_store(self.config.capture_store or "")
                    self._store_error = None
                except Exception as e:
                    self._store_error = str(e)
                    self._next_open = time.monotonic() + OPEN_RETRY_S
                    raise
        return self._store

    def purge(self, now: float | None = None) -> int | None:
        """Apply retention (``capture_max_age_s``, ``capture_max_per_domain``) to the whole store."""
        max_age = self.config.capture_max_age_s or None
        max_count = self.config.capture_max_per_domain or None
        if max_age is None and max_count is None:
            return None
        try:
            removed = self.store().purge(max_age_s=max_age, max_per_domain=max_count,
                                         now=self.clock() if now is None else now)
        except Exception as e:
            self._log_error("retention (purge) failed", e)
            return None
        self.last_purge = {"at": self.clock(), "removed": removed}
        if removed:
            log.info("capture retention removed %d samples", removed)
        return removed

    def _log_error(self, what: str, exc: BaseException) -> None:
        from wesam.errors import WesamError

        now = time.monotonic()
        if now - self._last_log < LOG_EVERY_S:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more capture errors since the last report)" if self._suppressed else ""
        self._last_log, self._suppressed = now, 0
        if isinstance(exc, WesamError):
            log.warning("capture: %s: %s%s", what, exc, more)
        else:
            log.error("capture: %s%s", what, more, exc_info=exc)

    # -- administration ----------------------------------------------------------------------------
    def delete(self, request_id: str) -> dict[str, Any]:
        """Remove a request's sample, and cancel it if it still waits in the queue (404 if neither)."""
        from wesam.adapters.online.store import check_request_id

        check_request_id(request_id)
        with self._lock:
            cancelled = self._pending_ids.get(request_id, 0) > 0
            if cancelled:
                self._cancel_ids[request_id] = self._admitted
        with self._write_lock:
            deleted = self.store().delete(request_id)
        if not (deleted or cancelled):
            raise UnknownSample(f"no captured sample for request {request_id!r}")
        return {"request_id": request_id, "deleted": deleted, "cancelled": cancelled}

    def delete_client(self, domain: str, client: str) -> dict[str, Any]:
        """Remove a client's samples in a domain, those still queued included."""
        from wesam.adapters.online.store import check_client, check_domain

        check_domain(domain)
        check_client(client)
        with self._lock:
            cancelled = self._pending_clients.get((domain, client), 0)
            if cancelled:
                self._cancel_clients[(domain, client)] = self._admitted
        with self._write_lock:
            deleted = self.store().delete_client(domain, client)
        return {"domain": domain, "client": client, "deleted": deleted, "cancelled": cancelled}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            outcomes: dict[str, dict[str, int]] = {}
            for (domain, outcome), n in sorted(self.outcomes.items()):
                outcomes.setdefault(domain, {})[outcome] = n
            queue_state = {"depth": self.queue.qsize(), "max": self.queue.maxsize, "bytes": self._bytes,
                           "max_bytes": self.max_bytes}
        samples: dict[str, int] = {}
        store_error = None
        try:
            store = self.store()
            for domain in store.domains():
                samples[domain] = store.count(domain)
        except Exception as e:  # stats still answer (queue, outcomes) while the store is down
            store_error = str(e)
        c = self.config
        return {"enabled": True, "store": self.location, "store_error": store_error,
                "domains": sorted(self.domains), "rate": self.rate,
                "caps": {"window_s": WINDOW_S, "per_domain": c.capture_domain_cap, "per_client": c.capture_client_cap},
                "queue": queue_state, "outcomes": outcomes, "samples": samples, "total": sum(samples.values()),
                "retention": {"max_age_s": c.capture_max_age_s, "max_per_domain": c.capture_max_per_domain,
                              "every_s": c.capture_purge_s, "last_purge": self.last_purge}}
