"""Capture of served requests for online self-training (service/capture.py): request identity, the
decisions on the request path (domains, opt-out, sampling, caps, bounded queue), the sample written
by the capture thread (downscaled image, prompts and masks in its frame), administration, the
`wesam capture` command, and one real `wesam serve` process over HTTP and gRPC."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_support import encode, make_base, make_image, publish_adapter

from wesam.adapters.online import SampleStoreError, open_store
from wesam.adapters.online.store_sqlite import SqliteSampleStore
from wesam.service import codec
from wesam.service.capture import (ANONYMOUS, Capture, RequestMeta, RollingCaps, grpc_metadata, request_meta,
                                   resize_image, resize_mask, sampled, stored_size)
from wesam.service.config import ConfigError, ServeConfig
from wesam.service.errors import ServiceError
from wesam.service.messages import InferItem, InferResult
from wesam.service.prompts import validate_prompts

TOKEN = "capture-admin-token"
CONFIG = ServeConfig(registry=None, capture_store="/unused.db", capture_domains=("polyp",), capture_rate=1.0)


class Clock:
    """Injected unix time."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _capture(tmp_path: Path, clock: Clock | None = None, start: bool = False, store=None, **over) -> Capture:
    config = dataclasses.replace(CONFIG, capture_store=str(tmp_path / "samples.db"), **over)
    store = store if store is not None else SqliteSampleStore(tmp_path / "samples.db")
    return Capture(config, img_size=64, store=store, clock=clock or Clock(), start=start)


def _served(rid: str | None = "r1", *, domain: str | None = "polyp", client: str | None = "alice",
            capture: bool = True, image: np.ndarray | None = None, boxes=((8, 6, 50, 40),), points=None,
            labels=None, multimask: bool = False, masks: np.ndarray | None = None,
            scores: np.ndarray | None = None) -> tuple[InferItem, InferResult]:
    """A served request as the engine holds it after answering: the item and its result."""
    image = make_image() if image is None else image
    prompts = validate_prompts(CONFIG, boxes=None if boxes is None else [list(b) for b in boxes], points=points,
                               point_labels=labels)
    n, m = prompts.count(), 3 if multimask else 1
    if masks is None:
        masks = np.zeros((n, m) + image.shape[:2], bool)
        masks[..., 10:30, 12:40] = True
    if scores is None:
        scores = np.full((n, m), 0.5, np.float32)
    item = InferItem(image=image, domain=domain, prompts=prompts, multimask=multimask, request_id=rid,
                     client=client, capture=capture)
    result = InferResult(image_id="x", adapter=f"{domain}@v1" if domain else "base", domain=domain,
                         image_size=image.shape[:2], masks=masks, scores=scores)
    return item, result


# -- request identity ----------------------------------------------------------------------------------

def test_request_meta_from_headers_and_grpc_metadata() -> None:
    from starlette.datastructures import Headers

    m = request_meta(Headers({"X-Request-Id": " abc-123 ", "X-Wesam-Client": "clinic-7", "X-Wesam-Capture": "OFF"}))
    assert m == RequestMeta("abc-123", "clinic-7", False)
    for bad in ("has spaces", "a/b", "x" * 200, "", "-leading", "ünïcode"):
        m = request_meta(Headers({"x-request-id": bad, "x-wesam-client": bad}))
        assert m.request_id != bad.strip() and uuid.UUID(m.request_id) and m.client == ANONYMOUS and m.capture
    assert request_meta({}, fallback_id="kserve-7").request_id == "kserve-7"
    assert request_meta({"x-request-id": "meta-1"}, fallback_id="kserve-7").request_id == "meta-1"
    assert request_meta({"x-wesam-capture": "on"}).capture and not request_meta({"x-wesam-capture": "no"}).capture

    class Context:  # what grpc.ServicerContext.invocation_metadata() gives: (key, value) pairs
        def invocation_metadata(self):
            return (("x-request-id", "g-1"), ("x-wesam-client", "c"), ("x-wesam-capture", "off"),
                    ("blob-bin", b"\x00"))

    assert request_meta(grpc_metadata(Context())) == RequestMeta("g-1", "c", False)


