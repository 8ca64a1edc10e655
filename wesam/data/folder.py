"""Readers for the two on-disk dataset formats: the folder format and COCO JSON.

Both yield :class:`Sample` objects with an RGB image and a stack of boolean
instance masks, and both raise :class:`DataError` naming the offending file
for any missing, corrupt or inconsistent data.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np
from PIL import Image, ImageFile

from .errors import DataError
from .instances import MASK_KINDS, instances_from_mask

IMAGE_EXTS = (".jpg", ".jpeg", ".png")  # preference order when a stem has several
_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"


@dataclass
class Sample:
    """One image with its ground-truth instances.

    Attributes:
        stem: sample identifier (file name without extension).
        image: (H,W,3) uint8 RGB.
        instances: (N,H,W) bool, N >= 1.
        image_path: path of the image file.
        mask_path: path of the mask PNG (folder format) or annotation JSON (COCO).
    """

    stem: str
    image: np.ndarray
    instances: np.ndarray
    image_path: str
    mask_path: str


# --------------------------------------------------------------------------- io


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, f"{what} file missing") from None
    except OSError as e:
        raise DataError(path, f"cannot read {what} file: {e}") from None
    if not data:
        raise DataError(path, f"{what} file is empty (0 bytes)")
    return data


def _check_complete(path: Path, data: bytes, what: str) -> None:
    """Reject truncated JPEG/PNG files.

    Decoders (libjpeg via cv2 in particular) return partial, grey-filled
    images for truncated files without any error, which would silently
    corrupt training/evaluation data; the end-of-stream markers catch this.
    """
    if data.startswith(_JPEG_SOI):
        # Some writers pad after EOI; that padding is harmless. Other trailers
        # (e.g. camera motion-photo data) are rare enough to afford a full
        # PIL decode as the second opinion.
        if not data.rstrip(b"\x00 \t\r\n").endswith(_JPEG_EOI) and not _pil_decodes(data):
            raise DataError(path, f"truncated JPEG {what} (no end-of-image marker)")
    elif data.startswith(_PNG_SIG):
        if b"IEND" not in data[-1024:]:
            raise DataError(path, f"truncated PNG {what} (no IEND chunk)")


def _pil_decodes(data: bytes) -> bool:
    """True if PIL decodes the whole stream without running out of data."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        return False  # someone enabled lenient loading globally: PIL can't tell
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False
    return True


