"""A registry of adapter versions on a local filesystem.

Layout (readable without wesam)::

    ROOT/<domain>/v1/adapter.json, adapter.safetensors
    ROOT/<domain>/v2/...
    ROOT/routing.json          {"<domain>": "v2", ...}  the active version per domain

Versions are immutable. A version becomes visible by one atomic ``rename`` of a fully
written staging directory, so a crash or Ctrl-C never leaves a half-written version.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .artifact import META_FILE, AdapterArtifact, read_artifact
from .errors import AdapterError
from .ref import DOMAIN_PATTERN, VERSION_PATTERN, AdapterRef

ROUTING_FILE = "routing.json"


def parse_ref(ref: str | AdapterRef) -> AdapterRef:
    """``"polyp"`` / ``"polyp@v3"`` (or an :class:`AdapterRef`) -> :class:`AdapterRef`."""
    return ref if isinstance(ref, AdapterRef) else AdapterRef.parse(ref)


class Registry:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def domains(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(d.name for d in self.root.iterdir() if d.is_dir() and DOMAIN_PATTERN.match(d.name)
                      and self.versions(d.name))

    def versions(self, domain: str) -> list[int]:
        d = self.root / domain
        if not d.is_dir():
            return []
        out = []
        for v in d.iterdir():
            m = VERSION_PATTERN.match(v.name)
            if m and (v / META_FILE).is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def path(self, domain: str, version: int) -> Path:
        return self.root / domain / AdapterRef(domain, version).version_dir

    def resolve(self, ref: str | AdapterRef) -> AdapterArtifact:
        """``DOMAIN[@vN]`` -> artifact; without a version, the newest one."""
        ref = parse_ref(ref)
        versions = self.versions(ref.domain)
        if not versions:
            raise AdapterError(f"no adapter for domain {ref.domain!r} in registry {self.root}")
        if ref.version is None:
            ref = ref.at(versions[-1])
        elif ref.version not in versions:
            raise AdapterError(f"{ref} not in registry {self.root}; versions: "
                               + ", ".join(f"v{v}" for v in versions))
        return read_artifact(self.path(ref.domain, ref.version))

    def lineage(self, domain: str, version: int) -> dict | None:
        """The ``"lineage"`` entry of ``domain@v<version>``'s adapter.json, written by the online
        worker (``parent``, ``pinned``, ``samples``, ``gate``, ``round``, ``worker``); None for a
        version made otherwise (``wesam adapt``), which is a root of the lineage."""
        art = self.resolve(AdapterRef(domain, version))
        lineage = art.meta.get("lineage")
        if lineage is None:
            return None
        if not isinstance(lineage, dict):
            raise AdapterError(f"{art.path / META_FILE}: 'lineage' must be an object, got {type(lineage).__name__}")
        return lineage

    # -- publishing
    @contextmanager
    def staging(self, domain: str) -> Iterator[Path]:
        """A private directory to write a new version into; published only if the block succeeds."""
        AdapterRef(domain)  # validates the name before anything touches the disk
        tmp = self.root / domain / f".staging-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def publish(self, staged: Path, domain: str, activate: bool = True) -> AdapterArtifact:
        """Move a fully written staging directory to the next free ``vN`` atomically."""
        meta_path = staged / META_FILE
        meta = json.loads(meta_path.read_text())
        for attempt in range(100):
            version = (self.versions(domain) or [0])[-1] + 1 + attempt
            meta["version"] = version
            _write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
            _fsync_dir_tree(staged)
            try:
                os.rename(staged, self.path(domain, version))  # fails if another writer took vN
            except OSError:
                continue
            _fsync_dir(self.root / domain)
            if activate:
                self.activate(domain, version)
            return read_artifact(self.path(domain, version))
        raise AdapterError(f"could not publish {domain}: no free version number")

    # -- routing
    def routing(self) -> dict[str, str]:
        f = self.root / ROUTING_FILE
        if not f.is_file():
            return {}
        return json.loads(f.read_text())

    def active_version(self, domain: str) -> int | None:
        """The routed version, or the newest if the domain was never activated explicitly."""
        v = self.routing().get(domain)
        if v is not None:
            return AdapterRef.of(domain, v).version  # InvalidAdapterRef (a ValueError) if malformed
        versions = self.versions(domain)
        return versions[-1] if versions else None

    def activate(self, domain: str, version: int) -> None:
        ref = AdapterRef(domain, version)
        if version not in self.versions(domain):
            raise AdapterError(f"{ref} not in registry {self.root}")
        routing = self.routing()
        routing[domain] = ref.version_dir
        self.root.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.root / ROUTING_FILE, json.dumps(routing, indent=2, sort_keys=True) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)
