"""A byte-bounded, scan-resistant LRU cache of image embeddings.

Keys are opaque strings (the engine derives them from the image content hash, the base model,
the adapter version and the preprocessing, see ``engine.embedding_key``) and double as the
``image_id`` clients send back. Entries stay on the device they were computed on: moving GPU
embeddings to the CPU and back on every hit is what made Roboflow's p99 regress.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from wesam.sam.predictor import ImageEmbedding


@dataclass
class CacheEntry:
    embedding: ImageEmbedding
    adapter: str  # "base" or "domain@vN"
    domain: str | None
    # What decodes this embedding (the runtime's ``decoder(handle)`` when it was made): the base
    # decoder, or the adapter's own when it adapts the mask decoder. Kept with the entry so that a
    # preview's embeddings still decode with its decoder after its handle is unloaded.
    decoder: Any = None

    @property
    def nbytes(self) -> int:
        return self.embedding.nbytes


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    rejected: int = 0  # entries larger than the whole cache


class EmbeddingCache:
    """Thread-safe segmented LRU (SLRU) bounded by the bytes of the embeddings it holds.

    A new entry starts in the *probation* segment; a hit moves it to the *protected* segment (at
    most ``protected_fraction`` of the bytes; its least recently used entries fall back to
    probation). Evictions take probation's least recently used entry first. Why: most new images
    are seen once, while the embeddings clients reuse (``image_id`` follow-ups, the same frame sent
    again) are hit repeatedly; under plain LRU a burst of one-off images pushed those out (the load
    benchmark's 404 ``unknown_image_id`` answers at 64 clients). SLRU keeps them at the same cost.

    ``on_event(name, count)`` is told about hits, misses, evictions and size changes (the engine
    turns them into Prometheus metrics); the cache itself knows nothing about metrics.
    """

    def __init__(self, max_bytes: int, on_event: Callable[[str, int], None] | None = None,
                 protected_fraction: float = 0.8) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        if not 0.0 <= protected_fraction < 1.0:
            raise ValueError("protected_fraction must be in [0, 1)")
        self.max_bytes = max_bytes
        self.protected_max_bytes = int(max_bytes * protected_fraction)
        self._probation: OrderedDict[str, CacheEntry] = OrderedDict()  # oldest first
        self._protected: OrderedDict[str, CacheEntry] = OrderedDict()  # oldest first
        self._bytes = 0
        self._protected_bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()
        self._on_event = on_event or (lambda name, n: None)

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)

    def __contains__(self, key: str) -> bool:
        return key in self._probation or key in self._protected

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> CacheEntry | None:
        with self._lock:
            entry = self._protected.get(key)
            if entry is not None:
                self._protected.move_to_end(key)
            else:
                entry = self._probation.pop(key, None)
                if entry is not None:  # a second use: protect it
                    self._protected[key] = entry
                    self._protected_bytes += entry.nbytes
                    while self._protected_bytes > self.protected_max_bytes and len(self._protected) > 1:
                        old_key, old = self._protected.popitem(last=False)
                        self._protected_bytes -= old.nbytes
                        self._probation[old_key] = old  # back to probation, as its most recent entry
            if entry is None:
                self.stats.misses += 1
            else:
                self.stats.hits += 1
        self._on_event("miss" if entry is None else "hit", 1)
        return entry

    def _remove(self, key: str) -> CacheEntry | None:
        entry = self._probation.pop(key, None)
        if entry is None:
            entry = self._protected.pop(key, None)
            if entry is not None:
                self._protected_bytes -= entry.nbytes
        if entry is not None:
            self._bytes -= entry.nbytes
        return entry

    def put(self, key: str, entry: CacheEntry) -> bool:
        """Insert (or replace) ``key`` on probation; evicts to fit (probation's least recently used
        first, then protected's). False if the entry is larger than the whole cache."""
        size = entry.nbytes
        evicted = 0
        with self._lock:
            if size > self.max_bytes:
                self.stats.rejected += 1
                return False
            self._remove(key)
            while self._bytes + size > self.max_bytes:
                victim = next(iter(self._probation or self._protected))
                self._remove(victim)
                evicted += 1
            self._probation[key] = entry
            self._bytes += size
            self.stats.evictions += evicted
        if evicted:
            self._on_event("evict", evicted)
        self._on_event("size", 0)
        return True

    def drop_adapter(self, adapter: str) -> int:
        """Remove every entry computed with ``adapter`` (its weights were unloaded)."""
        with self._lock:
            keys = [k for segment in (self._probation, self._protected) for k, e in segment.items()
                    if e.adapter == adapter]
            for k in keys:
                self._remove(k)
        if keys:
            self._on_event("size", 0)
        return len(keys)
