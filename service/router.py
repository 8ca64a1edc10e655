"""Which adapter serves which domain, kept in step with the registry's routing file.

The registry (``wesam.adapters.registry``) is the source of truth: ``routing.json`` names each
domain's active version and is replaced atomically, so every replica that polls it (or is told
to reload) converges on the same versions. A version that fails to load (tampered file, made for
another base model, malformed) is refused: the domain keeps serving the version it had, and the
failure is reported in ``status()`` and the metrics.

A request may also name a version, ``domain@vN`` (an operator's *preview*: what a version does
before it is activated). The active version is served from its slot; any other version is loaded
as activation loads it (``registry.resolve`` + the runtime's loader) into a small LRU of preview
handles (``previews.PreviewCache``, ``WESAM_SERVE_PREVIEW_SLOTS``), whose unload waits for the
encoder batches that use a handle (``acquire``/``release``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from wesam.adapters.artifact import WEIGHTS_FILE, AdapterArtifact
from wesam.adapters.errors import AdapterError
from wesam.adapters.ref import AdapterRef
from wesam.adapters.registry import ROUTING_FILE, Registry

from .config import BASE
from .errors import (AdapterRefused, AdapterUnavailable, Internal, NoRegistry, PreviewDisabled, UnknownDomain,
                     UnknownVersion)
from .previews import Preview, PreviewCache
from .runtime import AdapterHandle

log = logging.getLogger("wesam.service")

# What the runtime gives the router: load a verified artifact (merged or not), unload a handle.
AdapterLoader = Callable[[AdapterArtifact, bool], AdapterHandle]
AdapterUnloader = Callable[[AdapterHandle], None]
# Told about "loaded", "unloaded", "removed" and "failed" versions (metrics), and about previews:
# "preview_loaded", "preview_failed" (the metrics of served versions ignore those).
AdapterEvent = Callable[[str, AdapterRef], None]


def names_version(domain: str | None) -> bool:
    """Whether a request's ``domain`` names a version (``polyp@v2``): an operator's preview."""
    return bool(domain) and "@" in domain  # type: ignore[operator]


def route_key(ref: AdapterRef, sha256: str) -> str:
    """The weights a route serves, as cache keys name them: the version and its weights' SHA-256."""
    return f"{ref}:{sha256[:16]}"


@dataclass
class Route:
    """What a request is served with."""

    ref: AdapterRef | None  # None: the base model
    key: str  # identifies the weights in cache keys: "base" or "domain@vN:<sha256 prefix>"
    handle: AdapterHandle | None
    preview: bool = False  # a non-active version loaded for a request that named it (``domain@vN``)

    @property
    def domain(self) -> str | None:
        return self.ref.domain if self.ref is not None else None

    @property
    def adapter(self) -> str:
        """The adapter as answers and metrics name it: ``domain@vN`` or ``base``."""
        return str(self.ref) if self.ref is not None else BASE


@dataclass
class Slot:
    """The version a domain is served with."""

    ref: AdapterRef
    sha256: str
    handle: AdapterHandle
    loaded_at: float = field(default_factory=time.time)

    @property
    def version(self) -> int:
        return self.ref.version  # type: ignore[return-value]  # a slot always holds a version


BASE_ROUTE = Route(None, BASE, None)


