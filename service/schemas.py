"""The public HTTP API's request and response bodies (their JSON schemas go into BentoML's OpenAPI).

Coordinates are pixels of the original image, x to the right and y down; boxes are
``[x0, y0, x1, y1]``. Masks come back at the original image size.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

OutputFormat = Literal["rle", "png", "polygons"]

IMAGE_DOC = ("The image: base64 of PNG/JPEG/WebP/BMP/TIFF bytes (a data: URL prefix is accepted) in JSON, "
             "or a file part named `image` in multipart/form-data (the other fields are then form fields, "
             "JSON-encoded where they are lists). URLs are refused: the server never fetches anything.")
DOMAIN_DOC = ("Route to this domain's active adapter version (see GET /adapters). Absent or `base`: the "
              "base model. `domain@vN` (e.g. `polyp@v2`): that version, active or not: an operator's preview "
              "of a version before activating it (loaded on demand into a small LRU; never captured for "
              "online self-training; `preview_disabled` when the server keeps no preview slots). With "
              "`image_id`: absent means the domain the image was embedded for; `domain@vN` must be the "
              "version it was embedded with.")


class Rle(BaseModel):
    """COCO run-length encoding, as ``pycocotools.mask.encode`` writes it (column-major)."""

    size: list[int] = Field(description="[height, width]")
    counts: str | list[int] = Field(description="compressed counts string (or uncompressed list, input only)")


class MaskInput(BaseModel):
    """A previous mask fed back as a prompt: a binary mask (RLE at the original size) or low-res logits."""

    model_config = ConfigDict(extra="forbid")
    rle: Rle | None = None
    low_res_logits: str | None = Field(
        None, description="base64 .npy float32 (L, L) array, as returned in `low_res_logits`")


class SegmentRequest(BaseModel):
    """POST /segment. Give `image` or `image_id`, and at least one of boxes, points or mask_input.

    One mask set per box; points without boxes form one prompt; points given with boxes are added
    to every box's prompt. `mask_input` has one entry per prompt (or forms the prompts alone).
    """

    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(None, description=IMAGE_DOC)
    image_id: str | None = Field(None, description="from a previous /embed or /segment response: "
                                                     "reuses the cached embedding, no image needed")
    domain: str | None = Field(None, description=DOMAIN_DOC, examples=["polyp"])
    boxes: list[list[float]] | None = Field(None, description="[[x0, y0, x1, y1], ...]",
                                           examples=[[[10, 20, 200, 180]]])
    points: list[list[float]] | None = Field(None, description="[[x, y], ...]", examples=[[[100, 90]]])
    point_labels: list[int] | None = Field(None, description="one per point: 1 foreground, 0 background",
                                           examples=[[1]])
    mask_input: list[MaskInput] | None = Field(None, description="one per prompt")
    multimask: bool = Field(False, description="three masks per prompt instead of one")
    output: OutputFormat = Field("rle", description="mask encoding: COCO RLE, base64 PNG, or polygons")
    return_logits: bool = Field(False, description="add full-size float32 logits and low-res logits "
                                                   "(base64 .npy) to every mask")


class EmbedRequest(BaseModel):
    """POST /embed: compute and cache the embedding of (image, domain)."""

    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(None, description=IMAGE_DOC)
    domain: str | None = Field(None, description=DOMAIN_DOC, examples=["polyp"])


class MaskOut(BaseModel):
    prompt: int = Field(description="index of the prompt (box) this mask answers")
    score: float = Field(description="the model's predicted IoU")
    rle: Rle | None = None
    png: str | None = Field(None, description="base64 PNG, 1 = object")
    polygons: list[list[float]] | None = Field(None, description="outer contours, [x0, y0, x1, y1, ...]")
    logits: str | None = Field(None, description="base64 .npy float32 (H, W), with return_logits")
    low_res_logits: str | None = Field(None, description="base64 .npy float32 (L, L), with return_logits")


class SegmentResponse(BaseModel):
    masks: list[MaskOut]
    adapter: str = Field(description="`domain@vN`, or `base`", examples=["polyp@v1"])
    domain: str | None = None
    image_id: str = Field(description="send it instead of the image in follow-up requests")
    image_size: list[int] = Field(description="[height, width]")
    cached: bool = Field(description="the embedding came from the cache (no encoder run)")
    timings_ms: dict[str, float] = Field(description="decode_image, encoder, decoder, encode_masks, total, ...")


class EmbedResponse(BaseModel):
    image_id: str
    adapter: str = Field(examples=["polyp@v1"])
    domain: str | None = None
    image_size: list[int]
    cached: bool
    timings_ms: dict[str, float]

