"""One self-training worker per domain: a kernel lock on ``REGISTRY/<domain>/.worker.lock``.

Two workers training the same domain would publish competing versions from diverging states, so
``wesam worker`` takes the domain's lease before its first round and gives up when it loses it::

    with DomainLease(registry_root, "polyp") as lease:   # LeaseHeld if another worker has it
        while True:
            lease.check()                                # LeaseLost if the lock file was replaced
            ...                                          # one round; publish

The lease is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the lock file. The kernel drops the lock when the
holder's file descriptor closes, however the process ends (``kill -9``, OOM kill, a crash), so a
dead worker never blocks the next one and there is nothing to expire or clean up. After locking,
the holder writes who it is (host, pid, since) into the file; a worker refused the lease reads that
back to say who holds it. The file is never deleted by wesam: deleting (or replacing) it while a
worker holds it would let a second worker lock a new file at the same path, which is why a holder
calls :meth:`DomainLease.check` before it publishes.

Limits. ``flock`` is exact between processes on one host, on any local filesystem. Over the network
it depends on the filesystem: Linux's NFS client (v4, or v3 with a lock manager) maps ``flock`` onto
POSIX byte-range locks on the server, which works but is released only after the server's lease
time when a client host dies; CephFS supports it; some FUSE and SMB mounts accept the call without
locking anything. So: workers on one host, or on several hosts sharing a filesystem whose locks
you trust. On Kubernetes, the worker's single-replica Deployment with ``strategy: Recreate``
(``k8s/worker``) is what keeps one worker per domain; the lease is the second line of defence
there (and the only one for workers started by hand next to it).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from wesam.errors import WesamError

from ..ref import AdapterRef

LOCK_FILE = ".worker.lock"
MAX_HOLDER_BYTES = 4096  # holder info is one small JSON object; never read more than this
_ACQUIRE_ATTEMPTS = 10  # re-opens when the file was replaced between open() and flock()


class LeaseHeld(WesamError, RuntimeError):
    """Another process holds the domain's worker lease. ``holder``: what it wrote (host, pid, since),
    empty when it had not written it yet."""

    kind = "lease_held"

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder: dict[str, Any] = dict(holder or {})


class LeaseLost(WesamError, RuntimeError):
    """The lease this worker held is no longer exclusive: its lock file was removed or replaced (or
    it was released). The worker must stop without publishing."""

    kind = "lease_lost"


def describe_holder(holder: dict[str, Any]) -> str:
    """``host pid 123 since 2025-01-01T00:00:00+00:00`` (or a note that nothing was written)."""
    if not holder:
        return "a process that has not written its name yet"
    return f"{holder.get('host', '?')} pid {holder.get('pid', '?')} since {holder.get('since', '?')}"


class DomainLease:
    """The exclusive, non-blocking worker lease of one domain of a registry.

    Not shared between threads; a forked child inherits the lock with the file descriptor (do not
    fork while holding it, or close the descriptor in the child).
    """

    def __init__(self, registry_root: str | os.PathLike, domain: str) -> None:
        self.domain = AdapterRef(domain).domain  # InvalidAdapterRef before anything touches the disk
        self.path = Path(registry_root) / self.domain / LOCK_FILE
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we locked
        self.holder: dict[str, Any] = {}  # what we wrote, while held

    # -- state
    @property
    def held(self) -> bool:
        """Whether this object holds the lease (it may since have been lost: see :meth:`check`)."""
        return self._fd is not None

    def acquire(self) -> "DomainLease":
        """Take the lease now or raise :class:`LeaseHeld` naming the holder; never waits."""
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_ACQUIRE_ATTEMPTS):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LeaseHeld(f"cannot lock {self.path}: {e.strerror}") from e
                raise LeaseHeld(f"the worker lease of domain {self.domain!r} is held by {describe_holder(holder)} "
                                f"({self.path}); one worker per domain", holder) from None
            # Locked, but maybe a file that was unlinked or replaced after we opened it: the lock
            # must be on the file now at the path, or another worker could lock that one too.
            st = os.fstat(fd)
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)
                continue
            self.holder = {"host": socket.gethostname(), "pid": os.getpid(),
                           "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "domain": self.domain}
            try:
                _write_holder(fd, self.holder)
            except OSError:
                os.close(fd)  # unlocks: do not keep a lease nobody can identify
                raise
            self._fd, self._identity = fd, (st.st_dev, st.st_ino)
            return self
        raise LeaseHeld(f"cannot lock {self.path}: the file keeps being replaced")

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless we hold the lease on the file now at the path (it was
        not removed or replaced since :meth:`acquire`). Call it before publishing."""
        if self._fd is None or self._identity is None:
            raise LeaseLost(f"the worker lease of domain {self.domain!r} is not held ({self.path})")
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise LeaseLost(f"the worker lease file {self.path} was removed: another worker may now hold "
                            f"domain {self.domain!r}") from None
        if (st.st_dev, st.st_ino) != self._identity:
            raise LeaseLost(f"the worker lease file {self.path} was replaced: another worker may now hold "
                            f"domain {self.domain!r}")

    def release(self) -> None:
        """Give the lease up (a no-op when not held). The file stays: removing it would race with a
        worker that is opening it."""
        fd, self._fd, self._identity = self._fd, None, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # no stale holder info for the next reader
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the last descriptor drops the flock
        self.holder = {}

    def read_holder(self) -> dict[str, Any]:
        """What the current holder wrote into the lock file (``{}`` if nothing or unreadable)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return {}
        try:
            return _read_holder(fd)
        finally:
            os.close(fd)

    # -- context manager
    def __enter__(self) -> "DomainLease":
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:
        # A forgotten lease is released when the object goes away, as the kernel would at exit.
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)  # type: ignore[arg-type]
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"DomainLease({str(self.path)!r}, held={self.held})"


def _write_holder(fd: int, holder: dict[str, Any]) -> None:
    data = (json.dumps(holder, sort_keys=True) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, MAX_HOLDER_BYTES, 0)
        holder = json.loads(data.decode()) if data.strip() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}
