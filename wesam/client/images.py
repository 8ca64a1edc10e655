"""Images in any of the accepted forms -> what goes on the wire.

Accepted: a path (``str`` / ``os.PathLike``), the bytes of an encoded file (PNG, JPEG, WebP, BMP,
TIFF), a ``PIL.Image.Image``, or a ``numpy.uint8`` array of shape (H, W, 3) RGB or (H, W) grey.

HTTP sends an encoded file: a path's bytes untouched (a JPEG stays the JPEG the camera wrote: no
decode/re-encode on the client, and the server recognises the same file sent again by its bytes),
raw bytes as given, PIL images and arrays encoded once as PNG (lossless, so the masks are those of
exactly these pixels). gRPC can also take raw pixels (``IMAGE`` UINT8 [H, W, 3]): arrays and RGB/L
PIL images are sent that way, with no encoding on either side.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, "PILImage.Image", np.ndarray]

# Magic numbers of the formats the server decodes, for the multipart part's Content-Type (the server
# sniffs the bytes itself; the type only helps proxies and logs).
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"BM", "image/bmp"),
          (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))


@dataclass(frozen=True)
class EncodedImage:
    """An encoded image file ready to upload."""

    data: bytes
    filename: str
    content_type: str


def sniff_type(data: bytes) -> str:
    for magic, ctype in _MAGIC:
        if data.startswith(magic):
            return ctype
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def _is_pil(image: Any) -> bool:
    # Without importing PIL for callers that never use it: PIL's classes live in PIL.* modules.
    if not type(image).__module__.startswith("PIL."):
        return False
    from PIL import Image

    return isinstance(image, Image.Image)


def _check_array(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"an image array must be uint8 (H, W, 3) RGB or (H, W) grey, got {image.dtype} "
                         f"{image.shape}")
    if 0 in image.shape:
        raise ValueError(f"empty image array {image.shape}")
    return image


def _png(image: Any) -> bytes:
    from PIL import Image

    pil = image if _is_pil(image) else Image.fromarray(_check_array(np.asarray(image)))
    buf = io.BytesIO()
    # Pillow's default zlib level: on photos level 1 is barely faster (the noise does not compress
    # either way) and the file is ~10 % larger.
    pil.save(buf, format="PNG")
    return buf.getvalue()


def encode_image(image: ImageInput) -> EncodedImage:
    """The encoded file to send for ``image`` (see the module docstring); ``ValueError`` /
    ``TypeError`` for anything else, ``OSError`` for an unreadable path."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        with open(path, "rb") as f:
            data = f.read()
        return EncodedImage(data, os.path.basename(path) or "image", sniff_type(data))
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise ValueError("image bytes are empty")
        return EncodedImage(data, "image", sniff_type(data))
    if isinstance(image, np.ndarray) or _is_pil(image):
        return EncodedImage(_png(image), "image.png", "image/png")
    raise TypeError(f"unsupported image type {type(image).__name__}: give a path, encoded bytes, a PIL image "
                    "or a uint8 numpy array")


def image_tensor(image: ImageInput) -> tuple[str, np.ndarray | bytes]:
    """gRPC ``IMAGE``: ``("UINT8", (H, W, 3) array)`` for pixels the server takes as they are (arrays,
    RGB and L PIL images: no encoding anywhere), else ``("BYTES", file bytes)`` (paths, encoded bytes,
    PIL images of other modes, which the server then converts to RGB exactly as over HTTP)."""
    if _is_pil(image) and image.mode in ("RGB", "L"):
        image = np.asarray(image)
    if isinstance(image, np.ndarray):
        arr = _check_array(image)
        if arr.ndim == 2:  # grey -> RGB as the server's Pillow convert("RGB") does: the value thrice
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        return "UINT8", np.ascontiguousarray(arr)
    return "BYTES", encode_image(image).data
