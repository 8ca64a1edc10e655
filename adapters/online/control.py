"""Operator controls of a domain's self-training worker, kept in ``REGISTRY/<domain>/control.json``.

The file lives beside the versions it talks about, so every replica, the worker and the CLI read
the same state from the registry volume, and it is replaced atomically (write, fsync, rename) as
``routing.json`` is::

    {"pinned": 2, "frozen": true, "reason": "bad labels from client X", "updated": "2025-...+00:00"}

* ``pinned``: the version the worker anchors its regularisation to and resets to. ``null``: the
  version that was active when the worker started (the base model if there was none).
* ``frozen``: the worker skips its rounds and never publishes; serving is untouched.

:func:`rollback` activates the previous version of a domain, by lineage when the active version
has one, and freezes the domain (unless asked not to) so that the worker does not publish a new
version over the rollback at its next round. No file means the defaults: not pinned, not frozen.

Several operators changing one domain at once are serialised by an ``flock`` on
``REGISTRY/<domain>/.control.lock`` held around each read-modify-write (same limits as the worker
lease, see :mod:`.lease`: on a filesystem without working locks the last writer wins).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import AdapterError, InvalidAdapterRef
from ..ref import AdapterRef
from ..registry import Registry, _write_atomic

CONTROL_FILE = "control.json"
CONTROL_LOCK = ".control.lock"
MAX_REASON_CHARS = 500


@dataclass(frozen=True)
class DomainControl:
    """The operator state of one domain (the defaults when nobody set any)."""

    pinned: int | None = None
    frozen: bool = False
    reason: str | None = None
    updated: str = ""  # ISO 8601 time of the last change; "" when never changed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def control_path(registry: Registry, domain: str) -> Path:
    """``REGISTRY/<domain>/control.json`` (the domain name validated)."""
    return registry.root / AdapterRef(domain).domain / CONTROL_FILE


def read_control(registry: Registry, domain: str) -> DomainControl:
    """The domain's controls; the defaults when it has no ``control.json``. A file that is not a
    well-formed control object is an :class:`AdapterError` naming it (never silently ignored: a
    freeze that is not read would let the worker publish)."""
    path = control_path(registry, domain)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return DomainControl()
    except OSError as e:
        raise AdapterError(f"cannot read {path}: {e.strerror}") from e
    return _parse(text, path)


def pin(registry: Registry, domain: str, version: int) -> DomainControl:
    """Anchor the worker to ``version`` (which must exist): it resets to it and regularises towards
    it. Does not change what is served (``Registry.activate`` / :func:`rollback` do)."""
    ref = AdapterRef(domain, version)
    if version not in registry.versions(domain):
        raise AdapterError(f"cannot pin {ref}: not in registry {registry.root}; versions: "
                           + (", ".join(f"v{v}" for v in registry.versions(domain)) or "none"))
    return _update(registry, domain, pinned=version)


def unpin(registry: Registry, domain: str) -> DomainControl:
    """Back to the default anchor: the version active when the worker starts."""
    return _update(registry, domain, pinned=None)


def freeze(registry: Registry, domain: str, reason: str | None = None) -> DomainControl:
    """Stop the worker's rounds and publications for ``domain`` (it keeps its lease and metrics)."""
    return _update(registry, domain, frozen=True, reason=_check_reason(reason))


def unfreeze(registry: Registry, domain: str) -> DomainControl:
    """Let the worker run rounds and publish again."""
    return _update(registry, domain, frozen=False, reason=None)


def rollback_target(registry: Registry, domain: str) -> int:
    """The version :func:`rollback` would activate (raises as it would; changes nothing)."""
    AdapterRef(domain)
    versions = registry.versions(domain)
    active = registry.active_version(domain)
    if active is None:
        raise AdapterError(f"cannot roll back {domain!r}: no version in registry {registry.root}")
    if active in versions:
        parent = _parent_version(registry, domain, active)
        if parent is not None and parent in versions:
            return parent
    older = [v for v in versions if v < active]
    if not older:
        raise AdapterError(f"cannot roll back {AdapterRef(domain, active)}: it has no parent in the registry "
                           f"and no older version ({registry.root})")
    return older[-1]


def rollback(registry: Registry, domain: str, *, freeze: bool = True, reason: str | None = None) -> int:
    """Activate the previous version of ``domain`` and return it.

    The previous version is the active version's lineage parent (``adapter.json["lineage"]
    ["parent"]``, written by the worker) when it is still in the registry, else the newest version
    older than the active one. With ``freeze`` (the default) the domain is frozen *first*, so the
    worker cannot publish between the switch and the freeze; ``unfreeze`` when it may resume.
    """
    target = rollback_target(registry, domain)  # raises before anything changes
    if freeze:
        active = registry.active_version(domain)
        _update(registry, domain, frozen=True,
                reason=_check_reason(reason) or f"rolled back from v{active} to v{target}")
    registry.activate(domain, target)
    return target


