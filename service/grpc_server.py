"""A KServe-v2 / Triton gRPC endpoint (``GRPCInferenceService``) serving the segment pipeline.

Why not BentoML or PyTriton: BentoML's ``serve-grpc`` rejects ``@bentoml.service`` classes
(bentoml/BentoML#4634, #5607), and PyTriton 0.7.0's Python backend stub fails on this Python
(3.11.7) with ``AttributeError: '_thread.RLock' object has no attribute '_recursion_count'`` when it
starts the model. So this is a plain ``grpcio`` server implementing the protocol with the
messages and servicer base class that ``tritonclient`` ships (``tritonclient.grpc.service_pb2``),
so NVIDIA's ``tritonclient.grpc`` talks to it like to Triton.

It runs as threads inside the process that holds the model (the HTTP worker with one worker, else
the model-runtime process) and queues its requests in the same ``Batcher`` as the HTTP API, so they
share batches, the resident model, the adapters, the embedding cache and the metrics. Prompts are
checked by the same ``prompts.validate_prompts`` as HTTP's, straight from the tensors' arrays.
Errors become gRPC status codes in one place: handlers raise, ``ErrorInterceptor`` answers with
``GRPC_CODES[kind]`` and the details ``[kind] message``. An ``overloaded`` refusal (queue full) is
UNAVAILABLE at once, with ``retry-after`` (seconds) in the trailing metadata.

Model ``segment`` (version 1, no batch dimension: prompts and image sizes vary per request):

inputs (all optional except one of IMAGE / IMAGE_ID and at least one prompt)
    IMAGE       UINT8 [H, W, 3] RGB pixels, or BYTES [1] an encoded PNG/JPEG/WebP/BMP/TIFF file
    IMAGE_ID    BYTES [1]   a previous response's IMAGE_ID (cached embedding) instead of IMAGE
    DOMAIN      BYTES [1]   domain whose active adapter to use, or domain@vN (that version: an operator's
                            preview, never captured); empty or absent: base model
    BOXES       FP32 [N, 4] x0, y0, x1, y1 in pixels; one mask set per box
    POINTS      FP32 [K, 2] x, y in pixels;  LABELS INT32 [K] 1 foreground, 0 background
    MULTIMASK   BOOL [1]    three masks per prompt instead of one
outputs
    MASKS       UINT8 [N, M, H, W] 0/1 at the image size (M = 1, or 3 with MULTIMASK)
    SCORES      FP32 [N, M] predicted IoU
    ADAPTER     BYTES [1]   "domain@vN" or "base"
    IMAGE_ID    BYTES [1]   send it back instead of IMAGE for prompt-only requests
metadata (as HTTP's headers, for capture: service/capture.py)
    x-request-id (else the request's ``id``, else a new UUID; sent back in the initial metadata),
    x-wesam-client, x-wesam-capture: off
"""

from __future__ import annotations

import logging
import time
from concurrent import futures
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from . import codec
from .capture import REQUEST_ID_KEY, grpc_metadata, request_meta
from .config import ServeConfig
from .errors import BadRequest, InvalidImage, ServiceError, UnknownModel, to_service_error
from .messages import InferItem, InferResult
from .metrics import domain_label
from .prompts import validate_prompts

if TYPE_CHECKING:
    import grpc

    from .batcher import Batcher
    from .engine import SegmentEngine
    from .metrics import Metrics

log = logging.getLogger("wesam.service")

MODEL = "segment"
RETRY_AFTER_KEY = "retry-after"  # trailing metadata of an ``overloaded`` refusal, in seconds
VERSION = "1"
PLATFORM = "wesam_python"
INPUTS = [  # name, datatype, dims (-1: variable)
    ("IMAGE", "UINT8", [-1, -1, 3]),
    ("IMAGE_ID", "BYTES", [1]),
    ("DOMAIN", "BYTES", [1]),
    ("BOXES", "FP32", [-1, 4]),
    ("POINTS", "FP32", [-1, 2]),
    ("LABELS", "INT32", [-1]),
    ("MULTIMASK", "BOOL", [1]),
]
OUTPUTS = [
    ("MASKS", "UINT8", [-1, -1, -1, -1]),
    ("SCORES", "FP32", [-1, -1]),
    ("ADAPTER", "BYTES", [1]),
    ("IMAGE_ID", "BYTES", [1]),
]
_NP = {"UINT8": np.uint8, "INT8": np.int8, "UINT16": np.uint16, "INT16": np.int16, "INT32": np.int32,
       "INT64": np.int64, "UINT32": np.uint32, "UINT64": np.uint64, "FP16": np.float16, "FP32": np.float32,
       "FP64": np.float64, "BOOL": np.bool_}
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}


