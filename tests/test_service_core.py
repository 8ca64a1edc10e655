"""The serving layer's plain objects, without a server: codec, request parsing, cache, router/engine."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from service_support import corrupt_weights, encode, make_base, make_image, publish_adapter, reference_model

from wesam.sam.predictor import Prompts, SamPredictorCore
from wesam.adapters.registry import Registry
from wesam.service import codec
from wesam.service.admin import check_admin, parse_version
from wesam.service.cache import CacheEntry, EmbeddingCache
from wesam.service.config import ConfigError, ServeConfig
from wesam.service.engine import SegmentEngine
from wesam.service.errors import HTTP_STATUS, InvalidPrompt, ServiceError, to_service_error
from wesam.service.messages import InferItem, PromptArrays
from wesam.service.prompts import validate_prompts
from wesam.service.requests import parse_segment

LIMITS = dict(max_bytes=1 << 20, max_pixels=256 * 256)


def _png_with_size(w: int, h: int) -> bytes:
    """A PNG header claiming ``w`` x ``h`` (no valid pixel data): a decompression bomb's first bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b""))


# -- codec ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_decode_to_the_same_pixels(fmt: str) -> None:
    img = make_image()
    got = codec.decode_image(encode(img, fmt) if fmt != "WEBP" else _webp_lossless(img), **LIMITS)
    np.testing.assert_array_equal(got, img)


