"""``GrpcClient``: ``segment`` over the service's KServe-v2 gRPC endpoint, returning the same
``SegmentResult`` and raising the same exceptions as the HTTP clients.

The endpoint (``service/grpc_server.py``) serves one model, ``segment`` version 1, no batch dimension:
inputs ``IMAGE`` (UINT8 [H, W, 3] pixels or BYTES [1] an encoded file) or ``IMAGE_ID`` (BYTES [1]),
``DOMAIN`` (BYTES [1]), ``BOXES`` (FP32 [N, 4]), ``POINTS`` (FP32 [K, 2]) with ``LABELS`` (INT32 [K]),
``MULTIMASK`` (BOOL [1]); outputs ``MASKS`` (UINT8 [N, M, H, W] 0/1), ``SCORES`` (FP32 [N, M]),
``ADAPTER`` and ``IMAGE_ID`` (BYTES [1]). There is no embed call, no mask prompts and no logits over
gRPC (use the HTTP clients for those; a segment answer's ``image_id`` serves follow-ups here too).

Built on ``tritonclient.grpc``'s protocol messages and stub, called directly rather than through its
``InferenceServerClient``: that class turns a failed call into an exception without the trailing
metadata, where the server puts ``retry-after`` when it refuses an overloaded request, and without the
initial metadata that carries the request id. Errors come as ``UNAVAILABLE`` / ``NOT_FOUND`` / ...
with details ``"[kind] message"`` and are raised as the HTTP client would raise the same kind.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import error_from_grpc
from .images import ImageInput, image_tensor
from .prompts import labels as point_label_array
from .prompts import rows
from .results import SegmentResult
from .retry import RetryPolicy, run_sync

MODEL = "segment"
DEFAULT_URL = "127.0.0.1:8001"
MAX_MESSAGE_BYTES = 2**31 - 1  # masks of big images, N x M x H x W bytes, are far over grpcio's 4 MiB default


def _bytes_tensor(value: bytes) -> bytes:
    """One BYTES element in KServe's raw layout: 4-byte little-endian length, then the bytes."""
    return len(value).to_bytes(4, "little") + value


def build_request(image: ImageInput | None = None, *, image_id: str | None = None, boxes: Any = None,
                  points: Any = None, point_labels: Any = None, multimask: bool = False,
                  domain: str | None = None) -> Any:
    """The ``ModelInferRequest`` for these arguments (raw tensor contents, all outputs requested)."""
    from tritonclient.grpc import service_pb2 as pb

    if (image is None) == (image_id is None):
        raise ValueError("give exactly one of `image` or `image_id`")
    tensors: list[tuple[str, str, list[int], bytes]] = []
    if image is not None:
        dtype, value = image_tensor(image)
        if dtype == "UINT8":
            assert isinstance(value, np.ndarray)
            tensors.append(("IMAGE", "UINT8", list(value.shape), value.tobytes()))
        else:
            assert isinstance(value, bytes)
            tensors.append(("IMAGE", "BYTES", [1], _bytes_tensor(value)))
    else:
        tensors.append(("IMAGE_ID", "BYTES", [1], _bytes_tensor(str(image_id).encode())))
    if domain is not None:
        tensors.append(("DOMAIN", "BYTES", [1], _bytes_tensor(domain.encode())))
    box_rows = rows(boxes, 4, "boxes")
    if box_rows is not None:
        tensors.append(("BOXES", "FP32", list(box_rows.shape), box_rows.astype(np.float32).tobytes()))
    point_rows = rows(points, 2, "points")
    if point_rows is not None:
        lab = point_label_array(point_labels, len(point_rows))
        tensors.append(("POINTS", "FP32", list(point_rows.shape), point_rows.astype(np.float32).tobytes()))
        tensors.append(("LABELS", "INT32", [len(lab)], lab.astype("<i4").tobytes()))
    if box_rows is None and point_rows is None:
        raise ValueError("no prompt: give boxes or points")
    if multimask:
        tensors.append(("MULTIMASK", "BOOL", [1], np.array([True]).tobytes()))
    request = pb.ModelInferRequest(model_name=MODEL)
    for name, dtype, shape, raw in tensors:
        t = request.inputs.add()
        t.name, t.datatype = name, dtype
        t.shape.extend(shape)
        request.raw_input_contents.append(raw)
    return request


