"""A byte-bounded LRU cache of image embeddings.

Keys are opaque strings (the engine derives them from the image content hash, the base model,
the adapter version and the preprocessing, see ``engine.embedding_key``) and double as the
``image_id`` clients send back. Entries stay on the device they were computed on: moving GPU
embeddings to the CPU and back on every hit is what made Roboflow's p99 regress.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from wesam.sam.predictor import ImageEmbedding


@dataclass
class CacheEntry:
    embedding: ImageEmbedding
    adapter: str  # "base" or "domain@vN"
    domain: str | None

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
    """Thread-safe LRU bounded by the bytes of the embeddings it holds.

    ``on_event(name, count)`` is told about hits, misses, evictions and size changes (the engine
    turns them into Prometheus metrics); the cache itself knows nothing about metrics.
    """

    def __init__(self, max_bytes: int, on_event: Callable[[str, int], None] | None = None) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, CacheEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()
        self._on_event = on_event or (lambda name, n: None)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> CacheEntry | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is None:
                self.stats.misses += 1
            else:
                self._items.move_to_end(key)
                self.stats.hits += 1
        self._on_event("miss" if entry is None else "hit", 1)
        return entry

    def put(self, key: str, entry: CacheEntry) -> bool:
        """Insert (or replace) ``key``; evicts least recently used entries to fit. False if too big."""
        size = entry.nbytes
        evicted = 0
        with self._lock:
            if size > self.max_bytes:
                self.stats.rejected += 1
                return False
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._items and self._bytes + size > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes
                evicted += 1
            self._items[key] = entry
            self._bytes += size
            self.stats.evictions += evicted
        if evicted:
            self._on_event("evict", evicted)
        self._on_event("size", 0)
        return True

    def drop_adapter(self, adapter: str) -> int:
        """Remove every entry computed with ``adapter`` (its weights were unloaded)."""
        with self._lock:
            keys = [k for k, e in self._items.items() if e.adapter == adapter]
            for k in keys:
                self._bytes -= self._items.pop(k).nbytes
        if keys:
            self._on_event("size", 0)
        return len(keys)
