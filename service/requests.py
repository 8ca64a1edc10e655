"""HTTP request bodies -> validated requests, with a 4xx ``ServiceError`` for every bad input.

Bodies are read here, not by BentoML's serde: BentoML's file fields download URL strings on
the server (an SSRF surface), spool uploads to temporary files and answer some bad bodies with
500. Reading the body ourselves, with a byte limit, keeps every failure a clear 4xx.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import numpy as np
from pydantic import BaseModel, ValidationError

from . import codec
from .config import ServeConfig
from .errors import BadRequest, InvalidImage, InvalidPrompt, PayloadTooLarge, ServiceError
from .messages import InferItem, PromptArrays
from .schemas import EmbedRequest, SegmentRequest

JSON_TYPES = ("application/json", "text/json")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


@dataclass
class ParsedRequest:
    """A request ready for the runtime, plus what the front keeps for the response."""

    item: InferItem
    output: str = "rle"
    decode_ms: float = 0.0


async def read_fields(content_type: str, stream: AsyncIterator[bytes], headers: Any,
                      limit: int) -> dict[str, Any]:
    """The body's fields: JSON object, or form fields (files as bytes). Never more than ``limit`` bytes."""
    media = content_type.split(";")[0].strip().lower()
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes, over the limit of {limit}")
    chunks: list[bytes] = []
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if media in FORM_TYPES:
        return await _form_fields(headers, body, limit)
    if media and media not in JSON_TYPES and not media.endswith("+json"):
        raise ServiceError(f"unsupported Content-Type {media!r}: send application/json or multipart/form-data",
                           status=415, kind="unsupported_media_type")
    if not body.strip():
        raise BadRequest("empty request body: send a JSON object")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(data).__name__}")
    return data


async def _form_fields(headers: Any, body: bytes, limit: int) -> dict[str, Any]:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import FormParser, MultiPartException, MultiPartParser

    async def once() -> AsyncIterator[bytes]:
        yield body
        yield b""

    try:
        if headers.get("content-type", "").lower().startswith("multipart/"):
            form = await MultiPartParser(headers, once(), max_files=4, max_fields=32, max_part_size=limit).parse()
        else:
            form = await FormParser(headers, once()).parse()
    except (MultiPartException, ValueError, KeyError) as e:
        raise BadRequest(f"malformed form body: {e}") from None
    out: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key in out:
            raise BadRequest(f"form field {key!r} given more than once")
        if isinstance(value, UploadFile):
            out[key] = await value.read()
            await value.close()
        else:
            out[key] = value
    return out


def _form_value(key: str, value: Any) -> Any:
    """Form fields are strings; lists, numbers and booleans arrive JSON-encoded."""
    if isinstance(value, bytes) or key in ("image", "image_id", "domain", "output"):
        return value
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        return value


def _validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                             for err in e.errors(include_url=False)[:5])
        raise BadRequest(f"invalid request: {problems}") from None


def _image(fields: dict[str, Any], config: ServeConfig) -> tuple[np.ndarray | None, float]:
    raw = fields.get("image")
    if raw is None:
        return None, 0.0
    t0 = time.perf_counter()
    if isinstance(raw, str):
        raw = codec.b64decode(raw, config.max_image_bytes)
    image = codec.decode_image(raw, max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels)
    return image, (time.perf_counter() - t0) * 1000


def parse_segment(fields: dict[str, Any], config: ServeConfig, *, form: bool = False) -> ParsedRequest:
    """Validate a /segment body and decode its image (CPU work: call it off the event loop)."""
    image_field = fields.get("image")
    if form:
        fields = {k: _form_value(k, v) for k, v in fields.items()}
    req: SegmentRequest = _validate(SegmentRequest, {k: v for k, v in fields.items() if k != "image"})
    if image_field is not None and req.image_id is not None:
        raise BadRequest("give either `image` or `image_id`, not both")
    if image_field is None and req.image_id is None:
        raise BadRequest("missing `image` (or `image_id` of an embedded image)")
    if image_field is not None and not isinstance(image_field, (str, bytes)):
        raise InvalidImage("`image` must be a base64 string (or a file part in multipart/form-data)")
    prompts = build_prompts(req, config)
    image, decode_ms = _image({"image": image_field}, config)
    item = InferItem(image=image, content_hash=codec.content_hash(image) if image is not None else None,
                     image_id=req.image_id, domain=req.domain, prompts=prompts, multimask=req.multimask,
                     return_logits=req.return_logits)
    return ParsedRequest(item=item, output=req.output, decode_ms=decode_ms)


def parse_embed(fields: dict[str, Any], config: ServeConfig, *, form: bool = False) -> ParsedRequest:
    image_field = fields.get("image")
    if form:
        fields = {k: _form_value(k, v) for k, v in fields.items()}
    req: EmbedRequest = _validate(EmbedRequest, {k: v for k, v in fields.items() if k != "image"})
    if image_field is None:
        raise BadRequest("missing `image`")
    if not isinstance(image_field, (str, bytes)):
        raise InvalidImage("`image` must be a base64 string (or a file part in multipart/form-data)")
    image, decode_ms = _image({"image": image_field}, config)
    item = InferItem(image=image, content_hash=codec.content_hash(image), domain=req.domain)
    return ParsedRequest(item=item, decode_ms=decode_ms)


