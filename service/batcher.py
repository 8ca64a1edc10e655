"""Adaptive batching with a bounded queue, in the process that holds the model.

Every request for the model (HTTP from any front worker, gRPC) goes through one ``Batcher``:

* **Two lanes.** Requests with an image that is not cached yet wait in the *encode* lane; one model
  thread takes everything waiting there (up to ``max_batch_size``) as one batch, which the engine
  splits by adapter into homogeneous encoder calls. Prompt-only requests (``image_id``) and images
  whose embedding is already cached go to the *decode* lane, served by the other model threads
  (``runtime_threads - 1``), so they never wait behind an encoder batch.
* **No waiting for a batch to fill.** A free model thread takes what is queued at once: at low load a
  request is served alone without delay; under load, requests that arrived during the previous batch
  form the next one (continuous batching).
* **Bounded.** A lane holds at most ``max_queue`` waiting requests, and a request whose predicted wait
  (requests ahead x recent model time per request) exceeds ``max_latency_ms`` is not admitted either.
  Both are refused at once with ``Overloaded`` (503, ``Retry-After``: the predicted time to drain the
  lane), so under overload every request is either served or answered quickly, never left to time out.
* **Decode before queueing.** An image file is decoded and hashed (``SegmentEngine.prepare``) after
  admission and before queueing, in a worker thread (asyncio callers) or the caller's thread (gRPC),
  in parallel with the running batch; an image found cached then goes to the decode lane.

Results come back through ``concurrent.futures.Future``s; a caller that gives up (deadline) cancels
its future, and a cancelled request still in the queue is never computed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from wesam.errors import WesamError

from .errors import Internal, Overloaded, to_service_error
from .messages import InferItem, InferResult

if TYPE_CHECKING:
    from .config import ServeConfig
    from .engine import SegmentEngine
    from .metrics import Metrics

log = logging.getLogger("wesam.service")

ENCODE, DECODE = "encode", "decode"
# Weight of the newest batch in the moving average of model time per request: a few batches adapt
# the estimate to a new load (batch sizes, adapters, image sizes) without following every outlier.
EMA_WEIGHT = 0.2
# The first batches of a lane include one-off costs (kernel selection, lazy initialisation) that can
# be many times a steady batch: they are left out of the estimate, so a burst right after startup is
# not refused on a wait that will not happen (the queue bound still holds meanwhile).
WARMUP_BATCHES = 2
MAX_RETRY_AFTER_S = 30


@dataclass
class _Job:
    item: InferItem
    future: Future
    enqueued: float


@dataclass
class _Lane:
    name: str
    max_batch: int
    jobs: deque = field(default_factory=deque)
    reserved: int = 0  # admitted, being decoded before they join ``jobs``
    running: int = 0  # in the batch being computed
    item_s: float = 0.0  # moving average of model seconds per request (0: nothing measured yet)
    served: int = 0
    batches: int = 0
    refused: int = 0

    @property
    def waiting(self) -> int:
        return len(self.jobs) + self.reserved

    def predicted_wait_s(self) -> float:
        """Seconds until a request admitted now would be answered, from the recent model time."""
        return (self.waiting + self.running + 1) * self.item_s


class Batcher:
    """The admission queue and model threads in front of a ``SegmentEngine`` (see the module doc).

    ``infer`` (asyncio) and ``infer_sync`` (threads) never raise (but for the cancellation of an
    asyncio caller): every outcome, overload included, is an ``InferResult`` (an error as
    ``ServiceError.to_json()``), as the engine answers.
    """

    def __init__(self, engine: SegmentEngine, config: ServeConfig, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.max_queue = config.max_queue
        self.max_wait_s = config.max_latency_ms / 1000.0
        self.metrics = metrics
        self.lanes = {ENCODE: _Lane(ENCODE, config.max_batch_size), DECODE: _Lane(DECODE, 1)}
        self._cond = threading.Condition()
        self._closed = False
        # One thread for encoder batches, the others for prompt-only decodes; with a single model
        # thread it serves both lanes, prompt-only requests first (they are short).
        if config.runtime_threads >= 2:
            plan = [(self.lanes[ENCODE],)] + [(self.lanes[DECODE],)] * (config.runtime_threads - 1)
        else:
            plan = [(self.lanes[DECODE], self.lanes[ENCODE])]
        self._threads = [threading.Thread(target=self._work, args=(lanes,), daemon=True,
                                          name=f"wesam-model-{'+'.join(lane.name for lane in lanes)}-{i}")
                         for i, lanes in enumerate(plan)]
        for t in self._threads:
            t.start()

    # -- admission -------------------------------------------------------------------------------
    def _lane_of(self, item: InferItem) -> _Lane:
        return self.lanes[ENCODE if item.image is not None or item.image_bytes is not None else DECODE]

    def _refusal(self, lane: _Lane) -> Overloaded | None:
        """Why ``lane`` cannot take one more request now (under ``_cond``), or None."""
        if self._closed:
            return Overloaded("the server is shutting down; retry on another replica")
        wait = lane.predicted_wait_s()
        if lane.waiting >= self.max_queue:
            why = f"{lane.waiting} requests already wait for the {'encoder' if lane.name == ENCODE else 'decoder'}"
        elif wait > self.max_wait_s:
            why = f"predicted wait {wait:.1f} s is over the {self.max_wait_s:g} s bound"
        else:
            return None
        drain = (lane.waiting + lane.running) * lane.item_s
        retry = min(MAX_RETRY_AFTER_S, max(1, math.ceil(drain)))
        return Overloaded(f"the model is overloaded ({why}); retry in {retry} s", retry_after=retry)

    def _admit(self, lane: _Lane) -> None:
        """Reserve a place in ``lane`` or raise ``Overloaded``."""
        with self._cond:
            refusal = self._refusal(lane)
            if refusal is None:
                lane.reserved += 1
                return
            lane.refused += 1
        raise refusal

    def check(self, has_image: bool) -> None:
        """Raise ``Overloaded`` if a request (with an image or prompt-only) would be refused now: lets
        a caller skip decoding an image the model cannot take (gRPC). ``infer`` checks again."""
        lane = self.lanes[ENCODE if has_image else DECODE]
        with self._cond:
            refusal = self._refusal(lane)
            if refusal is not None:
                lane.refused += 1
        if refusal is not None:
            raise refusal

    def _submit(self, item: InferItem, lane: _Lane, cached: bool) -> Future:
        """Queue an admitted item (its reservation in ``lane`` becomes a job); cached images go to the
        decode lane, so they do not wait for the encoder either."""
        future: Future = Future()
        target = self.lanes[DECODE] if cached else lane
        with self._cond:
            lane.reserved -= 1
            target.jobs.append(_Job(item, future, time.perf_counter()))
            self._cond.notify_all()
        self._observe_depth()
        return future

    def _release(self, lane: _Lane) -> None:
        with self._cond:
            lane.reserved -= 1

    async def infer(self, item: InferItem) -> InferResult:
        """Admit, decode the image in a worker thread, queue, and wait for the answer (asyncio)."""
        import anyio

        lane = self._lane_of(item)
        try:
            self._admit(lane)
        except WesamError as e:
            return _failed(e)
        try:
            # an image file is decoded in a worker thread; a prompt-only request has nothing to prepare
            cached = await anyio.to_thread.run_sync(self.engine.prepare, item) if lane.name == ENCODE else False
        except BaseException as e:  # a bad image, or the caller gave up: the reserved place is freed
            self._release(lane)
            if isinstance(e, Exception):
                return _failed(e)
            raise
        future = self._submit(item, lane, cached)
        try:
            # a caller that gives up (asyncio.CancelledError, not caught here) cancels a queued job
            return await asyncio.wrap_future(future)
        except Exception as e:
            return _failed(e)

    def infer_sync(self, item: InferItem, timeout: float | None = None) -> InferResult:
        """As ``infer``, from a thread (the gRPC endpoint); past ``timeout`` seconds: ``overloaded``."""
        lane = self._lane_of(item)
        try:
            self._admit(lane)
        except WesamError as e:
            return _failed(e)
        try:
            cached = self.engine.prepare(item) if lane.name == ENCODE else False
        except Exception as e:
            self._release(lane)
            return _failed(e)
        future = self._submit(item, lane, cached)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            return _failed(Overloaded(f"no answer from the model within {timeout:g} s; retry later"))
        except Exception as e:
            return _failed(e)

    # -- model threads ---------------------------------------------------------------------------
    def _take(self, lanes: tuple[_Lane, ...]) -> tuple[_Lane, list[_Job]] | None:
        """The next batch (under ``_cond``): the first lane with work, up to its batch size of the
        jobs still wanted (cancelled ones are dropped). None when closed and drained."""
        while True:
            lane = next((lane for lane in lanes if lane.jobs), None)
            if lane is None:
                if self._closed:
                    return None
                self._cond.wait()
                continue
            batch = []
            while lane.jobs and len(batch) < lane.max_batch:
                job = lane.jobs.popleft()
                if job.future.set_running_or_notify_cancel():
                    batch.append(job)
            if batch:
                lane.running += len(batch)
                return lane, batch

    def _work(self, lanes: tuple[_Lane, ...]) -> None:
        while True:
            with self._cond:
                taken = self._take(lanes)
            if taken is None:
                return
            lane, batch = taken
            self._observe_depth()
            t0 = time.perf_counter()
            for job in batch:
                job.item.timings_ms = {**job.item.timings_ms, "queue": (t0 - job.enqueued) * 1000}
            try:
                results = self.engine.infer([job.item for job in batch], batch=lane.name == ENCODE)
            except Exception as e:  # the engine answers errors per item; this is a bug, not a bad request
                log.exception("model batch failed")
                results = [_failed(Internal(f"model batch failed: {type(e).__name__}"))] * len(batch)
            dt = time.perf_counter() - t0
            with self._cond:
                lane.running -= len(batch)
                lane.served += len(batch)
                lane.batches += 1
                per = dt / len(batch)
                if lane.batches > WARMUP_BATCHES:
                    lane.item_s = per if lane.item_s == 0 else (1 - EMA_WEIGHT) * lane.item_s + EMA_WEIGHT * per
            for job, result in zip(batch, results):
                job.future.set_result(result)

    def _observe_depth(self) -> None:
        if self.metrics is not None:
            for lane in self.lanes.values():
                self.metrics.queue_depth.labels(lane.name).set(lane.waiting)

    # -- state -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._cond:
            return {"max_queue": self.max_queue, "max_latency_ms": self.max_wait_s * 1000,
                    **{lane.name: {"waiting": lane.waiting, "running": lane.running, "served": lane.served,
                                   "batches": lane.batches, "refused": lane.refused,
                                   "model_ms_per_request": round(lane.item_s * 1000, 2)}
                       for lane in self.lanes.values()}}

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new requests, finish the queued ones, stop the model threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)


def _failed(error: BaseException) -> InferResult:
    return InferResult(error=to_service_error(error, "batcher").to_json())
