"""The shared sample store: one Redis (7.0 or newer) for the service and workers of many hosts.

Keys under ``PREFIX`` (domains cannot hold ``:``, so no two keys collide)::

    PREFIX:sample:<request_id>         hash: domain, client, entry (stream id), meta (JSON), image
    PREFIX:log:<domain>                stream, one entry per sample: rid, client; the entry id is
                                       the filed time (ms) and the order of the domain's log
    PREFIX:clients:<domain>            hash: client -> number of samples
    PREFIX:client:<domain>:<client>    set of the client's request ids (for delete_client)
    PREFIX:domains                     set of the domains that hold samples

A sample's keys change together in one Lua script, so ``add`` is idempotent and atomic and a
delete never leaves a counter, an entry or an image behind. Images stay out of the stream so
that range queries move ids only. Scripts name every key they touch in ``KEYS``; the key layout
still needs one Redis (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from .store import (CapturedSample, InvalidSample, SampleStore, SampleStoreError, backend_errors, check_client,
                    check_domain, check_request_id, check_retention, check_window, redact_url, time_ms)

BATCH = 500  # entries per round trip in bulk deletes and reads
# KEYS: sample, log, clients, client set, domains; ARGV: ms, rid, client, domain, meta, image.
# The entry is filed at max(ms, the log's last id): XADD refuses ids that go back in time.
ADD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local ms = ARGV[1]
if redis.call('EXISTS', KEYS[2]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[2])
    for i = 1, #info, 2 do
        if info[i] == 'last-generated-id' then
            local head = string.match(info[i + 1], '^(%d+)-')
            if tonumber(head) > tonumber(ms) then ms = head end
        end
    end
end
local id = redis.call('XADD', KEYS[2], ms .. '-*', 'rid', ARGV[2], 'client', ARGV[3])
redis.call('HSET', KEYS[1], 'domain', ARGV[4], 'client', ARGV[3], 'entry', id, 'meta', ARGV[5], 'image', ARGV[6])
redis.call('SADD', KEYS[4], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
redis.call('SADD', KEYS[5], ARGV[4])
return id
"""
# KEYS as for ADD; ARGV: entry id, rid, client, domain. Removes the stream entry, and the sample
# with its counters when the sample is still the one filed at that entry; 1 if it removed one.
DELETE = """
redis.call('XDEL', KEYS[2], ARGV[1])
local removed = 0
if redis.call('HGET', KEYS[1], 'entry') == ARGV[1] then
    redis.call('DEL', KEYS[1])
    redis.call('SREM', KEYS[4], ARGV[2])
    if redis.call('HINCRBY', KEYS[3], ARGV[3], -1) <= 0 then redis.call('HDEL', KEYS[3], ARGV[3]) end
    removed = 1
end
if redis.call('XLEN', KEYS[2]) == 0 then redis.call('SREM', KEYS[5], ARGV[4]) end
return removed
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisSampleStore(SampleStore):
    """Samples in the Redis at ``url`` (``redis://host:port/db``, ``rediss://`` for TLS), under
    ``prefix``. Fails at once, naming the URL, when the server cannot be reached."""

    def __init__(self, url: str, prefix: str = "wesam") -> None:
        if not prefix or any(c.isspace() for c in prefix):
            raise InvalidSample(f"Redis key prefix must be non-empty without whitespace, got {prefix!r}")
        self.location = redact_url(url)
        self.prefix = prefix
        try:
            self._r = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=60)
            version = _text(self._r.info("server")["redis_version"])
        except (redis.RedisError, ValueError) as exc:
            raise SampleStoreError(f"cannot reach the Redis sample store at {self.location}: {exc}") from exc
        if int(version.split(".")[0]) < 7:
            self._r.close()
            raise SampleStoreError(f"the Redis at {self.location} is version {version}; the sample store needs 7.0 "
                                   "or newer (stream ids given as <ms>-*)")
        self._add = self._r.register_script(ADD)
        self._delete = self._r.register_script(DELETE)

    def _keys(self, domain: str, client: str, request_id: str) -> list[str]:
        """The KEYS of the ADD and DELETE scripts."""
        p = self.prefix
        return [f"{p}:sample:{request_id}", self._log(domain), f"{p}:clients:{domain}",
                self._client_set(domain, client), f"{p}:domains"]

    def _client_set(self, domain: str, client: str) -> str:
        return f"{self.prefix}:client:{domain}:{client}"

    def _log(self, domain: str) -> str:
        return f"{self.prefix}:log:{domain}"

    @backend_errors(redis.RedisError)
    def add(self, sample: CapturedSample) -> bool:
        if not isinstance(sample, CapturedSample):
            raise InvalidSample(f"expected a CapturedSample, got {type(sample).__name__}")
        keys = self._keys(sample.domain, sample.client, sample.request_id)
        args = [time_ms(sample.created), sample.request_id, sample.client, sample.domain, sample.to_json(),
                sample.image]
        return self._add(keys=keys, args=args) is not None

    @backend_errors(redis.RedisError)
    def get(self, request_id: str) -> CapturedSample | None:
        meta, image = self._r.hmget(f"{self.prefix}:sample:{check_request_id(request_id)}", "meta", "image")
        return None if meta is None else CapturedSample.from_json(meta, image)

    @backend_errors(redis.RedisError)
    def delete(self, request_id: str) -> bool:
        key = f"{self.prefix}:sample:{check_request_id(request_id)}"
        while True:  # again if the sample was replaced between the read and the script
            domain, client, entry = self._r.hmget(key, "domain", "client", "entry")
            if entry is None:
                return False
            domain, client = _text(domain), _text(client)
            if self._delete(keys=self._keys(domain, client, request_id), args=[entry, request_id, client, domain]):
                return True

    def _delete_entries(self, domain: str, entries: Iterable[tuple[bytes, str, str]]) -> int:
        """Delete (entry id, request id, client) triples of ``domain``'s log in one round trip."""
        pipe = self._r.pipeline(transaction=False)
        for entry, rid, client in entries:
            self._delete(keys=self._keys(domain, client, rid), args=[entry, rid, client, domain], client=pipe)
        return sum(pipe.execute())

    @backend_errors(redis.RedisError)
    def delete_client(self, domain: str, client: str) -> int:
        rids = [_text(r) for r in self._r.smembers(self._client_set(check_domain(domain), check_client(client)))]
        removed = 0
        for start in range(0, len(rids), BATCH):
            chunk = rids[start:start + BATCH]
            pipe = self._r.pipeline(transaction=False)
            for rid in chunk:
                pipe.hget(f"{self.prefix}:sample:{rid}", "entry")
            entries = zip(pipe.execute(), chunk, strict=True)
            removed += self._delete_entries(domain, [(e, rid, client) for e, rid in entries if e is not None])
        return removed

    @backend_errors(redis.RedisError)
    def samples(self, domain: str, *, since: float | None = None, until: float | None = None,
                limit: int | None = None, newest_first: bool = False) -> list[CapturedSample]:
        check_domain(domain)
        check_window(since, until, limit)
        lo = None if since is None else max(time_ms(since), 0)
        hi = None if until is None else time_ms(until)  # exclusive
        if limit == 0 or (hi is not None and hi <= (lo or 0)):
            return []
        first = "-" if lo is None else str(lo)
        last = "+" if hi is None else str(hi - 1)  # an id without "-seq" ends at that ms's last entry
        if newest_first:
            entries = self._r.xrevrange(self._log(domain), max=last, min=first, count=limit)
        else:
            entries = self._r.xrange(self._log(domain), min=first, max=last, count=limit)
        out: list[CapturedSample] = []
        for start in range(0, len(entries), BATCH):
            pipe = self._r.pipeline(transaction=False)
            for _, fields in entries[start:start + BATCH]:
                pipe.hmget(f"{self.prefix}:sample:{_text(fields[b'rid'])}", "meta", "image")
            # a sample deleted since the range was read is left out
            out += [CapturedSample.from_json(meta, image) for meta, image in pipe.execute() if meta is not None]
        return out

    @backend_errors(redis.RedisError)
    def count(self, domain: str | None = None) -> int:
        if domain is not None:
            return self._r.xlen(self._log(check_domain(domain)))
        pipe = self._r.pipeline(transaction=False)
        for d in self.domains():
            pipe.xlen(self._log(d))
        return sum(pipe.execute())

    @backend_errors(redis.RedisError)
    def domains(self) -> list[str]:
        return sorted(_text(d) for d in self._r.smembers(f"{self.prefix}:domains"))

    @backend_errors(redis.RedisError)
    def client_counts(self, domain: str) -> dict[str, int]:
        counts = self._r.hgetall(f"{self.prefix}:clients:{check_domain(domain)}")
        return {_text(c): int(n) for c, n in counts.items()}

    def _oldest(self, domain: str, before_ms: int | None, count: int) -> list[tuple[bytes, str, str]]:
        """Up to ``count`` of ``domain``'s oldest entries, only those filed before ``before_ms`` if given."""
        if before_ms is not None and before_ms <= 0:
            return []
        last = "+" if before_ms is None else str(before_ms - 1)
        return [(entry, _text(f[b"rid"]), _text(f[b"client"]))
                for entry, f in self._r.xrange(self._log(domain), min="-", max=last, count=count)]

    @backend_errors(redis.RedisError)
    def purge(self, *, max_age_s: float | None = None, max_per_domain: int | None = None,
              now: float | None = None) -> int:
        check_retention(max_age_s, max_per_domain, now)
        cutoff = None if max_age_s is None else time_ms((time.time() if now is None else now) - max_age_s)
        removed = 0
        for domain in self.domains():
            if cutoff is not None:
                while entries := self._oldest(domain, cutoff, BATCH):
                    removed += self._delete_entries(domain, entries)
            if max_per_domain is not None:
                while (excess := self._r.xlen(self._log(domain)) - max_per_domain) > 0:
                    removed += self._delete_entries(domain, self._oldest(domain, None, min(excess, BATCH)))
        return removed

    def close(self) -> None:
        self._r.close()
