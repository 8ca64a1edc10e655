"""What the HTTP front hands the model runtime and gets back (pickled when they are two processes).

Plain pydantic models holding bytes and numpy arrays; the engine takes and returns them directly,
so the gRPC endpoint and tests use the same types without a server. ``RuntimeClient`` is the
front's view of the runtime.

The HTTP front sends the image as the client sent it (``image_bytes``: the encoded file, ~50 KB for
a 480x640 JPEG, not 900 KB of pixels) and the output encoding it wants (``output``); the runtime
decodes and hashes the image once, and answers with the masks already encoded (``encoded_masks``:
RLE strings of a few KB instead of full-size boolean arrays).
"""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict


class PromptArrays(BaseModel):
    """Prompts for one image, as ``prompts.validate_prompts`` makes them: shapes, counts and values
    checked, not yet coordinates against the image (its size may be unknown until the engine).

    point_coords (N, K, 2) float32, point_labels (N, K) int32, boxes (N, 4) float32,
    mask_binary (N, H, W) bool at the original size, mask_logits (N, 1, L, L) float32.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)
    point_coords: Any = None
    point_labels: Any = None
    boxes: Any = None
    mask_binary: Any = None
    mask_logits: Any = None

    def count(self) -> int:
        for x in (self.point_coords, self.boxes, self.mask_binary, self.mask_logits):
            if x is not None:
                return len(x)
        return 0


class InferItem(BaseModel):
    """One request to the runtime: an image (or the id of a cached embedding) and optional prompts.

    Without prompts only the embedding is made (``/embed``).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)
    # The image, as one of: the encoded file (``image_bytes``, decoded once by the engine), or pixels
    # (``image``, (H, W, 3) uint8: gRPC UINT8 tensors, in-process callers). Whoever sets
    # ``content_hash`` has validated ``image`` (``codec.decode_image`` / ``check_pixels``) and hashed
    # it (``codec.content_hash``): the engine validates and hashes pixels that come without one.
    image: Any = None
    image_bytes: bytes | None = None
    content_hash: str | None = None
    image_id: str | None = None
    domain: str | None = None
    prompts: PromptArrays | None = None
    multimask: bool = False
    return_logits: bool = False
    # ``rle``/``png``/``polygons``: the engine answers with ``InferResult.encoded_masks`` in that
    # encoding (the HTTP API's ``masks`` list) instead of arrays. None: arrays (gRPC, in-process).
    output: str | None = None
    # Who asked, for capture (service/capture.py): the request id the answer carries, the client id
    # (X-Wesam-Client / x-wesam-client), and False when the request opted out (X-Wesam-Capture: off).
    request_id: str | None = None
    client: str | None = None
    capture: bool = True
    # Time spent on the item before the engine answers it (``decode_image``, ``queue``); merged
    # into ``InferResult.timings_ms``.
    timings_ms: dict[str, float] = {}


class InferResult(BaseModel):
    """The runtime's answer; ``error`` (a ``ServiceError.to_json()``) instead of raising, so one bad
    item never fails the other requests of its batch."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    image_id: str | None = None
    adapter: str | None = None
    domain: str | None = None
    cached: bool = False
    image_size: tuple[int, int] | None = None
    masks: Any = None  # (N, M, H, W) bool
    scores: Any = None  # (N, M) float32
    logits: Any = None  # (N, M, H, W) float32, with return_logits
    low_res_logits: Any = None  # (N, M, L, L) float32, with return_logits
    # With ``InferItem.output``: the HTTP answer's ``masks`` list, already encoded (the arrays above
    # are then None: they never cross the process boundary).
    encoded_masks: list[dict[str, Any]] | None = None
    timings_ms: dict[str, float] = {}
    error: dict[str, Any] | None = None


class RuntimeClient(Protocol):
    """The model runtime as the HTTP front and the admin API call it: BentoML's dependency proxy
    in the server (``service._RuntimeClient``), an in-process engine in tests (``front.LocalRuntime``).

    ``activate`` answers a refusal as ``ServiceError.to_json()`` instead of raising, because
    exceptions do not cross BentoML's process boundary with their kind.
    """

    async def infer(self, items: list[InferItem]) -> list[InferResult]: ...

    async def decode(self, item: InferItem) -> InferResult: ...

    async def status(self) -> dict[str, Any]: ...

    async def reload(self, force: bool = True) -> dict[str, Any]: ...

    async def activate(self, domain: str, version: int) -> dict[str, Any]: ...

    # Each version's adapter.json summary for operators (``SegmentEngine.versions``); like
    # ``activate``, a refusal comes back as ``ServiceError.to_json()``.
    async def versions(self, domain: str) -> dict[str, Any]: ...

    # The online worker's controls (pin, freeze, rollback, lineage: ``SegmentEngine.worker_control``)
    # and capture administration; like ``activate``, errors come back as ``ServiceError.to_json()``.
    async def worker_control(self, domain: str, action: str,
                             params: dict[str, Any] | None = None) -> dict[str, Any]: ...

    async def capture_stats(self) -> dict[str, Any]: ...

    async def capture_delete(self, request_id: str) -> dict[str, Any]: ...

    async def capture_delete_client(self, domain: str, client: str) -> dict[str, Any]: ...
