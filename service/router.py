"""Which adapter serves which domain, kept in step with the registry's routing file.

The registry (``adapters.registry``) is the source of truth: ``routing.json`` names each
domain's active version and is replaced atomically, so every replica that polls it (or is told
to reload) converges on the same versions. A version that fails to load (tampered file, made for
another base model, malformed) is refused: the domain keeps serving the version it had, and the
failure is reported in ``status()`` and the metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from wesam.adapters.registry import ROUTING_FILE, Registry

from .config import BASE
from .errors import AdapterUnavailable, UnknownDomain
from .runtime import AdapterHandle

log = logging.getLogger("wesam.service")


@dataclass
class Route:
    """What a request is served with."""

    domain: str | None  # None: the base model
    adapter: str  # "base" or "domain@vN"
    key: str  # identifies the weights in cache keys: "base" or "domain@vN:<sha256 prefix>"
    handle: AdapterHandle | None


@dataclass
class Slot:
    domain: str
    version: int
    sha256: str
    handle: AdapterHandle
    loaded_at: float = field(default_factory=time.time)

    @property
    def ref(self) -> str:
        return f"{self.domain}@v{self.version}"


BASE_ROUTE = Route(None, BASE, BASE, None)


class AdapterRouter:
    """Domain -> loaded adapter version, refreshed from the registry.

    ``loader(artifact, merged)`` and ``unloader(handle)`` come from the runtime; ``on_event`` is
    told about loads and failures (metrics). Not thread-safe: the engine calls it under its lock.
    """

    def __init__(self, registry: str | None, loader: Callable[..., AdapterHandle],
                 unloader: Callable[[AdapterHandle], None], *, fallback: str | None = None,
                 merged_domains: tuple[str, ...] = (),
                 on_event: Callable[..., None] | None = None) -> None:
        self.registry = Registry(registry) if registry else None
        self.loader = loader
        self.unloader = unloader
        self.fallback = fallback
        self.merged_domains = set(merged_domains)
        self.slots: dict[str, Slot] = {}
        self.failures: dict[str, dict[str, Any]] = {}  # domain -> {version, error, at}
        self._refused: dict[tuple[str, int], str] = {}  # (domain, version) -> error; not retried
        self._signature: Any = None
        self._on_event = on_event or (lambda *a, **k: None)
        self.last_refresh: float | None = None
        self.lock = threading.RLock()

    # -- resolving --------------------------------------------------------------------------------
    def resolve(self, domain: str | None) -> Route:
        if domain is None or domain == "" or domain == BASE:
            return BASE_ROUTE
        slot = self.slots.get(domain)
        if slot is not None:
            return Route(domain, slot.ref, f"{slot.ref}:{slot.sha256[:16]}", slot.handle)
        if domain in self.failures:
            f = self.failures[domain]
            raise AdapterUnavailable(f"domain {domain!r} has no loadable adapter: v{f['version']} was refused "
                                     f"({f['error']})")
        if self.fallback and self.fallback != domain:
            return self.resolve(self.fallback)
        known = ", ".join(sorted(self.slots)) or "none"
        raise UnknownDomain(f"unknown domain {domain!r}; served domains: {known} (or omit `domain` for the "
                            "base model)")

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
            wanted: dict[str, int] = {}
            if self.registry is not None:
                for domain in self.registry.domains():
                    try:
                        version = self.registry.active_version(domain)
                    except (ValueError, OSError) as e:  # unreadable routing.json: keep serving what we have
                        log.error("cannot read %s: %s", Path(self.registry.root) / ROUTING_FILE, e)
                        self._signature = sig
                        return {**report, "error": f"cannot read routing: {e}"}
                    if version is not None:
                        wanted[domain] = version
            for domain, version in sorted(wanted.items()):
                current = self.slots.get(domain)
                if current is not None and current.version == version:
                    self.failures.pop(domain, None)
                    continue
                if (domain, version) in self._refused:
                    continue
                self._load(domain, version, current, report)
            for domain in sorted(set(self.slots) - set(wanted)):
                slot = self.slots.pop(domain)
                self.unloader(slot.handle)
                report["unloaded"].append(slot.ref)
                self._on_event("removed", domain, slot.version, slot.ref)
            for domain in set(self.failures) - set(wanted):
                del self.failures[domain]
            self._signature = sig
            self.last_refresh = time.time()
            return report

    def _load(self, domain: str, version: int, current: Slot | None, report: dict[str, Any]) -> None:
        from wesam.adapters.artifact import WEIGHTS_FILE

        ref = f"{domain}@v{version}"
        try:
            art = self.registry.resolve(ref)  # type: ignore[union-attr]
            if art.domain != domain or art.version != version:
                raise ValueError(f"{art.path}/adapter.json says {art.ref}, not {ref}")
            handle = self.loader(art, domain in self.merged_domains)
        except Exception as e:  # any failure refuses this version; the domain keeps its current one
            msg = f"{type(e).__name__}: {e}"
            log.error("refusing adapter %s: %s%s", ref, msg,
                      f" (still serving {current.ref})" if current else "")
            self._refused[(domain, version)] = msg
            self.failures[domain] = {"version": version, "error": msg, "at": time.time()}
            report["failed"].append({"adapter": ref, "error": msg})
            self._on_event("failed", domain, version, ref)
            return
        self.slots[domain] = Slot(domain, version, art.meta["files"][WEIGHTS_FILE], handle)
        self.failures.pop(domain, None)
        report["loaded"].append(ref)
        self._on_event("loaded", domain, version, ref)
        if current is not None:
            self.unloader(current.handle)
            report["unloaded"].append(current.ref)
            self._on_event("unloaded", domain, current.version, current.ref)
        log.info("serving %s%s", ref, f" (was {current.ref})" if current else "")

    def status(self) -> list[dict[str, Any]]:
        # Copies first: status is read from other threads while a refresh may be swapping slots.
        slots, failures = dict(self.slots), dict(self.failures)
        rows = []
        for d in sorted(set(slots) | set(failures)):
            slot = slots.get(d)
            row: dict[str, Any] = {"domain": d, "serving": slot.ref if slot else None,
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


def activate_checked(router: AdapterRouter, domain: str, version: int) -> dict[str, Any]:
    """Switch ``domain`` to ``version`` only if that version loads here first.

    The routing file is written (atomically, by the registry) after the new version is loaded, so a
    broken version is never made active and no replica is asked to serve it.
    """
    from wesam.adapters.artifact import WEIGHTS_FILE, AdapterError

    from .errors import ServiceError

    if router.registry is None:
        raise ServiceError("no registry configured", status=409, kind="no_registry")
    with router.lock:
        versions = router.registry.versions(domain)
        if not versions:
            raise UnknownDomain(f"no domain {domain!r} in registry {router.registry.root}")
        if version not in versions:
            raise ServiceError(f"{domain}@v{version} is not in the registry; versions: "
                               + ", ".join(f"v{v}" for v in versions), status=404, kind="unknown_version")
        current = router.slots.get(domain)
        previous = current.ref if current else None
        if current is None or current.version != version:
            try:
                art = router.registry.resolve(f"{domain}@v{version}")
                handle = router.loader(art, domain in router.merged_domains)
            except Exception as e:
                msg = f"{type(e).__name__}: {e}"
                router._on_event("failed", domain, version, f"{domain}@v{version}")
                raise ServiceError(f"refusing {domain}@v{version}: {msg}; still serving {previous or 'nothing'}",
                                   status=409, kind="adapter_refused") from None
            try:
                router.registry.activate(domain, version)
            except (AdapterError, OSError) as e:
                router.unloader(handle)
                raise ServiceError(f"cannot write the routing file: {e}", status=500, kind="internal") from None
            router.slots[domain] = Slot(domain, version, art.meta["files"][WEIGHTS_FILE], handle)
            router.failures.pop(domain, None)
            router._refused.pop((domain, version), None)
            router._on_event("loaded", domain, version, f"{domain}@v{version}")
            if current is not None:
                router.unloader(current.handle)
                router._on_event("unloaded", domain, current.version, current.ref)
        else:
            router.registry.activate(domain, version)
        router._signature = router.signature()
        return {"domain": domain, "serving": f"{domain}@v{version}", "previous": previous}