def lineage_chain(registry: Registry, domain: str, start: int | None = None) -> list[dict[str, Any]]:
    """The ancestry of ``start`` (default: the active version), newest first, one row per version:
    ``version``, ``adapter``, ``created``, ``method``, ``parent``, ``pinned`` (the pin it was trained
    under), ``samples`` (count), ``gate`` (pass: true/false, None without lineage), ``round``.

    The chain follows ``lineage.parent`` while the parent is a version of this domain in the
    registry; a version without lineage (made by ``wesam adapt``) is a root. When the last parent
    named is gone (deleted from the registry), a final row ``{"adapter": ..., "missing": True}``
    says so.
    """
    AdapterRef(domain)
    if start is None:
        start = registry.active_version(domain)
        if start is None:
            raise AdapterError(f"no adapter for domain {domain!r} in registry {registry.root}")
    versions = set(registry.versions(domain))
    if start not in versions:
        raise AdapterError(f"{AdapterRef(domain, start)} not in registry {registry.root}")
    rows: list[dict[str, Any]] = []
    seen: set[int] = set()
    version: int | None = start
    while version is not None and version not in seen:
        seen.add(version)
        meta = registry.resolve(AdapterRef(domain, version)).meta
        lineage = registry.lineage(domain, version)
        parent = lineage.get("parent") if lineage else None
        samples = (lineage or {}).get("samples") or {}
        gate = (lineage or {}).get("gate") or {}
        rows.append({
            "version": version, "adapter": str(AdapterRef(domain, version)), "created": meta.get("created"),
            "method": meta.get("method"), "parent": parent, "pinned": (lineage or {}).get("pinned"),
            "samples": samples.get("count") if isinstance(samples, dict) else None,
            "gate": gate.get("pass") if isinstance(gate, dict) else None, "round": (lineage or {}).get("round"),
        })
        next_version = _parse_parent(parent, domain)
        if next_version is not None and next_version not in versions:
            rows.append({"version": next_version, "adapter": str(AdapterRef(domain, next_version)), "missing": True})
            break
        version = next_version
    return rows


# -- internals ---------------------------------------------------------------------------------------

def _parent_version(registry: Registry, domain: str, version: int) -> int | None:
    lineage = registry.lineage(domain, version)
    return _parse_parent(lineage.get("parent") if lineage else None, domain)


def _parse_parent(parent: Any, domain: str) -> int | None:
    """``"polyp@v3"`` -> 3 for this domain; None for no parent, another domain, or no version."""
    if not isinstance(parent, str) or not parent:
        return None
    try:
        ref = AdapterRef.parse(parent)
    except InvalidAdapterRef:
        return None
    return ref.version if ref.domain == domain else None


def _check_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    if not isinstance(reason, str):
        raise AdapterError(f"reason must be text, got {type(reason).__name__}", kind="invalid_argument")
    reason = " ".join(reason.split())  # one line: it ends up in logs, tables and alerts
    if len(reason) > MAX_REASON_CHARS:
        raise AdapterError(f"reason too long ({len(reason)} > {MAX_REASON_CHARS} characters)", kind="invalid_argument")
    return reason or None


def _parse(text: str, path: Path) -> DomainControl:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: invalid JSON ({e}); fix or delete the file "
                           "(deleting it unpins and unfreezes the domain)") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(data).__name__}")
    unknown = set(data) - {"pinned", "frozen", "reason", "updated"}
    if unknown:
        raise AdapterError(f"{path}: unknown keys {sorted(unknown)}")
    pinned = data.get("pinned")
    if pinned is not None and (isinstance(pinned, bool) or not isinstance(pinned, int) or pinned < 1):
        raise AdapterError(f"{path}: 'pinned' must be a version number >= 1 or null, got {pinned!r}")
    frozen = data.get("frozen", False)
    if not isinstance(frozen, bool):
        raise AdapterError(f"{path}: 'frozen' must be true or false, got {frozen!r}")
    reason = data.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise AdapterError(f"{path}: 'reason' must be text or null, got {reason!r}")
    updated = data.get("updated", "")
    if not isinstance(updated, str):
        raise AdapterError(f"{path}: 'updated' must be an ISO time string, got {updated!r}")
    return DomainControl(pinned=pinned, frozen=frozen, reason=reason, updated=updated)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / CONTROL_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: held only for one small read-modify-write
        yield
    finally:
        os.close(fd)


def _update(registry: Registry, domain: str, **changes: Any) -> DomainControl:
    """Read, change and atomically rewrite the domain's ``control.json``."""
    path = control_path(registry, domain)
    if not path.parent.is_dir():
        known = ", ".join(registry.domains()) or "none"
        raise AdapterError(f"no domain {domain!r} in registry {registry.root} (domains: {known})")
    with _locked(path.parent):
        current = read_control(registry, domain)
        new = replace(current, **changes, updated=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        _write_atomic(path, json.dumps(new.to_json(), indent=2, sort_keys=True) + "\n")
    return new
