"""Loaded adapter versions that are not active: operator previews (``domain@vN`` in a request).

An operator looks at what a version does before activating it by naming it in a request
(``"domain": "polyp@v2"``). The router loads such a version next to the active ones, verified as an
activation loads it, and keeps it here: a small LRU bounded by ``WESAM_SERVE_PREVIEW_SLOTS``, so a
page that compares versions does not reload the adapter on every click, and a burst of previews
cannot fill the device with adapters.

**Unload safety.** The engine resolves the routes of a whole encoder batch before it encodes, so a
later item of the batch may evict the handle an earlier item is about to use. The engine therefore
*pins* each preview it resolved (:meth:`PreviewCache.pin`) until its batch is encoded
(:meth:`PreviewCache.unpin`). Evicting a pinned entry only *retires* it: it leaves the LRU (the
bound counts idle previews, never in-use ones) and is unloaded when its last pin goes. Requests
still queued hold no handle (they carry the domain string and resolve it when their batch runs),
so they need no pin. Every method is called under the engine's lock, which also serialises
loading and encoding; the ``threading.Lock`` here only keeps :meth:`status` (read from other
threads) consistent.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from wesam.adapters.ref import AdapterRef

from .runtime import AdapterHandle


@dataclass
class Preview:
    """A loaded, non-active version."""

    ref: AdapterRef
    sha256: str  # of the weights file, for cache keys (as ``Slot.sha256``)
    handle: AdapterHandle
    pins: int = 0  # encoder batches about to use (or using) the handle
    loaded_at: float = field(default_factory=time.time)
    used_at: float = field(default_factory=time.time)


class PreviewCache:
    """At most ``capacity`` idle preview handles, least recently used unloaded first.

    ``unload(handle)`` releases a handle in the runtime (it does not drop cached embeddings: they
    are keyed by the version's weights SHA-256 and stay correct for a later preview of it).
    """

    def __init__(self, capacity: int, unload: Callable[[AdapterHandle], None]) -> None:
        if capacity < 0:
            raise ValueError(f"preview capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._unload = unload
        self._live: OrderedDict[AdapterRef, Preview] = OrderedDict()  # LRU order: oldest first
        self._retired: dict[AdapterRef, Preview] = {}  # evicted while pinned: unloaded at the last unpin
        self._lock = threading.Lock()
        self.loads = 0
        self.evictions = 0

    def get(self, ref: AdapterRef) -> Preview | None:
        """The loaded preview of ``ref`` (marked as just used), or None.

        A retired entry (evicted while a batch still pins it) comes back into the LRU: it is still
        loaded, so asking for it again must not load a second copy.
        """
        with self._lock:
            entry = self._live.get(ref)
            if entry is None and ref in self._retired:
                entry = self._live[ref] = self._retired.pop(ref)
            if entry is None:
                return None
            self._live.move_to_end(ref)
            entry.used_at = time.time()
        self._shrink()
        return entry

    def add(self, entry: Preview) -> list[AdapterRef]:
        """Keep a freshly loaded preview; returns the versions evicted to make room."""
        with self._lock:
            self._live[entry.ref] = entry
            self._live.move_to_end(entry.ref)
            self.loads += 1
        return self._shrink(keep=entry.ref)

    def _shrink(self, keep: AdapterRef | None = None) -> list[AdapterRef]:
        evicted: list[AdapterRef] = []
        unload: list[Preview] = []
        with self._lock:
            while len(self._live) > self.capacity:
                victim = next((r for r in self._live if r != keep), None)
                if victim is None:  # capacity 0 and only the entry just added: keep it while pinned
                    break
                entry = self._live.pop(victim)
                evicted.append(victim)
                self.evictions += 1
                if entry.pins > 0:
                    self._retired[victim] = entry
                else:
                    unload.append(entry)
        for entry in unload:
            self._unload(entry.handle)
        return evicted

    def peek(self, ref: AdapterRef) -> Preview | None:
        """The loaded preview of ``ref`` without marking it used (a cache-key lookup), or None."""
        with self._lock:
            return self._live.get(ref) or self._retired.get(ref)

    def take(self, ref: AdapterRef) -> Preview | None:
        """Remove ``ref`` without unloading it (it becomes the domain's active version). A batch
        that pinned it keeps using the same handle; its unpin then finds nothing to unload."""
        with self._lock:
            entry = self._live.pop(ref, None) or self._retired.pop(ref, None)
        if entry is not None:
            entry.pins = 0
        return entry

    def pin(self, ref: AdapterRef) -> None:
        with self._lock:
            entry = self._live.get(ref) or self._retired.get(ref)
            if entry is not None:
                entry.pins += 1

    def unpin(self, ref: AdapterRef) -> None:
        """Release a pin; a retired entry whose last pin this was is unloaded now."""
        unload = None
        with self._lock:
            entry = self._live.get(ref) or self._retired.get(ref)
            if entry is None:  # promoted to active meanwhile, or already gone
                return
            entry.pins = max(0, entry.pins - 1)
            if entry.pins == 0 and ref in self._retired:
                unload = self._retired.pop(ref)
        if unload is not None:
            self._unload(unload.handle)

    def drop(self, keep: Callable[[AdapterRef], bool] = lambda ref: False) -> list[AdapterRef]:
        """Unload every preview for which ``keep`` is false (pinned ones when their batch ends)."""
        dropped: list[AdapterRef] = []
        unload: list[Preview] = []
        with self._lock:
            for ref in [r for r in self._live if not keep(r)]:
                entry = self._live.pop(ref)
                dropped.append(ref)
                if entry.pins > 0:
                    self._retired[ref] = entry
                else:
                    unload.append(entry)
        for entry in unload:
            self._unload(entry.handle)
        return dropped

    def __contains__(self, ref: AdapterRef) -> bool:
        with self._lock:
            return ref in self._live or ref in self._retired

    def __len__(self) -> int:
        """Idle and in-use previews in the LRU (retired ones are not counted: they are on their way out)."""
        return len(self._live)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "slots": self.capacity,
                "loaded": [{"adapter": str(e.ref), "in_use": e.pins, "loaded_at": e.loaded_at, "used_at": e.used_at}
                           for e in reversed(self._live.values())],  # most recently used first
                "retiring": sorted(str(r) for r in self._retired),
                "loads": self.loads,
                "evictions": self.evictions,
            }