class AdapterRouter:
    """Domain -> loaded adapter version, refreshed from the registry.

    ``loader(artifact, merged)`` and ``unloader(handle)`` come from the runtime; ``on_event`` is
    told about loads and failures (metrics). Callers serialise calls (the engine holds its lock);
    ``lock`` guards the slots against the registry watcher.

    ``preview_slots`` bounds the idle preview handles (0: requests naming a non-active version are
    refused with ``preview_disabled``); ``preview_unloader`` releases one (default ``unloader``).
    """

    def __init__(self, registry: str | None, loader: AdapterLoader, unloader: AdapterUnloader, *,
                 fallback: str | None = None, merged_domains: tuple[str, ...] = (),
                 on_event: AdapterEvent | None = None, preview_slots: int = 2,
                 preview_unloader: AdapterUnloader | None = None) -> None:
        self.registry = Registry(registry) if registry else None
        self.loader = loader
        self.unloader = unloader
        self.fallback = fallback
        self.merged_domains = set(merged_domains)
        self.slots: dict[str, Slot] = {}
        self.failures: dict[str, dict[str, Any]] = {}  # domain -> {version, error, at}
        self._refused: dict[AdapterRef, str] = {}  # version -> error; not retried until a forced refresh
        self._signature: Any = None
        self._on_event: AdapterEvent = on_event or (lambda event, ref: None)
        self.last_refresh: float | None = None
        self.lock = threading.RLock()
        self.previews = PreviewCache(preview_slots, preview_unloader or unloader)

    # -- resolving --------------------------------------------------------------------------------
    def resolve(self, domain: str | None) -> Route:
        """The route of a request's ``domain``: ``base``, a domain (its active version) or
        ``domain@vN`` (that version: the active slot's, else a preview, loaded here if needed).

        Loading a preview rewires the shared model, so callers that may name a version hold the
        engine's lock; callers that resolve several routes before they encode use :meth:`acquire`.
        """
        if domain is None or domain == "" or domain == BASE:
            return BASE_ROUTE
        if names_version(domain):
            return self._resolve_version(AdapterRef.parse(domain))
        slot = self.slots.get(domain)
        if slot is not None:
            return Route(slot.ref, route_key(slot.ref, slot.sha256), slot.handle)
        if domain in self.failures:
            f = self.failures[domain]
            refused = AdapterRef(domain, f["version"]).version_dir
            raise AdapterUnavailable(f"domain {domain!r} has no loadable adapter: {refused} was refused "
                                     f"({f['error']})")
        if self.fallback and self.fallback != domain:
            return self.resolve(self.fallback)
        known = ", ".join(sorted(self.slots)) or "none"
        raise UnknownDomain(f"unknown domain {domain!r}; served domains: {known} (or omit `domain` for the "
                            "base model)")

    def acquire(self, domain: str | None) -> Route:
        """:meth:`resolve`, and keep a preview's handle loaded until :meth:`release`: the engine
        resolves a whole batch before it encodes, and a later item must not unload an earlier
        item's adapter meanwhile."""
        route = self.resolve(domain)
        if route.preview:
            self.previews.pin(route.ref)  # type: ignore[arg-type]
        return route

    def release(self, route: Route) -> None:
        if route.preview:
            self.previews.unpin(route.ref)  # type: ignore[arg-type]

    def peek(self, domain: str | None) -> Route | None:
        """As :meth:`resolve` but never loads anything: None for a version that is neither active nor
        previewed now (its embedding cannot be cached under a key we could compute without loading)."""
        if not names_version(domain):
            return self.resolve(domain)
        ref = AdapterRef.parse(domain)  # type: ignore[arg-type]
        slot = self.slots.get(ref.domain)
        if slot is not None and slot.ref == ref:
            return Route(slot.ref, route_key(slot.ref, slot.sha256), slot.handle)
        entry = self.previews.peek(ref)
        return Route(ref, route_key(ref, entry.sha256), entry.handle, preview=True) if entry else None

    def _resolve_version(self, ref: AdapterRef) -> Route:
        slot = self.slots.get(ref.domain)
        if slot is not None and slot.ref == ref:
            return Route(slot.ref, route_key(slot.ref, slot.sha256), slot.handle)
        with self.lock:
            entry = self.previews.get(ref)
            if entry is None:
                entry = self._load_preview(ref)
            return Route(ref, route_key(ref, entry.sha256), entry.handle, preview=True)

    def _load_preview(self, ref: AdapterRef) -> Preview:
        """Load a non-active version as activation would: verified, or refused with ``adapter_refused``."""
        versions = self.registry.versions(ref.domain) if self.registry is not None else []
        if not versions:
            raise UnknownDomain(f"unknown domain {ref.domain!r}: not in the registry")
        if ref.version not in versions:
            raise UnknownVersion(f"{ref} is not in the registry; versions: "
                                 + ", ".join(ref.at(v).version_dir for v in versions))
        if self.previews.capacity == 0:
            raise PreviewDisabled(f"{ref} is not the active version of {ref.domain!r} and previews of other "
                                  "versions are off on this server (WESAM_SERVE_PREVIEW_SLOTS=0)")
        try:
            art = self.registry.resolve(ref)  # type: ignore[union-attr]
            if art.ref != ref:
                raise ValueError(f"{art.path}/adapter.json says {art.ref}, not {ref}")
            handle = self.loader(art, ref.domain in self.merged_domains)
        except Exception as e:  # the version cannot be served here; nothing else changes
            self._on_event("preview_failed", ref)
            raise AdapterRefused(f"refusing {ref}: {type(e).__name__}: {e}") from None
        entry = Preview(ref, art.meta["files"][WEIGHTS_FILE], handle)
        evicted = self.previews.add(entry)
        self._on_event("preview_loaded", ref)
        log.info("previewing %s%s", ref, f" (least recently used previews unloaded: "
                 f"{', '.join(map(str, evicted))})" if evicted else "")
        return entry

    def _take_preview(self, ref: AdapterRef) -> tuple[AdapterHandle, str] | None:
        """The loaded preview of a version that becomes active: its handle moves to the slot instead
        of a second copy being loaded (it was verified when loaded; its weights are those bytes)."""
        entry = self.previews.take(ref)
        return (entry.handle, entry.sha256) if entry is not None else None

    # -- refreshing ------------------------------------------------------------------------------
    def signature(self) -> Any:
        """Cheap fingerprint of the registry: routing file stat + domain/version directories."""
        if self.registry is None:
            return None
        root = self.registry.root
        try:
            st = (root / ROUTING_FILE).stat()
            routing = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            routing = None
        return routing, tuple((d, tuple(self.registry.versions(d))) for d in self.registry.domains())

    def changed(self) -> bool:
        return self.signature() != self._signature

    def refresh(self, force: bool = False) -> dict[str, Any]:
        """Load the active version of every domain; returns what changed.

        ``force`` retries versions refused before (e.g. after a file was repaired in place).
        """
        with self.lock:
            if force:
                self._refused.clear()
            sig = self.signature()
            report: dict[str, Any] = {"loaded": [], "unloaded": [], "failed": []}
            wanted: dict[str, AdapterRef] = {}
            if self.registry is not None:
                for domain in self.registry.domains():
                    try:
                        version = self.registry.active_version(domain)
                        if version is not None:
                            wanted[domain] = AdapterRef(domain, version)  # refuses v0 in routing.json
                    except (ValueError, OSError) as e:  # unreadable routing.json: keep serving what we have
                        log.error("cannot read %s: %s", Path(self.registry.root) / ROUTING_FILE, e)
                        self._signature = sig
                        return {**report, "error": f"cannot read routing: {e}"}
            for domain, ref in sorted(wanted.items()):
                current = self.slots.get(domain)
                if current is not None and current.ref == ref:
                    self.failures.pop(domain, None)
                    continue
                if ref in self._refused:
                    continue
                self._load(ref, current, report)
            for domain in sorted(set(self.slots) - set(wanted)):
                slot = self.slots.pop(domain)
                self.unloader(slot.handle)
                report["unloaded"].append(str(slot.ref))
                self._on_event("removed", slot.ref)
            for domain in set(self.failures) - set(wanted):
                del self.failures[domain]
            # A forced reload starts previews afresh too; a domain that left the registry takes its previews.
            self.previews.drop(keep=lambda ref: not force and ref.domain in wanted)
            self._signature = sig
            self.last_refresh = time.time()
            return report

    def _load(self, ref: AdapterRef, current: Slot | None, report: dict[str, Any]) -> None:
        try:
            promoted = self._take_preview(ref)
            if promoted is not None:
                handle, sha256 = promoted
            else:
                art = self.registry.resolve(ref)  # type: ignore[union-attr]
                if art.ref != ref:
                    raise ValueError(f"{art.path}/adapter.json says {art.ref}, not {ref}")
                handle = self.loader(art, ref.domain in self.merged_domains)
                sha256 = art.meta["files"][WEIGHTS_FILE]
        except Exception as e:  # any failure refuses this version; the domain keeps its current one
            msg = f"{type(e).__name__}: {e}"
            log.error("refusing adapter %s: %s%s", ref, msg,
                      f" (still serving {current.ref})" if current else "")
            self._refused[ref] = msg
            self.failures[ref.domain] = {"version": ref.version, "error": msg, "at": time.time()}
            report["failed"].append({"adapter": str(ref), "error": msg})
            self._on_event("failed", ref)
            return
        self._install(Slot(ref, sha256, handle), current)
        report["loaded"].append(str(ref))
        if current is not None:
            report["unloaded"].append(str(current.ref))
        log.info("serving %s%s", ref, f" (was {current.ref})" if current else "")

    def _install(self, slot: Slot, current: Slot | None) -> None:
        """Serve ``slot`` for its domain and unload the version it replaces."""
        self.slots[slot.ref.domain] = slot
        self.failures.pop(slot.ref.domain, None)
        self._on_event("loaded", slot.ref)
        if current is not None:
            self.unloader(current.handle)
            self._on_event("unloaded", current.ref)

    # -- activating ------------------------------------------------------------------------------
    def activate(self, domain: str, version: int) -> dict[str, Any]:
        """Switch ``domain`` to ``version`` only if that version loads here first.

        The routing file is written (atomically, by the registry) after the new version is loaded, so a
        broken version is never made active and no replica is asked to serve it.
        """
        if self.registry is None:
            raise NoRegistry("no registry configured")
        with self.lock:
            versions = self.registry.versions(domain)
            if not versions:
                raise UnknownDomain(f"no domain {domain!r} in registry {self.registry.root}")
            ref = AdapterRef(domain, version)
            if version not in versions:
                raise UnknownVersion(f"{ref} is not in the registry; versions: "
                                     + ", ".join(AdapterRef(domain, v).version_dir for v in versions))
            current = self.slots.get(domain)
            previous = str(current.ref) if current else None
            if current is None or current.ref != ref:
                promoted = self._take_preview(ref)
                if promoted is not None:
                    handle, sha256 = promoted
                else:
                    try:
                        art = self.registry.resolve(ref)
                        handle = self.loader(art, domain in self.merged_domains)
                    except Exception as e:
                        self._on_event("failed", ref)
                        raise AdapterRefused(f"refusing {ref}: {type(e).__name__}: {e}; still serving "
                                             f"{previous or 'nothing'}") from None
                    sha256 = art.meta["files"][WEIGHTS_FILE]
                try:
                    self._write_routing(ref)
                except Internal:
                    self.unloader(handle)
                    raise
                self._install(Slot(ref, sha256, handle), current)
                self._refused.pop(ref, None)
            else:
                self._write_routing(ref)
            self._signature = self.signature()
            return {"domain": domain, "serving": str(ref), "previous": previous}

    def _write_routing(self, ref: AdapterRef) -> None:
        try:
            self.registry.activate(ref.domain, ref.version)  # type: ignore[union-attr, arg-type]
        except (AdapterError, OSError) as e:
            raise Internal(f"cannot write the routing file: {e}") from None

    # -- reporting -------------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        # Copies first: status is read from other threads while a refresh may be swapping slots.
        slots, failures = dict(self.slots), dict(self.failures)
        rows = []
        for d in sorted(set(slots) | set(failures)):
            slot = slots.get(d)
            row: dict[str, Any] = {"domain": d, "serving": str(slot.ref) if slot else None,
                                   "version": slot.version if slot else None,
                                   "merged": bool(slot and slot.handle.merged)}
            if self.registry is not None:
                try:
                    row["active"] = self.registry.active_version(d)
                    row["versions"] = self.registry.versions(d)
                except (ValueError, OSError):
                    pass
            if d in failures:
                row["error"] = failures[d]
            rows.append(row)
        return rows
