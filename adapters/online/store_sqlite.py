"""The embedded sample store: one SQLite file shared by the processes of one host.

WAL mode lets readers (the self-training worker) run while a writer (a service worker) commits;
every operation is one transaction, writes take the write lock up front (``BEGIN IMMEDIATE``) and
wait up to ``busy_timeout`` for it. ``PRAGMA user_version`` records the schema version.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .store import (CapturedSample, InvalidSample, SampleStore, SampleStoreError, backend_errors, check_client,
                    check_domain, check_request_id, check_retention, check_window, time_ms)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0
# filed_ms: the sample's place in its domain's log (see wesam.adapters.online.store); rowid breaks
# ties in insertion order. heads: each domain's newest filed_ms ever, kept when samples are deleted
# (a Redis Stream's last-generated-id), so a late sample never files before what readers have seen.
SCHEMA = (
    """CREATE TABLE samples (
        request_id TEXT PRIMARY KEY,
        domain TEXT NOT NULL,
        client TEXT NOT NULL,
        created REAL NOT NULL,
        filed_ms INTEGER NOT NULL,
        meta TEXT NOT NULL,
        image BLOB NOT NULL
    )""",
    "CREATE INDEX samples_domain_filed ON samples (domain, filed_ms)",
    "CREATE INDEX samples_domain_client ON samples (domain, client)",
    "CREATE TABLE heads (domain TEXT PRIMARY KEY, filed_ms INTEGER NOT NULL)",
)


class SqliteSampleStore(SampleStore):
    """Samples in the SQLite file ``path`` (created with its folder when missing)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self.location = str(self.path)
        self._lock = threading.Lock()  # one connection, shared by this object's threads
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                       check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise SampleStoreError(f"cannot open the SQLite sample store {self.location}: {exc}") from exc
        try:
            self._setup()
        except BaseException:
            self._db.close()
            raise

    @backend_errors(sqlite3.Error)
    def _setup(self) -> None:
        self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        self._db.execute("PRAGMA journal_mode = WAL")
        # Safe with WAL: a crash cannot corrupt the file, a power cut may lose the last commits.
        self._db.execute("PRAGMA synchronous = NORMAL")
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SampleStoreError(f"sample store {self.location} has schema version {version}, newer than "
                                       f"this wesam's {SCHEMA_VERSION}; upgrade wesam to open it")
            if version == 0:
                for statement in SCHEMA:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding SQLite's write lock from its start."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @backend_errors(sqlite3.Error)
    def add(self, sample: CapturedSample) -> bool:
        if not isinstance(sample, CapturedSample):
            raise InvalidSample(f"expected a CapturedSample, got {type(sample).__name__}")
        with self._write() as db:
            if db.execute("SELECT 1 FROM samples WHERE request_id = ?", (sample.request_id,)).fetchone():
                return False
            head = db.execute("SELECT filed_ms FROM heads WHERE domain = ?", (sample.domain,)).fetchone()
            filed = max(time_ms(sample.created), head[0] if head else 0)
            db.execute("INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (sample.request_id, sample.domain, sample.client, sample.created, filed, sample.to_json(),
                        sample.image))
            db.execute("INSERT INTO heads VALUES (?, ?) "
                       "ON CONFLICT (domain) DO UPDATE SET filed_ms = excluded.filed_ms", (sample.domain, filed))
        return True

    @backend_errors(sqlite3.Error)
    def get(self, request_id: str) -> CapturedSample | None:
        rows = self._read("SELECT meta, image FROM samples WHERE request_id = ?", (check_request_id(request_id),))
        return CapturedSample.from_json(rows[0][0], rows[0][1]) if rows else None

    @backend_errors(sqlite3.Error)
    def delete(self, request_id: str) -> bool:
        with self._write() as db:
            return db.execute("DELETE FROM samples WHERE request_id = ?", (check_request_id(request_id),)).rowcount > 0

    @backend_errors(sqlite3.Error)
    def delete_client(self, domain: str, client: str) -> int:
        with self._write() as db:
            return db.execute("DELETE FROM samples WHERE domain = ? AND client = ?",
                              (check_domain(domain), check_client(client))).rowcount

    @backend_errors(sqlite3.Error)
    def samples(self, domain: str, *, since: float | None = None, until: float | None = None,
                limit: int | None = None, newest_first: bool = False) -> list[CapturedSample]:
        check_domain(domain)
        check_window(since, until, limit)
        where, args = ["domain = ?"], [domain]
        if since is not None:
            where.append("filed_ms >= ?")
            args.append(time_ms(since))
        if until is not None:
            where.append("filed_ms < ?")
            args.append(time_ms(until))
        order = "DESC" if newest_first else "ASC"
        rows = self._read(f"SELECT meta, image FROM samples WHERE {' AND '.join(where)} "
                          f"ORDER BY filed_ms {order}, rowid {order} LIMIT ?",
                          (*args, -1 if limit is None else limit))
        return [CapturedSample.from_json(meta, image) for meta, image in rows]

    @backend_errors(sqlite3.Error)
    def count(self, domain: str | None = None) -> int:
        if domain is None:
            return self._read("SELECT COUNT(*) FROM samples")[0][0]
        return self._read("SELECT COUNT(*) FROM samples WHERE domain = ?", (check_domain(domain),))[0][0]

    @backend_errors(sqlite3.Error)
    def domains(self) -> list[str]:
        return [d for (d,) in self._read("SELECT DISTINCT domain FROM samples ORDER BY domain")]

    @backend_errors(sqlite3.Error)
    def client_counts(self, domain: str) -> dict[str, int]:
        return dict(self._read("SELECT client, COUNT(*) FROM samples WHERE domain = ? GROUP BY client",
                               (check_domain(domain),)))

    @backend_errors(sqlite3.Error)
    def purge(self, *, max_age_s: float | None = None, max_per_domain: int | None = None,
              now: float | None = None) -> int:
        check_retention(max_age_s, max_per_domain, now)
        removed = 0
        with self._write() as db:
            if max_age_s is not None:
                cutoff = time_ms((time.time() if now is None else now) - max_age_s)
                removed += db.execute("DELETE FROM samples WHERE filed_ms < ?", (cutoff,)).rowcount
            if max_per_domain is not None:
                over = db.execute("SELECT domain FROM samples GROUP BY domain HAVING COUNT(*) > ?",
                                  (max_per_domain,)).fetchall()
                for (domain,) in over:
                    removed += db.execute(
                        "DELETE FROM samples WHERE rowid IN (SELECT rowid FROM samples WHERE domain = ? "
                        "ORDER BY filed_ms DESC, rowid DESC LIMIT -1 OFFSET ?)", (domain, max_per_domain)).rowcount
        return removed

    def close(self) -> None:
        with self._lock:
            self._db.close()