# -- decisions on the request path --------------------------------------------------------------------

def test_sampling_is_a_deterministic_function_of_the_request_id(tmp_path: Path) -> None:
    ids = [f"req-{i}" for i in range(4000)]
    kept = [i for i in ids if sampled(i, 0.25)]
    assert 0.22 < len(kept) / len(ids) < 0.28
    assert kept == [i for i in ids if sampled(i, 0.25)]  # the same answer every time
    assert {i for i in ids if sampled(i, 0.1)} <= set(kept)  # a lower rate keeps a subset
    assert all(sampled(i, 1.0) for i in ids[:50]) and not any(sampled(i, 0.0) for i in ids[:50])
    # two replicas (two Capture objects, two stores) make the same decisions
    a = _capture(tmp_path / "a", capture_rate=0.5)
    b = _capture(tmp_path / "b", capture_rate=0.5)
    outcomes = [(a.offer(*_served(f"q{i}")), b.offer(*_served(f"q{i}"))) for i in range(40)]
    assert all(x == y for x, y in outcomes) and {x for x, _ in outcomes} == {"queued", "sampled_out"}


def test_domains_opt_out_caps_and_the_rolling_hour(tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    from wesam.service.metrics import get_metrics

    def metric(outcome: str, domain: str = "polyp") -> float:
        return REGISTRY.get_sample_value("wesam_capture_total", {"domain": domain, "outcome": outcome}) or 0.0

    clock = Clock()
    cap = _capture(tmp_path, clock, capture_domain_cap=4, capture_client_cap=2, capture_queue=100)
    cap.metrics = get_metrics()
    before = {o: metric(o) for o in ("stored", "capped_client", "capped_domain", "opted_out")}
    assert cap.offer(*_served("s1", domain="skin")) == "domain_off"
    assert cap.offer(*_served("b1", domain=None)) == "domain_off"  # base only when listed as `base`
    assert cap.offer(*_served("o1", capture=False)) == "opted_out"
    item, res = _served("u1")
    item.image = None  # an image_id follow-up: no image to keep
    assert cap.offer(item, res) == "unsupported"
    item, res = _served("u2")
    item.prompts.mask_logits = np.zeros((1, 1, 16, 16), np.float32)  # a mask prompt cannot be replayed
    assert cap.offer(item, res) == "unsupported"
    got = [cap.offer(*_served(f"c{i}", client=c)) for i, c in enumerate("aaabbc")]
    assert got == ["queued", "queued", "capped_client", "queued", "queued", "capped_domain"]
    clock.now += 3599  # still inside the hour
    assert cap.offer(*_served("late", client="d")) == "capped_domain"
    clock.now += 2  # the first samples left the window
    assert cap.offer(*_served("next", client="a")) == "queued"
    assert cap.drain() == 5
    store = cap.store()
    assert store.count("polyp") == 5 and store.client_counts("polyp") == {"a": 3, "b": 2}
    assert store.get("next").created == clock.now and store.get("c0").created == clock.now - 3601
    stats = cap.stats()
    assert stats["samples"] == {"polyp": 5} and stats["queue"]["depth"] == 0
    assert stats["outcomes"]["polyp"] == {"stored": 5, "capped_client": 1, "capped_domain": 2, "opted_out": 1,
                                          "unsupported": 2}
    assert stats["outcomes"]["skin"] == {"domain_off": 1} and stats["outcomes"]["base"] == {"domain_off": 1}
    assert metric("stored") - before["stored"] == 5 and metric("capped_domain") - before["capped_domain"] == 2
    assert metric("opted_out") - before["opted_out"] == 1 and metric("domain_off", "skin") >= 1
    assert REGISTRY.get_sample_value("wesam_capture_queue_depth") == 0


def test_caps_forget_quiet_clients() -> None:
    caps = RollingCaps(domain_cap=0, client_cap=1, window=10)
    for i in range(100):
        assert caps.check("polyp", f"c{i}", 0.0) is None
        caps.record("polyp", f"c{i}", 0.0)
    assert caps.check("polyp", "c5", 5.0) == "capped_client"
    assert caps.check("polyp", "new", 100.0) is None and len(caps._clients) == 0 and not caps._domains


def test_base_is_captured_only_when_listed(tmp_path: Path) -> None:
    cap = _capture(tmp_path, capture_domains=("base",))
    assert cap.offer(*_served("b1", domain=None)) == "queued"
    assert cap.offer(*_served("p1", domain="polyp")) == "domain_off"
    cap.drain()
    sample = cap.store().get("b1")
    assert sample.domain == "base" and sample.adapter is None


class BlockingStore(SqliteSampleStore):
    """A real SQLite store whose ``add`` waits until the test lets it go."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered = threading.Event()
        self.release = threading.Event()

    def add(self, sample):
        self.entered.set()
        assert self.release.wait(30), "the test never released the store"
        return super().add(sample)


def test_a_full_queue_drops_without_blocking(tmp_path: Path) -> None:
    store = BlockingStore(tmp_path / "blocking.db")
    cap = _capture(tmp_path, store=store, start=True, capture_queue=2)
    try:
        assert cap.offer(*_served("q0")) == "queued"
        assert store.entered.wait(10)  # the thread holds q0 inside store.add
        assert [cap.offer(*_served(f"q{i}")) for i in (1, 2)] == ["queued", "queued"]
        t0 = time.perf_counter()
        assert [cap.offer(*_served(f"q{i}")) for i in (3, 4)] == ["queue_full", "queue_full"]
        assert time.perf_counter() - t0 < 1.0  # answered at once while the store is stuck
        assert cap.stats()["queue"]["depth"] == 2
    finally:
        store.release.set()
    assert cap.flush(timeout=30)
    assert sorted(s.request_id for s in store.samples("polyp")) == ["q0", "q1", "q2"]
    assert cap.outcomes[("polyp", "queue_full")] == 2 and cap.outcomes[("polyp", "stored")] == 3
    cap.close()
    assert cap._thread is None
    assert cap.offer(*_served("after-close")) == "queue_full"  # a closed capture admits nothing


def test_the_queue_is_bounded_in_bytes_too(tmp_path: Path) -> None:
    # one request holds 48*64*3 + 48*64 bytes; the budget fits one
    cap = _capture(tmp_path, capture_queue_mb=15_000 / 2**20)
    assert cap.offer(*_served("a")) == "queued" and cap.offer(*_served("b")) == "queue_full"
    cap.drain()
    assert cap.offer(*_served("c")) == "queued"


def test_store_failures_are_counted_not_raised(tmp_path: Path) -> None:
    config = dataclasses.replace(CONFIG, capture_store=str(tmp_path / "not-a-dir" / "x.db"))
    (tmp_path / "not-a-dir").write_text("a file where the store's folder should be")
    cap = Capture(config, img_size=64, start=False)
    assert cap.offer(*_served("e1")) == "queued"
    assert cap.drain() == 1 and cap.outcomes[("polyp", "error")] == 1
    stats = cap.stats()
    assert stats["store_error"] and stats["samples"] == {} and stats["queue"]["depth"] == 0
    with pytest.raises(SampleStoreError):  # an admin delete says the store is unavailable (503)
        cap.delete("e1")


# -- the stored sample ------------------------------------------------------------------------------

def _rle_mask(rle: dict) -> np.ndarray:
    return codec.rle_decode(rle)


def test_downscaled_image_prompts_and_masks_round_trip(tmp_path: Path) -> None:
    h, w = 150, 200  # stored at 48 x 64 (the longest side brought to img_size = 64)
    image = make_image(h, w, seed=3)
    yy, xx = np.mgrid[:h, :w]
    best = ((yy - 75) / 40.0) ** 2 + ((xx - 90) / 60.0) ** 2 <= 1  # an ellipse
    masks = np.stack([np.zeros((h, w), bool), best, np.ones((h, w), bool)])[None]
    scores = np.array([[0.2, 0.9, 0.5]], np.float32)
    cap = _capture(tmp_path, capture_format="png")
    item, res = _served("rt", image=image, boxes=[(20, 30, 160, 120)], points=[[90, 75]], labels=[1],
                        multimask=True, masks=masks, scores=scores)
    assert cap.offer(item, res) == "queued" and cap.drain() == 1
    s = cap.store().get("rt")
    assert stored_size(h, w, 64) == (48, 64) and s.image_size == (h, w)
    assert (s.domain, s.client, s.adapter) == ("polyp", "alice", "polyp@v1")
    pixels = np.asarray(Image.open(io.BytesIO(s.image)))
    assert pixels.shape == (48, 64, 3)
    np.testing.assert_array_equal(pixels, resize_image(image, (48, 64)))  # PNG: lossless
    sx, sy = 64 / w, 48 / h
    np.testing.assert_allclose(s.prompts["boxes"], [[20 * sx, 30 * sy, 160 * sx, 120 * sy]], atol=1e-3)
    np.testing.assert_allclose(s.prompts["points"], [[90 * sx, 75 * sy]], atol=1e-3)
    assert s.prompts["point_labels"] == [1] and s.prompts["multimask"] is True
    # the best-scored mask of the multimask answer is the one kept, at the stored size
    stored = _rle_mask(s.mask_rle)
    assert s.mask_rle["size"] == [48, 64] and s.score == pytest.approx(0.9)
    np.testing.assert_array_equal(stored, resize_mask(best, (48, 64)))
    assert s.prompts["masks"] == [s.mask_rle] and s.prompts["scores"] == [pytest.approx(0.9)]
    # resized back to the original size it is the served mask, but for the border
    back = np.asarray(Image.fromarray(stored.astype(np.uint8)).resize((w, h), Image.NEAREST)).astype(bool)
    assert (back & best).sum() / (back | best).sum() > 0.95


def test_several_prompts_jpeg_and_small_images(tmp_path: Path) -> None:
    image = make_image(40, 50, seed=4)  # smaller than the model's input: kept as it is, not enlarged
    masks = np.zeros((2, 1, 40, 50), bool)
    masks[0, 0, 2:10, 3:12] = True
    masks[1, 0, 20:35, 30:45] = True
    cap = _capture(tmp_path)  # JPEG by default
    item, res = _served("two", image=image, boxes=[(2, 2, 12, 10), (30, 20, 45, 35)], masks=masks,
                        scores=np.array([[0.4], [0.8]], np.float32))
    assert cap.offer(item, res) == "queued" and cap.drain() == 1
    s = cap.store().get("two")
    assert s.image[:3] == b"\xff\xd8\xff" and np.asarray(Image.open(io.BytesIO(s.image))).shape == (40, 50, 3)
    assert s.prompts["boxes"] == [[2, 2, 12, 10], [30, 20, 45, 35]] and "points" not in s.prompts
    per_prompt = [_rle_mask(r) for r in s.prompts["masks"]]
    np.testing.assert_array_equal(np.stack(per_prompt), masks[:, 0])
    np.testing.assert_array_equal(_rle_mask(s.mask_rle), masks[0, 0] | masks[1, 0])  # their union
    assert s.prompts["scores"] == [pytest.approx(0.4), pytest.approx(0.8)] and s.score == pytest.approx(0.6)


# -- deletion and retention ---------------------------------------------------------------------------

def test_deletes_reach_queued_samples_and_unknown_ids_are_404(tmp_path: Path) -> None:
    cap = _capture(tmp_path)
    for rid, client in (("keep", "alice"), ("gone", "alice"), ("b1", "bob"), ("b2", "bob")):
        assert cap.offer(*_served(rid, client=client)) == "queued"
    assert cap.delete("gone") == {"request_id": "gone", "deleted": False, "cancelled": True}
    assert cap.delete_client("polyp", "bob") == {"domain": "polyp", "client": "bob", "deleted": 0, "cancelled": 2}
    assert cap.drain() == 4
    assert [s.request_id for s in cap.store().samples("polyp")] == ["keep"]
    assert cap.outcomes[("polyp", "cancelled")] == 3
    # bob's later requests are captured again: a deletion is not an opt-out
    assert cap.offer(*_served("b3", client="bob")) == "queued" and cap.drain() == 1
    assert cap.delete("keep") == {"request_id": "keep", "deleted": True, "cancelled": False}
    with pytest.raises(ServiceError) as e:
        cap.delete("keep")
    assert (e.value.status, e.value.kind) == (404, "unknown_sample")
    with pytest.raises(Exception) as e:
        cap.delete_client("bad domain!", "bob")
    assert getattr(e.value, "kind", None) == "invalid_argument"


def test_retention_is_applied_by_purge(tmp_path: Path) -> None:
    clock = Clock()
    cap = _capture(tmp_path, clock, capture_max_age_s=86400, capture_max_per_domain=2, capture_client_cap=0)
    for i in range(4):
        clock.now += 3600
        assert cap.offer(*_served(f"r{i}")) == "queued"
    cap.drain()
    assert cap.purge(now=clock.now) == 2  # the oldest beyond 2 per domain
    assert [s.request_id for s in cap.store().samples("polyp")] == ["r2", "r3"]
    assert cap.purge(now=clock.now + 86400 - 3600 + 1) == 1  # r2 is now more than a day old
    assert cap.last_purge == {"at": clock.now, "removed": 1}
    off = _capture(tmp_path / "off", capture_max_age_s=0, capture_max_per_domain=0)
    assert off.purge() is None  # no retention configured: nothing to do


# -- configuration ---------------------------------------------------------------------------------

def test_capture_configuration() -> None:
    env = {"WESAM_SERVE_CAPTURE_STORE": "redis://:hunter2@redis:6379/0", "WESAM_SERVE_CAPTURE_DOMAINS": "polyp, base",
           "WESAM_SERVE_CAPTURE_RATE": "0.25", "WESAM_SERVE_CAPTURE_CLIENT_CAP": "0",
           "WESAM_SERVE_CAPTURE_FORMAT": "png"}
    c = ServeConfig.from_env(env)
    assert c.capture_enabled and c.capture_domains == ("polyp", "base") and c.capture_rate == 0.25
    assert c.capture_client_cap == 0 and c.capture_format == "png"
    assert ServeConfig.from_env(c.to_env()) == c
    assert "hunter2" not in repr(c) and "hunter2" not in json.dumps(c.public())
    assert c.public()["capture_store"] == "redis://redis:6379/0"
    assert not ServeConfig().capture_enabled and ServeConfig().capture_domains == ()
    for over, words in (({"capture_store": "http://x/y"}, "CAPTURE_STORE"),
                        ({"capture_store": "sqlite://rel.db"}, "absolute"),
                        ({"capture_rate": 1.5}, "CAPTURE_RATE"), ({"capture_domains": ("a b",)}, "CAPTURE_DOMAINS"),
                        ({"capture_format": "webp"}, "CAPTURE_FORMAT"), ({"capture_queue": 0}, "CAPTURE_QUEUE"),
                        ({"capture_domain_cap": -1}, "CAPTURE_DOMAIN_CAP")):
        with pytest.raises(ConfigError, match=words):
            ServeConfig(**over)


def test_serve_flags_and_relative_store_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from wesam.service.cli import add_serve_parser, config_from_args

    parser = argparse.ArgumentParser(prog="wesam")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    monkeypatch.chdir(tmp_path)
    args = parser.parse_args(["serve", "--capture-store", "samples.db", "--capture-domains", "polyp", "skin",
                              "--capture-rate", "0.5"])
    c = config_from_args(args, {})
    assert c.capture_store == str(tmp_path / "samples.db")  # workers run in another folder
    assert c.capture_domains == ("polyp", "skin") and c.capture_rate == 0.5
    assert config_from_args(parser.parse_args(["serve"]), {}).capture_store is None


# -- the engine, the front and the admin API, in process -------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("capture-engine")
    base = make_base(root)
    reg = root / "registry"
    publish_adapter(base, reg, "polyp", seed=1)
    return base, reg, root


class AdminClient:
    """The admin app called in process through httpx's ASGI transport."""

    def __init__(self, app) -> None:
        self.app = app

    def _call(self, method: str, url: str, **kw) -> httpx.Response:
        import anyio

        async def go() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://admin") as c:
                return await c.request(method, url, **kw)

        return anyio.run(go)

    def get(self, url: str, **kw) -> httpx.Response:
        return self._call("GET", url, **kw)

    def delete(self, url: str, **kw) -> httpx.Response:
        return self._call("DELETE", url, **kw)


def test_engine_front_and_admin_api_in_process(world, tmp_path: Path) -> None:
    import anyio

    from wesam.service.admin import make_admin_app
    from wesam.service.engine import SegmentEngine
    from wesam.service.front import Frontend, LocalRuntime

    base, reg, _ = world
    db = tmp_path / "samples.db"
    config = ServeConfig(model=str(base), registry=str(reg), threads=1, poll_seconds=0, capture_store=str(db),
                         capture_domains=("polyp",))
    engine = SegmentEngine.from_config(config)
    try:
        runtime = LocalRuntime(engine)
        front = Frontend(config, runtime)
        img = make_image(96, 128, seed=5)
        fields = {"image": base64.b64encode(encode(img)).decode(), "boxes": [[10, 8, 100, 80]], "domain": "polyp"}
        status, body = anyio.run(front.segment, fields, False, RequestMeta("front-1", "clinic-a"))
        assert status == 200 and "request_id" not in body  # the answer's body is unchanged
        status, _ = anyio.run(front.segment, fields, False, RequestMeta("front-2", "clinic-a", capture=False))
        assert status == 200
        status, _ = anyio.run(front.segment, {**fields, "domain": "base"}, False, RequestMeta("front-3"))
        assert status == 200
        (follow,) = engine.infer([InferItem(image_id=body["image_id"], request_id="front-4",
                                            prompts=validate_prompts(config, boxes=[[1, 1, 20, 20]]))])
        assert follow.error is None
        assert engine.capture.flush(30)
        with open_store(str(db)) as store:
            assert [s.request_id for s in store.samples("polyp")] == ["front-1"]
            s = store.get("front-1")
        served = codec.rle_decode(body["masks"][0]["rle"])
        np.testing.assert_array_equal(codec.rle_decode(s.mask_rle), resize_mask(served, (48, 64)))
        assert s.image_size == (96, 128) and s.adapter == "polyp@v1" and s.client == "clinic-a"
        assert engine.capture.outcomes[("polyp", "opted_out")] == 1
        assert engine.capture.outcomes[("base", "domain_off")] == 1
        assert engine.capture.outcomes[("polyp", "unsupported")] == 1

        admin = AdminClient(make_admin_app(lambda: runtime, TOKEN))
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert admin.get("/capture/stats").status_code == 401
        assert admin.delete("/capture/front-1", headers={"Authorization": "Bearer nope"}).status_code == 403
        stats = admin.get("/capture/stats", headers=auth).json()
        assert stats["samples"] == {"polyp": 1} and stats["outcomes"]["polyp"]["stored"] == 1
        r = admin.delete("/capture/front-1", headers=auth)
        assert r.status_code == 200 and r.json()["deleted"] is True
        r = admin.delete("/capture/front-1", headers=auth)
        assert r.status_code == 404 and r.json()["kind"] == "unknown_sample"
        r = admin.delete("/capture/clients/polyp/clinic-a", headers=auth)
        assert r.status_code == 200 and r.json() == {"domain": "polyp", "client": "clinic-a", "deleted": 0,
                                                     "cancelled": 0}
        r = admin.delete("/capture/clients/not%20a%20domain/x", headers=auth)
        assert r.status_code == 400 and r.json()["kind"] == "invalid_argument"
    finally:
        engine.close()
    assert engine.capture._thread is None  # stopped

    off = SegmentEngine(engine.model, engine.runtime, dataclasses.replace(config, capture_store=None))
    assert off.capture is None and off.capture_stats() == {"enabled": False}
    admin = AdminClient(make_admin_app(lambda: LocalRuntime(off), TOKEN))
    r = admin.delete("/capture/x", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 409 and r.json()["kind"] == "capture_disabled"


# -- wesam capture -----------------------------------------------------------------------------------

def test_capture_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from wesam.cli import main

    cap = _capture(tmp_path, capture_client_cap=0)
    for rid, client in (("a1", "alice"), ("a2", "alice"), ("b1", "bob")):
        cap.offer(*_served(rid, client=client))
    cap.drain()
    db = str(tmp_path / "samples.db")

    def run(*argv: str) -> tuple[int, object]:
        code = main(["capture", *argv, "--store", db, "--json"])
        return code, json.loads(capsys.readouterr().out)

    code, out = run("stats", "--clients")
    assert code == 0 and out["total"] == 3
    assert out["domains"] == {"polyp": {"samples": 3, "clients": 2, "per_client": {"alice": 2, "bob": 1}}}
    code, out = run("delete", "a1", "zz")
    assert code == 1 and out["deleted"] == ["a1"] and out["missing"] == ["zz"]
    code, out = run("delete-client", "polyp", "bob")
    assert code == 0 and out["deleted"] == 1
    code, out = run("purge", "--max-per-domain", "0")
    assert code == 0 and out["removed"] == 1
    assert main(["capture", "stats", "--store", str(tmp_path / "typo.db")]) == 2
    assert "no sample store" in capsys.readouterr().err and not (tmp_path / "typo.db").exists()
    assert main(["capture", "stats", "--store", db]) == 0 and "0 samples" in capsys.readouterr().out


# -- a real server --------------------------------------------------------------------------------------

def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(
                f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_real_server_captures_over_http_and_grpc(world, tmp_path: Path) -> None:
    import grpc
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg
    from tritonclient.utils import serialize_byte_tensor

    from wesam.service.launch import ServerProcess, free_port

    base, reg, _ = world
    db = tmp_path / "samples.db"
    config = ServeConfig(model=str(base), registry=str(reg), threads=1, workers=1, admin_token=TOKEN,
                         grpc_port=free_port(), poll_seconds=0, capture_store=str(db), capture_domains=("polyp",),
                         capture_rate=1.0, capture_format="png")
    img = make_image(96, 128, seed=9)  # stored at 48 x 64
    box = [10, 8, 100, 80]
    body = {"image": base64.b64encode(encode(img)).decode(), "boxes": [box], "domain": "polyp"}
    with ServerProcess(config, bentoml_home=tmp_path / "bentoml", extra_env={"OMP_NUM_THREADS": "1"}) as server, \
            httpx.Client(base_url=server.url, timeout=120) as c:
        r = c.post("/segment", json=body, headers={"X-Request-Id": "http-1", "X-Wesam-Client": "clinic-a"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "http-1", r.text
        served_http = codec.rle_decode(r.json()["masks"][0]["rle"])
        r = c.post("/segment", json=body, headers={"X-Request-Id": "http-2", "X-Wesam-Capture": "off"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "http-2"
        r = c.post("/segment", json={**body, "domain": "base"}, headers={"X-Request-Id": "bad id!"})
        assert r.status_code == 200 and uuid.UUID(r.headers["x-request-id"])  # not a sane id: a new one
        r = c.post("/segment", json={**body, "boxes": [[0, 0, 999, 9]]})  # errors carry an id too
        assert r.status_code == 422 and uuid.UUID(r.headers["x-request-id"])
        assert uuid.UUID(c.post("/embed", json={"image": body["image"]}).headers["x-request-id"])

        grpc_client = grpcclient.InferenceServerClient(server.grpc_url)
        inputs = []
        for name, dtype, value in (("IMAGE", "UINT8", img), ("BOXES", "FP32", np.array([box], np.float32)),
                                   ("DOMAIN", "BYTES", np.array([b"polyp"], dtype=object))):
            t = grpcclient.InferInput(name, list(value.shape), dtype)
            t.set_data_from_numpy(value)
            inputs.append(t)
        res = grpc_client.infer("segment", inputs, headers={"x-request-id": "grpc-1", "x-wesam-client": "clinic-b"})
        served_grpc = res.as_numpy("MASKS")[0, 0].astype(bool)
        # a raw call: the request's KServe `id` is the request id without metadata, echoed in the
        # initial metadata; this one opts out
        req = pb.ModelInferRequest(model_name="segment", id="kserve-1")
        for name, dtype, arr in (("IMAGE", "UINT8", img), ("BOXES", "FP32", np.array([box], np.float32)),
                                 ("DOMAIN", "BYTES", np.array([b"polyp"], dtype=object))):
            req.inputs.add(name=name, datatype=dtype, shape=list(arr.shape))
            req.raw_input_contents.append(serialize_byte_tensor(arr).item() if dtype == "BYTES" else arr.tobytes())
        with grpc.insecure_channel(server.grpc_url) as channel:
            _, call = pbg.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
                req, metadata=(("x-wesam-capture", "off"),))
        assert dict(call.initial_metadata())["x-request-id"] == "kserve-1"

        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert c.get("/capture/stats").status_code == 401
        deadline = time.monotonic() + 60
        while True:
            stats = c.get("/capture/stats", headers=auth).json()
            done = stats["outcomes"].get("polyp", {})
            if done.get("stored", 0) + done.get("error", 0) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert stats["samples"] == {"polyp": 2} and stats["queue"]["depth"] == 0, (stats, server.log_tail())
        assert stats["outcomes"]["polyp"] == {"stored": 2, "opted_out": 2}
        assert stats["outcomes"]["base"] == {"domain_off": 1}
        with open_store(str(db)) as store:
            a, b = store.get("http-1"), store.get("grpc-1")
            assert store.get("http-2") is None and store.count() == 2
        assert (a.domain, a.client, a.adapter, a.image_size) == ("polyp", "clinic-a", "polyp@v1", (96, 128))
        assert (b.client, b.adapter) == ("clinic-b", "polyp@v1")
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(a.image))), resize_image(img, (48, 64)))
        np.testing.assert_array_equal(codec.rle_decode(a.mask_rle), resize_mask(served_http, (48, 64)))
        np.testing.assert_array_equal(codec.rle_decode(b.mask_rle), resize_mask(served_grpc, (48, 64)))
        np.testing.assert_allclose(a.prompts["boxes"], [[5, 4, 50, 40]])

        r = c.delete("/capture/http-1", headers=auth)
        assert r.status_code == 200 and r.json() == {"request_id": "http-1", "deleted": True, "cancelled": False}
        r = c.delete("/capture/http-1", headers=auth)
        assert r.status_code == 404 and r.json()["kind"] == "unknown_sample"
        r = c.delete("/capture/clients/polyp/clinic-b", headers=auth)
        assert r.status_code == 200 and r.json()["deleted"] == 1
        with open_store(str(db)) as store:
            assert store.count() == 0

        metrics = c.get("/metrics").text
        assert _metric(metrics, "wesam_capture_total", domain="polyp", outcome="stored") == 2
        assert _metric(metrics, "wesam_capture_total", domain="polyp", outcome="opted_out") == 2
        assert _metric(metrics, "wesam_capture_total", domain="base", outcome="domain_off") == 1
        assert re.search(r"^wesam_capture_queue_depth(\{[^}]*\})? 0\.0$", metrics, re.M), metrics[-2000:]
