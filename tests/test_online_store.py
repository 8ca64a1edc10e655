"""The captured-sample store: one behavioural suite run against SQLite and a real redis-server."""

from __future__ import annotations

import io
import math
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from wesam.adapters.online import CapturedSample, InvalidSample, SampleStore, SampleStoreError, open_store
from wesam.adapters.online.store_redis import RedisSampleStore
from wesam.adapters.online.store_sqlite import SCHEMA_VERSION, SqliteSampleStore
from wesam.errors import WesamError

REDIS_SERVER = shutil.which("redis-server")


def _image(seed: int = 0, size: int = 32, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


PNG = _image()


def _sample(rid: str, created: float, domain: str = "polyp", client: str = "alice", **kw) -> CapturedSample:
    fields = dict(request_id=rid, domain=domain, client=client, created=created, image=PNG, image_size=(480, 640),
                  prompts={"boxes": [[1.0, 2.0, 30.0, 40.0]]}, adapter="polyp@v3",
                  mask_rle={"size": [32, 32], "counts": "PPYo0"}, score=0.87)
    fields.update(kw)
    return CapturedSample(**fields)


def _ids(samples: list[CapturedSample]) -> list[str]:
    return [s.request_id for s in samples]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real, throwaway redis-server on a free port (no persistence), stopped at the end."""
    assert REDIS_SERVER is not None
    folder = tmp_path_factory.mktemp("redis")
    port = _free_port()
    with open(folder / "redis.log", "wb") as log:
        proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(folder)], stdout=log, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    try:
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("redis-server did not answer PING: " + (folder / "redis.log").read_text()[-2000:])
                time.sleep(0.05)
        yield port
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server; CI installs it)"))])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty store of each backend."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'samples.db'}"
    port = request.getfixturevalue("redis_port")
    with redis.Redis(port=port) as r:
        r.flushdb()
    return f"redis://127.0.0.1:{port}/0"


@pytest.fixture()
def store(store_url: str) -> Iterator[SampleStore]:
    with open_store(store_url) as s:
        yield s


# -- the shared behaviour, both backends


def test_round_trip_with_real_images(store: SampleStore) -> None:
    big = _sample("big", 1000.0, image=_image(1, size=384))  # ~440 kB of noise
    jpeg = _sample("jpeg", 1001.0, image=_image(2, fmt="JPEG"), adapter=None, mask_rle=None, score=None,
                   prompts={"points": [[3, 4], [5, 6]], "point_labels": [1, 0]})
    assert store.add(big) and store.add(jpeg)
    for want in (big, jpeg):
        got = store.get(want.request_id)
        assert got == want and got.image == want.image
        assert Image.open(io.BytesIO(got.image)).size in ((384, 384), (32, 32))
    assert store.get("missing") is None
    assert store.count() == 2 and store.domains() == ["polyp"]


def test_add_is_idempotent(store: SampleStore) -> None:
    first = _sample("r1", 1000.0)
    assert store.add(first) is True
    assert store.add(first) is False
    assert store.add(_sample("r1", 2000.0, client="bob", domain="skin")) is False  # the id decides
    assert store.get("r1") == first
    assert store.count() == 1 and store.domains() == ["polyp"] and store.client_counts("polyp") == {"alice": 1}
    assert _ids(store.samples("polyp")) == ["r1"]


def test_delete_and_delete_client(store: SampleStore) -> None:
    for i, client in enumerate(["alice", "bob", "alice", "carol"]):
        store.add(_sample(f"p{i}", 1000.0 + i, client=client))
    store.add(_sample("s0", 1000.0, domain="skin", client="alice"))
    assert store.delete("p1") is True and store.delete("p1") is False and store.get("p1") is None
    assert store.client_counts("polyp") == {"alice": 2, "carol": 1}
    assert store.delete_client("polyp", "alice") == 2
    assert store.delete_client("polyp", "alice") == 0 and store.delete_client("polyp", "nobody") == 0
    assert _ids(store.samples("polyp")) == ["p3"] and store.client_counts("polyp") == {"carol": 1}
    assert _ids(store.samples("skin")) == ["s0"]  # the same client in another domain is kept
    assert store.delete("s0") and store.domains() == ["polyp"] and store.client_counts("skin") == {}
    # a deleted id can be captured again
    assert store.add(_sample("p1", 2000.0, client="dave")) and store.get("p1").client == "dave"


def test_time_windows_in_both_orders(store: SampleStore) -> None:
    for i in range(10):
        store.add(_sample(f"r{i}", 1000.0 + i, client="alice" if i % 2 else "bob"))
    store.add(_sample("tie", 1009.0))  # same millisecond as r9: after it, in insertion order
    assert _ids(store.samples("polyp")) == [f"r{i}" for i in range(10)] + ["tie"]
    assert _ids(store.samples("polyp", newest_first=True)) == ["tie"] + [f"r{i}" for i in range(9, -1, -1)]
    assert _ids(store.samples("polyp", since=1003, until=1007)) == ["r3", "r4", "r5", "r6"]  # until excluded
    assert _ids(store.samples("polyp", since=1003, until=1007, newest_first=True)) == ["r6", "r5", "r4", "r3"]
    assert _ids(store.samples("polyp", since=1003, until=1007, limit=2)) == ["r3", "r4"]
    assert _ids(store.samples("polyp", since=1003, until=1007, limit=2, newest_first=True)) == ["r6", "r5"]
    assert _ids(store.samples("polyp", since=1008.5)) == ["r9", "tie"]
    assert _ids(store.samples("polyp", until=1001.5, newest_first=True)) == ["r1", "r0"]
    assert _ids(store.samples("polyp", limit=3, newest_first=True)) == ["tie", "r9", "r8"]
    assert store.samples("polyp", since=1005, until=1005) == [] and store.samples("polyp", since=1006, until=1004) == []
    assert store.samples("polyp", limit=0) == [] and store.samples("other") == []
    # paging with since=<previous until> sees every sample exactly once
    pages = [store.samples("polyp", since=t, until=t + 3) for t in range(1000, 1012, 3)]
    assert sorted(s.request_id for page in pages for s in page) == sorted([f"r{i}" for i in range(10)] + ["tie"])


def test_a_late_sample_is_filed_at_its_domains_newest_time(store: SampleStore) -> None:
    store.add(_sample("a", 1000.0))
    store.add(_sample("b", 2000.0))
    store.add(_sample("late", 1500.0))  # captured before b, stored after it
    assert store.get("late").created == 1500.0
    assert _ids(store.samples("polyp")) == ["a", "b", "late"]
    assert _ids(store.samples("polyp", until=1800)) == ["a"]
    assert _ids(store.samples("polyp", since=2000)) == ["b", "late"]
    # the log never goes back, even after its newest samples are deleted
    assert store.delete("b") and store.delete("late")
    store.add(_sample("later", 1200.0))
    assert _ids(store.samples("polyp", since=2000)) == ["later"]
    assert store.purge(max_age_s=100, now=2050) == 1 and _ids(store.samples("polyp")) == ["later"]
    # another domain has its own log
    store.add(_sample("s", 1200.0, domain="skin"))
    assert _ids(store.samples("skin", until=1300)) == ["s"]


def test_counts_domains_and_clients(store: SampleStore) -> None:
    assert store.count() == 0 and store.domains() == [] and store.client_counts("polyp") == {}
    for i in range(5):
        store.add(_sample(f"p{i}", 1000.0 + i, client=["alice", "bob"][i % 2]))
    for i in range(3):
        store.add(_sample(f"s{i}", 1000.0 + i, domain="skin-2", client="carol"))
    assert store.count() == 8 and store.count("polyp") == 5 and store.count("skin-2") == 3 and store.count("x") == 0
    assert store.domains() == ["polyp", "skin-2"]
    assert store.client_counts("polyp") == {"alice": 3, "bob": 2} and store.client_counts("skin-2") == {"carol": 3}


def test_purge_by_age_then_by_count(store: SampleStore) -> None:
    for i in range(10):
        store.add(_sample(f"p{i}", 1000.0 + i, client=["alice", "bob"][i % 2]))
        store.add(_sample(f"s{i}", 1000.0 + i, domain="skin", client="carol"))
    assert store.purge() == 0 and store.count() == 20
    assert store.purge(max_age_s=5, now=1010.0) == 10  # created before 1005.0
    assert _ids(store.samples("polyp")) == [f"p{i}" for i in range(5, 10)]
    assert store.purge(max_age_s=5, now=1010.0) == 0
    assert store.purge(max_per_domain=3) == 4
    assert _ids(store.samples("polyp")) == ["p7", "p8", "p9"] and _ids(store.samples("skin")) == ["s7", "s8", "s9"]
    assert store.client_counts("polyp") == {"bob": 2, "alice": 1} and store.client_counts("skin") == {"carol": 3}
    # both at once: the age first, then the count
    assert store.purge(max_age_s=1.5, max_per_domain=1, now=1009.0) == 4
    assert _ids(store.samples("polyp")) == ["p9"] and store.count() == 2
    assert store.purge(max_per_domain=0) == 2 and store.count() == 0 and store.domains() == []
    assert store.client_counts("polyp") == {}
    # without `now`, the age is measured from the clock
    store.add(_sample("old", time.time() - 3600))
    store.add(_sample("new", time.time()))
    assert store.purge(max_age_s=60) == 1 and _ids(store.samples("polyp")) == ["new"]


def test_two_connections_see_each_others_writes(store: SampleStore, store_url: str) -> None:
    with open_store(store_url) as other:
        assert store.add(_sample("r1", 1000.0))
        assert other.get("r1") == store.get("r1") and other.count("polyp") == 1
        assert other.add(_sample("r1", 1000.0)) is False
        assert other.add(_sample("r2", 1001.0, client="bob"))
        assert _ids(store.samples("polyp")) == ["r1", "r2"]
        assert other.delete_client("polyp", "alice") == 1
        assert store.get("r1") is None and store.client_counts("polyp") == {"bob": 1}


def test_concurrent_adds_of_the_same_ids_store_each_once(store: SampleStore, store_url: str) -> None:
    samples = [_sample(f"r{i}", 1000.0 + i) for i in range(40)]
    results: list[bool] = []
    with open_store(store_url) as other:
        def add_all(s: SampleStore) -> None:
            results.extend(s.add(x) for x in samples)

        threads = [threading.Thread(target=add_all, args=(s,)) for s in (store, other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sum(results) == 40 and len(results) == 80
    assert store.count() == 40 and store.client_counts("polyp") == {"alice": 40}
    assert _ids(store.samples("polyp")) == [f"r{i}" for i in range(40)]


WRITER = """
import sys
from pathlib import Path
from wesam.adapters.online import CapturedSample, open_store

url, image, n = sys.argv[1], Path(sys.argv[2]).read_bytes(), int(sys.argv[3])
with open_store(url) as store:
    for i in range(n):
        sample = CapturedSample(f"remote-{i}", "remote", f"c{i % 3}", 5000.0 + i, image, (64, 64),
                                {"points": [[1, 2]], "point_labels": [1]})
        assert store.add(sample)
"""


def test_another_process_writes_while_we_read_and_write(store: SampleStore, store_url: str, tmp_path: Path) -> None:
    n = 150
    (tmp_path / "image.png").write_bytes(PNG)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, store_url, str(tmp_path / "image.png"), str(n)],
                              stderr=subprocess.PIPE, text=True)
    seen, local = 0, 0
    while writer.poll() is None:  # read and write while the other process writes
        count = store.count("remote")
        assert seen <= count <= n
        seen = count
        newest = store.samples("remote", newest_first=True, limit=3)
        assert [s.created for s in newest] == sorted((s.created for s in newest), reverse=True)
        assert store.add(_sample(f"local-{local}", 1000.0 + local))
        local += 1
    assert writer.wait(timeout=120) == 0, writer.stderr.read()[-3000:]
    assert store.count("remote") == n and store.count("polyp") == local and store.count() == n + local
    assert _ids(store.samples("remote")) == [f"remote-{i}" for i in range(n)]
    assert store.client_counts("remote") == {"c0": 50, "c1": 50, "c2": 50}


def test_bad_arguments_are_refused(store: SampleStore) -> None:
    bad_calls = [lambda: store.samples("not a domain"), lambda: store.samples("polyp", limit=-1),
                 lambda: store.samples("polyp", since=math.nan), lambda: store.samples("polyp", until="soon"),
                 lambda: store.get(""), lambda: store.delete("x" * 300), lambda: store.delete_client("polyp", ""),
                 lambda: store.delete_client("a:b", "alice"), lambda: store.count("a b"),
                 lambda: store.client_counts(""), lambda: store.purge(max_age_s=-1),
                 lambda: store.purge(max_per_domain=1.5), lambda: store.purge(max_age_s=1, now=math.inf),
                 lambda: store.add({"request_id": "r1"})]
    for call in bad_calls:
        with pytest.raises(InvalidSample) as err:
            call()
        assert err.value.kind == "invalid_argument"
    assert store.count() == 0


# -- the record


def test_sample_validation() -> None:
    cases = {
        "request_id": dict(request_id=""),
        "client": dict(client="line\nbreak"),
        "domain": dict(domain="polyp@v3"),
        "created": dict(created=math.inf),
        "unix seconds": dict(created=-1.0),
        "image must be": dict(image=b"\x00raw pixels"),
        "image_size": dict(image_size=(480,)),
        "prompts must be a dict": dict(prompts=[[1, 2, 3, 4]]),
        "prompts must be JSON": dict(prompts={"boxes": np.zeros((1, 4))}),
        "adapter": dict(adapter="polyp@3"),
        "mask_rle['counts']": dict(mask_rle={"size": [32, 32], "counts": b"PPYo0"}),
        "mask_rle['size']": dict(mask_rle={"size": [32], "counts": "PPYo0"}),
        "score": dict(score=float("nan")),
    }
    for needle, change in cases.items():
        with pytest.raises(InvalidSample) as err:
            _sample(**{"rid": "r1", "created": 1000.0, **change})
        assert needle in str(err.value), (needle, str(err.value))
        assert isinstance(err.value, WesamError) and isinstance(err.value, ValueError)
    # numpy numbers and lists are normalised
    s = _sample("r1", np.float64(1000.5), image_size=[np.int64(480), 640], score=np.float32(0.5))
    assert s.image_size == (480, 640) and type(s.created) is float and s.score == 0.5 and type(s.score) is float
    assert "image" not in repr(s).replace("image_size", "")


def test_json_round_trip_without_the_image() -> None:
    s = _sample("r1", 1000.25)
    text = s.to_json()
    assert "image\"" not in text and '"image_size":[480,640]' in text
    assert CapturedSample.from_json(text, PNG) == s
    assert CapturedSample.from_dict({**s.to_dict(), "added_later": 1}, PNG) == s
    with pytest.raises(InvalidSample, match="lacks the field 'client'"):
        CapturedSample.from_dict({k: v for k, v in s.to_dict().items() if k != "client"}, PNG)
    with pytest.raises(InvalidSample, match="not JSON"):
        CapturedSample.from_json("{", PNG)
    with pytest.raises(InvalidSample, match="JSON object"):
        CapturedSample.from_json("[1]", PNG)


# -- opening stores


def test_open_store_urls(tmp_path: Path) -> None:
    with open_store(str(tmp_path / "plain.db")) as a, open_store(f"sqlite://{tmp_path}/nested/url.db") as b:
        assert isinstance(a, SqliteSampleStore) and isinstance(b, SqliteSampleStore)
        assert b.location == str(tmp_path / "nested" / "url.db")
    for url, needle in [("sqlite://relative.db", "absolute path"), ("ftp://host/x", "unsupported"),
                        ("", "non-empty"), ("postgres://u:secret@db/x", "unsupported")]:
        with pytest.raises(SampleStoreError, match=needle) as err:
            open_store(url)
        assert err.value.kind == "config" and "secret" not in str(err.value)
    missing = tmp_path / "missing.db"
    with pytest.raises(SampleStoreError, match="no sample store"):
        open_store(str(missing), create=False)
    assert not missing.exists()
    with open_store(f"sqlite://{tmp_path}/plain.db", create=False) as c:  # an existing store opens
        assert c.location == str(tmp_path / "plain.db")


def test_unreachable_redis_is_a_clear_error() -> None:
    port = _free_port()  # nothing listens there
    with pytest.raises(SampleStoreError, match=f"cannot reach the Redis sample store at redis://127.0.0.1:{port}/0"):
        open_store(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(SampleStoreError) as err:
        open_store(f"redis://user:hunter2@127.0.0.1:{port}/0")
    assert "hunter2" not in str(err.value) and f"redis://127.0.0.1:{port}/0" in str(err.value)
    assert not isinstance(err.value, InvalidSample) and isinstance(err.value, WesamError)


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)")
def test_redis_prefixes_keep_stores_apart(redis_port: int) -> None:
    url = f"redis://127.0.0.1:{redis_port}/1"
    with RedisSampleStore(url, prefix="a") as a, RedisSampleStore(url, prefix="b") as b:
        a.add(_sample("r1", 1000.0))
        assert b.get("r1") is None and b.count() == 0 and b.add(_sample("r1", 1000.0))
        assert a.delete("r1") and b.get("r1") is not None
        b.delete("r1")
    with pytest.raises(InvalidSample, match="prefix"):
        RedisSampleStore(url, prefix="")


def test_sqlite_file_is_wal_versioned_and_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "samples.db"
    with open_store(str(path)) as s:
        s.add(_sample("r1", 1000.0))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SampleStoreError, match="newer than this wesam's"):
        open_store(str(path))
    (tmp_path / "folder.db").mkdir()
    with pytest.raises(SampleStoreError, match="folder.db"):
        open_store(str(tmp_path / "folder.db"))
