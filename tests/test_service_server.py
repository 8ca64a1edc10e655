"""End to end: a real ``bentoml serve`` driven over HTTP with httpx and over gRPC with NVIDIA's
tritonclient, in both layouts: one process (one worker holds the model, the default) and two front
workers calling the model-runtime process (which then hosts the gRPC endpoint).

One server per layout for the whole module (startup is the slow part); tests that change the active
adapter version put it back.
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from service_support import corrupt_weights, encode, make_base, make_image, publish_adapter, reference_model

from wesam.sam.predictor import Prompts, SamPredictorCore
from wesam.adapters.registry import Registry
from wesam.service import codec
from wesam.service.config import ServeConfig
from wesam.service.launch import ServerProcess, free_port

TOKEN = "test-admin-token"
BOX = [8.0, 6.0, 50.0, 40.0]


@dataclass
class Served:
    server: ServerProcess
    base: Path
    registry: Path
    home: Path
    client: httpx.Client
    workers: int


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "two-workers"])
def served(tmp_path_factory, request):
    torch.set_num_threads(1)  # the server's runtime runs with 1 thread: same float sums, same masks
    workers = request.param
    root = tmp_path_factory.mktemp(f"serve-{workers}")
    base = make_base(root)
    reg = root / "registry"
    publish_adapter(base, reg, "polyp", seed=1)  # v1, active
    publish_adapter(base, reg, "polyp", seed=7, activate=False)  # v2
    publish_adapter(base, reg, "polyp", seed=8, activate=False)  # v3, broken below
    corrupt_weights(reg, "polyp", 3)
    config = ServeConfig(model=str(base), registry=str(reg), threads=1, workers=workers, admin_token=TOKEN,
                         grpc_port=free_port(), poll_seconds=1, max_image_mb=1, max_image_pixels=512 * 512,
                         max_prompts=16, cache_mb=64)
    server = ServerProcess(config, bentoml_home=root / "bentoml", extra_env={"OMP_NUM_THREADS": "1"})
    try:
        server.start(timeout=300)
        with httpx.Client(base_url=server.url, timeout=120) as client:
            yield Served(server, base, reg, root / "bentoml", client, workers)
    finally:
        server.cleanup()


def _b64(image: np.ndarray) -> str:
    return base64.b64encode(encode(image)).decode()


def _masks(body: dict) -> np.ndarray:
    return np.stack([codec.rle_decode(m["rle"]) for m in body["masks"]])


def _reference(served: Served, image: np.ndarray, prompts: Prompts, ref: str | None = None, multimask=False):
    model = reference_model(served.base, served.registry, ref)
    return SamPredictorCore(model.sam).predict(image, prompts, multimask=multimask)


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_health_and_openapi(served: Served) -> None:
    c = served.client
    assert c.get("/livez").status_code == 200 and c.get("/readyz").status_code == 200
    spec = c.get("/docs.json").json()
    for path in ("/segment", "/embed", "/adapters", "/adapters/reload", "/adapters/{domain}/activate"):
        assert path in spec["paths"], path
    schema = spec["paths"]["/segment"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"image", "image_id", "domain", "boxes", "points", "point_labels", "mask_input", "multimask",
            "output", "return_logits"} <= set(schema["properties"])
    ok = spec["paths"]["/segment"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert {"masks", "adapter", "image_id", "timings_ms"} <= set(ok["properties"])


def test_box_and_point_prompts_match_the_predictor(served: Served) -> None:
    img = make_image(seed=3)
    cases = [
        ({"boxes": [BOX, [0, 0, 30, 30]]}, Prompts(boxes=np.array([BOX, [0, 0, 30, 30]])), False),
        ({"points": [[20, 15], [40, 30]], "point_labels": [1, 0]},
         Prompts(point_coords=np.array([[20, 15], [40, 30]]), point_labels=np.array([1, 0])), False),
        ({"boxes": [BOX], "points": [[20, 15]], "point_labels": [1], "multimask": True},
         Prompts(point_coords=np.array([[[20, 15]]]), point_labels=np.array([[1]]), boxes=np.array([BOX])), True),
    ]
    for fields, prompts, multimask in cases:
        r = served.client.post("/segment", json={"image": _b64(img), **fields})
        assert r.status_code == 200, r.text
        body = r.json()
        want = _reference(served, img, prompts, multimask=multimask)
        n, m = want.masks.shape[:2]
        assert body["adapter"] == "base" and body["image_size"] == [48, 64] and len(body["masks"]) == n * m
        assert [mk["prompt"] for mk in body["masks"]] == [i for i in range(n) for _ in range(m)]
        np.testing.assert_array_equal(_masks(body).reshape(want.masks.shape), want.masks)
        np.testing.assert_allclose([mk["score"] for mk in body["masks"]], want.scores.reshape(-1), atol=1e-5)
        assert want.masks.any() and set(body["timings_ms"]) >= {"total", "decoder"}


def test_multipart_and_other_outputs(served: Served) -> None:
    img = make_image(seed=4)
    ref = served.client.post("/segment", json={"image": _b64(img), "boxes": [BOX]}).json()
    r = served.client.post("/segment", files={"image": ("x.png", encode(img), "image/png")},
                           data={"boxes": json.dumps([BOX]), "output": "png", "return_logits": "true"})
    assert r.status_code == 200, r.text
    (mask,) = r.json()["masks"]
    import io

    from PIL import Image

    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(mask["png"])))).astype(bool)
    np.testing.assert_array_equal(png, _masks(ref)[0])
    logits = np.load(io.BytesIO(base64.b64decode(mask["logits"])))
    np.testing.assert_array_equal(logits > 0, png)
    low = np.load(io.BytesIO(base64.b64decode(mask["low_res_logits"])))
    assert low.shape == (32, 32)
    # the low-res logits go back in as a mask prompt
    again = served.client.post("/segment", json={"image_id": ref["image_id"], "boxes": [BOX],
                                                  "mask_input": [{"low_res_logits": mask["low_res_logits"]}]})
    assert again.status_code == 200, again.text
    poly = served.client.post("/segment", json={"image_id": ref["image_id"], "boxes": [BOX], "output": "polygons"})
    assert poly.status_code == 200 and isinstance(poly.json()["masks"][0]["polygons"], list)


def test_domain_is_served_by_its_adapter(served: Served) -> None:
    img = make_image(seed=5)
    base = served.client.post("/segment", json={"image": _b64(img), "boxes": [BOX]}).json()
    r = served.client.post("/segment", json={"image": _b64(img), "boxes": [BOX], "domain": "polyp"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] == "polyp@v1" and body["domain"] == "polyp"
    want = _reference(served, img, Prompts(boxes=np.array([BOX])), ref="polyp@v1")
    np.testing.assert_array_equal(_masks(body)[:, None], want.masks)
    assert (_masks(body) != _masks(base)).any()


def test_concurrent_mixed_domains_are_each_correct(served: Served) -> None:
    imgs = [make_image(seed=20 + i) for i in range(6)]
    domains = [None, "polyp", "polyp", None, "polyp", None]

    def call(i: int) -> dict:
        with httpx.Client(base_url=served.server.url, timeout=120) as c:
            body = {"image": _b64(imgs[i]), "boxes": [BOX]}
            if domains[i]:
                body["domain"] = domains[i]
            r = c.post("/segment", json=body)
            assert r.status_code == 200, r.text
            return r.json()

    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(call, range(6)))
    for img, domain, body in zip(imgs, domains, results):
        ref = "polyp@v1" if domain else None
        assert body["adapter"] == (ref or "base")
        want = _reference(served, img, Prompts(boxes=np.array([BOX])), ref=ref)
        np.testing.assert_array_equal(_masks(body)[:, None], want.masks)


def test_sustained_concurrency_is_served_without_runtime_call_failures(served: Served) -> None:
    """24 concurrent clients, 288 requests. With two workers that is well past 100 runtime calls per
    worker (BentoML's dependency client used to close its connection pool every 100 calls, failing
    every call then in flight). The queue bound (32) is above the client count: every request is served."""
    imgs = [_b64(make_image(seed=300 + i)) for i in range(24)]

    def client(k: int) -> list[int]:
        with httpx.Client(base_url=served.server.url, timeout=120) as c:
            return [c.post("/segment", json={"image": imgs[(k + j) % len(imgs)], "boxes": [BOX],
                                             **({"domain": "polyp"} if j % 2 else {})}).status_code
                    for j in range(12)]

    log_before = served.server.log_tail(100000).count("runtime call failed")
    with ThreadPoolExecutor(24) as ex:
        statuses = [s for got in ex.map(client, range(24)) for s in got]
    assert statuses == [200] * 24 * 12
    log = served.server.log_tail(100000)
    assert log.count("runtime call failed") == log_before
    assert "cannot configure BentoML's runtime client" not in log  # the steady sessions are in place


def test_image_id_follow_ups_hit_the_cache(served: Served) -> None:
    c = served.client
    img = make_image(seed=6)
    e = c.post("/embed", json={"image": _b64(img), "domain": "polyp"})
    assert e.status_code == 200, e.text
    emb = e.json()
    assert emb["adapter"] == "polyp@v1" and not emb["cached"] and emb["image_size"] == [48, 64]
    hits = _metric(c.get("/metrics").text, "wesam_cache_hits_total")
    r = c.post("/segment", json={"image_id": emb["image_id"], "points": [[20, 15]], "point_labels": [1]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["cached"] and body["adapter"] == "polyp@v1" and body["image_id"] == emb["image_id"]
    assert "encoder" not in body["timings_ms"]
    assert _metric(c.get("/metrics").text, "wesam_cache_hits_total") == hits + 1
    want = _reference(served, img, Prompts(point_coords=np.array([[20, 15]]), point_labels=np.array([1])),
                      ref="polyp@v1")
    np.testing.assert_array_equal(_masks(body)[:, None], want.masks)
    # the same image again with the same domain is a hit too, and gets the same id
    full = c.post("/segment", json={"image": _b64(img), "domain": "polyp", "boxes": [BOX]}).json()
    assert full["cached"] and full["image_id"] == emb["image_id"]


def test_activate_and_rollback_need_the_token(served: Served) -> None:
    c = served.client
    img = make_image(seed=8)
    url = "/adapters/polyp/activate"
    assert c.post(url, json={"version": "v2"}).status_code == 401
    assert c.post(url, json={"version": "v2"}, headers={"Authorization": "Bearer nope"}).status_code == 403
    assert c.post("/adapters/reload").status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        r = c.post(url, json={"version": "v2"}, headers=auth)
        assert r.status_code == 200, r.text
        assert r.json() == {"domain": "polyp", "serving": "polyp@v2", "previous": "polyp@v1"}
        assert Registry(served.registry).active_version("polyp") == 2
        body = c.post("/segment", json={"image": _b64(img), "boxes": [BOX], "domain": "polyp"}).json()
        assert body["adapter"] == "polyp@v2"
        want = _reference(served, img, Prompts(boxes=np.array([BOX])), ref="polyp@v2")
        np.testing.assert_array_equal(_masks(body)[:, None], want.masks)
        # the broken v3 is refused and v2 keeps serving
        r = c.post(url, json={"version": 3}, headers=auth)
        assert r.status_code == 409 and r.json()["kind"] == "adapter_refused" and "SHA-256" in r.json()["error"]
        assert Registry(served.registry).active_version("polyp") == 2
        listing = c.get("/adapters").json()
        (row,) = [d for d in listing["domains"] if d["domain"] == "polyp"]
        assert row["serving"] == "polyp@v2" and row["versions"] == [1, 2, 3]
        assert c.post(url, json={"version": "v9"}, headers=auth).status_code == 404
        assert c.post("/adapters/lung/activate", json={"version": 1}, headers=auth).status_code == 404
        # a core error (not a service error) crosses the runtime process and is answered by its kind
        odd = served.registry / "bad.name" / "v1"
        odd.mkdir(parents=True)
        (odd / "adapter.json").write_text("{}")
        try:
            r = c.post("/adapters/bad.name/activate", json={"version": 1}, headers=auth)
        finally:
            (odd / "adapter.json").unlink()
            odd.rmdir()
            odd.parent.rmdir()
        assert r.status_code == 400 and r.json()["kind"] == "invalid_adapter_ref", r.text
        assert c.post("/adapters/reload", headers=auth).status_code == 200
    finally:
        r = c.post(url, json={"version": "v1"}, headers=auth)  # roll back
    assert r.status_code == 200 and r.json()["serving"] == "polyp@v1"
    body = c.post("/segment", json={"image": _b64(img), "boxes": [BOX], "domain": "polyp"}).json()
    assert body["adapter"] == "polyp@v1"


def test_worker_controls_over_the_admin_api(served: Served) -> None:
    """Pin, freeze, rollback and lineage of the online worker, as `wesam adapters` does them."""
    c = served.client
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert c.get("/adapters/polyp/control").json()["control"]["frozen"] is False
    assert c.post("/adapters/polyp/pin", json={"version": "v2"}).status_code == 401
    assert c.post("/adapters/polyp/freeze", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert c.get("/adapters/lung/control").status_code == 404
    try:
        r = c.post("/adapters/polyp/pin", json={"version": "v2"}, headers=auth)
        assert r.status_code == 200 and r.json()["control"]["pinned"] == 2, r.text
        r = c.post("/adapters/polyp/pin", json={"version": "v9"}, headers=auth)
        assert r.status_code >= 400 and r.json()["kind"] == "adapter", r.text
        r = c.post("/adapters/polyp/freeze", json={"reason": "audit"}, headers=auth)
        assert r.json()["control"]["frozen"] is True and r.json()["control"]["reason"] == "audit"
        assert c.post("/adapters/polyp/unfreeze", headers=auth).json()["control"]["frozen"] is False
        # Nothing older than v1 to roll back to: refused, nothing changes.
        assert Registry(served.registry).active_version("polyp") == 1
        r = c.post("/adapters/polyp/rollback", headers=auth)
        assert r.status_code >= 400 and r.json()["kind"] == "adapter", r.text
        assert c.get("/adapters/polyp/control").json()["control"]["frozen"] is False
        # From v2 the rollback serves v1 at once and freezes the domain.
        assert c.post("/adapters/polyp/activate", json={"version": "v2"}, headers=auth).status_code == 200
        r = c.post("/adapters/polyp/rollback", headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["serving"] == "polyp@v1" and r.json()["previous"] == "polyp@v2"
        assert r.json()["control"]["frozen"] and "v2 to v1" in r.json()["control"]["reason"]
        body = c.post("/segment", json={"image": _b64(make_image(seed=3)), "boxes": [BOX], "domain": "polyp"}).json()
        assert body["adapter"] == "polyp@v1"
        chain = c.get("/adapters/polyp/lineage").json()["chain"]
        assert [row["adapter"] for row in chain] == ["polyp@v1"]  # made by `wesam adapt`: a root
    finally:
        c.post("/adapters/polyp/activate", json={"version": "v1"}, headers=auth)
        c.post("/adapters/polyp/unfreeze", headers=auth)
        c.post("/adapters/polyp/unpin", headers=auth)
    assert c.get("/adapters/polyp/control").json()["control"] == {
        "pinned": None, "frozen": False, "reason": None,
        "updated": c.get("/adapters/polyp/control").json()["control"]["updated"]}


def _wait_for(served: Served, domain: str, ref: str) -> None:
    deadline = time.monotonic() + 60
    domains: dict = {}
    while time.monotonic() < deadline:
        domains = {d["domain"]: d for d in served.client.get("/adapters").json()["domains"]}
        if domains.get(domain, {}).get("serving") == ref:
            return
        time.sleep(0.5)
    pytest.fail(f"{ref} never served: {domains}")


def test_registry_changes_are_picked_up_without_restart(served: Served) -> None:
    # a new domain published by `wesam adapt`, then a switch as `wesam adapters activate` makes it:
    # the replica polls routing.json and follows, with no API call and no restart
    publish_adapter(served.base, served.registry, "skin", seed=11)
    _wait_for(served, "skin", "skin@v1")
    img = _b64(make_image())
    r = served.client.post("/segment", json={"image": img, "boxes": [BOX], "domain": "skin"})
    assert r.status_code == 200 and r.json()["adapter"] == "skin@v1"
    publish_adapter(served.base, served.registry, "skin", seed=12, activate=False)
    Registry(served.registry).activate("skin", 2)
    _wait_for(served, "skin", "skin@v2")
    r = served.client.post("/segment", json={"image": img, "boxes": [BOX], "domain": "skin"})
    assert r.status_code == 200 and r.json()["adapter"] == "skin@v2" and not r.json()["cached"]


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        _Recorder.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(encode(make_image()))

    def log_message(self, *args) -> None:
        pass


def test_bad_inputs_are_4xx_json(served: Served) -> None:
    c = served.client
    img_b64 = _b64(make_image())
    png = encode(make_image(96, 128))
    recorder = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=recorder.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{recorder.server_address[1]}/image.png"
    zero = (b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR" + (0).to_bytes(4, "big") + (10).to_bytes(4, "big")
            + bytes([8, 2, 0, 0, 0]) + b"\x00" * 4)
    padded = encode(make_image()) + b"\x00" * (1024 * 1024 + 10)
    cases = [
        ("not an image", dict(json={"image": base64.b64encode(b"plain text, no pixels").decode(), "boxes": [BOX]}),
         400, "invalid_image"),
        ("truncated", dict(json={"image": base64.b64encode(png[: len(png) // 2]).decode(), "boxes": [BOX]}),
         400, "invalid_image"),
        ("zero-size", dict(json={"image": base64.b64encode(zero).decode(), "boxes": [BOX]}), 400, "invalid_image"),
        ("empty", dict(json={"image": "", "boxes": [BOX]}), 400, "invalid_image"),
        ("oversize bytes", dict(json={"image": base64.b64encode(padded).decode(), "boxes": [BOX]}), 413, "too_large"),
        ("oversize pixels", dict(json={"image": _b64(np.zeros((600, 600, 3), np.uint8)), "boxes": [BOX]}),
         413, "too_large"),
        ("oversize body", dict(content=b"{" + b" " * (6 * 1024 * 1024) + b"}",
                               headers={"content-type": "application/json"}), 413, "too_large"),
        ("too many prompts", dict(json={"image": img_b64, "boxes": [BOX] * 17}), 422, "invalid_prompt"),
        ("out of range", dict(json={"image": img_b64, "boxes": [[0, 0, 65, 40]]}), 422, "invalid_prompt"),
        ("point out of range", dict(json={"image": img_b64, "points": [[10, 49]], "point_labels": [1]}),
         422, "invalid_prompt"),
        ("labels", dict(json={"image": img_b64, "points": [[10, 10]]}), 422, "invalid_prompt"),
        ("unknown domain", dict(json={"image": img_b64, "boxes": [BOX], "domain": "mars"}), 404, "unknown_domain"),
        ("unknown image_id", dict(json={"image_id": "f" * 32, "boxes": [BOX]}), 404, "unknown_image_id"),
        ("not json", dict(content=b"{nope", headers={"content-type": "application/json"}), 400, "bad_request"),
        ("json list", dict(json=[1, 2]), 400, "bad_request"),
        ("empty body", dict(content=b"", headers={"content-type": "application/json"}), 400, "bad_request"),
        ("unknown field", dict(json={"image": img_b64, "box": BOX}), 400, "bad_request"),
        ("media type", dict(content=b"x", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
        ("url in json", dict(json={"image": url, "boxes": [BOX]}), 400, "invalid_image"),
        ("url in form", dict(files={"image": (None, url)}, data={"boxes": json.dumps([BOX])}), 400, "invalid_image"),
    ]
    try:
        for name, kwargs, status, kind in cases:
            r = c.post("/segment", **kwargs)
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            body = r.json()
            assert body["kind"] == kind and body["status"] == status and body["error"], (name, body)
        r = c.post("/embed", json={"image": base64.b64encode(b"nope").decode()})
        assert r.status_code == 400 and r.json()["kind"] == "invalid_image"
        r = c.post("/segment", json={"image": url, "boxes": [BOX]})
        assert "never fetches URLs" in r.json()["error"]
    finally:
        recorder.shutdown()
    assert _Recorder.hits == []  # nothing was downloaded
    assert c.get("/readyz").status_code == 200  # and nothing crashed


def test_metrics_after_traffic_across_workers(served: Served) -> None:
    c = served.client
    before = c.get("/metrics").text
    img = _b64(make_image(seed=9))
    n = 16
    for _ in range(n):  # a new connection each time, so both front workers serve some
        with httpx.Client(base_url=served.server.url, timeout=120, headers={"Connection": "close"}) as one:
            assert one.post("/segment", json={"image": img, "boxes": [BOX], "domain": "polyp"}).status_code == 200
    after = c.get("/metrics").text
    labels = dict(endpoint="segment", domain="polyp", adapter="polyp@v1", status="200")
    assert _metric(after, "wesam_requests_total", **labels) - _metric(before, "wesam_requests_total", **labels) == n
    assert (_metric(after, "wesam_request_latency_seconds_count", endpoint="segment", domain="polyp")
            - _metric(before, "wesam_request_latency_seconds_count", endpoint="segment", domain="polyp")) == n
    for name in ("wesam_requests_total", "wesam_request_latency_seconds_bucket", "wesam_errors_total",
                 "wesam_encoder_seconds_count", "wesam_decoder_seconds_count", "wesam_cache_hits_total",
                 "wesam_cache_misses_total", "wesam_cache_evictions_total", "wesam_cache_bytes",
                 "wesam_cache_entries", "wesam_adapter_loads_total", "wesam_adapter_load_failures_total",
                 "wesam_adapter_active_version", "wesam_batch_size_count", "wesam_encoder_batch_images_count",
                 "wesam_batch_adapters_count", "bentoml_service_request_total"):
        assert re.search(rf"^{name}[{{ ]", after, re.M), name
    assert _metric(after, "wesam_adapter_load_failures_total", domain="polyp", version="3") >= 1
    assert _metric(after, "wesam_cache_bytes") > 0
    # with two workers, both front workers and the runtime wrote metrics: the scrape summed three processes
    pids = {m.group(1) for f in (served.home / "prometheus_multiproc_dir").iterdir()
            if (m := re.match(r"counter_(\d+)\.db$", f.name))}
    assert len(pids) >= (3 if served.workers > 1 else 1), pids


# -- gRPC -------------------------------------------------------------------------------------------

def _grpc(served: Served):
    import tritonclient.grpc as grpcclient

    return grpcclient, grpcclient.InferenceServerClient(served.server.grpc_url)


def _inputs(grpcclient, **tensors):
    out = []
    for name, (dtype, value) in tensors.items():
        arr = np.asarray(value, dtype=object if dtype == "BYTES" else None)
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def test_grpc_health_and_metadata(served: Served) -> None:
    _, client = _grpc(served)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("segment")
    assert not client.is_model_ready("nope")
    meta = client.get_model_metadata("segment", as_json=True)
    assert {i["name"] for i in meta["inputs"]} >= {"IMAGE", "DOMAIN", "BOXES", "POINTS", "LABELS"}
    assert {o["name"] for o in meta["outputs"]} == {"MASKS", "SCORES", "ADAPTER", "IMAGE_ID"}
    cfg = client.get_model_config("segment", as_json=True)["config"]
    assert cfg["name"] == "segment" and cfg.get("max_batch_size", 0) == 0  # no batch dimension
    assert all(i.get("optional") for i in cfg["input"]) and len(cfg["output"]) == 4
    assert client.get_server_metadata(as_json=True)["name"] == "wesam"
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as e:  # the error interceptor keeps UNIMPLEMENTED as it is
        client.get_inference_statistics("segment")
    assert "UNIMPLEMENTED" in str(e.value.status())


def test_grpc_segment_matches_the_predictor_and_routes_domains(served: Served) -> None:
    grpcclient, client = _grpc(served)
    img = make_image(seed=12)
    boxes = np.array([BOX], np.float32)
    res = client.infer("segment", _inputs(grpcclient, IMAGE=("UINT8", img), BOXES=("FP32", boxes)))
    want = _reference(served, img, Prompts(boxes=boxes))
    np.testing.assert_array_equal(res.as_numpy("MASKS").astype(bool), want.masks)
    np.testing.assert_allclose(res.as_numpy("SCORES"), want.scores, atol=1e-5)
    assert res.as_numpy("ADAPTER")[0] == b"base"
    dom = client.infer("segment", _inputs(grpcclient, IMAGE=("BYTES", [encode(img)]), BOXES=("FP32", boxes),
                                          DOMAIN=("BYTES", [b"polyp"])))
    assert dom.as_numpy("ADAPTER")[0] == b"polyp@v1"
    want = _reference(served, img, Prompts(boxes=boxes), ref="polyp@v1")
    np.testing.assert_array_equal(dom.as_numpy("MASKS").astype(bool), want.masks)
    # prompt-only follow-up by IMAGE_ID, with points
    image_id = dom.as_numpy("IMAGE_ID")[0]
    pts = client.infer("segment", _inputs(grpcclient, IMAGE_ID=("BYTES", [image_id]),
                                          POINTS=("FP32", np.array([[20, 15]], np.float32)),
                                          LABELS=("INT32", np.array([1], np.int32)),
                                          MULTIMASK=("BOOL", np.array([True]))))
    assert pts.as_numpy("MASKS").shape == (1, 3, 48, 64) and pts.as_numpy("ADAPTER")[0] == b"polyp@v1"
    # and the HTTP API shares the cache: the gRPC image_id works there too
    r = served.client.post("/segment", json={"image_id": image_id.decode(), "boxes": [BOX]})
    assert r.status_code == 200 and r.json()["cached"]


def test_grpc_errors(served: Served) -> None:
    from tritonclient.utils import InferenceServerException

    grpcclient, client = _grpc(served)
    img = make_image()
    boxes = ("FP32", np.array([BOX], np.float32))
    cases = [
        (dict(BOXES=boxes), "INVALID_ARGUMENT", "IMAGE"),
        (dict(IMAGE=("BYTES", [b"not an image"]), BOXES=boxes), "INVALID_ARGUMENT", "invalid_image"),
        (dict(IMAGE=("UINT8", img)), "INVALID_ARGUMENT", "invalid_prompt"),
        (dict(IMAGE=("UINT8", img), BOXES=("FP32", np.array([[0, 0, 99, 9]], np.float32))), "INVALID_ARGUMENT",
         "outside"),
        (dict(IMAGE=("UINT8", img), BOXES=boxes, DOMAIN=("BYTES", [b"mars"])), "NOT_FOUND", "unknown_domain"),
        (dict(IMAGE_ID=("BYTES", [b"f" * 32]), BOXES=boxes), "NOT_FOUND", "unknown_image_id"),
        (dict(IMAGE=("UINT8", img), BOXES=boxes, EXTRA=("FP32", np.zeros(1, np.float32))), "INVALID_ARGUMENT",
         "unknown inputs"),
        (dict(IMAGE=("UINT8", img), BOXES=("FP32", np.array(BOX, np.float32))), "INVALID_ARGUMENT",
         "[bad_request] invalid prompt tensors: BOXES"),
    ]
    for tensors, status, words in cases:
        with pytest.raises(InferenceServerException) as e:
            client.infer("segment", _inputs(grpcclient, **tensors))
        assert status in str(e.value.status()) and words in e.value.message(), (tensors.keys(), str(e.value))
    with pytest.raises(InferenceServerException) as e:
        client.infer("nope", _inputs(grpcclient, IMAGE=("UINT8", img), BOXES=boxes))
    assert "NOT_FOUND" in str(e.value.status()) and e.value.message().endswith("unknown model 'nope'; this "
                                                                               "server has 'segment'")
    with pytest.raises(InferenceServerException, match="has version 1 only"):
        client.get_model_metadata("segment", model_version="2")
    assert client.is_server_ready()


def test_the_same_bad_prompt_gets_the_same_error_over_http_and_grpc(served: Served) -> None:
    from tritonclient.utils import InferenceServerException

    grpcclient, client = _grpc(served)
    img = make_image(seed=13)
    cases = [  # (JSON fields, gRPC tensors)
        ({"boxes": [[5, 2, 3, 4]]}, dict(BOXES=("FP32", np.array([[5, 2, 3, 4]], np.float32)))),
        ({"points": [[1, 2]], "point_labels": [1, 0]},
         dict(POINTS=("FP32", np.array([[1, 2]], np.float32)), LABELS=("INT32", np.array([1, 0], np.int32)))),
        ({"boxes": [[0, 0, 99, 9]]}, dict(BOXES=("FP32", np.array([[0, 0, 99, 9]], np.float32)))),  # engine's check
    ]
    before = served.client.get("/metrics").text
    for fields, tensors in cases:
        r = served.client.post("/segment", json={"image": _b64(img), **fields})
        assert r.status_code == 422, r.text
        http = r.json()
        with pytest.raises(InferenceServerException) as e:
            client.infer("segment", _inputs(grpcclient, IMAGE=("UINT8", img), **tensors))
        assert "INVALID_ARGUMENT" in str(e.value.status())
        assert e.value.message().endswith(f"[{http['kind']}] {http['error']}"), (e.value.message(), http)
    after = served.client.get("/metrics").text
    for endpoint in ("segment", "grpc"):
        counted = (_metric(after, "wesam_errors_total", kind="invalid_prompt", endpoint=endpoint)
                   - _metric(before, "wesam_errors_total", kind="invalid_prompt", endpoint=endpoint))
        assert counted == len(cases), endpoint
        assert (_metric(after, "wesam_requests_total", endpoint=endpoint, status="422")
                - _metric(before, "wesam_requests_total", endpoint=endpoint, status="422")) == len(cases)


def test_previews_of_a_non_active_version(served: Served) -> None:
    """`domain: "polyp@v2"` is served by v2 while v1 stays active, over HTTP and gRPC; errors by kind."""
    c = served.client
    img = make_image(seed=31)
    e = c.post("/embed", json={"image": _b64(img), "domain": "polyp@v2"})
    assert e.status_code == 200, e.text
    emb = e.json()
    assert emb["adapter"] == "polyp@v2" and emb["domain"] == "polyp"
    r = c.post("/segment", json={"image_id": emb["image_id"], "domain": "polyp@v2", "boxes": [BOX]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] == "polyp@v2" and body["cached"]
    want = _reference(served, img, Prompts(boxes=np.array([BOX])), ref="polyp@v2")
    np.testing.assert_array_equal(_masks(body)[:, None], want.masks)
    # the active version is unchanged and still answers the domain
    active = c.post("/segment", json={"image": _b64(img), "domain": "polyp", "boxes": [BOX]}).json()
    assert active["adapter"] == "polyp@v1" and active["image_id"] != emb["image_id"]
    np.testing.assert_array_equal(_masks(active)[:, None],
                                  _reference(served, img, Prompts(boxes=np.array([BOX])), ref="polyp@v1").masks)
    # naming the active version is the active slot, not a second copy
    named = c.post("/segment", json={"image": _b64(img), "domain": "polyp@v1", "boxes": [BOX]}).json()
    assert named["adapter"] == "polyp@v1" and named["image_id"] == active["image_id"] and named["cached"]
    status = c.get("/adapters").json()
    (row,) = [d for d in status["domains"] if d["domain"] == "polyp"]
    assert row["serving"] == "polyp@v1" and row["active"] == 1 and Registry(served.registry).active_version("polyp") == 1
    loaded = [p["adapter"] for p in status["previews"]["loaded"]]
    assert loaded == ["polyp@v2"] and status["previews"]["slots"] == 2 and status["previews"]["retiring"] == []
    # a preview's image_id does not answer the active version (nor the reverse)
    r = c.post("/segment", json={"image_id": emb["image_id"], "domain": "polyp", "boxes": [BOX]})
    assert r.status_code == 409 and r.json()["kind"] == "domain_mismatch", r.text
    for domain, status_code, kind in (("polyp@v9", 404, "unknown_version"), ("polyp@2", 400, "invalid_adapter_ref"),
                                      ("polyp@v", 400, "invalid_adapter_ref"), ("mars@v1", 404, "unknown_domain"),
                                      ("polyp@v3", 409, "adapter_refused")):  # v3 is corrupt
        r = c.post("/segment", json={"image": _b64(img), "domain": domain, "boxes": [BOX]})
        assert (r.status_code, r.json()["kind"]) == (status_code, kind), (domain, r.text)
    # gRPC: the same domain string, the same routing
    grpcclient, client = _grpc(served)
    boxes = np.array([BOX], np.float32)
    res = client.infer("segment", _inputs(grpcclient, IMAGE=("UINT8", img), BOXES=("FP32", boxes),
                                          DOMAIN=("BYTES", [b"polyp@v2"])))
    assert res.as_numpy("ADAPTER")[0] == b"polyp@v2" and res.as_numpy("IMAGE_ID")[0].decode() == emb["image_id"]
    np.testing.assert_array_equal(res.as_numpy("MASKS").astype(bool), want.masks)
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as err:
        client.infer("segment", _inputs(grpcclient, IMAGE=("UINT8", img), BOXES=("FP32", boxes),
                                        DOMAIN=("BYTES", [b"polyp@v9"])))
    assert "NOT_FOUND" in str(err.value.status()) and "[unknown_version]" in err.value.message()
    metrics = c.get("/metrics").text
    assert _metric(metrics, "wesam_requests_total", endpoint="segment", domain="polyp", adapter="polyp@v2") >= 1
    assert _metric(metrics, "wesam_requests_total", endpoint="grpc", domain="polyp", adapter="polyp@v2") >= 1
    assert Registry(served.registry).active_version("polyp") == 1


def test_versions_of_a_domain(served: Served) -> None:
    """GET /adapters/{domain}/versions: each version's adapter.json summary, public like GET /adapters."""
    c = served.client
    r = c.get("/adapters/polyp/versions")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["domain"] == "polyp" and out["active"] == 1 and out["serving"] == "polyp@v1"
    rows = {row["version"]: row for row in out["versions"]}
    assert {1, 2, 3} <= set(rows) and rows[1]["active"] and rows[1]["serving"] and not rows[2]["active"]
    assert rows[2]["adapter"] == "polyp@v2" and rows[2]["base_model"] == "sam-micro" and rows[2]["created"]
    assert "config" not in rows[2] and "data" not in rows[2]  # the machine's paths stay on the machine
    assert c.get("/adapters/mars/versions").json()["kind"] == "unknown_domain"
    assert c.get("/adapters/mars/versions").status_code == 404
    assert c.get("/adapters/bad.name/versions").status_code == 400
    spec = c.get("/docs.json").json()
    assert "/adapters/{domain}/versions" in spec["paths"] and not any(p.startswith("/ui") for p in spec["paths"])