def _webp_lossless(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def test_modes_become_rgb_and_jpeg_decodes() -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(make_image()[..., 0]).save(buf, format="PNG")  # grayscale
    gray = codec.decode_image(buf.getvalue(), **LIMITS)
    assert gray.shape == (48, 64, 3) and (gray[..., 0] == gray[..., 2]).all()
    rgba = np.dstack([make_image(), np.full((48, 64), 7, np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    np.testing.assert_array_equal(codec.decode_image(buf.getvalue(), **LIMITS), make_image())
    assert codec.decode_image(encode(make_image(), "JPEG"), **LIMITS).shape == (48, 64, 3)


@pytest.mark.parametrize("data, status, words", [
    (b"", 400, "empty"),
    (b"hello, I am not an image", 400, "not an image"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 400, "not an image"),  # EPS would run Ghostscript
    (None, 400, "truncated"),
    (_png_with_size(100_000, 100_000), 413, "pixels"),
    (b"x" * ((1 << 20) + 1), 413, "bytes"),
])
def test_bad_images_are_4xx(data: bytes | None, status: int, words: str) -> None:
    if data is None:
        full = encode(make_image(96, 128))
        data = full[: len(full) // 2]
    with pytest.raises(ServiceError) as e:
        codec.decode_image(data, **LIMITS)
    assert e.value.status == status and words in e.value.message


def test_base64_accepts_data_urls_and_refuses_urls() -> None:
    png = encode(make_image())
    assert codec.b64decode("data:image/png;base64," + base64.b64encode(png).decode(), 1 << 20) == png
    for url in ("http://127.0.0.1/x.png", "https://example.org/a.jpg", "file:///etc/passwd", "ftp://h/x"):
        with pytest.raises(ServiceError, match="never fetches URLs"):
            codec.b64decode(url, 1 << 20)
    with pytest.raises(ServiceError, match="not valid base64"):
        codec.b64decode("@@@@", 1 << 20)


def test_mask_encodings_round_trip() -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((37, 53)) > 0.6
    rle = codec.rle_encode(mask)
    want = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert rle == {"size": [37, 53], "counts": want["counts"].decode()}
    np.testing.assert_array_equal(codec.rle_decode(rle), mask)
    np.testing.assert_array_equal(codec.rle_decode({"size": [2, 2], "counts": [1, 2, 1]}),
                                  np.array([[False, True], [True, False]]))
    from PIL import Image

    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(codec.png_encode(mask))))).astype(bool)
    np.testing.assert_array_equal(png, mask)
    square = np.zeros((20, 20), bool)
    square[5:15, 4:12] = True
    (poly,) = codec.polygons_encode(square)
    xs, ys = poly[0::2], poly[1::2]
    assert (min(xs), max(xs), min(ys), max(ys)) == (4, 11, 5, 14)
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(codec.npy_from_b64(codec.npy_b64(arr), 1 << 20), arr)


# -- request parsing --------------------------------------------------------------------------------

CONFIG = ServeConfig(registry=None, max_prompts=4, max_points=3, max_image_mb=1, max_image_pixels=256 * 256)


def _b64(img: np.ndarray) -> str:
    return base64.b64encode(encode(img)).decode()


def test_parse_segment_layout() -> None:
    img = make_image()
    p = parse_segment({"image": _b64(img), "boxes": [[1, 2, 30, 40], [0, 0, 5, 5]], "points": [[3, 4]],
                       "point_labels": [1], "domain": "polyp"}, CONFIG)
    item = p.item
    # the encoded file travels to the runtime, which decodes and hashes it once (engine.prepare)
    assert item.image_bytes == encode(img) and item.image is None and item.content_hash is None
    assert item.prompts.boxes.shape == (2, 4) and item.prompts.point_coords.shape == (2, 1, 2)
    assert item.prompts.point_labels.tolist() == [[1], [1]] and item.domain == "polyp" and p.output == "rle"
    assert item.output == "rle"  # the runtime encodes the masks
    only_points = parse_segment({"image_id": "abc", "points": [[3, 4], [5, 6]], "point_labels": [1, 0]}, CONFIG)
    assert only_points.item.prompts.point_coords.shape == (1, 2, 2) and only_points.item.image is None
    # multipart: a file part and JSON-encoded form fields
    form = parse_segment({"image": encode(img), "boxes": "[[1, 2, 30, 40]]", "multimask": "true",
                          "output": "png", "domain": "polyp"}, CONFIG, form=True)
    assert form.item.multimask and form.output == "png" and form.item.prompts.boxes.shape == (1, 4)
    assert form.item.image_bytes == encode(img) and form.item.output == "png"


@pytest.mark.parametrize("body, status, words", [
    ({"boxes": [[1, 2, 3, 4]]}, 400, "missing `image`"),
    ({"image_id": "x", "image": "AAAA", "boxes": [[1, 2, 3, 4]]}, 400, "not both"),
    ({"image_id": "x"}, 422, "no prompt"),
    ({"image_id": "x", "boxes": [[1, 2, 3, 4]] * 5}, 422, "over the limit of 4"),
    ({"image_id": "x", "points": [[1, 2]] * 4, "point_labels": [1] * 4}, 422, "over the limit of 3"),
    ({"image_id": "x", "points": [[1, 2]], "point_labels": [1, 0]}, 422, "one label per point"),
    ({"image_id": "x", "points": [[1, 2]], "point_labels": [2]}, 422, "1 (foreground) or 0"),
    ({"image_id": "x", "boxes": [[1, 2, 3]]}, 422, "[x0, y0, x1, y1]"),
    ({"image_id": "x", "boxes": [[5, 2, 3, 4]]}, 422, "x0 <= x1"),
    ({"image_id": "x", "boxes": [[-1, 2, 3, 4]]}, 422, "negative"),
    ({"image_id": "x", "box": [[1, 2, 3, 4]]}, 400, "box"),
    ({"image_id": "x", "boxes": [[1, 2, 3, 4]], "output": "svg"}, 400, "output"),
    ({"image": "http://127.0.0.1:1/x.png", "boxes": [[1, 2, 3, 4]]}, 400, "never fetches URLs"),
    ({"image": 5, "boxes": [[1, 2, 3, 4]]}, 400, "base64 string"),
    ({"image_id": "x", "boxes": [[1, 2, 3, 4]], "mask_input": [{}]}, 422, "exactly one of"),
])
def test_parse_segment_errors(body: dict, status: int, words: str) -> None:
    with pytest.raises(ServiceError) as e:
        parse_segment(body, CONFIG)
    assert e.value.status == status and words in e.value.message, e.value.to_json()


def test_oversize_image_is_413() -> None:
    # the pixel limit is read from the header where the file is decoded, before any pixel is decoded
    item = parse_segment({"image": _b64(make_image(300, 300)), "boxes": [[1, 2, 3, 4]]}, CONFIG).item
    with pytest.raises(ServiceError) as e:
        codec.decode_image(item.image_bytes, max_bytes=CONFIG.max_image_bytes, max_pixels=CONFIG.max_image_pixels)
    assert e.value.status == 413 and "pixels" in e.value.message
    with pytest.raises(ServiceError) as e:  # the byte limit already in the front
        parse_segment({"image": base64.b64encode(b"x" * (CONFIG.max_image_bytes + 1)).decode(),
                       "boxes": [[1, 2, 3, 4]]}, CONFIG)
    assert e.value.status == 413 and "bytes" in e.value.message


# -- prompts: one validation for HTTP and gRPC -------------------------------------------------------

# The same bad prompt, as JSON fields and as KServe tensors: (JSON fields, gRPC tensors, words).
SAME_BAD_PROMPTS = [
    ({"boxes": [[1, 2, 3, 4]] * 5}, {"BOXES": ("FP32", np.tile(np.float32([1, 2, 3, 4]), (5, 1)))},
     "5 boxes, over the limit of 4"),
    ({"boxes": [[1, 2, 3]]}, {"BOXES": ("FP32", np.float32([[1, 2, 3]]))}, "[x0, y0, x1, y1] entries"),
    ({"boxes": [[5, 2, 3, 4]]}, {"BOXES": ("FP32", np.float32([[5, 2, 3, 4]]))}, "x0 <= x1"),
    ({"boxes": [[-1, 2, 3, 4]]}, {"BOXES": ("FP32", np.float32([[-1, 2, 3, 4]]))}, "negative"),
    ({"points": [[1, 2]] * 4, "point_labels": [1] * 4},
     {"POINTS": ("FP32", np.ones((4, 2), np.float32)), "LABELS": ("INT32", np.ones(4, np.int32))},
     "4 points, over the limit of 3"),
    ({"points": [[1, 2]], "point_labels": [1, 0]},
     {"POINTS": ("FP32", np.float32([[1, 2]])), "LABELS": ("INT32", np.int32([1, 0]))},
     "one label per point (1), got 2"),
    ({"points": [[1, 2]]}, {"POINTS": ("FP32", np.float32([[1, 2]]))}, "one label per point (1), got 0"),
    ({"points": [[1, 2]], "point_labels": [2]},
     {"POINTS": ("FP32", np.float32([[1, 2]])), "LABELS": ("INT32", np.int32([2]))}, "1 (foreground) or 0"),
    ({"point_labels": [1]}, {"LABELS": ("INT32", np.int32([1]))}, "point_labels given without points"),
    ({}, {}, "no prompt"),
    ({"boxes": []}, {"BOXES": ("FP32", np.zeros((0, 4), np.float32))}, "no prompt"),
]


@pytest.mark.parametrize("fields, tensors, words", SAME_BAD_PROMPTS)
def test_the_same_bad_prompt_gets_the_same_error_over_http_and_grpc(fields: dict, tensors: dict, words: str) -> None:
    from wesam.service.grpc_server import build_item

    with pytest.raises(ServiceError) as http:
        parse_segment({"image": _b64(make_image()), **fields}, CONFIG)
    with pytest.raises(ServiceError) as grpc:
        build_item({"IMAGE": ("UINT8", make_image()), **tensors}, CONFIG)
    assert isinstance(http.value, InvalidPrompt) and words in http.value.message, http.value.to_json()
    assert http.value.to_json() == grpc.value.to_json()
    # and the function both call answers it alike from lists and arrays
    arrays = {"boxes": "BOXES", "points": "POINTS", "point_labels": "LABELS"}
    with pytest.raises(InvalidPrompt) as direct:
        validate_prompts(CONFIG, **{k: tensors[v][1] for k, v in arrays.items() if v in tensors})
    assert direct.value.to_json() == http.value.to_json()


def test_validate_prompts_layout_from_lists_and_arrays() -> None:
    from_lists = validate_prompts(CONFIG, boxes=[[1, 2, 30, 40], [0, 0, 5, 5]], points=[[3, 4]], point_labels=[1])
    from_arrays = validate_prompts(CONFIG, boxes=np.float32([[1, 2, 30, 40], [0, 0, 5, 5]]),
                                   points=np.float32([[3, 4]]), point_labels=np.int32([[1]]))  # [1, K] labels
    for p in (from_lists, from_arrays):
        assert p.boxes.dtype == np.float32 and p.boxes.shape == (2, 4)
        assert p.point_coords.shape == (2, 1, 2) and p.point_labels.tolist() == [[1], [1]]
        assert p.point_labels.dtype == np.int32 and p.mask_binary is None and p.count() == 2
    # a huge label is refused as a label (it used to overflow int32 into a 500)
    with pytest.raises(InvalidPrompt, match="1 \\(foreground\\) or 0"):
        validate_prompts(CONFIG, points=[[1, 2]], point_labels=[2 ** 40])
    with pytest.raises(InvalidPrompt, match="NaN"):
        validate_prompts(CONFIG, boxes=np.float32([[0, 0, np.nan, 4]]))
    masks_rle = {"rle": codec.rle_encode(np.eye(6, dtype=bool))}
    masks = validate_prompts(CONFIG, mask_input=[masks_rle])
    assert masks.mask_binary.shape == (1, 6, 6) and masks.count() == 1
    with pytest.raises(InvalidPrompt, match="one entry per prompt"):
        validate_prompts(CONFIG, boxes=[[1, 2, 3, 4]], mask_input=[masks_rle] * 2)
    with pytest.raises(InvalidPrompt, match="mask_input\\[0\\]"):
        validate_prompts(CONFIG, mask_input=[{"png": "x"}])


def test_grpc_tensors_of_the_wrong_rank_are_bad_requests() -> None:
    from wesam.service.grpc_server import build_item

    for tensors in ({"BOXES": ("FP32", np.float32([1, 2, 3, 4]))},
                    {"POINTS": ("FP32", np.float32([[[1, 2]]])), "LABELS": ("INT32", np.int32([1]))},
                    {"BOXES": ("BYTES", [b"1"])}):
        with pytest.raises(ServiceError) as e:
            build_item({"IMAGE": ("UINT8", make_image()), **tensors}, CONFIG)
        assert e.value.kind == "bad_request" and e.value.status == 400, e.value.to_json()


# -- errors: one table per protocol -----------------------------------------------------------------

def _error_kinds() -> dict[str, str]:
    """Every error kind defined in the code: ``kind`` of every WesamError subclass, and kinds passed
    by name (``SomeError(..., kind="x")``) anywhere in the product. The client's own errors
    (``wesam.client``: answers it received, or none) are raised in the caller's process and never
    reach a server's request boundary, so they are left out."""
    import importlib
    import re

    from wesam.errors import WesamError

    root = Path(__file__).resolve().parent.parent
    for module in ("wesam.sam.zoo", "wesam.data.errors", "wesam.adapters.errors", "wesam.export.errors",
                   "wesam.export.tensorrt", "wesam.service.errors"):
        importlib.import_module(module)
    kinds: dict[str, str] = {}
    todo = [WesamError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("wesam.client"):
            continue
        kinds.setdefault(cls.kind, cls.__qualname__)
    by_name = re.compile(r"\w*Error\((?:[^()]|\([^()]*\))*?\bkind=\"(\w+)\"", re.S)
    for folder in ("wesam", "adapters", "export", "service", "bench"):
        for f in (root / folder).rglob("*.py"):
            if f.is_relative_to(root / "wesam" / "client"):
                continue
            for kind in by_name.findall(f.read_text()):
                kinds.setdefault(kind, str(f.relative_to(root)))
    return kinds


def test_error_tables_cover_every_kind() -> None:
    from wesam.service.grpc_server import GRPC_CODES

    kinds = _error_kinds()
    assert {"bad_request", "invalid_prompt", "config", "adapter", "invalid_adapter_ref", "model_load",
            "invalid_data", "export", "invalid_argument"} <= set(kinds)
    assert not set(kinds) - set(HTTP_STATUS), {k: kinds[k] for k in set(kinds) - set(HTTP_STATUS)}
    assert set(GRPC_CODES) == set(HTTP_STATUS)
    # the gRPC code follows from the HTTP status as it always did (clients see the same codes)
    by_status = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 409: "FAILED_PRECONDITION", 413: "INVALID_ARGUMENT", 415: "INVALID_ARGUMENT",
                 422: "INVALID_ARGUMENT", 503: "UNAVAILABLE"}
    for kind, status in HTTP_STATUS.items():
        assert GRPC_CODES[kind] == by_status.get(status, "INTERNAL"), kind


def test_service_errors_take_their_status_from_the_table() -> None:
    from wesam.service import errors

    expected = {"BadRequest": 400, "InvalidImage": 400, "PayloadTooLarge": 413, "UnsupportedMediaType": 415,
                "InvalidPrompt": 422, "UnknownDomain": 404, "UnknownVersion": 404, "UnknownImageId": 404,
                "UnknownModel": 404, "DomainMismatch": 409, "AdapterRefused": 409, "NoRegistry": 409,
                "AdapterUnavailable": 503, "Unauthorized": 401, "Forbidden": 403, "Overloaded": 503,
                "Internal": 500}
    for name, status in expected.items():
        err = getattr(errors, name)("x")
        assert err.status == status and err.to_json() == {"error": "x", "kind": err.kind, "status": status}
    assert ServiceError("x", kind="too_large").status == 413
    assert ServiceError("x", kind="too_large", status=400).status == 400  # per-instance override
    back = ServiceError.from_json(errors.Forbidden("no").to_json())
    assert (back.kind, back.status, back.message) == ("forbidden", 403, "no")


def test_core_errors_are_mapped_by_kind() -> None:
    from wesam.adapters.errors import AdapterError, InvalidAdapterRef
    from wesam.adapters.ref import AdapterRef
    from wesam.data.errors import DataError
    from wesam.sam.zoo import ModelLoadError
    from wesam.service.grpc_server import grpc_status

    with pytest.raises(InvalidAdapterRef) as bad_ref:
        AdapterRef.parse("polyp@3")
    cases = [(bad_ref.value, 400, "invalid_adapter_ref", "INVALID_ARGUMENT"),
             (AdapterError("tampered"), 409, "adapter", "FAILED_PRECONDITION"),
             (DataError("/x.png", "unreadable"), 400, "invalid_data", "INVALID_ARGUMENT"),
             (ModelLoadError("no weights"), 500, "model_load", "INTERNAL"),
             (ConfigError("bad"), 500, "config", "INTERNAL"),
             (KeyError("bug"), 500, "internal", "INTERNAL")]
    for exc, status, kind, code in cases:
        err = to_service_error(exc)
        assert (err.status, err.kind) == (status, kind), exc
        got, details = grpc_status(err)
        assert got.name == code and details == f"[{kind}] {err.message}"
    assert to_service_error(KeyError("secret")).message == "internal error: KeyError"
    assert to_service_error(AdapterError("tampered")).message == "tampered"


def test_config_from_env_and_errors() -> None:
    c = ServeConfig.from_env({"WESAM_SERVE_WORKERS": "2", "WESAM_SERVE_MERGED_DOMAINS": "a, b",
                              "WESAM_SERVE_ADMIN_TOKEN": "s3cr3t-token", "WESAM_SERVE_CACHE_MB": "1.5"})
    assert c.workers == 2 and c.merged_domains == ("a", "b") and c.cache_bytes == int(1.5 * 2**20)
    assert ServeConfig.from_env(c.to_env()) == c and c.public()["admin_token"] == "set"
    assert "s3cr3t-token" not in repr(c) and "s3cr3t-token" not in json.dumps(c.public())
    with pytest.raises(ConfigError, match="not a number"):
        ServeConfig.from_env({"WESAM_SERVE_WORKERS": "two"})
    with pytest.raises(ConfigError, match="RUNTIME"):
        ServeConfig(runtime="tensorrt")
    with pytest.raises(ConfigError, match="MAX_BATCH_SIZE"):
        ServeConfig(max_batch_size=1)


def test_admin_token_checks() -> None:
    with pytest.raises(ServiceError) as e:
        check_admin("Bearer x", None)
    assert e.value.status == 403 and "disabled" in e.value.message
    for header in (None, "", "Basic abc", "Bearer "):
        with pytest.raises(ServiceError) as e:
            check_admin(header, "secret")
        assert e.value.status == 401
    with pytest.raises(ServiceError) as e:
        check_admin("Bearer wrong", "secret")
    assert e.value.status == 403
    check_admin("Bearer secret", "secret")
    assert parse_version("v3") == parse_version(3) == parse_version("3") == 3
    for bad in ("x", 0, True, "v-1"):
        with pytest.raises(ServiceError):
            parse_version(bad)


# -- cache ------------------------------------------------------------------------------------------

def _entry(nbytes: int, adapter: str = "base") -> CacheEntry:
    import torch

    from wesam.sam.predictor import ImageEmbedding

    return CacheEntry(ImageEmbedding(torch.zeros(nbytes // 4), (1, 1), (1, 1)), adapter, None)


def test_cache_is_lru_bounded_by_bytes() -> None:
    events: list[tuple[str, int]] = []
    cache = EmbeddingCache(1000, on_event=lambda name, n: events.append((name, n)))
    for k in "abc":
        assert cache.put(k, _entry(300))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", _entry(300))  # evicts b, the least recently used
    assert "b" not in cache and all(k in cache for k in "acd") and cache.nbytes == 900
    assert cache.get("b") is None
    assert not cache.put("huge", _entry(2000)) and cache.stats.rejected == 1
    cache.put("e", _entry(400, adapter="polyp@v1"))  # evicts c
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 1, 2)
    assert "c" not in cache and "a" in cache
    assert ("evict", 1) in events and ("hit", 1) in events and ("miss", 1) in events
    assert cache.drop_adapter("polyp@v1") == 1 and cache.nbytes == 600
    empty = EmbeddingCache(0)
    assert not empty.put("a", _entry(4)) and empty.get("a") is None


def test_cache_keeps_reused_embeddings_through_a_burst_of_new_images() -> None:
    """Segmented LRU: an entry hit once more (an image_id follow-up) survives more one-off images than
    the cache holds; among one-off images the least recently used goes first, as before."""
    cache = EmbeddingCache(1000)
    for k in ("hot", "cold"):
        cache.put(k, _entry(100))
    assert cache.get("hot") is not None
    for i in range(30):  # 30 one-off images of 100 bytes through a 10-entry cache
        cache.put(f"new{i}", _entry(100))
    assert "hot" in cache and "cold" not in cache and len(cache) == 10 and cache.nbytes == 1000
    assert all(f"new{i}" in cache for i in range(21, 30)) and "new20" not in cache
    # the protected part is bounded: protecting more than 80 % of the bytes demotes its oldest entries
    for i in range(21, 30):
        assert cache.get(f"new{i}") is not None
    assert cache._protected_bytes <= 800 and len(cache) == 10
    cache.put("newest", _entry(100))  # evicts from probation: a demoted entry, never a protected one
    assert all(k in cache for k in list(cache._protected)) and cache.nbytes == 1000
    assert cache.drop_adapter("base") == 10 and cache.nbytes == 0 and cache._protected_bytes == 0


# -- engine (router + runtime + cache) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    base = make_base(root)
    reg = root / "registry"
    publish_adapter(base, reg, "polyp", seed=1)
    publish_adapter(base, reg, "skin", seed=2)
    return base, reg


def _engine(world, **over) -> SegmentEngine:
    base, reg = world
    config = ServeConfig(model=str(base), registry=str(reg), threads=1, poll_seconds=0, **over)
    return SegmentEngine.from_config(config)


BOX = np.array([[8, 6, 50, 40]], np.float32)


def test_engine_matches_predictor_per_domain(world) -> None:
    base, reg = world
    engine = _engine(world)
    img = make_image()
    items = [InferItem(image=img, prompts=PromptArrays(boxes=BOX)),
             InferItem(image=img, domain="polyp", prompts=PromptArrays(boxes=BOX)),
             InferItem(image=img, domain="nope", prompts=PromptArrays(boxes=BOX))]
    plain, polyp, unknown = engine.infer(items)
    assert unknown.error["status"] == 404 and unknown.error["kind"] == "unknown_domain"
    assert (plain.adapter, polyp.adapter, polyp.domain) == ("base", "polyp@v1", "polyp")
    for res, ref in ((plain, None), (polyp, "polyp@v1")):
        want = SamPredictorCore(reference_model(base, reg, ref).sam).predict(img, Prompts(boxes=BOX))
        np.testing.assert_array_equal(res.masks, want.masks)
        np.testing.assert_allclose(res.scores, want.scores, atol=1e-5)
        assert 0 < res.masks.mean() < 1
    assert (plain.masks != polyp.masks).any() and plain.image_id != polyp.image_id


def test_batch_is_grouped_by_adapter(world) -> None:
    engine = _engine(world)
    calls: list[tuple[str | None, int]] = []
    encode_fn = engine.runtime.encode

    def counting(images, handle):
        calls.append((str(handle.ref) if handle else None, len(images)))
        return encode_fn(images, handle)

    engine.runtime.encode = counting
    imgs = [make_image(seed=s) for s in range(3)]
    domains = ["polyp", None, "skin", "polyp", None, "polyp"]
    items = [InferItem(image=imgs[i % 3], domain=d, prompts=PromptArrays(boxes=BOX)) for i, d in enumerate(domains)]
    batched = engine.infer(items, batch=True)
    # one encoder call per adapter; the same (image, adapter) twice is encoded once (items 0/3, 1/4)
    assert sorted(calls, key=str) == sorted([("polyp@v1", 2), (None, 1), ("skin@v1", 1)], key=str)
    single = _engine(world)
    for item, got in zip(items, batched):
        (want,) = single.infer([InferItem(image=item.image, domain=item.domain, prompts=item.prompts)])
        assert got.adapter == want.adapter
        np.testing.assert_array_equal(got.masks, want.masks)


def test_image_id_follow_ups_use_the_cache(world) -> None:
    engine = _engine(world)
    img = make_image()
    (emb,) = engine.infer([InferItem(image=img, domain="polyp")])
    assert emb.masks is None and not emb.cached and emb.image_size == (48, 64)
    (again,) = engine.infer([InferItem(image=img, domain="polyp", prompts=PromptArrays(boxes=BOX))])
    assert again.cached and again.image_id == emb.image_id
    (follow,) = engine.infer([InferItem(image_id=emb.image_id, prompts=PromptArrays(boxes=BOX))])
    assert follow.cached and follow.adapter == "polyp@v1"
    np.testing.assert_array_equal(follow.masks, again.masks)
    (wrong,) = engine.infer([InferItem(image_id=emb.image_id, domain="skin", prompts=PromptArrays(boxes=BOX))])
    assert wrong.error["status"] == 409 and wrong.error["kind"] == "domain_mismatch"
    (missing,) = engine.infer([InferItem(image_id="0" * 32, prompts=PromptArrays(boxes=BOX))])
    assert missing.error["status"] == 404
    assert engine.cache.stats.hits == 3 and engine.cache.stats.misses == 2


def test_prompt_ranges_and_mask_inputs(world) -> None:
    engine = _engine(world, max_mask_pixels=48 * 64 * 5)
    img = make_image()
    (emb,) = engine.infer([InferItem(image=img)])

    def one(**kw):
        return engine.infer([InferItem(image_id=emb.image_id, **kw)])[0]

    r = one(prompts=PromptArrays(boxes=np.array([[0, 0, 65, 10]], np.float32)))
    assert r.error["status"] == 422 and "outside the 64x48 image" in r.error["error"]
    r = one(prompts=PromptArrays(point_coords=np.array([[[10, 49]]], np.float32), point_labels=np.array([[1]])))
    assert r.error["status"] == 422
    r = one(prompts=PromptArrays(boxes=BOX), multimask=True, return_logits=True)  # 3 masks with logits
    assert r.error["status"] == 413 and "over the limit" in r.error["error"]
    first = one(prompts=PromptArrays(boxes=BOX), return_logits=True)
    assert first.logits.shape == (1, 1, 48, 64) and first.low_res_logits.shape == (1, 1, 32, 32)
    np.testing.assert_array_equal(first.masks, first.logits > 0)
    # feed the previous answer back, both ways
    by_logits = one(prompts=PromptArrays(boxes=BOX, mask_logits=first.low_res_logits))
    by_mask = one(prompts=PromptArrays(boxes=BOX, mask_binary=first.masks[:, 0]))
    want = SamPredictorCore(engine.model.sam).predict(img, Prompts(boxes=BOX, mask_inputs=first.low_res_logits))
    np.testing.assert_array_equal(by_logits.masks, want.masks)
    assert by_mask.error is None and by_mask.masks.shape == (1, 1, 48, 64)
    r = one(prompts=PromptArrays(boxes=BOX, mask_binary=np.zeros((1, 10, 10), bool)))
    assert r.error["status"] == 422 and "the image is 64x48" in r.error["error"]
    r = one(prompts=PromptArrays(boxes=BOX, mask_logits=np.zeros((1, 1, 16, 16), np.float32)))
    assert r.error["status"] == 422 and "takes 32x32" in r.error["error"]


def test_hot_reload_rollback_and_broken_versions(world, tmp_path: Path) -> None:
    base, _ = world
    reg = tmp_path / "registry"
    publish_adapter(base, reg, "polyp", seed=1)
    engine = _engine((base, reg))
    img = make_image()
    (v1,) = engine.infer([InferItem(image=img, domain="polyp", prompts=PromptArrays(boxes=BOX))])
    assert v1.adapter == "polyp@v1" and not engine.router.changed()

    publish_adapter(base, reg, "polyp", seed=7)  # v2, activated in routing.json
    assert engine.router.changed()
    report = engine.refresh()
    assert report["loaded"] == ["polyp@v2"] and report["unloaded"] == ["polyp@v1"]
    (v2,) = engine.infer([InferItem(image=img, domain="polyp", prompts=PromptArrays(boxes=BOX))])
    assert v2.adapter == "polyp@v2" and not v2.cached and (v2.masks != v1.masks).any()
    # v1's embeddings left with v1
    (old,) = engine.infer([InferItem(image_id=v1.image_id, prompts=PromptArrays(boxes=BOX))])
    assert old.error["kind"] == "unknown_image_id"

    # a broken v3 activated behind the server's back is refused; v2 keeps serving
    publish_adapter(base, reg, "polyp", seed=8)
    corrupt_weights(reg, "polyp", 3)
    report = engine.refresh()
    assert report["failed"][0]["adapter"] == "polyp@v3" and "SHA-256" in report["failed"][0]["error"]
    (still,) = engine.infer([InferItem(image=img, domain="polyp", prompts=PromptArrays(boxes=BOX))])
    assert still.adapter == "polyp@v2"
    row = engine.status()["domains"][0]
    assert row["serving"] == "polyp@v2" and row["active"] == 3 and row["error"]["version"] == 3

    # activation through the engine checks first: the broken version is never written to routing.json
    Registry(reg).activate("polyp", 2)
    engine.refresh()
    with pytest.raises(ServiceError) as e:
        engine.activate("polyp", 3)
    assert e.value.status == 409 and Registry(reg).active_version("polyp") == 2
    assert engine.activate("polyp", 1) == {"domain": "polyp", "serving": "polyp@v1", "previous": "polyp@v2"}
    assert json.loads((reg / "routing.json").read_text()) == {"polyp": "v1"}
    (back,) = engine.infer([InferItem(image=img, domain="polyp", prompts=PromptArrays(boxes=BOX))])
    assert back.adapter == "polyp@v1"
    np.testing.assert_array_equal(back.masks, v1.masks)
    with pytest.raises(ServiceError) as e:
        engine.activate("polyp", 9)
    assert e.value.status == 404
    with pytest.raises(ServiceError) as e:
        engine.activate("lung", 1)
    assert e.value.status == 404


def test_router_activate_loads_first(world, tmp_path: Path) -> None:
    from wesam.adapters.ref import AdapterRef
    from wesam.service.router import AdapterRouter
    from wesam.service.runtime import TorchRuntime

    base, _ = world
    reg = tmp_path / "registry"
    publish_adapter(base, reg, "polyp", seed=1)
    publish_adapter(base, reg, "polyp", seed=7, activate=False)
    publish_adapter(base, reg, "polyp", seed=8, activate=False)
    corrupt_weights(reg, "polyp", 3)
    runtime = TorchRuntime(reference_model(base), "cpu")
    events: list[tuple[str, AdapterRef]] = []
    router = AdapterRouter(str(reg), runtime.load_adapter, runtime.unload_adapter,
                           on_event=lambda event, ref: events.append((event, ref)))
    assert router.refresh() == {"loaded": ["polyp@v1"], "unloaded": [], "failed": []}
    route = router.resolve("polyp")
    assert route.ref == AdapterRef("polyp", 1) and route.adapter == "polyp@v1" and route.domain == "polyp"
    assert route.handle.ref == AdapterRef("polyp", 1) and route.key.startswith("polyp@v1:")
    assert router.resolve(None).adapter == "base" and router.resolve("base").domain is None

    assert router.activate("polyp", 2) == {"domain": "polyp", "serving": "polyp@v2", "previous": "polyp@v1"}
    assert Registry(reg).active_version("polyp") == 2 and not router.changed()
    assert events[-2:] == [("loaded", AdapterRef("polyp", 2)), ("unloaded", AdapterRef("polyp", 1))]
    assert router.activate("polyp", 2)["previous"] == "polyp@v2"  # already serving: only routing.json
    for domain, version, kind, words in (("polyp", 3, "adapter_refused", "refusing polyp@v3: AdapterError"),
                                         ("polyp", 9, "unknown_version", "polyp@v9 is not in the registry; "
                                                                         "versions: v1, v2, v3"),
                                         ("lung", 1, "unknown_domain", "no domain 'lung'")):
        with pytest.raises(ServiceError) as e:
            router.activate(domain, version)
        assert e.value.kind == kind and words in e.value.message, e.value.to_json()
    assert events[-1] == ("failed", AdapterRef("polyp", 3)) and Registry(reg).active_version("polyp") == 2
    assert [row["serving"] for row in router.status()] == ["polyp@v2"]
    with pytest.raises(ServiceError) as e:
        AdapterRouter(None, runtime.load_adapter, runtime.unload_adapter).activate("polyp", 1)
    assert (e.value.kind, e.value.status) == ("no_registry", 409)


def test_fallback_domain_and_merged_copies(world) -> None:
    engine = _engine(world, fallback_domain="base", merged_domains=("polyp",))
    img = make_image()
    (fallback,) = engine.infer([InferItem(image=img, domain="unseen", prompts=PromptArrays(boxes=BOX))])
    assert fallback.adapter == "base"
    (merged,) = engine.infer([InferItem(image=img, domain="polyp", prompts=PromptArrays(boxes=BOX))])
    assert merged.adapter == "polyp@v1" and engine.router.slots["polyp"].handle.merged
    unmerged = _engine(world)
    (want,) = unmerged.infer([InferItem(image=img, domain="polyp", prompts=PromptArrays(boxes=BOX))])
    assert (merged.masks == want.masks).mean() > 0.99
    np.testing.assert_allclose(merged.scores, want.scores, atol=1e-3)


def test_onnx_runtime_serves_the_same_masks(world, tmp_path: Path) -> None:
    engine = _engine(world, runtime="onnx", onnx_cache=str(tmp_path / "onnx"))
    torch_engine = _engine(world)
    img = make_image()
    for domain in (None, "polyp"):
        item = dict(image=img, domain=domain, prompts=PromptArrays(boxes=BOX))
        (got,) = engine.infer([InferItem(**item)])
        (want,) = torch_engine.infer([InferItem(**item)])
        assert got.adapter == want.adapter
        assert (got.masks == want.masks).mean() > 0.99
    graphs = sorted((tmp_path / "onnx").glob("*/*/encoder.onnx"))
    assert [g.parent.name.split("-")[0] for g in graphs] == ["base", "polyp", "skin"]
    stamps = [g.stat().st_mtime_ns for g in graphs]
    again = _engine(world, runtime="onnx", onnx_cache=str(tmp_path / "onnx"))  # reuses the exported graphs
    assert [g.stat().st_mtime_ns for g in graphs] == stamps and set(again.router.slots) == {"polyp", "skin"}


def test_grpc_inputs_are_validated() -> None:
    from wesam.service.grpc_server import build_item

    config = dataclasses.replace(CONFIG, max_prompts=4)
    img = make_image()
    item = build_item({"IMAGE": ("UINT8", img), "BOXES": ("FP32", BOX), "DOMAIN": ("BYTES", [b"polyp"])}, config)
    assert item.domain == "polyp" and item.prompts.boxes.shape == (1, 4)
    png = build_item({"IMAGE": ("BYTES", [encode(img)]), "POINTS": ("FP32", np.array([[1, 2]])),
                      "LABELS": ("INT32", np.array([1]))}, config)
    np.testing.assert_array_equal(png.image, img)
    for inputs, status in (({"BOXES": ("FP32", BOX)}, 400),
                           ({"IMAGE": ("FP32", img.astype(np.float32)), "BOXES": ("FP32", BOX)}, 400),
                           ({"IMAGE": ("BYTES", [b"nope"]), "BOXES": ("FP32", BOX)}, 400),
                           ({"IMAGE": ("UINT8", img)}, 422),
                           ({"IMAGE": ("UINT8", img), "POINTS": ("FP32", np.array([[1, 2]]))}, 422)):
        with pytest.raises(ServiceError) as e:
            build_item(inputs, config)
        assert e.value.status == status


# -- the HTTP front's logic, with the engine in process -----------------------------------------------

def test_frontend_formats_answers_and_maps_runtime_failures(world) -> None:
    from http import HTTPStatus

    import anyio
    from bentoml.exceptions import BentoMLException

    from wesam.service.front import Frontend, LocalRuntime

    engine = _engine(world)
    front = Frontend(dataclasses.replace(engine.config, max_prompts=4), LocalRuntime(engine))
    img = make_image()
    status, body = anyio.run(front.segment, {"image": _b64(img), "boxes": [BOX.tolist()[0]], "domain": "polyp"})
    assert status == 200 and body["adapter"] == "polyp@v1" and body["image_size"] == [48, 64]
    want = SamPredictorCore(reference_model(world[0], world[1], "polyp@v1").sam).predict(img, Prompts(boxes=BOX))
    np.testing.assert_array_equal(codec.rle_decode(body["masks"][0]["rle"]), want.masks[0, 0])
    status, body = anyio.run(front.embed, {"image": encode(img)}, True)  # multipart: file bytes
    assert status == 200 and body["adapter"] == "base" and not body["cached"]
    status, body = anyio.run(front.segment, ServiceError("too big", status=413, kind="too_large"))
    assert (status, body["kind"]) == (413, "too_large")

    class Failing:
        def __init__(self, exc: Exception) -> None:
            self.exc = exc

        async def infer(self, items):
            raise self.exc

        async def status(self):
            return {"domains": []}

    from wesam.adapters.errors import AdapterError

    for exc, status, kind in ((BentoMLException("shed", error_code=HTTPStatus.SERVICE_UNAVAILABLE), 503, "overloaded"),
                              (ConnectionRefusedError("down"), 503, "overloaded"),
                              (AdapterError("tampered"), 409, "adapter"),
                              (BentoMLException("bug", error_code=HTTPStatus.INTERNAL_SERVER_ERROR), 500, "internal")):
        got = anyio.run(Frontend(engine.config, Failing(exc)).segment, {"image": _b64(img), "boxes": [[1, 1, 5, 5]]})
        assert (got[0], got[1]["kind"]) == (status, kind)


# -- the transport between the front and the model: what the runtime receives and answers -----------

def test_the_runtime_receives_the_file_and_answers_encoded_masks(world) -> None:
    """The front sends the client's encoded file, not pixels, and the runtime answers the masks
    already encoded: what crosses the process boundary (pickled, as BentoML sends it) is small."""
    import pickle

    import anyio

    from wesam.service.front import Frontend, LocalRuntime

    class Recording(LocalRuntime):
        """The real in-process runtime, recording each call as the runtime process would receive it."""

        def __init__(self, engine: SegmentEngine) -> None:
            super().__init__(engine)
            self.received: list[InferItem] = []
            self.answered: list = []

        async def infer(self, items):
            items = pickle.loads(pickle.dumps(items))  # what reaches the other process
            self.received.extend(pickle.loads(pickle.dumps(items)))
            results = [pickle.loads(pickle.dumps(r)) for r in await super().infer(items)]  # and comes back
            self.answered.extend(results)
            return results

        async def decode(self, item):
            return (await self.infer([item]))[0]

    engine = _engine(world)
    rec = Recording(engine)
    front = Frontend(engine.config, rec)
    img = make_image(480, 640, seed=11)
    jpeg = encode(img, "JPEG")
    status, body = anyio.run(front.segment, {"image": base64.b64encode(jpeg).decode(), "boxes": [[80, 60, 500, 400]],
                                             "domain": "polyp"})
    assert status == 200, body
    (item,), (result,) = rec.received, rec.answered
    assert item.image_bytes == jpeg and item.image is None and item.content_hash is None and item.output == "rle"
    assert len(pickle.dumps(item)) < len(jpeg) + 4096 < img.nbytes // 4  # the file, not 900 KB of pixels
    assert result.masks is None and result.logits is None and result.encoded_masks == body["masks"]
    assert len(pickle.dumps(result)) < 16384  # RLE strings, not a 480x640 boolean array
    # decoded once, in the runtime: the answer is the predictor's on the decoded pixels
    pixels = codec.decode_image(jpeg, **LIMITS | {"max_pixels": 1 << 20})
    want = SamPredictorCore(reference_model(world[0], world[1], "polyp@v1").sam).predict(
        pixels, Prompts(boxes=np.array([[80, 60, 500, 400]])))
    np.testing.assert_array_equal(codec.rle_decode(body["masks"][0]["rle"]), want.masks[0, 0])
    assert body["timings_ms"]["decode_image"] > 0 and not body["cached"]
    # the same file again: recognised by its bytes, its cached embedding used without decoding it again
    status, again = anyio.run(front.segment, {"image": base64.b64encode(jpeg).decode(), "boxes": [[80, 60, 500, 400]],
                                              "domain": "polyp"})
    assert status == 200 and again["cached"] and again["image_id"] == body["image_id"]
    assert "decode_image" not in again["timings_ms"]
    # (the same embedding; the decoder's float sums may differ in the last bit from the first call's)
    assert (codec.rle_decode(again["masks"][0]["rle"]) == codec.rle_decode(body["masks"][0]["rle"])).mean() > 0.999
    # the same pixels in another file format: decoded (new bytes), but the same embedding and image_id
    status, png = anyio.run(front.segment, {"image": base64.b64encode(encode(pixels, "PNG")).decode(),
                                            "boxes": [[80, 60, 500, 400]], "domain": "polyp"})
    assert status == 200 and png["cached"] and png["image_id"] == body["image_id"]
    assert png["timings_ms"]["decode_image"] > 0
    # another output format is encoded by the runtime too; logits travel as .npy
    status, out = anyio.run(front.segment, {"image_id": body["image_id"], "boxes": [[80, 60, 500, 400]],
                                            "output": "png", "return_logits": True})
    assert status == 200 and {"png", "logits", "low_res_logits"} <= set(out["masks"][0])
    assert rec.answered[-1].encoded_masks == out["masks"]


def test_a_bad_file_is_refused_where_it_is_decoded(world) -> None:
    engine = _engine(world, max_image_pixels=64 * 64)
    for data, status, words in ((b"not an image", 400, "supported format"), (_png_with_size(5000, 5000), 413, "pixels"),
                                (encode(make_image())[:200], 400, "cannot decode")):
        (res,) = engine.infer([InferItem(image_bytes=data, prompts=PromptArrays(boxes=BOX))])
        assert res.error["status"] == status and words in res.error["error"], res.error


# -- the batcher: bounded admission, lanes, cancellation ---------------------------------------------

def _wait_until(predicate, what: str, timeout: float = 60.0) -> None:
    """Wait for a state of another thread (not a timing assertion: fails only if it never happens)."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.005)


def test_the_batcher_refuses_at_once_beyond_its_queue_bound(world) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from wesam.service.batcher import Batcher

    engine = _engine(world)
    batcher = Batcher(engine, dataclasses.replace(engine.config, max_queue=1, runtime_threads=2))
    (emb,) = engine.infer([InferItem(image=make_image(seed=40))])
    try:
        with ThreadPoolExecutor(3) as pool:
            with engine.lock:  # the encoder thread blocks on the model lock with the first request
                first = pool.submit(batcher.infer_sync, InferItem(image=make_image(seed=41),
                                                                  prompts=PromptArrays(boxes=BOX)))
                _wait_until(lambda: batcher.status()["encode"]["running"] == 1, "first request running")
                second = pool.submit(batcher.infer_sync, InferItem(image=make_image(seed=42),
                                                                   prompts=PromptArrays(boxes=BOX)))
                _wait_until(lambda: batcher.status()["encode"]["waiting"] == 1, "second request queued")
                third = batcher.infer_sync(InferItem(image=make_image(seed=43), prompts=PromptArrays(boxes=BOX)))
                assert third.error["kind"] == "overloaded" and third.error["status"] == 503
                assert third.error["retry_after"] >= 1 and "already wait" in third.error["error"]
                # prompt-only requests have their own lane and thread: served while the encoder is busy
                quick = batcher.infer_sync(InferItem(image_id=emb.image_id, prompts=PromptArrays(boxes=BOX)))
                assert quick.error is None and quick.cached and quick.masks.shape == (1, 1, 48, 64)
            assert first.result().error is None and second.result().error is None
        status = batcher.status()
        assert status["encode"]["refused"] == 1 and status["encode"]["served"] == 2 and status["decode"]["served"] == 1
        assert status["encode"]["waiting"] == status["encode"]["running"] == 0
    finally:
        batcher.close()
    closed = batcher.infer_sync(InferItem(image=make_image(), prompts=PromptArrays(boxes=BOX)))
    assert closed.error["kind"] == "overloaded" and "shutting down" in closed.error["error"]


def test_a_request_given_up_while_queued_is_never_computed(world) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import anyio

    from wesam.service.batcher import Batcher

    engine = _engine(world)
    batcher = Batcher(engine, dataclasses.replace(engine.config, max_queue=4, runtime_threads=2))
    try:
        with ThreadPoolExecutor(1) as pool:
            with engine.lock:
                first = pool.submit(batcher.infer_sync, InferItem(image=make_image(seed=50),
                                                                  prompts=PromptArrays(boxes=BOX)))
                _wait_until(lambda: batcher.status()["encode"]["running"] == 1, "first request running")
                late = batcher.infer_sync(InferItem(image=make_image(seed=51), prompts=PromptArrays(boxes=BOX)),
                                          timeout=0.05)  # the caller's deadline passes while it waits
                assert late.error["kind"] == "overloaded" and "within" in late.error["error"]

                async def give_up() -> None:  # the HTTP front's deadline, on the asyncio path
                    with anyio.move_on_after(0.05):
                        await batcher.infer(InferItem(image=make_image(seed=52), prompts=PromptArrays(boxes=BOX)))
                        pytest.fail("answered while the model was blocked")

                anyio.run(give_up)
            assert first.result().error is None
        _wait_until(lambda: batcher.status()["encode"]["waiting"] == 0, "queue drained")
        assert batcher.status()["encode"]["served"] == 1 and len(engine.cache) == 1  # the late ones were dropped
    finally:
        batcher.close()


def test_http_and_grpc_requests_share_batches_grouped_by_adapter(world) -> None:
    """Requests queued together (from any protocol) form one batch that the engine splits by adapter."""
    from concurrent.futures import ThreadPoolExecutor

    from wesam.service.batcher import Batcher

    engine = _engine(world)
    reference = _engine(world)
    batcher = Batcher(engine, dataclasses.replace(engine.config, max_batch_size=8, runtime_threads=2))
    try:
        with ThreadPoolExecutor(6) as pool:
            with engine.lock:
                blocker = pool.submit(batcher.infer_sync, InferItem(image=make_image(seed=60),
                                                                    prompts=PromptArrays(boxes=BOX)))
                _wait_until(lambda: batcher.status()["encode"]["running"] == 1, "first request running")
                items = [InferItem(image=make_image(seed=61 + i), domain=d, prompts=PromptArrays(boxes=BOX))
                         for i, d in enumerate((None, "polyp", "skin", "polyp"))]
                futures = [pool.submit(batcher.infer_sync, item) for item in items]
                _wait_until(lambda: batcher.status()["encode"]["waiting"] == 4, "four requests queued")
            results = [f.result() for f in futures]
            assert blocker.result().error is None
        assert [r.adapter for r in results] == ["base", "polyp@v1", "skin@v1", "polyp@v1"]
        status = batcher.status()["encode"]
        assert (status["served"], status["batches"]) == (5, 2)  # the blocker alone, then the four in one batch
        for item, got in zip(items, results):
            (want,) = reference.infer([InferItem(image=item.image, domain=item.domain, prompts=item.prompts)])
            np.testing.assert_array_equal(got.masks, want.masks)
    finally:
        batcher.close()