# kind -> gRPC status code (``grpc.StatusCode`` names), the twin of ``errors.HTTP_STATUS``: the same
# kinds (tests/test_service_core.py checks both cover every kind), and the code that corresponds to
# the kind's HTTP status (every 4xx client error, too large ones included, is INVALID_ARGUMENT).
GRPC_CODES: dict[str, str] = {
    "bad_request": "INVALID_ARGUMENT",
    "invalid_image": "INVALID_ARGUMENT",
    "unauthorized": "UNAUTHENTICATED",
    "forbidden": "PERMISSION_DENIED",
    "unknown_domain": "NOT_FOUND",
    "unknown_version": "NOT_FOUND",
    "unknown_image_id": "NOT_FOUND",
    "unknown_model": "NOT_FOUND",
    "unknown_sample": "NOT_FOUND",
    "domain_mismatch": "FAILED_PRECONDITION",
    "adapter_refused": "FAILED_PRECONDITION",
    "no_registry": "FAILED_PRECONDITION",
    "capture_disabled": "FAILED_PRECONDITION",
    "preview_disabled": "FAILED_PRECONDITION",
    "too_large": "INVALID_ARGUMENT",
    "unsupported_media_type": "INVALID_ARGUMENT",
    "invalid_prompt": "INVALID_ARGUMENT",
    "internal": "INTERNAL",
    "adapter_unavailable": "UNAVAILABLE",
    "overloaded": "UNAVAILABLE",
    "invalid_adapter_ref": "INVALID_ARGUMENT",
    "invalid_argument": "INVALID_ARGUMENT",
    "invalid_data": "INVALID_ARGUMENT",
    "adapter": "FAILED_PRECONDITION",
    "config": "INTERNAL",
    "model_load": "INTERNAL",
    "export": "INTERNAL",
    "error": "INTERNAL",
    "interrupted": "UNAVAILABLE",
    "sample_store": "UNAVAILABLE",
    "lease_held": "FAILED_PRECONDITION",
    "lease_lost": "FAILED_PRECONDITION",
    "worker": "INTERNAL",
    "non_finite_loss": "INTERNAL",
}


def grpc_status(error: ServiceError) -> tuple["grpc.StatusCode", str]:
    """The gRPC code and details answering ``error``."""
    import grpc

    code = grpc.StatusCode[GRPC_CODES.get(error.kind, "INTERNAL")]
    if isinstance(error, UnknownModel):  # KServe routing, worded as Triton does (no kind prefix)
        return code, error.message
    return code, f"[{error.kind}] {error.message}"


def _bytes_elements(raw: bytes) -> list[bytes]:
    from tritonclient.utils import deserialize_bytes_tensor

    try:
        return [bytes(x) for x in deserialize_bytes_tensor(raw).reshape(-1)]
    except Exception:
        raise BadRequest("malformed BYTES tensor (expected 4-byte little-endian length prefixes)") from None