def read_image_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as (H,W,3) uint8 RGB; DataError if missing/corrupt/truncated."""
    path = Path(path)
    data = _read_bytes(path, "image")
    _check_complete(path, data, "image")
    # imdecode == imread on the same bytes, but reads the file only once.
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DataError(path, "unreadable or corrupt image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a label PNG with PIL, keeping ids: (H,W) for L/P/I/1 modes, (H,W,C) for colour."""
    path = Path(path)
    data = _read_bytes(path, "mask")
    _check_complete(path, data, "mask")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # forces a full decode so corrupt data fails here
            if im.mode == "LA":
                im = im.getchannel("L")
            # "P" must not be converted: np.array then yields palette indices = ids.
            arr = np.array(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(path, f"unreadable or corrupt mask: {e}") from None
    return arr


def _check_sizes(image: np.ndarray, mask_hw: tuple[int, int], mask_path: Path, image_path: Path) -> None:
    ih, iw = image.shape[:2]
    mh, mw = mask_hw
    if (ih, iw) != (mh, mw):
        raise DataError(
            mask_path,
            f"mask size {mw}x{mh} (WxH) does not match image {image_path} size {iw}x{ih}",
        )


def _validate_stems(stems: Iterable[Any], source: Path) -> list[str]:
    out = list(stems)
    if not all(isinstance(s, str) for s in out):
        raise DataError(source, "stems must be strings")
    return out


def _handle_bad(skip_bad: bool, bad: list[tuple[str, str]], stem: str, err: DataError) -> None:
    if not skip_bad:
        raise err
    bad.append((stem, str(err)))
    # stacklevel points at the dataset constructor's caller.
    warnings.warn(f"skipping bad sample {stem!r}: {err}", stacklevel=3)


# ----------------------------------------------------------------- folder format


class FolderDataset:
    """Folder-format dataset.

    Layout::

        root/images/<stem>.jpg|.jpeg|.png
        root/masks/<stem>.png
        root/split.json        {"train": [stems], "test": [stems], ...}
        root/instances.json    (optional marker: masks hold instance ids)
        root/classes.json      (optional marker: masks hold semantic class ids)

    Without ``skip_bad`` only split.json and file existence are checked at
    construction; content errors surface from ``__getitem__``. With
    ``skip_bad`` every pair is fully decoded once up front and bad samples
    are dropped with a warning and recorded in ``bad`` as (stem, reason).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "test",
        mask_kind: str = "auto",
        min_area_frac: float = 0.001,
        skip_bad: bool = False,
        stems: list[str] | None = None,
        ignore_classes: tuple[int, ...] = (),
    ) -> None:
        self.root = Path(root)
        self.ignore_classes = tuple(ignore_classes)
        self.split = split
        self.name = self.root.resolve().name
        self.min_area_frac = min_area_frac
        self.mask_kind = self._resolve_kind(mask_kind)
        self.images_dir = self.root / "images"
        self.masks_dir = self.root / "masks"

        if stems is None:
            wanted = self._read_split(split)
        else:
            wanted = _validate_stems(stems, self.root)

        self._images = self._index_dir(self.images_dir, IMAGE_EXTS, "images")
        self._masks = self._index_dir(self.masks_dir, (".png",), "masks")

        self.bad: list[tuple[str, str]] = []
        self.stems: list[str] = []
        for stem in wanted:
            try:
                self._paths(stem)
                if skip_bad:
                    self._load(stem)
            except DataError as e:
                _handle_bad(skip_bad, self.bad, stem, e)
            else:
                self.stems.append(stem)

    # -- construction helpers

    def _resolve_kind(self, mask_kind: str) -> str:
        if mask_kind == "auto":
            if (self.root / "instances.json").is_file():
                return "instance"
            if (self.root / "classes.json").is_file():
                return "semantic"
            return "binary"
        if mask_kind not in MASK_KINDS:
            raise ValueError(
                f"unknown mask_kind {mask_kind!r}; valid: auto, {', '.join(MASK_KINDS)}"
            )
        return mask_kind

    def _read_split(self, split: str) -> list[str]:
        path = self.root / "split.json"
        if not path.is_file():
            raise DataError(path, "split.json missing")
        try:
            splits = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(path, f"cannot parse split.json: {e}") from None
        if not isinstance(splits, dict):
            raise DataError(path, "split.json must be an object mapping split name -> list of stems")
        # Other keys (metadata) are allowed; only lists of strings are splits.
        available = sorted(
            k for k, v in splits.items()
            if isinstance(v, list) and all(isinstance(s, str) for s in v)
        )
        if split not in available:
            raise DataError(
                path, f"unknown split {split!r}; available splits: {', '.join(available) or '(none)'}"
            )
        return list(splits[split])

    @staticmethod
    def _index_dir(d: Path, exts: tuple[str, ...], what: str) -> dict[str, str]:
        """Map stem -> file name, one directory listing instead of a stat per sample."""
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            raise DataError(d, f"{what} directory missing") from None
        except OSError as e:
            raise DataError(d, f"cannot list {what} directory: {e}") from None
        index: dict[str, tuple[int, str]] = {}
        for name in names:
            stem, ext = os.path.splitext(name)
            ext = ext.lower()
            if ext in exts:
                rank = exts.index(ext)
                if stem not in index or rank < index[stem][0]:
                    index[stem] = (rank, name)
        return {stem: name for stem, (_, name) in index.items()}

    def _paths(self, stem: str) -> tuple[Path, Path]:
        img = self._images.get(stem)
        if img is None:
            raise DataError(
                self.images_dir / f"{stem}.jpg",
                f"image file missing for stem {stem!r} (tried {', '.join(IMAGE_EXTS)})",
            )
        mask = self._masks.get(stem)
        if mask is None:
            raise DataError(self.masks_dir / f"{stem}.png", "mask file missing")
        return self.images_dir / img, self.masks_dir / mask

    def _load(self, stem: str) -> Sample:
        image_path, mask_path = self._paths(stem)
        image = read_image_rgb(image_path)
        mask = read_mask(mask_path)
        _check_sizes(image, mask.shape[:2], mask_path, image_path)
        try:
            inst = instances_from_mask(mask, self.mask_kind, self.min_area_frac, self.ignore_classes)
        except ValueError as e:
            raise DataError(mask_path, str(e)) from None
        if len(inst) == 0:
            raise DataError(
                mask_path,
                f"empty mask: no instance after extraction "
                f"(kind={self.mask_kind}, min_area_frac={self.min_area_frac})",
            )
        return Sample(stem, image, inst, str(image_path), str(mask_path))

    # -- public API

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, i: int) -> Sample:
        return self._load(self.stems[i])

    def fingerprint(self) -> str:
        """sha256 hex over sorted stems with image/mask file names and sizes.

        Cheap (stat only): identifies which data an artifact was trained on,
        independent of where the folder lives.
        """
        h = hashlib.sha256()
        for stem in sorted(self.stems):
            img, mask = self._paths(stem)
            h.update(
                f"{stem}\0{img.name}\0{img.stat().st_size}\0"
                f"{mask.name}\0{mask.stat().st_size}\n".encode()
            )
        return h.hexdigest()

    def __repr__(self) -> str:
        return (
            f"FolderDataset(root={str(self.root)!r}, split={self.split!r}, "
            f"mask_kind={self.mask_kind!r}, n={len(self)}, bad={len(self.bad)})"
        )


# ------------------------------------------------------------------- COCO JSON


class CocoJsonDataset:
    """COCO instance-segmentation JSON (polygon or RLE segmentations).

    ``stems`` are the images' ``file_name`` without extension (sub-folders
    kept, so names stay unique). Crowd annotations are ignored unless
    ``include_crowd``; instances with fewer than ``min_area_px`` pixels are
    dropped. An image left with no instance is bad data (DataError).
    """

    def __init__(
        self,
        annotation_json: str | os.PathLike[str],
        image_dir: str | os.PathLike[str],
        min_area_px: int = 1,
        include_crowd: bool = False,
        skip_bad: bool = False,
    ) -> None:
        self.annotation_json = Path(annotation_json)
        self.image_dir = Path(image_dir)
        self.min_area_px = min_area_px
        self.include_crowd = include_crowd
        parent = self.annotation_json.resolve().parent
        # COCO's own layout keeps JSONs in annotations/; the dataset is one up.
        self.name = parent.parent.name if parent.name == "annotations" else parent.name

        images, anns = self._parse()
        self.bad: list[tuple[str, str]] = []
        self._entries: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        self.stems: list[str] = []
        for img in images:
            stem = Path(img["file_name"]).with_suffix("").as_posix()
            entry = (img, anns.get(img["id"], []))
            try:
                path = self.image_dir / img["file_name"]
                if not path.is_file():
                    raise DataError(path, "image file missing")
                if skip_bad:
                    self._load(entry)
            except DataError as e:
                _handle_bad(skip_bad, self.bad, stem, e)
            else:
                self._entries.append(entry)
                self.stems.append(stem)

    def _parse(self) -> tuple[list[dict[str, Any]], dict[Any, list[dict[str, Any]]]]:
        path = self.annotation_json
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(path, "annotation JSON missing") from None
        except (OSError, ValueError) as e:
            raise DataError(path, f"cannot parse annotation JSON: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
                or not isinstance(data.get("annotations"), list):
            raise DataError(path, "not a COCO instance JSON (needs 'images' and 'annotations' lists)")
        images = data["images"]
        for img in images:
            if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
                raise DataError(path, f"image entry without id/file_name: {str(img)[:200]}")
        anns: dict[Any, list[dict[str, Any]]] = {}
        for ann in data["annotations"]:
            if not isinstance(ann, dict) or "image_id" not in ann:
                raise DataError(path, f"annotation without image_id: {str(ann)[:200]}")
            if ann.get("iscrowd", 0) and not self.include_crowd:
                continue
            anns.setdefault(ann["image_id"], []).append(ann)
        return images, anns

    def _decode(self, ann: dict[str, Any], h: int, w: int) -> np.ndarray:
        """Annotation -> (h,w) bool mask."""
        from pycocotools import mask as mask_utils  # heavy-ish import, only when needed

        where = f"annotation id {ann.get('id')!r} (image_id {ann['image_id']!r})"
        seg = ann.get("segmentation")
        try:
            if isinstance(seg, list):
                # Fewer than 3 vertices is no area; exactly 4 numbers would
                # even be misread by pycocotools as a bbox.
                polys = [p for p in seg if isinstance(p, list) and len(p) >= 6]
                if not polys:
                    return np.zeros((h, w), dtype=bool)
                rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
            elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
                if [int(x) for x in seg["size"]] != [h, w]:
                    raise DataError(
                        self.annotation_json,
                        f"{where}: RLE size {seg['size']} does not match image size [{h}, {w}]",
                    )
                if isinstance(seg["counts"], list):
                    rle = mask_utils.frPyObjects(seg, h, w)
                else:
                    counts = seg["counts"]
                    rle = {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
            else:
                raise DataError(self.annotation_json, f"{where}: missing or unsupported segmentation")
            with warnings.catch_warnings():
                # pycocotools' numpy-2 copy= DeprecationWarning, once per annotation.
                warnings.simplefilter("ignore", DeprecationWarning)
                return mask_utils.decode(rle).astype(bool)
        except DataError:
            raise
        except Exception as e:  # pycocotools raises assorted types on malformed input
            raise DataError(self.annotation_json, f"{where}: cannot decode segmentation: {e}") from None

    def _load(self, entry: tuple[dict[str, Any], list[dict[str, Any]]]) -> Sample:
        img, anns = entry
        image_path = self.image_dir / img["file_name"]
        image = read_image_rgb(image_path)
        h, w = image.shape[:2]
        jh, jw = img.get("height", h), img.get("width", w)
        if (jh, jw) != (h, w):
            raise DataError(
                image_path,
                f"image size {w}x{h} (WxH) does not match annotation {self.annotation_json} "
                f"size {jw}x{jh}",
            )
        masks = [m for m in (self._decode(a, h, w) for a in anns) if m.sum() >= self.min_area_px]
        if not masks:
            raise DataError(
                self.annotation_json,
                f"empty mask: no instance for image {image_path} "
                f"({len(anns)} annotations, min_area_px={self.min_area_px})",
            )
        stem = Path(img["file_name"]).with_suffix("").as_posix()
        return Sample(stem, image, np.stack(masks), str(image_path), str(self.annotation_json))

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> Sample:
        return self._load(self._entries[i])

    def fingerprint(self) -> str:
        """sha256 hex over sorted stems, image file sizes and the annotation JSON's size."""
        h = hashlib.sha256()
        h.update(f"{self.annotation_json.name}\0{self.annotation_json.stat().st_size}\n".encode())
        for stem, (img, _) in sorted(zip(self.stems, self._entries), key=lambda t: t[0]):
            path = self.image_dir / img["file_name"]
            h.update(f"{stem}\0{path.name}\0{path.stat().st_size}\n".encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return (
            f"CocoJsonDataset(annotation_json={str(self.annotation_json)!r}, "
            f"n={len(self)}, bad={len(self.bad)})"
        )


# ---------------------------------------------------------------------- factory


_FOLDER_ONLY_KW = ("mask_kind", "min_area_frac")


def open_dataset(path: str | os.PathLike[str], split: str, **kw: Any) -> FolderDataset | CocoJsonDataset:
    """Open a dataset by path.

    A directory with split.json -> :class:`FolderDataset` (``split`` selects
    the stems); a ``.json`` file -> :class:`CocoJsonDataset` with images from
    the sibling ``images/`` directory if present, else the JSON's directory
    (``split`` is ignored: a COCO JSON is already one split). ``kw`` is passed
    to the constructor; for COCO the folder-only label-image options
    ``mask_kind`` and ``min_area_frac`` are dropped, since COCO annotations
    are explicit instances (no speck filtering wanted; use ``min_area_px``).
    """
    p = Path(path)
    if p.is_dir():
        if not (p / "split.json").is_file():
            raise DataError(p / "split.json", "not a folder dataset: split.json missing")
        return FolderDataset(p, split=split, **kw)
    if p.is_file() and p.suffix.lower() == ".json":
        image_dir = p.parent / "images"
        kw = {k: v for k, v in kw.items() if k not in _FOLDER_ONLY_KW}
        return CocoJsonDataset(p, image_dir if image_dir.is_dir() else p.parent, **kw)
    raise DataError(p, "not a dataset: expected a directory with split.json or a COCO .json file")
