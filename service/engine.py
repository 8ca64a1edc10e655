"""The segmentation pipeline behind every endpoint: route, embed (cached, batched), decode.

One ``SegmentEngine`` lives in the process that holds the model (the HTTP worker itself with one
worker, else the model-runtime process). Its batcher (``wesam.service.batcher``) hands it a list of
requests; it decodes each image once (``prepare``), groups the requests by adapter so each encoder
call runs one adapter over a homogeneous sub-batch, reuses cached embeddings, decodes every
request's prompts and encodes the masks the HTTP answer needs. The gRPC endpoint goes through the
same batcher and engine. No request can fail another: each result carries its own error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from wesam.adapters.online import control as ctl
from wesam.adapters.ref import AdapterRef
from wesam.errors import WesamError
from wesam.sam.predictor import ImageEmbedding, Prompts

from . import codec
from .cache import CacheEntry, EmbeddingCache
from .config import ServeConfig
from .errors import (BadRequest, CaptureDisabled, DomainMismatch, Internal, InvalidPrompt, NoRegistry,
                     PayloadTooLarge, UnknownDomain, UnknownImageId, to_service_error)
from .messages import InferItem, InferResult
from .router import AdapterRouter, Route, names_version
from .runtime import AdapterHandle, ModelRuntime

if TYPE_CHECKING:
    from wesam.sam.zoo import LoadedModel

    from .capture import Capture
    from .metrics import Metrics

log = logging.getLogger("wesam.service")

# Part of every cache key: bump it when preprocessing changes so old embeddings are never reused.
PREPROCESSING = "resize-longest-side(PIL bilinear)/normalize(ImageNet mean,std)/pad-bottom-right/v1"


def embedding_key(content_hash: str, model_id: str, route_key: str, runtime: str, img_size: int) -> str:
    """The cache key, also handed out as ``image_id``: image pixels x base model x adapter version x
    preprocessing x runtime (ONNX and PyTorch embeddings differ in the last bits)."""
    text = "|".join((content_hash, model_id, route_key, runtime, str(img_size), PREPROCESSING))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class FileAliases:
    """Which pixels (content hash) an encoded image file decoded to, for the files seen last.

    A client that sends the same file again (a retry, a second prompt on the same frame without using
    ``image_id``) then hits the embedding cache without the file being decoded and hashed again.
    Bounded by entry count (an entry is two short strings); least recently used forgotten first.
    """

    def __init__(self, max_entries: int = 16384) -> None:
        self.max_entries = max_entries
        self._map: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, file_hash: str) -> str | None:
        with self._lock:
            content = self._map.get(file_hash)
            if content is not None:
                self._map.move_to_end(file_hash)
            return content

    def put(self, file_hash: str, content_hash: str) -> None:
        with self._lock:
            self._map[file_hash] = content_hash
            self._map.move_to_end(file_hash)
            while len(self._map) > self.max_entries:
                self._map.popitem(last=False)

    def __len__(self) -> int:
        return len(self._map)


class SegmentEngine:
    def __init__(self, model: LoadedModel, runtime: ModelRuntime, config: ServeConfig,
                 metrics: Metrics | None = None) -> None:
        self.model = model
        self.runtime = runtime
        self.config = config
        self.metrics = metrics
        self.cache = EmbeddingCache(config.cache_bytes, on_event=self._cache_event)
        # A preview's handle is unloaded without dropping its cached embeddings: they are keyed by the
        # version's weights SHA-256, so they stay right for that version (and for a later preview of it).
        self.router = AdapterRouter(config.registry, runtime.load_adapter, self._unload,
                                    fallback=config.fallback_domain, merged_domains=config.merged_domains,
                                    on_event=self._adapter_event, preview_slots=config.preview_slots,
                                    preview_unloader=runtime.unload_adapter)
        self.mask_threshold = float(getattr(model.sam, "mask_threshold", 0.0))
        self.aliases = FileAliases()
        # Encoder calls switch the active LoRA adapter on the shared model and loading an adapter
        # rewires its layers: both happen under this lock. Decoding needs no lock: it runs on plain
        # decoder copies (the base's, or an adapter's own), never on the LoRA-wrapped resident model.
        self.lock = threading.RLock()
        self.ready = False
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        # Capture of served requests (off unless a store is configured): offered after each answer,
        # written by its own thread (service/capture.py).
        self.capture: Capture | None = None
        if config.capture_enabled:
            from .capture import Capture

            self.capture = Capture(config, runtime.img_size, metrics=metrics)

    @classmethod
    def from_config(cls, config: ServeConfig, metrics: Metrics | None = None) -> "SegmentEngine":
        """Load the base model, the runtime and every active adapter (the slow part of startup)."""
        import torch

        from wesam.sam.zoo import resolve_model

        from .runtime import make_runtime

        if config.threads:
            torch.set_num_threads(config.threads)
        model = resolve_model(config.model, config.checkpoint)
        runtime = make_runtime(model, config.runtime, device=config.device, onnx_cache=config.onnx_cache,
                               threads=config.threads)
        engine = cls(model, runtime, config, metrics)
        report = engine.refresh()
        log.info("model %s on %s; adapters loaded: %s; refused: %s", model.model_id, runtime.describe(),
                 report["loaded"] or "none", report["failed"] or "none")
        engine.ready = True
        return engine

    # -- events -> metrics -----------------------------------------------------------------------
    def _cache_event(self, name: str, count: int) -> None:
        if self.metrics is not None:
            self.metrics.cache_event(name, count, self.cache)

    def _adapter_event(self, event: str, ref: AdapterRef) -> None:
        if self.metrics is not None:
            self.metrics.adapter_event(event, ref)

    def _unload(self, handle: AdapterHandle) -> None:
        self.runtime.unload_adapter(handle)
        # A rolled-back version must stop serving, also to clients holding its image_ids.
        self.cache.drop_adapter(str(handle.ref))

    # -- adapters --------------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> dict[str, Any]:
        with self.lock:
            return self.router.refresh(force)

    def activate(self, domain: str, version: int) -> dict[str, Any]:
        with self.lock:
            return self.router.activate(domain, version)

    def worker_control(self, domain: str, action: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The online worker's operator controls (``adapters/online/control.py``) on this server's
        registry: ``control`` (read), ``pin`` (``version``), ``unpin``, ``freeze`` (``reason``),
        ``unfreeze``, ``rollback`` (``freeze``, ``reason``) and ``lineage``.

        A rollback freezes the domain first (unless ``freeze`` is false), so the worker cannot
        publish between the switch and the freeze, then activates the target through
        :meth:`activate`: the version must load here before it is routed, as for any activation.
        """
        registry = self.router.registry
        if registry is None:
            raise NoRegistry("no registry configured")
        if not registry.versions(domain):
            raise UnknownDomain(f"no domain {domain!r} in registry {registry.root}")
        params = params or {}
        if action == "lineage":
            return {"domain": domain, "active": registry.active_version(domain),
                    "chain": ctl.lineage_chain(registry, domain)}
        if action == "rollback":
            target = ctl.rollback_target(registry, domain)  # refuses before anything changes
            active = registry.active_version(domain)
            if params.get("freeze", True):
                ctl.freeze(registry, domain, params.get("reason") or f"rolled back from v{active} to v{target}")
            answer = self.activate(domain, target)
            return {**answer, "control": dataclasses.asdict(ctl.read_control(registry, domain))}
        if action == "pin":
            state = ctl.pin(registry, domain, int(params["version"]))
        elif action == "unpin":
            state = ctl.unpin(registry, domain)
        elif action == "freeze":
            state = ctl.freeze(registry, domain, params.get("reason"))
        elif action == "unfreeze":
            state = ctl.unfreeze(registry, domain)
        elif action == "control":
            state = ctl.read_control(registry, domain)
        else:
            raise BadRequest(f"unknown worker control {action!r}")
        return {"domain": domain, "control": dataclasses.asdict(state)}

    def versions(self, domain: str) -> dict[str, Any]:
        """Every version of ``domain`` as its adapter.json describes it (``catalog``: metrics, creation,
        lineage), with what this replica does with it: ``active`` (routing.json), ``serving`` (loaded
        in the domain's slot) and ``previewed`` (loaded as a preview)."""
        from .catalog import describe_versions

        registry = self.router.registry
        if registry is None:
            raise NoRegistry("no registry configured")
        AdapterRef(domain)  # a malformed name is 400 invalid_adapter_ref, never a path
        if not registry.versions(domain):
            raise UnknownDomain(f"no domain {domain!r} in registry {registry.root}")
        try:
            active = registry.active_version(domain)
        except (ValueError, OSError):  # an unreadable routing.json: the versions are still worth showing
            active = None
        slot = self.router.slots.get(domain)
        previewed = {row["adapter"] for row in self.router.previews.status()["loaded"]}
        rows = describe_versions(registry, domain)
        for row in rows:
            row["active"] = row["version"] == active
            row["serving"] = slot is not None and slot.ref.version == row["version"]
            row["previewed"] = row["adapter"] in previewed
        return {"domain": domain, "active": active, "serving": str(slot.ref) if slot else None, "versions": rows}

    def served_domains(self) -> set[str]:
        return set(self.router.slots)

    def start_watcher(self) -> None:
        """Poll the registry every ``poll_seconds`` and reload when it changed (0: never)."""
        if self.config.poll_seconds <= 0 or self._watcher is not None:
            return

        def loop() -> None:
            while not self._stop.wait(self.config.poll_seconds):
                try:
                    if self.router.changed():
                        report = self.refresh()
                        if report.get("loaded") or report.get("failed") or report.get("unloaded"):
                            log.info("registry changed: %s", report)
                except Exception:  # the watcher must outlive a bad poll (e.g. a registry on a flaky mount)
                    log.exception("registry poll failed")

        self._watcher = threading.Thread(target=loop, name="wesam-registry-watcher", daemon=True)
        self._watcher.start()

    def stop_watcher(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
            self._watcher = None

    def close(self) -> None:
        """Stop the registry watcher and the capture thread (writing what it has queued)."""
        self.stop_watcher()
        if self.capture is not None:
            self.capture.close()

    # -- capture administration ------------------------------------------------------------------
    def _capture(self) -> Capture:
        if self.capture is None:
            raise CaptureDisabled("capture is off: start the server with WESAM_SERVE_CAPTURE_STORE set")
        return self.capture

    def capture_stats(self) -> dict[str, Any]:
        if self.capture is None:
            return {"enabled": False}
        return self.capture.stats()

    def capture_delete(self, request_id: str) -> dict[str, Any]:
        return self._capture().delete(request_id)

    def capture_delete_client(self, domain: str, client: str) -> dict[str, Any]:
        return self._capture().delete_client(domain, client)

    def status(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "model": {"name": self.model.name, "id": self.model.model_id, "sha256": self.model.sha256,
                      "img_size": self.runtime.img_size},
            "runtime": self.runtime.describe(),
            "registry": str(self.router.registry.root) if self.router.registry else None,
            "fallback_domain": self.config.fallback_domain,
            "domains": self.router.status(),
            "previews": self.router.previews.status(),
            "cache": {"bytes": self.cache.nbytes, "max_bytes": self.cache.max_bytes, "entries": len(self.cache),
                      "hits": self.cache.stats.hits, "misses": self.cache.stats.misses,
                      "evictions": self.cache.stats.evictions},
            "last_refresh": self.router.last_refresh,
        }

    # -- inference -------------------------------------------------------------------------------
    def prepare(self, item: InferItem) -> bool:
        """Make an item with an image ready for ``infer`` and say whether its embedding is cached.

        The encoded file (``image_bytes``) is decoded once, here, with the size limits checked from
        its header before any pixel is decoded; pixels that come without a ``content_hash`` are
        validated; either way the pixels are hashed once. A file decoded before is recognised by its
        bytes (``aliases``): when its embedding is still cached it is not decoded at all (unless capture
        is on: capture stores the pixels). Called by the batcher before a request is queued (outside
        the model lock, in parallel with encoder batches) and again by ``infer`` (then a no-op).
        Raises a ``ServiceError`` for a bad image or an unknown domain.
        """
        if item.image is None and item.image_bytes is None:
            return False
        if item.content_hash is None:
            if item.image_bytes is not None:
                data = item.image_bytes
                file_hash = codec.bytes_hash(data)
                known = self.aliases.get(file_hash)
                if known is not None and self.capture is None and self._is_cached(known, item.domain):
                    item.content_hash = known  # pixels are decoded later only if the entry is evicted meanwhile
                    return True
                self._decode_file(item)
                self.aliases.put(file_hash, item.content_hash)  # type: ignore[arg-type]
            else:
                item.image = codec.check_pixels(np.asarray(item.image), max_pixels=self.config.max_image_pixels)
                item.content_hash = codec.content_hash(item.image)
        return self._is_cached(item.content_hash, item.domain)

    def _decode_file(self, item: InferItem) -> None:
        t0 = time.perf_counter()
        item.image = codec.decode_image(item.image_bytes or b"", max_bytes=self.config.max_image_bytes,
                                        max_pixels=self.config.max_image_pixels)
        item.image_bytes = None  # the pixels from here on (nothing decodes the file twice)
        if item.content_hash is None:
            item.content_hash = codec.content_hash(item.image)
        item.timings_ms = {**item.timings_ms, "decode_image": (time.perf_counter() - t0) * 1000}

    def _is_cached(self, content_hash: str, domain: str | None) -> bool:
        """Whether (pixels, domain's adapter) is cached; no LRU touch, no hit/miss counted.

        Never loads an adapter (this runs outside the model lock): a version named in the request
        that is not loaded now counts as not cached, and the encoder lane loads it.
        """
        route = self.router.peek(domain)
        if route is None:
            return False
        return embedding_key(content_hash, self.model.model_id, route.key, self.runtime.kind,
                             self.runtime.img_size) in self.cache

    def infer(self, items: list[InferItem], batch: bool = False) -> list[InferResult]:
        """Serve a batch: embeddings (cache or encoder, grouped by adapter), then each item's prompts.

        ``batch``: the items are one adaptive batch (recorded in the batch metrics).
        """
        if self.metrics is not None and items and batch:
            self.metrics.batch_size.observe(len(items))
        results: list[InferResult | None] = [None] * len(items)
        entries: dict[int, CacheEntry] = {}

        def found(i: int, key: str, entry: CacheEntry) -> None:
            entries[i] = entry
            results[i] = InferResult(image_id=key, adapter=entry.adapter, domain=entry.domain, cached=True,
                                     image_size=entry.embedding.original_size)

        with_image = []
        for i, item in enumerate(items):
            try:
                if item.image is None and item.image_bytes is None:
                    # Prompt-only requests need no model lock: they never wait for an encoder batch.
                    key, entry = self._lookup_id(item)
                    found(i, key, entry)
                else:
                    self.prepare(item)
                    with_image.append(i)
            except WesamError as e:
                results[i] = _failed(e)
        if with_image:
            with self.lock:  # routes stay valid until the encoder ran: no adapter is swapped meanwhile
                pending: dict[str, dict[str, list[int]]] = {}  # route key -> embedding key -> item indices
                route_of: dict[str, Route] = {}
                held: list[Route] = []  # preview handles pinned until this batch is encoded
                try:
                    for i in with_image:
                        try:
                            route, key, entry = self._lookup_image(items[i], held)
                            if entry is None and items[i].image is None:
                                self._decode_file(items[i])  # known file, but its embedding was evicted meanwhile
                        except WesamError as e:
                            results[i] = _failed(e)
                            continue
                        if entry is not None:
                            found(i, key, entry)
                        else:
                            pending.setdefault(route.key, {}).setdefault(key, []).append(i)
                            route_of[route.key] = route
                    if self.metrics is not None and batch:
                        self.metrics.batch_adapters.observe(len(route_of))
                    for route_key, by_key in pending.items():
                        self._encode_group(items, route_of[route_key], by_key, entries, results)
                finally:
                    for route in held:
                        self.router.release(route)
        for i, item in enumerate(items):
            res = results[i]
            if res is None or res.error is not None:
                continue
            if item.timings_ms:
                res.timings_ms = {**item.timings_ms, **res.timings_ms}
            if item.prompts is None:
                continue
            try:
                self._decode(item, entries[i], res)
            except WesamError as e:
                results[i] = _failed(e)
                continue
            except Exception as e:  # a runtime failure on one request must not take the batch down
                log.exception("decoder failed")
                results[i] = _failed(Internal(f"decoder failed: {type(e).__name__}"))
                continue
            if self.capture is not None:
                self._offer(item, res)  # a request naming a version (a preview) is counted, never kept
            if item.output is not None:
                self._encode_answer(item, res)
        return [r if r is not None else _failed(Internal("no result")) for r in results]

    def _encode_answer(self, item: InferItem, res: InferResult) -> None:
        """Encode the masks where they were made: the HTTP front gets a few KB of RLE, not H x W arrays."""
        t0 = time.perf_counter()
        res.encoded_masks = codec.mask_answers(res.masks, res.scores, item.output or "rle",
                                               res.logits, res.low_res_logits)
        res.masks = res.logits = res.low_res_logits = None  # capture holds its own references
        res.timings_ms = {**res.timings_ms, "encode_masks": (time.perf_counter() - t0) * 1000}

    def _offer(self, item: InferItem, res: InferResult) -> None:
        """Hand a served request to capture: a few checks and a non-blocking put, never an error."""
        try:
            self.capture.offer(item, res)  # type: ignore[union-attr]
        except Exception:
            log.exception("capture offer failed")

    def _lookup_image(self, item: InferItem, held: list[Route]) -> tuple[Route, str, CacheEntry | None]:
        """The item's route (appended to ``held``: the caller releases it after encoding), cache key
        and cached entry (None: to encode)."""
        route = self.router.acquire(item.domain)
        held.append(route)
        key = embedding_key(item.content_hash or "", self.model.model_id, route.key, self.runtime.kind,
                            self.runtime.img_size)
        return route, key, self.cache.get(key)

    def _lookup_id(self, item: InferItem) -> tuple[str, CacheEntry]:
        if not item.image_id:
            raise BadRequest("give an image or an image_id")
        entry = self.cache.get(item.image_id)
        if entry is None:
            raise UnknownImageId(f"unknown image_id {item.image_id!r}: never embedded here, evicted from the "
                                 "cache, or its adapter version was replaced; send the image again")
        if item.domain not in (None, ""):
            if names_version(item.domain):
                # A preview names its version: only an embedding made by that version answers it.
                wanted = str(AdapterRef.parse(item.domain))
            else:
                route = self.router.resolve(item.domain)
                if route.domain != entry.domain:
                    raise DomainMismatch(f"image_id {item.image_id!r} was embedded for "
                                         f"{entry.domain or 'the base model'} ({entry.adapter}), not "
                                         f"{route.domain or 'the base model'}; omit `domain` or send the image")
                # The domain's embeddings of replaced versions are dropped with them; a preview's are
                # not, and must not answer a request for the domain's active version.
                wanted = route.adapter
            if entry.adapter != wanted:
                raise DomainMismatch(f"image_id {item.image_id!r} was embedded with {entry.adapter}, not "
                                     f"{wanted}; omit `domain` or send the image")
        return item.image_id, entry

    def _encode_group(self, items: list[InferItem], route: Route, by_key: dict[str, list[int]],
                      entries: dict[int, CacheEntry], results: list[InferResult | None]) -> None:
        keys = list(by_key)
        step = max(self.config.max_batch_size, 1)
        for start in range(0, len(keys), step):
            chunk = keys[start: start + step]
            images = [items[by_key[k][0]].image for k in chunk]
            t0 = time.perf_counter()
            try:
                embs = self.runtime.encode(images, route.handle)
                decoder = self.runtime.decoder(route.handle)
            except Exception as e:
                log.exception("encoder failed for %s", route.adapter)
                for k in chunk:
                    for i in by_key[k]:
                        results[i] = _failed(Internal(f"encoder failed: {type(e).__name__}"))
                continue
            dt = time.perf_counter() - t0
            if self.metrics is not None:
                self.metrics.encoder.labels(route.adapter).observe(dt)
                self.metrics.encoder_batch.observe(len(chunk))
            for k, emb in zip(chunk, embs):
                if len(chunk) > 1:
                    # Each embedding of a batch is a view of the batch's output: cached as it is, it would
                    # keep the whole batch alive (up to MAX_BATCH_SIZE x the bytes the cache accounts for).
                    emb = dataclasses.replace(emb, features=emb.features.clone())
                entry = CacheEntry(emb, route.adapter, route.domain, decoder)
                self.cache.put(k, entry)
                for i in by_key[k]:
                    entries[i] = entry
                    results[i] = InferResult(image_id=k, adapter=route.adapter, domain=route.domain, cached=False,
                                             image_size=emb.original_size,
                                             timings_ms={"encoder": dt * 1000, "encoder_batch": float(len(chunk))})

    def _decode(self, item: InferItem, entry: CacheEntry, res: InferResult) -> None:
        prompts = self.build_prompts(item, entry.embedding)
        t0 = time.perf_counter()
        decoder = entry.decoder if entry.decoder is not None else self.runtime.decoder(None)
        pred = decoder.decode(entry.embedding, prompts, multimask=item.multimask, return_logits=item.return_logits)
        dt = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.decoder.labels(entry.adapter).observe(dt)
        if item.return_logits:
            res.logits = np.asarray(pred.masks, dtype=np.float32)
            res.masks = res.logits > self.mask_threshold
            res.low_res_logits = np.asarray(pred.low_res_logits, dtype=np.float32)
        else:
            res.masks = np.asarray(pred.masks, dtype=bool)
        res.scores = np.asarray(pred.scores, dtype=np.float32)
        res.timings_ms = {**res.timings_ms, "decoder": dt * 1000}

    def build_prompts(self, item: InferItem, emb: ImageEmbedding) -> Prompts:
        """What needs the image: coordinates inside it, mask prompts at its size, the answer's size.

        Shapes, counts and values were checked by ``prompts.validate_prompts`` when the request was
        parsed (HTTP front or gRPC endpoint), so they are not checked again here.
        """
        p = item.prompts
        h, w = emb.original_size
        n = p.count()
        m = 3 if item.multimask else 1
        cost = n * m * h * w * (5 if item.return_logits else 1)
        if cost > self.config.max_mask_pixels:
            raise PayloadTooLarge(f"the answer would hold {n} prompts x {m} masks x {h}x{w} pixels"
                                  f"{' with logits' if item.return_logits else ''}, over the limit of "
                                  f"{self.config.max_mask_pixels}; send fewer prompts or a smaller image")
        for name, arr in (("points", p.point_coords), ("boxes", p.boxes)):
            if arr is None:
                continue
            xy = np.asarray(arr, dtype=np.float64).reshape(-1, 2)
            bad = (xy[:, 0] < 0) | (xy[:, 0] > w) | (xy[:, 1] < 0) | (xy[:, 1] > h)
            if bad.any():
                x, y = xy[np.argmax(bad)]
                raise InvalidPrompt(f"{name} coordinate ({x:g}, {y:g}) is outside the {w}x{h} image "
                                    f"(x in [0, {w}], y in [0, {h}])")
        mask_inputs = None
        if p.mask_binary is not None:
            masks = np.asarray(p.mask_binary, dtype=bool)
            if masks.shape[1:] != (h, w):
                raise InvalidPrompt(f"mask_input is {masks.shape[2]}x{masks.shape[1]}, the image is {w}x{h}")
            mask_inputs = self.runtime.transform.mask_to_prompt(masks, (h, w))
        elif p.mask_logits is not None:
            logits = np.asarray(p.mask_logits, dtype=np.float32)
            low = self.runtime.low_res_size
            if logits.shape[-2:] != (low, low):
                raise InvalidPrompt(f"mask_input low_res_logits are {logits.shape[-1]}x{logits.shape[-2]}, this "
                                    f"model takes {low}x{low}")
            mask_inputs = logits.reshape(-1, 1, low, low)
        try:
            return Prompts(point_coords=p.point_coords, point_labels=p.point_labels, boxes=p.boxes,
                           mask_inputs=mask_inputs)
        except ValueError as e:  # the predictor's own guards, for callers that built PromptArrays by hand
            raise InvalidPrompt(str(e)) from None


def _failed(error: BaseException) -> InferResult:
    """One item's error, answered instead of raised so the rest of its batch is served."""
    return InferResult(error=to_service_error(error).to_json())