def parse_response(response: Any, request_id: str | None = None) -> SegmentResult:
    from tritonclient.grpc import InferResult

    result = InferResult(response)
    return SegmentResult.from_arrays(result.as_numpy("MASKS"), result.as_numpy("SCORES"),
                                     adapter=result.as_numpy("ADAPTER").reshape(-1)[0].decode(),
                                     image_id=result.as_numpy("IMAGE_ID").reshape(-1)[0].decode(),
                                     request_id=request_id)


def _request_id(call: Any) -> str | None:
    try:
        return dict(call.initial_metadata() or ()).get("x-request-id")
    except Exception:  # a call that failed before any metadata
        return None


class GrpcClient:
    """Synchronous client of the KServe-v2 gRPC endpoint (``wesam serve`` starts it on :8001).

    ``url``: ``host:port``. ``timeout``: seconds per attempt (the gRPC deadline). ``max_retries``,
    ``backoff``, ``backoff_max``: as for :class:`wesam.client.Client` (``UNAVAILABLE [overloaded]``
    is retried after its ``retry-after``). ``client_id`` / ``capture=False``: sent as the
    ``x-wesam-client`` / ``x-wesam-capture: off`` metadata. One channel per instance (grpcio
    multiplexes concurrent calls on it; thread-safe); close it with :meth:`close` or ``with``.
    """

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float = 120.0, max_retries: int = 3,
                 backoff: float = 0.25, backoff_max: float = 10.0, client_id: str | None = None,
                 capture: bool = True) -> None:
        import grpc
        from tritonclient.grpc import service_pb2_grpc as pbg

        self.url = url
        self.timeout = timeout
        self.retry = RetryPolicy(max_retries=max_retries, backoff=backoff, backoff_max=backoff_max)
        self._channel = grpc.insecure_channel(url, options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                                            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        self._stub = pbg.GRPCInferenceServiceStub(self._channel)
        metadata = []
        if client_id is not None:
            metadata.append(("x-wesam-client", client_id))
        if not capture:
            metadata.append(("x-wesam-capture", "off"))
        self._metadata = tuple(metadata)

    def segment(self, image: ImageInput | None = None, *, image_id: str | None = None, boxes: Any = None,
                points: Any = None, point_labels: Any = None, multimask: bool = False, domain: str | None = None,
                mask_input: Any = None, return_logits: bool = False) -> SegmentResult:
        """As :meth:`wesam.client.Client.segment` (same prompts, same result); an array or RGB/grey PIL
        image goes as raw pixels, a path or bytes as the file. ``mask_input`` and ``return_logits``
        are not available over gRPC (``ValueError``): use the HTTP client."""
        if mask_input is not None or return_logits:
            raise ValueError("mask_input and return_logits are HTTP-only: use wesam.client.Client")
        request = build_request(image, image_id=image_id, boxes=boxes, points=points, point_labels=point_labels,
                                multimask=multimask, domain=domain)
        return run_sync(lambda: self._infer(request), self.retry)

    def _infer(self, request: Any) -> SegmentResult:
        import grpc

        try:
            response, call = self._stub.ModelInfer.with_call(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            trailing = {k: v for k, v in (e.trailing_metadata() or ()) if isinstance(v, str)}
            raise error_from_grpc(e.code().name, e.details() or "", trailing, _request_id(e)) from None
        return parse_response(response, _request_id(call))

    def health(self) -> bool:
        """``True`` when the server and the ``segment`` model are ready; ``ServiceUnreachable`` when
        it does not answer. Not retried."""
        import grpc
        from tritonclient.grpc import service_pb2 as pb

        try:
            return bool(self._stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=self.timeout).ready)
        except grpc.RpcError as e:
            raise error_from_grpc(e.code().name, e.details() or "", {}, None) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "GrpcClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GrpcClient({self.url!r})"
