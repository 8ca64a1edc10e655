"""HTTP request bodies -> validated requests, with a 4xx ``ServiceError`` for every bad input.

Bodies are read here, not by BentoML's serde: BentoML's file fields download URL strings on
the server (an SSRF surface), spool uploads to temporary files and answer some bad bodies with
500. Reading the body ourselves, with a byte limit, keeps every failure a clear 4xx.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, AsyncIterator

from pydantic import BaseModel, ValidationError

from . import codec
from .config import ServeConfig
from .errors import BadRequest, InvalidImage, PayloadTooLarge, UnsupportedMediaType
from .messages import InferItem
from .prompts import validate_prompts
from .schemas import EmbedRequest, SegmentRequest

JSON_TYPES = ("application/json", "text/json")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


@dataclass
class ParsedRequest:
    """A request ready for the runtime, plus what the front keeps for the response."""

    item: InferItem
    output: str = "rle"


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
        raise UnsupportedMediaType(f"unsupported Content-Type {media!r}: send application/json or "
                                   "multipart/form-data")
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


def _image_bytes(raw: str | bytes | None, config: ServeConfig) -> bytes | None:
    """The encoded image file (base64 decoded; a URL refused), for the runtime to decode once.

    Only the byte size is checked here; format, header and pixel limits are checked where the file is
    decoded (``SegmentEngine.prepare``), before any pixel is decoded.
    """
    if raw is None:
        return None
    data = codec.b64decode(raw, config.max_image_bytes) if isinstance(raw, str) else raw
    if not data:
        raise InvalidImage("image is empty (0 bytes)")
    if len(data) > config.max_image_bytes:
        raise PayloadTooLarge(f"image is {len(data)} bytes, over the limit of {config.max_image_bytes}")
    return data


def parse_segment(fields: dict[str, Any], config: ServeConfig, *, form: bool = False) -> ParsedRequest:
    """Validate a /segment body (fields, prompts) and base64-decode its image; the runtime decodes
    the image file and encodes the masks in the requested ``output``."""
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
    prompts = validate_prompts(config, boxes=req.boxes, points=req.points, point_labels=req.point_labels,
                               mask_input=req.mask_input)
    item = InferItem(image_bytes=_image_bytes(image_field, config), image_id=req.image_id, domain=req.domain,
                     prompts=prompts, multimask=req.multimask, return_logits=req.return_logits, output=req.output)
    return ParsedRequest(item=item, output=req.output)


def parse_embed(fields: dict[str, Any], config: ServeConfig, *, form: bool = False) -> ParsedRequest:
    image_field = fields.get("image")
    if form:
        fields = {k: _form_value(k, v) for k, v in fields.items()}
    req: EmbedRequest = _validate(EmbedRequest, {k: v for k, v in fields.items() if k != "image"})
    if image_field is None:
        raise BadRequest("missing `image`")
    if not isinstance(image_field, (str, bytes)):
        raise InvalidImage("`image` must be a base64 string (or a file part in multipart/form-data)")
    item = InferItem(image_bytes=_image_bytes(image_field, config), domain=req.domain)
    return ParsedRequest(item=item)
