"""``wesam.client`` against a real ``wesam serve`` (sam-micro, a temporary registry with published
adapters; one server for the module), plus tiny real local servers for the retry behaviour that a
healthy server cannot be made to show cheaply (503 ``overloaded`` on demand).

Masks are checked against the server's own answer decoded independently (``wesam.service.codec``),
not against the client's decoder; that the server's masks are the model's is tests/test_service_server.py's job.
"""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import threading
import time
from concurrent import futures
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_support import encode, make_base, make_image, publish_adapter

from wesam.client import (
    AsyncClient,
    Client,
    ConflictError,
    EmbedResult,
    GrpcClient,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    SegmentResult,
    ServerError,
    ServiceUnreachable,
    UnauthorizedError,
    UnavailableError,
    WesamClientError,
)
from wesam.client import calls
from wesam.client.errors import KIND_STATUS, error_class, error_from_grpc
from wesam.errors import WesamError
from wesam.service import codec
from wesam.service.config import ServeConfig
from wesam.service.launch import ServerProcess, free_port

TOKEN = "client-test-token"
BOX = [8.0, 6.0, 50.0, 40.0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("client")
    base = make_base(root)
    reg = root / "registry"
    publish_adapter(base, reg, "polyp", seed=1)  # v1, active
    publish_adapter(base, reg, "polyp", seed=7, activate=False)  # v2
    config = ServeConfig(model=str(base), registry=str(reg), threads=1, workers=1, admin_token=TOKEN,
                         grpc_port=free_port(), poll_seconds=0, cache_mb=64)
    with ServerProcess(config, bentoml_home=root / "bentoml", extra_env={"OMP_NUM_THREADS": "1"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(server.url, admin_token=TOKEN) as c:
        yield c


def _server_masks(result: SegmentResult) -> list[np.ndarray]:
    """The answer's RLE decoded by the server's codec, independently of the client's decoder."""
    return [codec.rle_decode(m["rle"]) for m in result.raw["masks"]]


def _assert_masks(result: SegmentResult, size: tuple[int, int]) -> None:
    assert result.image_size == size
    masks = result.masks
    assert len(masks) == len(result.scores) == len(result.prompt_index) == len(result.raw["masks"])
    for got, want in zip(masks, _server_masks(result)):
        assert got.dtype == bool and got.shape == size
        np.testing.assert_array_equal(got, want)


# -- without a server ---------------------------------------------------------------------------------

def test_kind_table_and_classes_match_the_service() -> None:
    """Every kind the service answers has the same status in the client's table, and gets the same
    exception class whether it came over HTTP (by status) or gRPC (by the kind in the details)."""
    from wesam.service.errors import HTTP_STATUS
    from wesam.service.grpc_server import GRPC_CODES

    for kind, status in HTTP_STATUS.items():
        assert KIND_STATUS.get(kind) == status, kind
        err = error_from_grpc(GRPC_CODES[kind], f"[{kind}] what", {"retry-after": "3"}, "rid")
        assert type(err) is error_class(status, kind) and err.status == status and err.kind == kind, kind
        assert err.message == "what" and err.request_id == "rid" and err.retry_after == 3.0
    families = {400: InvalidRequestError, 401: UnauthorizedError, 403: UnauthorizedError, 404: NotFoundError,
                409: ConflictError, 413: InvalidRequestError, 415: InvalidRequestError, 422: InvalidRequestError,
                500: ServerError}
    for kind, status in HTTP_STATUS.items():
        cls = error_class(status, kind)
        assert issubclass(cls, WesamClientError) and issubclass(cls, WesamError)
        if status == 503:
            assert cls is (OverloadedError if kind == "overloaded" else UnavailableError)
        else:
            assert cls is families[status], kind


def test_requests_with_an_image_are_multipart_and_prompt_only_ones_json() -> None:
    img = make_image()
    call = calls.segment(img, boxes=[BOX], points=[[3, 4]], domain="polyp", multimask=True)
    assert call.json is None and call.files["image"][2] == "image/png"
    assert Image.open(io.BytesIO(call.files["image"][1])).size == (64, 48)
    # strings raw (the server reads domain/output/image_id as they are), the rest JSON-encoded
    assert call.data == {"boxes": json.dumps([BOX]), "points": "[[3.0, 4.0]]", "point_labels": "[1]",
                         "domain": "polyp", "multimask": "true"}
    follow = calls.segment(image_id="abc", boxes=[BOX])
    assert follow.files is None and follow.json == {"image_id": "abc", "boxes": [BOX]}
    for bad in (dict(), dict(image=img, image_id="abc")):
        with pytest.raises(ValueError, match="exactly one"):
            calls.segment(**bad, boxes=[BOX])
    with pytest.raises(ValueError, match="boxes"):
        calls.segment(img, boxes=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="uint8"):
        calls.segment(img.astype(np.float32), boxes=[BOX])


# -- HTTP -----------------------------------------------------------------------------------------------

def test_segment_from_path_bytes_pil_and_array(client: Client, tmp_path: Path) -> None:
    img = make_image(seed=31)
    png = encode(img)
    path = tmp_path / "frame.png"
    path.write_bytes(png)
    boxes = [BOX, [0, 0, 30, 30]]
    results = [client.segment(path, boxes=boxes), client.segment(str(path), boxes=boxes),
               client.segment(png, boxes=boxes), client.segment(Image.fromarray(img), boxes=boxes),
               client.segment(img, boxes=np.array(boxes))]
    first = results[0]
    assert not first.cached and first.adapter == "base" and first.domain is None
    assert first.prompt_index == [0, 1] and first.masks[0].any()
    for r in results:
        _assert_masks(r, (48, 64))
        # the same pixels whichever form they came in: the same cache entry, the same masks
        assert r.image_id == first.image_id
        for a, b in zip(r.masks, first.masks):
            np.testing.assert_array_equal(a, b)
        assert r.request_id and r.timings_ms["total"] > 0 and r.raw["image_size"] == [48, 64]
    assert all(r.cached for r in results[1:])
    # a JPEG file's bytes go as they are (not re-encoded): its pixels are the JPEG's, not the array's
    jpeg = client.segment(encode(img, "JPEG"), boxes=[BOX])
    assert jpeg.image_id != first.image_id and not jpeg.cached
    # a grey array is sent as a grey PNG, which the server makes RGB by repeating the value
    grey = img[:, :, 0].copy()
    g = client.segment(grey, boxes=[BOX])
    _assert_masks(g, (48, 64))
    assert g.image_id == client.segment(np.repeat(grey[:, :, None], 3, axis=2), boxes=[BOX]).image_id


def test_points_and_multimask_are_grouped_per_prompt(client: Client) -> None:
    img = make_image(seed=32)
    r = client.segment(img, points=[[20, 15], [40, 30]], point_labels=[1, 0], multimask=True)
    _assert_masks(r, (48, 64))
    assert r.prompt_index == [0, 0, 0] and r.num_prompts == 1 and len(r.masks_by_prompt[0]) == 3
    best = int(np.argmax(r.scores))
    np.testing.assert_array_equal(r.best_masks[0], r.masks[best])
    two = client.segment(image_id=r.image_id, boxes=[BOX, [0, 0, 30, 30]], multimask=True)
    assert two.cached and two.prompt_index == [0, 0, 0, 1, 1, 1]
    assert two.masks_array.shape == (2, 3, 48, 64) and two.masks_array.dtype == bool
    np.testing.assert_array_equal(two.masks_array[1, 2], _server_masks(two)[5])
    assert two.scores_by_prompt == [two.scores[:3], two.scores[3:]]
    # labels default to foreground
    fg = client.segment(image_id=r.image_id, points=[[20, 15]])
    assert fg.raw["masks"] == client.segment(image_id=r.image_id, points=[[20, 15]], point_labels=[1]).raw["masks"]


def test_logits_and_mask_inputs_round_trip(client: Client, server: ServerProcess) -> None:
    img = make_image(seed=33)
    r = client.segment(img, boxes=[BOX], return_logits=True)
    (logits,), (low,) = r.logits, r.low_res_logits
    assert logits.dtype == np.float32 and logits.shape == (48, 64)
    np.testing.assert_array_equal(logits > 0, r.masks[0])
    assert low.ndim == 2 and low.shape[0] == low.shape[1] and low.dtype == np.float32
    plain = client.segment(image_id=r.image_id, boxes=[BOX])
    assert plain.logits is None and plain.low_res_logits is None
    # as mask prompts: the client's encodings give what the server's own encodings give
    with httpx.Client(base_url=server.url, timeout=120) as raw:
        for mine, wire in ((low, {"low_res_logits": r.raw["masks"][0]["low_res_logits"]}),
                           (r.masks[0], {"rle": codec.rle_encode(r.masks[0])})):
            got = client.segment(image_id=r.image_id, boxes=[BOX], mask_input=[mine])
            want = raw.post("/segment", json={"image_id": r.image_id, "boxes": [BOX], "mask_input": [wire]})
            assert want.status_code == 200, want.text
            assert got.raw["masks"] == want.json()["masks"]
        # mask inputs alone form the prompts, also in a multipart request with the image
        alone = client.segment(img, mask_input=np.stack([r.masks[0], ~r.masks[0]]))
        assert alone.cached and alone.prompt_index == [0, 1]
    # other wire formats decode to the same masks
    png = client.segment(image_id=r.image_id, boxes=[BOX], output="png")
    assert "rle" not in png.raw["masks"][0]
    np.testing.assert_array_equal(png.masks[0], plain.masks[0])
    assert png.rle[0] == plain.rle[0]


def test_embed_then_prompt_only_follow_ups(client: Client) -> None:
    img = make_image(seed=34)
    e = client.embed(img, domain="polyp")
    assert isinstance(e, EmbedResult)
    assert e.adapter == "polyp@v1" and e.domain == "polyp" and not e.cached and e.image_size == (48, 64)
    r = client.segment(image_id=e.image_id, boxes=[BOX])
    assert r.cached and r.adapter == "polyp@v1" and r.image_id == e.image_id and "encoder" not in r.timings_ms
    _assert_masks(r, (48, 64))
    assert client.embed(img, domain="polyp").cached


def test_domains_route_to_their_adapter(client: Client) -> None:
    img = make_image(seed=5)
    base = client.segment(img, boxes=[BOX])
    polyp = client.segment(img, boxes=[BOX], domain="polyp")
    assert (base.adapter, base.domain) == ("base", None) and (polyp.adapter, polyp.domain) == ("polyp@v1", "polyp")
    assert base.image_id != polyp.image_id and (base.masks[0] != polyp.masks[0]).any()
    assert [d["serving"] for d in client.domains() if d["domain"] == "polyp"] == ["polyp@v1"]
    assert client.health() and "wesam_requests_total" in client.metrics()


def test_errors_are_raised_by_family_with_their_kind(client: Client, server: ServerProcess) -> None:
    img = make_image()
    cases = [
        (lambda: client.segment(img, boxes=[BOX], domain="mars"), NotFoundError, 404, "unknown_domain"),
        (lambda: client.segment(image_id="f" * 32, boxes=[BOX]), NotFoundError, 404, "unknown_image_id"),
        (lambda: client.segment(img, boxes=[[0, 0, 65, 40]]), InvalidRequestError, 422, "invalid_prompt"),
        (lambda: client.segment(b"plain text, no pixels", boxes=[BOX]), InvalidRequestError, 400, "invalid_image"),
        (lambda: client.activate("polyp", "v9"), NotFoundError, 404, "unknown_version"),
        (lambda: Client(server.url).reload(), UnauthorizedError, 401, "unauthorized"),
        (lambda: Client(server.url, admin_token="nope").activate("polyp", 2), UnauthorizedError, 403, "forbidden"),
        (lambda: Client(server.url, admin_token="nope").freeze("polyp"), UnauthorizedError, 403, "forbidden"),
    ]
    for call, cls, status, kind in cases:
        with pytest.raises(cls) as e:
            call()
        err = e.value
        assert type(err) is cls and isinstance(err, WesamError), err
        assert (err.status, err.kind) == (status, kind) and err.message and err.body["kind"] == kind, err
        assert kind in str(err)
    with pytest.raises(NotFoundError) as e:
        client.segment(img, boxes=[BOX], domain="mars")
    assert e.value.request_id and e.value.retry_after is None
    with pytest.raises(ServiceUnreachable) as e:
        Client(f"http://127.0.0.1:{free_port()}", max_retries=0).segment(img, boxes=[BOX])
    assert e.value.kind == "unreachable" and not e.value.sent and e.value.status is None


def test_admin_calls_with_the_token(client: Client) -> None:
    img = make_image(seed=35)
    try:
        assert client.activate("polyp", "v2") == {"domain": "polyp", "serving": "polyp@v2", "previous": "polyp@v1"}
        assert client.segment(img, boxes=[BOX], domain="polyp").adapter == "polyp@v2"
        assert client.pin("polyp", 2)["control"]["pinned"] == 2
        assert client.freeze("polyp", reason="audit")["control"] | {"updated": ""} == {
            "pinned": 2, "frozen": True, "reason": "audit", "updated": ""}
        assert client.control("polyp")["control"]["frozen"]
        assert not client.unfreeze("polyp")["control"]["frozen"]
        assert client.unpin("polyp")["control"]["pinned"] is None
        back = client.rollback("polyp")  # v2 -> v1, frozen
        assert back["serving"] == "polyp@v1" and back["control"]["frozen"]
        assert [row["adapter"] for row in client.lineage("polyp")["chain"]] == ["polyp@v1"]
        reloaded = client.reload()  # nothing changed on disk: nothing (re)loaded
        assert (reloaded["loaded"], reloaded["failed"]) == ([], []), reloaded
    finally:
        client.activate("polyp", 1)
        client.unfreeze("polyp")
        client.unpin("polyp")
    assert client.segment(img, boxes=[BOX], domain="polyp").adapter == "polyp@v1"


def test_async_client_does_the_same(client: Client, server: ServerProcess) -> None:
    img = make_image(seed=36)
    want = client.segment(img, boxes=[BOX], domain="polyp")

    async def main() -> tuple:
        async with AsyncClient(server.url) as a:
            r = await a.segment(img, boxes=[BOX], domain="polyp")
            e = await a.embed(Image.fromarray(img))
            follow = await a.segment(image_id=e.image_id, points=[[20, 15]], point_labels=[1])
            with pytest.raises(NotFoundError) as err:
                await a.segment(img, boxes=[BOX], domain="mars")
            return r, e, follow, err.value, await a.health()

    r, e, follow, err, healthy = asyncio.run(main())
    assert r.image_id == want.image_id and r.cached and r.adapter == "polyp@v1"
    _assert_masks(r, (48, 64))
    np.testing.assert_array_equal(r.masks[0], want.masks[0])
    assert e.adapter == "base" and follow.cached and follow.image_id == e.image_id
    assert err.kind == "unknown_domain" and err.status == 404 and healthy


# -- gRPC -----------------------------------------------------------------------------------------------

def test_grpc_client_gives_the_http_answer(client: Client, server: ServerProcess, tmp_path: Path) -> None:
    img = make_image(seed=37)
    path = tmp_path / "frame.png"
    path.write_bytes(encode(img))
    with GrpcClient(server.grpc_url) as g:
        assert g.health()
        for image, domain in ((img, None), (path, "polyp"), (Image.fromarray(img), "polyp")):
            want = client.segment(image, boxes=[BOX, [0, 0, 30, 30]], domain=domain)
            got = g.segment(image, boxes=[BOX, [0, 0, 30, 30]], domain=domain)
            assert isinstance(got, SegmentResult) and got.raw is None
            assert (got.adapter, got.domain, got.image_id, got.image_size, got.prompt_index) == (
                want.adapter, want.domain, want.image_id, want.image_size, want.prompt_index)
            np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
            for a, b in zip(got.masks, want.masks):
                assert a.dtype == bool
                np.testing.assert_array_equal(a, b)
            assert got.rle == want.rle
        # prompt-only follow-up on the HTTP answer's image_id, points, multimask
        multi = g.segment(image_id=want.image_id, points=[[20, 15]], point_labels=[1], multimask=True)
        http_multi = client.segment(image_id=want.image_id, points=[[20, 15]], point_labels=[1], multimask=True)
        assert multi.masks_array.shape == (1, 3, 48, 64)
        np.testing.assert_array_equal(multi.masks_array, http_multi.masks_array)
        grey = img[:, :, 1].copy()  # raw pixels over gRPC, a grey PNG over HTTP: the same RGB image
        assert g.segment(grey, boxes=[BOX]).image_id == client.segment(grey, boxes=[BOX]).image_id
        for kwargs, cls, status, kind in ((dict(domain="mars"), NotFoundError, 404, "unknown_domain"),
                                          (dict(boxes=[[0, 0, 65, 40]]), InvalidRequestError, 422, "invalid_prompt")):
            with pytest.raises(cls) as e:
                g.segment(img, **{"boxes": [BOX], **kwargs})
            with pytest.raises(cls) as h:
                client.segment(img, **{"boxes": [BOX], **kwargs})
            assert (e.value.status, e.value.kind, e.value.message) == (status, kind, h.value.message)
            assert e.value.request_id
        with pytest.raises(ValueError, match="HTTP-only"):
            g.segment(img, boxes=[BOX], return_logits=True)
    with GrpcClient(f"127.0.0.1:{free_port()}", max_retries=0, timeout=10) as dead:
        with pytest.raises(ServiceUnreachable):
            dead.segment(img, boxes=[BOX])


# -- retries, against tiny real servers that refuse on demand ---------------------------------------------

_OK = {"masks": [{"prompt": 0, "score": 0.5, "rle": codec.rle_encode(np.eye(4, dtype=bool))}], "adapter": "base",
       "image_id": "x" * 32, "image_size": [4, 4], "cached": False, "timings_ms": {"total": 1.0}}


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Answers 503 overloaded with Retry-After: 1 to the first ``refusals`` requests, then 200."""

    refusals = 2
    arrivals: list[tuple[float, str]] = []
    status = 503
    kind = "overloaded"

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        cls = type(self)
        cls.arrivals.append((time.monotonic(), self.path))
        if len(cls.arrivals) <= cls.refusals:
            body, headers = {"error": "queue full", "kind": cls.kind, "status": cls.status, "retry_after": 1}, {
                "Retry-After": "1", "X-Request-Id": f"r{len(cls.arrivals)}"}
            status = cls.status
        else:
            body, headers, status = _OK, {}, 200
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def refusing():
    _Refusing.arrivals, _Refusing.refusals, _Refusing.status, _Refusing.kind = [], 2, 503, "overloaded"
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _gaps() -> list[float]:
    times = [t for t, _ in _Refusing.arrivals]
    return [b - a for a, b in zip(times, times[1:])]


def test_overloaded_is_retried_after_retry_after(refusing: str) -> None:
    img = make_image()
    with Client(refusing, backoff=0.01) as c:
        r = c.segment(img, boxes=[BOX])
    assert r.masks[0].shape == (4, 4) and len(_Refusing.arrivals) == 3
    assert all(gap >= 1.0 for gap in _gaps()), _gaps()  # Retry-After: 1, honoured each time

    _Refusing.arrivals = []
    with Client(refusing, max_retries=0) as c, pytest.raises(OverloadedError) as e:
        c.segment(img, boxes=[BOX])
    assert len(_Refusing.arrivals) == 1
    assert (e.value.status, e.value.kind, e.value.retry_after, e.value.request_id) == (503, "overloaded", 1.0, "r1")

    _Refusing.arrivals = []  # the async client shares the policy
    async def main() -> SegmentResult:
        async with AsyncClient(refusing, backoff=0.01) as a:
            return await a.segment(image_id="x" * 32, boxes=[BOX])

    assert asyncio.run(main()).image_id == "x" * 32 and len(_Refusing.arrivals) == 3
    assert all(gap >= 1.0 for gap in _gaps()), _gaps()


def test_no_retry_for_4xx_or_a_rollback(refusing: str) -> None:
    _Refusing.status, _Refusing.kind = 422, "invalid_prompt"
    with Client(refusing, max_retries=3, backoff=0.01) as c, pytest.raises(InvalidRequestError):
        c.segment(image_id="x" * 32, boxes=[BOX])
    assert len(_Refusing.arrivals) == 1
    _Refusing.arrivals, _Refusing.status, _Refusing.kind = [], 503, "overloaded"
    with Client(refusing, admin_token="t", max_retries=3) as c, pytest.raises(OverloadedError):
        c.rollback("polyp")  # not idempotent: sent once
    assert [p for _, p in _Refusing.arrivals] == ["/adapters/polyp/rollback"]
    _Refusing.arrivals, _Refusing.kind = [], "interrupted"  # a server shutting down: retried
    with Client(refusing, max_retries=3, backoff=0.01) as c:
        assert c.freeze("polyp") == _OK and len(_Refusing.arrivals) == 3


def test_grpc_unavailable_overloaded_is_retried_after_retry_after() -> None:
    """A real grpcio server with the KServe servicer that refuses twice as wesam's endpoint does."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    arrivals: list[float] = []

    class Refusing(pbg.GRPCInferenceServiceServicer):
        def ModelInfer(self, request, context):  # noqa: N802
            arrivals.append(time.monotonic())
            if len(arrivals) <= 2:
                context.set_trailing_metadata((("retry-after", "1"),))
                context.abort(grpc.StatusCode.UNAVAILABLE, "[overloaded] queue full")
            resp = pb.ModelInferResponse(model_name="segment", model_version="1")
            for name, dtype, shape, raw in (
                    ("MASKS", "UINT8", [1, 1, 4, 4], np.eye(4, dtype=np.uint8).tobytes()),
                    ("SCORES", "FP32", [1, 1], np.float32([0.5]).tobytes()),
                    ("ADAPTER", "BYTES", [1], (8).to_bytes(4, "little") + b"polyp@v1"),
                    ("IMAGE_ID", "BYTES", [1], (2).to_bytes(4, "little") + b"id")):
                out = resp.outputs.add()
                out.name, out.datatype = name, dtype
                out.shape.extend(shape)
                resp.raw_output_contents.append(raw)
            return resp

    server = grpc.server(futures.ThreadPoolExecutor(2))
    pbg.add_GRPCInferenceServiceServicer_to_server(Refusing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with GrpcClient(f"127.0.0.1:{port}", backoff=0.01) as g:
            r = g.segment(make_image(), boxes=[BOX])
        assert len(arrivals) == 3 and all(b - a >= 1.0 for a, b in zip(arrivals, arrivals[1:]))
        assert (r.adapter, r.domain, r.image_id) == ("polyp@v1", "polyp", "id")
        np.testing.assert_array_equal(r.masks[0], np.eye(4, dtype=bool))
        arrivals.clear()
        with GrpcClient(f"127.0.0.1:{port}", max_retries=0) as g, pytest.raises(OverloadedError) as e:
            g.segment(make_image(), boxes=[BOX])
        assert len(arrivals) == 1 and (e.value.status, e.value.kind, e.value.retry_after) == (503, "overloaded", 1.0)
    finally:
        server.stop(None)
