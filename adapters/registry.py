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
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .artifact import META_FILE, AdapterArtifact, AdapterError, read_artifact

_VERSION = re.compile(r"^v(\d+)$")
_DOMAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
ROUTING_FILE = "routing.json"


def parse_ref(ref: str) -> tuple[str, int | None]:
    """"polyp" -> ("polyp", None); "polyp@v3" -> ("polyp", 3)."""
    domain, _, ver = ref.partition("@")
    if not _DOMAIN.match(domain):
        raise AdapterError(f"invalid domain name {domain!r} (letters, digits, '-', '_')")
    if not ver:
        return domain, None
    m = _VERSION.match(ver)
    if not m:
        raise AdapterError(f"invalid version {ver!r} in {ref!r}; expected vN, e.g. {domain}@v1")
    return domain, int(m.group(1))


class Registry:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def domains(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(d.name for d in self.root.iterdir() if d.is_dir() and _DOMAIN.match(d.name)
                      and self.versions(d.name))

    def versions(self, domain: str) -> list[int]:
        d = self.root / domain
        if not d.is_dir():
            return []
        out = []
        for v in d.iterdir():
            m = _VERSION.match(v.name)
            if m and (v / META_FILE).is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def path(self, domain: str, version: int) -> Path:
        return self.root / domain / f"v{version}"

    def resolve(self, ref: str) -> AdapterArtifact:
        """``DOMAIN[@vN]`` -> artifact; without a version, the newest one."""
        domain, version = parse_ref(ref)
        versions = self.versions(domain)
        if not versions:
            raise AdapterError(f"no adapter for domain {domain!r} in registry {self.root}")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise AdapterError(f"{domain}@v{version} not in registry {self.root}; versions: "
                               + ", ".join(f"v{v}" for v in versions))
        return read_artifact(self.path(domain, version))

    # -- publishing
    @contextmanager
    def staging(self, domain: str) -> Iterator[Path]:
        """A private directory to write a new version into; published only if the block succeeds."""
        parse_ref(domain)
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
            return int(v.lstrip("v"))
        versions = self.versions(domain)
        return versions[-1] if versions else None

    def activate(self, domain: str, version: int) -> None:
        if version not in self.versions(domain):
            raise AdapterError(f"{domain}@v{version} not in registry {self.root}")
        routing = self.routing()
        routing[domain] = f"v{version}"
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
