"""Prometheus metrics of the online worker (``wesam_worker_*``, one ``domain`` label each).

Created once per process on first use (``prometheus_client``'s default registry refuses a second
metric of the same name); ``wesam worker --metrics-port`` serves them. The names are an interface:
k8s/monitoring's dashboard and alerts read them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

ROUND_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
OUTCOMES = ("published", "rejected", "aborted", "frozen", "waiting", "reset", "error")


@dataclass(frozen=True)
class WorkerMetrics:
    rounds: Any  # Counter wesam_worker_rounds_total{domain,outcome}
    samples: Any  # Counter wesam_worker_samples_total{domain,decision}
    round_seconds: Any  # Histogram wesam_worker_round_seconds{domain}
    golden_delta: Any  # Gauge
    consecutive_rejections: Any  # Gauge
    drift: Any  # Gauge
    loss: Any  # Gauge
    last_publish: Any  # Gauge, unix seconds (0: never)
    lease_held: Any  # Gauge 0/1
    active_version: Any  # Gauge (0: the base model)


@functools.cache
def worker_metrics() -> WorkerMetrics:
    """The process's worker metrics (created on the first call)."""
    from prometheus_client import Counter, Gauge, Histogram

    return WorkerMetrics(
        rounds=Counter("wesam_worker_rounds", "Worker rounds by outcome", ["domain", "outcome"]),
        samples=Counter("wesam_worker_samples", "Captured samples read by the worker, by decision "
                        "(used, holdout, capped, filtered:<reason>)", ["domain", "decision"]),
        round_seconds=Histogram("wesam_worker_round_seconds", "Duration of worker rounds that trained",
                                ["domain"], buckets=ROUND_BUCKETS),
        golden_delta=Gauge("wesam_worker_gate_golden_delta",
                           "Candidate minus active mean golden-set mIoU at the last gate", ["domain"]),
        consecutive_rejections=Gauge("wesam_worker_consecutive_rejections",
                                     "Rounds rejected (or aborted) since the last publish", ["domain"]),
        drift=Gauge("wesam_worker_drift", "Relative distance of the last candidate to the pinned adapter",
                    ["domain"]),
        loss=Gauge("wesam_worker_loss", "Mean training loss of the last round", ["domain"]),
        last_publish=Gauge("wesam_worker_last_publish_timestamp_seconds",
                           "Unix time of the worker's last publish (0: none since it started)", ["domain"]),
        lease_held=Gauge("wesam_worker_lease_held", "1 while this worker holds the domain's lease", ["domain"]),
        active_version=Gauge("wesam_worker_active_version", "The domain's active version (0: the base model)",
                             ["domain"]),
    )


def serve_metrics(port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port`` from a daemon thread (0: do nothing)."""
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr=addr)
