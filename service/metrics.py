"""wesam's Prometheus metrics (BentoML's own ``bentoml_service_*`` metrics are kept as they are).

Created on first use, in the process that records them: BentoML starts every worker with
``PROMETHEUS_MULTIPROC_DIR`` set, and ``prometheus_client`` picks multiprocess mode at import
time from that variable. Counters and histograms from all workers (HTTP front and model runtime
alike) land in that directory and ``/metrics`` sums them. Gauges say how to combine processes.

Label values are bounded: ``domain`` is a served domain, ``base`` or ``unknown`` (never the raw
request value) and ``adapter`` is ``base`` or ``domain@vN``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wesam.adapters.ref import AdapterRef

    from .cache import EmbeddingCache

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

_lock = threading.Lock()
_metrics: "Metrics | None" = None


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter("wesam_requests", "Requests by endpoint, domain, adapter and HTTP status",
                                ["endpoint", "domain", "adapter", "status"])
        self.latency = Histogram("wesam_request_latency_seconds", "End-to-end request latency in the front",
                                 ["endpoint", "domain", "adapter"], buckets=LATENCY_BUCKETS)
        self.errors = Counter("wesam_errors", "Requests answered with an error, by kind", ["kind", "endpoint"])
        self.encoder = Histogram("wesam_encoder_seconds", "Image-encoder time per encoder call (one adapter)",
                                 ["adapter"], buckets=LATENCY_BUCKETS)
        self.decoder = Histogram("wesam_decoder_seconds", "Prompt/mask-decoder time per image", ["adapter"],
                                 buckets=LATENCY_BUCKETS)
        self.batch_size = Histogram("wesam_batch_size", "Requests per adaptive batch of the runtime",
                                    buckets=BATCH_BUCKETS)
        self.encoder_batch = Histogram("wesam_encoder_batch_images", "Images per encoder call (per adapter group)",
                                       buckets=BATCH_BUCKETS)
        self.batch_adapters = Histogram("wesam_batch_adapters", "Distinct adapters in one adaptive batch",
                                        buckets=BATCH_BUCKETS)
        self.cache_hits = Counter("wesam_cache_hits", "Embedding-cache hits")
        self.cache_misses = Counter("wesam_cache_misses", "Embedding-cache misses")
        self.cache_evictions = Counter("wesam_cache_evictions", "Embeddings evicted to stay under the byte bound")
        self.cache_bytes = Gauge("wesam_cache_bytes", "Bytes of embeddings held", multiprocess_mode="livesum")
        self.cache_entries = Gauge("wesam_cache_entries", "Embeddings held", multiprocess_mode="livesum")
        self.adapter_loads = Counter("wesam_adapter_loads", "Adapter versions loaded", ["domain", "version"])
        self.adapter_failures = Counter("wesam_adapter_load_failures", "Adapter versions refused",
                                        ["domain", "version"])
        self.adapter_active = Gauge("wesam_adapter_active_version", "Version served per domain (0: none)",
                                    ["domain"], multiprocess_mode="livemax")
        self.queue_depth = Gauge("wesam_queue_depth", "Requests waiting for the model, by lane (encode: new "
                                 "images; decode: prompt-only and cached images)", ["lane"],
                                 multiprocess_mode="livesum")
        self._capture: tuple[Any, Any] | None = None  # created when capture is on (capture_metrics)
        self._capture_lock = threading.Lock()

    def capture_metrics(self) -> tuple[Any, Any]:
        """``wesam_capture_total{domain,outcome}`` and ``wesam_capture_queue_depth``, registered on
        first use: a server without capture exposes neither."""
        with self._capture_lock:
            if self._capture is None:
                from prometheus_client import Counter, Gauge

                self._capture = (
                    Counter("wesam_capture", "Served requests considered for capture, by served domain and outcome",
                            ["domain", "outcome"]),
                    Gauge("wesam_capture_queue_depth", "Captured requests waiting to be written to the store",
                          multiprocess_mode="livesum"))
            return self._capture

    def capture_event(self, domain: str, outcome: str) -> None:
        self.capture_metrics()[0].labels(domain, outcome).inc()

    def capture_queue_depth(self, depth: int) -> None:
        self.capture_metrics()[1].set(depth)

    def request(self, endpoint: str, domain: str, adapter: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, domain, adapter, str(status)).inc()
        self.latency.labels(endpoint, domain, adapter).observe(seconds)

    def error(self, kind: str, endpoint: str) -> None:
        self.errors.labels(kind, endpoint).inc()

    def adapter_event(self, event: str, ref: AdapterRef) -> None:
        if event == "loaded":
            self.adapter_loads.labels(ref.domain, str(ref.version)).inc()
            self.adapter_active.labels(ref.domain).set(ref.version)
        elif event == "failed":
            self.adapter_failures.labels(ref.domain, str(ref.version)).inc()
        elif event == "removed":  # the domain left the registry ("unloaded" versions are replaced)
            self.adapter_active.labels(ref.domain).set(0)

    def cache_event(self, name: str, count: int, cache: EmbeddingCache) -> None:
        if name == "hit":
            self.cache_hits.inc(count)
        elif name == "miss":
            self.cache_misses.inc(count)
        elif name == "evict":
            self.cache_evictions.inc(count)
        self.cache_bytes.set(cache.nbytes)
        self.cache_entries.set(len(cache))


def get_metrics() -> Metrics:
    """The process's metrics (registered once: prometheus_client refuses duplicate names)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = Metrics()
        return _metrics


def domain_label(domain: str | None, served: set[str] | None = None) -> str:
    """A bounded label value for a request's domain."""
    if domain is None or domain == "" or domain == "base":
        return "base"
    if served is not None and domain not in served:
        return "unknown"
    return domain
