"""What the service answered, with masks decoded only when asked for.

A /segment answer lists its masks flat: prompt 0's masks first (1 per prompt, or 3 with
``multimask``), then prompt 1's, ... :class:`SegmentResult` keeps that order in ``masks``,
``scores``, ``prompt_index``, ``rle`` and the logits, and groups them per prompt in
``masks_by_prompt`` / ``scores_by_prompt`` / ``best_masks``. Decoding (pycocotools for RLE, Pillow
for PNG) happens on first access and is cached: a caller that only needs ``image_id``, the scores or
the RLE (to store it) never pays for it.
"""

from __future__ import annotations

import base64
import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (``counts`` a string, bytes or an uncompressed list) -> (H, W) bool."""
    from pycocotools import mask as mask_utils

    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    with warnings.catch_warnings():
        # pycocotools 2.0.x under numpy 2 warns about its own __array__ signature
        warnings.simplefilter("ignore", DeprecationWarning)
        if isinstance(counts, list):
            coded = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        else:
            coded = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        return np.ascontiguousarray(mask_utils.decode(coded), dtype=bool)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    from .prompts import rle_encode

    return rle_encode(mask)


def load_npy(text: str) -> np.ndarray:
    """A base64 ``.npy`` array (logits). ``allow_pickle=False``: an answer can never make the client
    unpickle (run) anything."""
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)


def _decode_entry(entry: dict[str, Any], size: tuple[int, int]) -> np.ndarray:
    if entry.get("rle") is not None:
        return decode_rle(entry["rle"])
    if entry.get("png") is not None:
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["png"])))) > 0
    if entry.get("polygons") is not None:  # outer contours only: holes are filled (the service's note)
        from pycocotools import mask as mask_utils

        polys = [p for p in entry["polygons"] if len(p) >= 6]
        if not polys:
            return np.zeros(size, bool)
        merged = mask_utils.merge(mask_utils.frPyObjects(polys, size[0], size[1]))
        return np.ascontiguousarray(mask_utils.decode(merged), dtype=bool)
    raise ValueError("mask entry has no rle, png or polygons")


@dataclass
class SegmentResult:
    """One /segment answer (HTTP) or ModelInfer answer (gRPC).

    Masks are at the image size, ``image_size`` = (H, W). Per returned mask, in the service's order
    (prompt 0's masks first): ``masks`` (bool (H, W) arrays), ``scores`` (predicted IoU),
    ``prompt_index`` (the prompt each mask answers), ``rle`` (COCO RLE dicts), ``logits`` /
    ``low_res_logits`` (float32 (H, W) / (L, L), with ``return_logits``). Without ``multimask``
    there is one mask per prompt, so ``masks[i]`` is prompt ``i``'s mask; with ``multimask`` there
    are three per prompt: use ``masks_by_prompt[i]`` (prompt ``i``'s three) or ``best_masks[i]``
    (its highest-scoring one).

    ``adapter``: ``domain@vN`` or ``base``; ``domain``: the domain served (``None`` for the base
    model); ``image_id``: send it as ``segment(image_id=...)`` for prompt-only follow-ups;
    ``cached``: the embedding came from the cache (``None`` over gRPC, which does not say);
    ``timings_ms``: the server's timings (empty over gRPC); ``raw``: the JSON answer (``None`` over
    gRPC); ``request_id``: the answer's request id.
    """

    scores: list[float]
    prompt_index: list[int]
    adapter: str
    domain: str | None
    image_id: str
    image_size: tuple[int, int]
    cached: bool | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] | None = field(default=None, repr=False)
    request_id: str | None = None
    _entries: list[dict[str, Any]] | None = field(default=None, repr=False)  # HTTP: encoded masks
    _array: np.ndarray | None = field(default=None, repr=False)  # gRPC: (N, M, H, W) uint8
    _decoded: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _npy_cache: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, body: dict[str, Any], request_id: str | None = None) -> "SegmentResult":
        entries = body["masks"]
        return cls(scores=[float(m["score"]) for m in entries], prompt_index=[int(m["prompt"]) for m in entries],
                   adapter=body["adapter"], domain=body.get("domain"), image_id=body["image_id"],
                   image_size=(int(body["image_size"][0]), int(body["image_size"][1])), cached=body.get("cached"),
                   timings_ms=body.get("timings_ms") or {}, raw=body, request_id=request_id, _entries=entries)

    @classmethod
    def from_arrays(cls, masks: np.ndarray, scores: np.ndarray, adapter: str, image_id: str,
                    request_id: str | None = None) -> "SegmentResult":
        """From gRPC tensors: ``masks`` (N, M, H, W) 0/1, ``scores`` (N, M)."""
        n, m, h, w = masks.shape
        return cls(scores=[float(s) for s in np.asarray(scores).reshape(-1)],
                   prompt_index=[i for i in range(n) for _ in range(m)], adapter=adapter,
                   domain=adapter.split("@", 1)[0] if "@" in adapter else None, image_id=image_id,
                   image_size=(h, w), request_id=request_id, _array=masks)

    def __len__(self) -> int:
        return len(self.scores)

    def mask(self, i: int) -> np.ndarray:
        """Mask ``i`` alone, (H, W) bool (decoded once, then cached)."""
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"mask {i} of {len(self)}")
        got = self._decoded.get(i)
        if got is None:
            if self._array is not None:
                m = self._array.shape[1]
                got = self._array[i // m, i % m].astype(bool)
            else:
                got = _decode_entry(self._entries[i], self.image_size)  # type: ignore[index]
            self._decoded[i] = got
        return got

    @property
    def masks(self) -> list[np.ndarray]:
        """Every returned mask, (H, W) bool each, in the service's order (see the class docstring)."""
        return [self.mask(i) for i in range(len(self))]

    @property
    def num_prompts(self) -> int:
        return max(self.prompt_index) + 1 if self.prompt_index else 0

    @property
    def masks_by_prompt(self) -> list[list[np.ndarray]]:
        """``[prompt][k]``: each prompt's masks (1, or 3 with ``multimask``)."""
        out: list[list[np.ndarray]] = [[] for _ in range(self.num_prompts)]
        for i, p in enumerate(self.prompt_index):
            out[p].append(self.mask(i))
        return out

    @property
    def scores_by_prompt(self) -> list[list[float]]:
        out: list[list[float]] = [[] for _ in range(self.num_prompts)]
        for s, p in zip(self.scores, self.prompt_index):
            out[p].append(s)
        return out

    @property
    def best_masks(self) -> list[np.ndarray]:
        """One mask per prompt: its highest-scoring one (the only one without ``multimask``)."""
        best: dict[int, int] = {}
        for i, p in enumerate(self.prompt_index):
            if p not in best or self.scores[i] > self.scores[best[p]]:
                best[p] = i
        return [self.mask(best[p]) for p in range(self.num_prompts)]

    @property
    def masks_array(self) -> np.ndarray:
        """All masks stacked, (N prompts, M masks per prompt, H, W) bool."""
        n = self.num_prompts
        if n == 0:
            return np.zeros((0, 0, *self.image_size), bool)
        return np.stack(self.masks).reshape(n, len(self) // n, *self.image_size)

    @property
    def rle(self) -> list[dict[str, Any]]:
        """COCO RLE per mask (``{"size": [H, W], "counts": str}``): the server's own with
        ``output="rle"`` (no decoding), else encoded here from the masks."""
        if self._entries is not None and all(e.get("rle") is not None for e in self._entries):
            return [e["rle"] for e in self._entries]
        return [encode_rle(m) for m in self.masks]

    def _npy(self, key: str) -> list[np.ndarray] | None:
        if self._entries is None or not self._entries or self._entries[0].get(key) is None:
            return None
        if key not in self._npy_cache:
            self._npy_cache[key] = [load_npy(e[key]) for e in self._entries]
        return self._npy_cache[key]

    @property
    def logits(self) -> list[np.ndarray] | None:
        """Per mask, float32 (H, W) logits (mask = logits > 0); ``None`` without ``return_logits``."""
        return self._npy("logits")

    @property
    def low_res_logits(self) -> list[np.ndarray] | None:
        """Per mask, float32 (L, L) low-res logits, to send back as ``mask_input``; ``None`` without
        ``return_logits``."""
        return self._npy("low_res_logits")


@dataclass
class EmbedResult:
    """One /embed answer: ``image_id`` for prompt-only ``segment(image_id=...)`` calls, the
    ``adapter`` and ``domain`` it was embedded for, ``image_size`` (H, W), ``cached``,
    ``timings_ms``, ``raw`` (the JSON answer), ``request_id``."""

    image_id: str
    adapter: str
    domain: str | None
    image_size: tuple[int, int]
    cached: bool
    timings_ms: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] | None = field(default=None, repr=False)
    request_id: str | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any], request_id: str | None = None) -> "EmbedResult":
        return cls(image_id=body["image_id"], adapter=body["adapter"], domain=body.get("domain"),
                   image_size=(int(body["image_size"][0]), int(body["image_size"][1])),
                   cached=bool(body.get("cached")), timings_ms=body.get("timings_ms") or {}, raw=body,
                   request_id=request_id)