# -- prompts ----------------------------------------------------------------------------------------

def _finite_array(values: Any, width: int, what: str, form: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except ValueError:
        arr = np.zeros((0, 0))
    if arr.ndim != 2 or arr.shape[1] != width:
        raise InvalidPrompt(f"{what} must be a list of {form} entries")
    if not np.isfinite(arr).all():
        raise InvalidPrompt(f"{what} contain NaN or infinite values")
    if (arr < 0).any():
        raise InvalidPrompt(f"{what} have negative coordinates (pixels start at 0)")
    return arr


def build_prompts(req: SegmentRequest, config: ServeConfig) -> PromptArrays:
    """Shape checks and layout; ranges against the image size are checked by the engine."""
    boxes = points = labels = None
    if req.boxes is not None and len(req.boxes) > 0:
        if len(req.boxes) > config.max_prompts:
            raise InvalidPrompt(f"{len(req.boxes)} boxes, over the limit of {config.max_prompts} prompts")
        boxes = _finite_array(req.boxes, 4, "boxes", "[x0, y0, x1, y1]")
        if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
            raise InvalidPrompt("boxes must be [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1")
    if req.points is not None and len(req.points) > 0:
        if len(req.points) > config.max_points:
            raise InvalidPrompt(f"{len(req.points)} points, over the limit of {config.max_points}")
        points = _finite_array(req.points, 2, "points", "[x, y]")
        if req.point_labels is None or len(req.point_labels) != len(points):
            raise InvalidPrompt(f"point_labels must have one label per point ({len(points)}), "
                                f"got {0 if req.point_labels is None else len(req.point_labels)}")
        labels = np.asarray(req.point_labels, dtype=np.int32)
        if not np.isin(labels, (0, 1)).all():
            raise InvalidPrompt("point_labels must be 1 (foreground) or 0 (background)")
    elif req.point_labels:
        raise InvalidPrompt("point_labels given without points")

    n = len(boxes) if boxes is not None else (1 if points is not None else 0)
    out = PromptArrays()
    if boxes is not None:
        out.boxes = boxes.astype(np.float32)
    if points is not None:
        out.point_coords = np.repeat(points[None].astype(np.float32), n, axis=0)
        out.point_labels = np.repeat(labels[None], n, axis=0)
    if req.mask_input:
        _mask_inputs(req, config, n, out)
    if out.count() == 0:
        raise InvalidPrompt("no prompt: give boxes, points (with point_labels) or mask_input")
    return out


def _mask_inputs(req: SegmentRequest, config: ServeConfig, n: int, out: PromptArrays) -> None:
    entries = req.mask_input or []
    if n and len(entries) != n:
        raise InvalidPrompt(f"mask_input needs one entry per prompt ({n}), got {len(entries)}")
    if len(entries) > config.max_prompts:
        raise InvalidPrompt(f"{len(entries)} mask inputs, over the limit of {config.max_prompts} prompts")
    kinds = {("rle" if e.rle is not None else "logits" if e.low_res_logits is not None else "none")
             for e in entries}
    if "none" in kinds or len(kinds) != 1:
        raise InvalidPrompt("every mask_input entry needs exactly one of `rle` or `low_res_logits`, "
                            "the same kind for all entries")
    if kinds == {"rle"}:
        pixels = sum(math.prod(e.rle.size) if len(e.rle.size) == 2 else 0 for e in entries)
        if pixels > 8 * config.max_image_pixels:
            raise PayloadTooLarge(f"mask_input totals {pixels} pixels, over the limit of "
                                  f"{8 * config.max_image_pixels}")
        masks = []
        for i, e in enumerate(entries):
            try:
                masks.append(codec.rle_decode(e.rle.model_dump()))
            except ValueError as err:
                raise InvalidPrompt(f"mask_input[{i}].rle: {err}") from None
        if len({m.shape for m in masks}) != 1:
            raise InvalidPrompt("mask_input masks have different sizes")
        out.mask_binary = np.stack(masks)
        return
    arrays = []
    for i, e in enumerate(entries):
        try:
            a = codec.npy_from_b64(e.low_res_logits, 64 * 1024 * 1024)
        except (ValueError, ServiceError) as err:
            raise InvalidPrompt(f"mask_input[{i}].low_res_logits: {err}") from None
        if a.ndim != 2 or a.shape[0] != a.shape[1] or not np.issubdtype(a.dtype, np.floating):
            raise InvalidPrompt(f"mask_input[{i}].low_res_logits must be a square float (L, L) array, "
                                f"got {a.shape} {a.dtype}")
        if not np.isfinite(a).all():
            raise InvalidPrompt(f"mask_input[{i}].low_res_logits contains NaN or infinite values")
        arrays.append(a.astype(np.float32))
    if len({a.shape for a in arrays}) != 1:
        raise InvalidPrompt("mask_input low_res_logits have different sizes")
    out.mask_logits = np.stack(arrays)[:, None]