def read_inputs(request: Any, max_bytes: int) -> dict[str, tuple[str, np.ndarray | list[bytes]]]:
    """name -> (datatype, array or list of bytes); raw contents and typed contents both accepted."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents")
    out: dict[str, tuple[str, Any]] = {}
    for i, t in enumerate(request.inputs):
        shape = [int(d) for d in t.shape]
        if any(d < 0 for d in shape):
            raise BadRequest(f"input {t.name}: negative dimension in shape {shape}")
        count = int(np.prod(shape)) if shape else 1
        if t.datatype == "BYTES":
            values = _bytes_elements(raw[i]) if raw else [bytes(x) for x in t.contents.bytes_contents]
            if len(values) != count:
                raise BadRequest(f"input {t.name}: shape {shape} but {len(values)} elements")
            out[t.name] = ("BYTES", values)
            continue
        dtype = _NP.get(t.datatype)
        if dtype is None:
            raise BadRequest(f"input {t.name}: unsupported datatype {t.datatype}")
        if raw:
            if len(raw[i]) != count * np.dtype(dtype).itemsize:
                raise BadRequest(f"input {t.name}: {len(raw[i])} bytes do not fit shape {shape} {t.datatype}")
            arr = np.frombuffer(raw[i], dtype=dtype).reshape(shape)
        else:
            values = getattr(t.contents, _CONTENTS[t.datatype])
            if len(values) != count:
                raise BadRequest(f"input {t.name}: shape {shape} but {len(values)} elements")
            arr = np.asarray(values, dtype=dtype).reshape(shape)
        out[t.name] = (t.datatype, arr)
    unknown = set(out) - {name for name, _, _ in INPUTS}
    if unknown:
        raise BadRequest(f"unknown inputs {sorted(unknown)}; model {MODEL} takes "
                         + ", ".join(name for name, _, _ in INPUTS))
    return out


def _one_string(inputs: dict[str, Any], name: str) -> str | None:
    if name not in inputs:
        return None
    dtype, values = inputs[name]
    if dtype != "BYTES" or len(values) != 1:
        raise BadRequest(f"{name} must be BYTES [1]")
    try:
        return values[0].decode("utf-8") or None
    except UnicodeDecodeError:
        raise BadRequest(f"{name} is not UTF-8") from None


def _prompt_tensor(inputs: dict[str, Any], name: str, ndim: int | None) -> np.ndarray | None:
    """A numeric prompt tensor's array; the rank KServe metadata declares (``ndim``) is checked here,
    everything else by ``validate_prompts``."""
    if name not in inputs:
        return None
    dtype, value = inputs[name]
    if dtype == "BYTES":
        raise BadRequest(f"{name} must be numeric")
    value = np.asarray(value)
    if ndim is not None and value.ndim != ndim:
        raise BadRequest(f"invalid prompt tensors: {name} must have {ndim} dimensions, got shape "
                         f"{list(value.shape)}")
    return value


def build_item(inputs: dict[str, Any], config: ServeConfig) -> InferItem:
    image = None
    if "IMAGE" in inputs:
        dtype, value = inputs["IMAGE"]
        if dtype == "BYTES":
            if len(value) != 1:
                raise InvalidImage("IMAGE as BYTES must hold exactly one encoded file")
            image = codec.decode_image(value[0], max_bytes=config.max_image_bytes,
                                       max_pixels=config.max_image_pixels)
        elif dtype == "UINT8":
            image = codec.check_pixels(np.array(value), max_pixels=config.max_image_pixels)
        else:
            raise InvalidImage(f"IMAGE must be UINT8 [H, W, 3] pixels or BYTES [1] file, got {dtype}")
    image_id = _one_string(inputs, "IMAGE_ID")
    if image is None and image_id is None:
        raise BadRequest("give IMAGE or IMAGE_ID")
    if image is not None and image_id is not None:
        raise BadRequest("give either IMAGE or IMAGE_ID, not both")
    labels = _prompt_tensor(inputs, "LABELS", None)
    multimask = False
    if "MULTIMASK" in inputs:
        dtype, value = inputs["MULTIMASK"]
        if dtype != "BOOL" or value.size != 1:
            raise BadRequest("MULTIMASK must be BOOL [1]")
        multimask = bool(value.reshape(-1)[0])
    boxes = _prompt_tensor(inputs, "BOXES", 2)
    points = _prompt_tensor(inputs, "POINTS", 2)
    prompts = validate_prompts(config, boxes=boxes, points=points,
                               point_labels=None if labels is None else labels.reshape(-1))
    return InferItem(image=image, content_hash=codec.content_hash(image) if image is not None else None,
                     image_id=image_id, domain=_one_string(inputs, "DOMAIN"), prompts=prompts,
                     multimask=multimask)


def _error_interceptor_class():
    import grpc

    class ErrorInterceptor(grpc.ServerInterceptor):
        """The one place where exceptions become gRPC statuses (lorax's pattern): a handler raises a
        ``WesamError`` (or anything else: a bug, logged and answered INTERNAL) and the call is
        aborted with ``GRPC_CODES[kind]``."""

        def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
            handler = continuation(handler_call_details)
            if handler is None or handler.unary_unary is None:  # every KServe v2 call used here is unary
                return handler
            method = handler_call_details.method.rsplit("/", 1)[-1]
            behaviour = handler.unary_unary

            def guarded(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return behaviour(request, context)
                except Exception as e:
                    if context.code() not in (None, grpc.StatusCode.OK):
                        raise  # the handler aborted the call itself
                    error = to_service_error(e, f"gRPC {method}")
                    if error.retry_after is not None:  # as HTTP's Retry-After header
                        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(error.retry_after)),))
                    code, details = grpc_status(error)
                    context.abort(code, details)

            return grpc.unary_unary_rpc_method_handler(guarded, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)

    return ErrorInterceptor


def _servicer_class():
    from tritonclient.grpc import model_config_pb2 as mc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    from wesam.version import __version__

    class KServeServicer(pbg.GRPCInferenceServiceServicer):
        """The KServe v2 calls; errors are raised and answered by ``ErrorInterceptor``."""

        def __init__(self, engine: SegmentEngine, config: ServeConfig, metrics: Metrics | None = None,
                     batcher: Batcher | None = None) -> None:
            self.engine = engine
            self.config = config
            self.metrics = metrics
            self.batcher = batcher

        # -- health and metadata -------------------------------------------------------------
        def ServerLive(self, request, context):
            return pb.ServerLiveResponse(live=True)

        def ServerReady(self, request, context):
            return pb.ServerReadyResponse(ready=bool(self.engine.ready))

        @staticmethod
        def _check_model(name: str, version: str) -> None:
            if name != MODEL:
                raise UnknownModel(f"unknown model {name!r}; this server has {MODEL!r}")
            if version not in ("", VERSION):
                raise UnknownModel(f"model {MODEL} has version {VERSION} only")

        def ModelReady(self, request, context):
            if request.name != MODEL or request.version not in ("", VERSION):
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=bool(self.engine.ready))

        def ServerMetadata(self, request, context):
            return pb.ServerMetadataResponse(name="wesam", version=__version__, extensions=[])

        def ModelMetadata(self, request, context):
            self._check_model(request.name, request.version)
            tm = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=MODEL, versions=[VERSION], platform=PLATFORM,
                inputs=[tm(name=n, datatype=d, shape=s) for n, d, s in INPUTS],
                outputs=[tm(name=n, datatype=d, shape=s) for n, d, s in OUTPUTS])

        def ModelConfig(self, request, context):
            self._check_model(request.name, request.version)
            types = {"UINT8": mc.TYPE_UINT8, "BYTES": mc.TYPE_STRING, "FP32": mc.TYPE_FP32,
                     "INT32": mc.TYPE_INT32, "BOOL": mc.TYPE_BOOL}
            cfg = mc.ModelConfig(name=MODEL, platform=PLATFORM, max_batch_size=0)
            for n, d, s in INPUTS:
                cfg.input.append(mc.ModelInput(name=n, data_type=types[d], dims=s, optional=True))
            for n, d, s in OUTPUTS:
                cfg.output.append(mc.ModelOutput(name=n, data_type=types[d], dims=s))
            return pb.ModelConfigResponse(config=cfg)

        # -- inference -----------------------------------------------------------------------
        def ModelInfer(self, request, context):
            self._check_model(request.model_name, request.model_version)
            t0 = time.perf_counter()
            label, adapter = "base", "none"
            # Metadata x-request-id (else the request's `id`, else a new UUID), x-wesam-client,
            # x-wesam-capture: as HTTP's headers; the id comes back in the initial metadata.
            meta = request_meta(grpc_metadata(context), fallback_id=request.id)
            context.send_initial_metadata(((REQUEST_ID_KEY, meta.request_id),))
            try:
                inputs = read_inputs(request, self.config.max_body_bytes)
                if self.batcher is not None:  # refuse before decoding an image the model cannot take now
                    self.batcher.check(has_image="IMAGE" in inputs)
                item = build_item(inputs, self.config)
                item.request_id, item.client, item.capture = meta.request_id, meta.client, meta.capture
                label = domain_label(item.domain, self.engine.served_domains())
                if self.batcher is not None:
                    result = self.batcher.infer_sync(item, timeout=self.config.request_deadline_s)
                else:
                    result = self.engine.infer([item])[0]
                if result.error is not None:
                    raise ServiceError.from_json(result.error)
                adapter, label = result.adapter or "base", domain_label(result.domain)
                response = self._response(request, result)
            except Exception as e:
                error = to_service_error(e, "gRPC ModelInfer")
                self._observe(label, adapter, error.status, t0, error.kind)
                raise error from None  # answered by ErrorInterceptor
            self._observe(label, adapter, 200, t0)
            return response

        def _observe(self, label: str, adapter: str, status: int, t0: float, kind: str | None = None) -> None:
            if self.metrics is None:
                return
            if kind is not None:
                self.metrics.error(kind, "grpc")
            self.metrics.request("grpc", label, adapter, status, time.perf_counter() - t0)

        def _response(self, request, result: InferResult):
            from tritonclient.utils import serialize_byte_tensor

            wanted = [o.name for o in request.outputs] or [n for n, _, _ in OUTPUTS]
            unknown = set(wanted) - {n for n, _, _ in OUTPUTS}
            if unknown:
                raise BadRequest(f"unknown outputs {sorted(unknown)}")
            tensors = {
                "MASKS": ("UINT8", np.ascontiguousarray(result.masks, dtype=np.uint8)),
                "SCORES": ("FP32", np.ascontiguousarray(result.scores, dtype=np.float32)),
                "ADAPTER": ("BYTES", np.array([result.adapter.encode()], dtype=np.object_)),
                "IMAGE_ID": ("BYTES", np.array([result.image_id.encode()], dtype=np.object_)),
            }
            resp = pb.ModelInferResponse(model_name=MODEL, model_version=VERSION, id=request.id)
            for name in wanted:
                dtype, arr = tensors[name]
                out = resp.outputs.add()
                out.name, out.datatype = name, dtype
                out.shape.extend(arr.shape)
                resp.raw_output_contents.append(serialize_byte_tensor(arr).item() if dtype == "BYTES"
                                                else arr.tobytes())
            return resp

    return KServeServicer


def handler_threads(config: ServeConfig) -> int:
    """gRPC handler threads: one per request the batcher can hold (both lanes' queues and a running
    batch each) plus a few. A handler waits for its request's answer, so with fewer threads the
    calls beyond them would wait inside grpcio for a thread, unbounded and unseen by the batcher;
    with these, every call reaches the batcher at once and is admitted or refused (UNAVAILABLE)."""
    return 2 * config.max_queue + config.max_batch_size + config.runtime_threads + 4


def start_grpc_server(engine: SegmentEngine, config: ServeConfig, metrics: Metrics | None = None,
                      port: int | None = None, batcher: Batcher | None = None) -> grpc.Server:
    """Start the server on ``config.grpc_host:port``; returns the ``grpc.Server`` (call ``.stop()``).

    ``batcher``: queue inference there (the server); without it, calls run the engine directly.
    """
    import grpc
    from tritonclient.grpc import service_pb2_grpc as pbg

    port = config.grpc_port if port is None else port
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=handler_threads(config), thread_name_prefix="wesam-grpc"),
        options=[
            ("grpc.max_receive_message_length", config.max_body_bytes),
            ("grpc.max_send_message_length", max(config.max_mask_pixels * 2, 64 * 1024 * 1024)),
            # grpcio shares ports between processes by default; a second server must fail loudly instead.
            ("grpc.so_reuseport", 0),
        ],
        interceptors=[_error_interceptor_class()()])
    pbg.add_GRPCInferenceServiceServicer_to_server(_servicer_class()(engine, config, metrics, batcher), server)
    address = f"{config.grpc_host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot listen for gRPC on {address}: {e}") from None
    if not bound:
        raise OSError(f"cannot listen for gRPC on {address} (port in use?)")
    server.start()
    log.info("KServe v2 gRPC endpoint on %s (model %r)", address.replace(f":{port}", f":{bound}"), MODEL)
    server.wesam_port = bound  # type: ignore[attr-defined]
    return server
