"""Overload, end to end: a real ``wesam serve`` with a queue bound of one request per lane, flooded by
concurrent real clients over HTTP (httpx) and gRPC (grpcio with the KServe v2 messages).

Every answer must be a success or a refusal in wesam's format: HTTP 503 ``overloaded`` JSON with a
``Retry-After`` header, gRPC UNAVAILABLE ``[overloaded] ...`` with ``retry-after`` trailing metadata.
Never a timeout, a 5xx or BentoML's bare error. No timing is asserted: a flood is repeated until the
bound has been hit by both protocols.
"""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from service_support import encode, make_base, make_image

from wesam.service import codec
from wesam.service.config import ServeConfig
from wesam.service.launch import ServerProcess, free_port

HTTP_CLIENTS, GRPC_CLIENTS, MAX_ROUNDS = 16, 8, 10
BOX = [40.0, 30.0, 400.0, 300.0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("overload")
    config = ServeConfig(model=str(make_base(root)), registry=None, threads=1, workers=1, grpc_port=free_port(),
                         poll_seconds=0, max_queue=1, max_batch_size=2, runtime_threads=1)
    with ServerProcess(config, bentoml_home=root / "bentoml", extra_env={"OMP_NUM_THREADS": "1"}) as srv:
        yield srv


@dataclass
class HttpAnswer:
    status: int
    body: dict
    retry_after: str | None


@dataclass
class GrpcAnswer:
    code: str
    details: str
    retry_after: str | None
    masks_shape: tuple | None


def _grpc_request(image: np.ndarray):
    from tritonclient.grpc import service_pb2 as pb

    req = pb.ModelInferRequest(model_name="segment")
    for name, dtype, arr in (("IMAGE", "UINT8", image), ("BOXES", "FP32", np.array([BOX], np.float32))):
        t = req.inputs.add()
        t.name, t.datatype = name, dtype
        t.shape.extend(arr.shape)
        req.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
    return req


def _flood_round(srv: ServerProcess, round_no: int) -> tuple[list[HttpAnswer], list[GrpcAnswer]]:
    """One flood: every client released at once by a barrier, each with a new 480x640 image."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    barrier = threading.Barrier(HTTP_CLIENTS + GRPC_CLIENTS)
    images = [make_image(480, 640, seed=1000 * round_no + k) for k in range(HTTP_CLIENTS + GRPC_CLIENTS)]

    def http_client(k: int) -> HttpAnswer:
        body = {"image": base64.b64encode(encode(images[k], "JPEG")).decode(), "boxes": [BOX]}
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            client.get("/livez")  # connect before the barrier
            barrier.wait()
            r = client.post("/segment", json=body)
        return HttpAnswer(r.status_code, r.json(), r.headers.get("retry-after"))

    def grpc_client(k: int) -> GrpcAnswer:
        request = _grpc_request(images[HTTP_CLIENTS + k])
        with grpc.insecure_channel(srv.grpc_url, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            stub.ServerLive(pb.ServerLiveRequest())  # connect before the barrier
            barrier.wait()
            try:
                resp, call = stub.ModelInfer.with_call(request, timeout=120)
            except grpc.RpcError as e:
                trailing = dict(e.trailing_metadata() or ())
                return GrpcAnswer(e.code().name, e.details() or "", trailing.get("retry-after"), None)
        return GrpcAnswer("OK", "", None, tuple(resp.outputs[0].shape))

    with ThreadPoolExecutor(HTTP_CLIENTS + GRPC_CLIENTS) as pool:
        http = [pool.submit(http_client, k) for k in range(HTTP_CLIENTS)]
        grpc_ = [pool.submit(grpc_client, k) for k in range(GRPC_CLIENTS)]
        return [f.result() for f in http], [f.result() for f in grpc_]


def _metric(text: str, name: str, **labels: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()))


def test_a_flood_gets_answers_or_quick_refusals_never_timeouts(server: ServerProcess) -> None:
    http_answers: list[HttpAnswer] = []
    grpc_answers: list[GrpcAnswer] = []
    # Until each protocol has met the bound and been served at least once: both protocols share one
    # queue, so in a single flood either may take every admitted place.
    for round_no in range(MAX_ROUNDS):
        h, g = _flood_round(server, round_no)
        http_answers += h
        grpc_answers += g
        if ({a.status == 200 for a in http_answers} == {True, False}
                and {a.code == "OK" for a in grpc_answers} == {True, False}):
            break
    refused = [a for a in http_answers if a.status != 200]
    assert refused and len(refused) < len(http_answers), [a.status for a in http_answers]
    for a in http_answers:
        if a.status == 200:
            assert a.body["image_size"] == [480, 640]
            assert codec.rle_decode(a.body["masks"][0]["rle"]).shape == (480, 640)
            continue
        # the only other answer: 503 overloaded, wesam's JSON, with Retry-After (also in the body)
        assert a.status == 503 and a.body["kind"] == "overloaded" and a.body["status"] == 503, a
        assert a.body["error"] and a.retry_after is not None and int(a.retry_after) >= 1, a
        assert a.body["retry_after"] == int(a.retry_after)
    grpc_refused = [a for a in grpc_answers if a.code != "OK"]
    assert grpc_refused and len(grpc_refused) < len(grpc_answers), [a.code for a in grpc_answers]
    for a in grpc_answers:
        if a.code == "OK":
            assert a.masks_shape == (1, 1, 480, 640)
            continue
        assert a.code == "UNAVAILABLE" and a.details.startswith("[overloaded] "), a
        assert a.retry_after is not None and int(a.retry_after) >= 1, a
    # refusals are counted by kind, per protocol; the server is unharmed and serves the next request
    with httpx.Client(base_url=server.url, timeout=120) as client:
        metrics = client.get("/metrics").text
        assert _metric(metrics, "wesam_errors_total", kind="overloaded", endpoint="segment") == len(refused)
        assert _metric(metrics, "wesam_errors_total", kind="overloaded", endpoint="grpc") == len(grpc_refused)
        assert _metric(metrics, "wesam_requests_total", endpoint="segment", status="503") == len(refused)
        assert client.get("/readyz").status_code == 200
        queue = client.get("/adapters").json()["queue"]
        assert queue["max_queue"] == 1 and queue["encode"]["refused"] == len(refused) + len(grpc_refused)
        assert queue["encode"]["waiting"] == queue["encode"]["running"] == 0
        r = client.post("/segment", json={"image": base64.b64encode(encode(make_image(seed=7))).decode(),
                                          "boxes": [[1, 1, 30, 30]]})
        assert r.status_code == 200, r.text
    assert "Traceback" not in server.log_tail(2000)
