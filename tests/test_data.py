"""Tests for adapters.data: instance extraction, dataset readers, weak labels."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from wesam.data import (
    WEAK_KINDS,
    CocoJsonDataset,
    DataError,
    FolderDataset,
    Sample,
    boxes_from_masks,
    coarse_box_of_polygon,
    coarse_mask,
    derive_weak_labels,
    instances_from_mask,
    jitter_boxes,
    open_dataset,
    sample_points,
)
from wesam.evaluation.metrics import iou_f1

H, W = 48, 64


# ------------------------------------------------------------------ helpers


def two_blobs_and_speck() -> np.ndarray:
    """0/255 mask: two 10x10 blobs plus a 1-px speck (below 0.1% of 48*64)."""
    m = np.zeros((H, W), np.uint8)
    m[5:15, 5:15] = 255
    m[30:40, 40:50] = 255
    m[25, 25] = 255
    return m


def disk(h: int = 100, w: int = 100, cx: int = 50, cy: int = 50, r: int = 30) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def write_image(path: Path, hw=(H, W), color=(200, 30, 10)) -> np.ndarray:
    """Write an RGB image (cv2 wants BGR) and return the RGB array."""
    rgb = np.zeros((*hw, 3), np.uint8)
    rgb[...] = color
    rgb[: hw[0] // 2, : hw[1] // 2] = (10, 120, 240)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return rgb


def write_mask(path: Path, mask: np.ndarray) -> None:
    """Write a uint8 mode-"L" PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8)).save(path)


def make_folder(
    root: Path,
    stems=("a", "b", "c"),
    split=None,
    ext: str = ".png",
    mask: np.ndarray | None = None,
) -> Path:
    mask = two_blobs_and_speck() if mask is None else mask
    for s in stems:
        write_image(root / "images" / f"{s}{ext}")
        write_mask(root / "masks" / f"{s}.png", mask)
    split = split if split is not None else {"train": list(stems[:1]), "test": list(stems[1:])}
    (root / "split.json").write_text(json.dumps(split))
    return root


# -------------------------------------------------------- instance extraction


def test_binary_components_drop_speck():
    inst = instances_from_mask(two_blobs_and_speck(), "binary")
    assert inst.dtype == bool and inst.shape == (2, H, W)
    assert inst[0, 10, 10] and inst[1, 35, 45]  # raster order of components
    assert inst.sum(axis=(1, 2)).tolist() == [100, 100]
    # With no area threshold the speck is an instance too.
    assert len(instances_from_mask(two_blobs_and_speck(), "binary", min_area_frac=0)) == 3


def test_binary_accepts_01_and_rgb_and_threshold():
    m01 = (two_blobs_and_speck() > 0).astype(np.uint8)
    assert len(instances_from_mask(m01, "binary")) == 2
    rgb = np.repeat(two_blobs_and_speck()[..., None], 3, axis=2)
    assert len(instances_from_mask(rgb, "binary")) == 2
    faint = np.zeros((H, W), np.uint8)
    faint[5:15, 5:15] = 100  # JPEG-ish grey is not foreground for 0/255 masks
    faint[30:40, 40:50] = 255
    assert len(instances_from_mask(faint, "binary")) == 1


def test_binary_8_connectivity():
    m = np.zeros((H, W), np.uint8)
    m[5:15, 5:15] = 255
    m[15:25, 15:25] = 255  # touches the first blob only diagonally
    assert len(instances_from_mask(m, "binary")) == 1


def test_instance_ids_sorted_and_small_kept():
    m = np.zeros((H, W), np.uint8)
    m[0:10, 0:10] = 7
    m[20:30, 20:30] = 2
    m[40, 60] = 5  # one pixel: instance masks do not apply the area filter
    inst = instances_from_mask(m, "instance")
    assert inst.shape == (3, H, W)
    assert inst[0, 25, 25] and inst[1, 40, 60] and inst[2, 5, 5]


def test_semantic_components_ordered_by_class():
    m = np.zeros((H, W), np.uint8)
    m[0:10, 0:10] = 3
    m[0:10, 30:40] = 1
    m[30:40, 0:10] = 1
    m[45, 60] = 1  # speck dropped
    inst = instances_from_mask(m, "semantic")
    assert inst.shape == (3, H, W)
    assert inst[0, 5, 35] and inst[1, 35, 5] and inst[2, 5, 5]


def test_instances_empty_and_bad_kind():
    assert instances_from_mask(np.zeros((H, W), np.uint8), "binary").shape == (0, H, W)
    with pytest.raises(ValueError, match="binary"):
        instances_from_mask(np.zeros((H, W), np.uint8), "panoptic")
    with pytest.raises(ValueError):
        instances_from_mask(np.zeros((H, W, 3), np.uint8), "instance")


# ---------------------------------------------------------- folder dataset


def test_folder_basic(tmp_path):
    root = make_folder(tmp_path / "kvasir")
    ds = FolderDataset(root)
    assert ds.name == "kvasir" and ds.mask_kind == "binary"
    assert ds.stems == ["b", "c"] and len(ds) == 2
    s = ds[0]
    assert isinstance(s, Sample)
    assert s.stem == "b" and s.image.shape == (H, W, 3) and s.image.dtype == np.uint8
    assert s.image[0, 0].tolist() == [10, 120, 240]  # RGB, not BGR
    assert s.image[-1, -1].tolist() == [200, 30, 10]
    assert s.instances.shape == (2, H, W) and s.instances.dtype == bool
    assert s.image_path.endswith("b.png") and s.mask_path.endswith("b.png")
    assert [x.stem for x in ds] == ["b", "c"]


def test_folder_jpeg_and_splits(tmp_path):
    root = make_folder(
        tmp_path / "d",
        stems=("a", "b", "c"),
        split={"train": ["a", "b"], "test": ["c"], "meta": {"source": "x"}, "n": 3},
        ext=".jpg",
    )
    assert FolderDataset(root, split="train").stems == ["a", "b"]
    assert FolderDataset(root, split="test")[0].image.shape == (H, W, 3)
    assert FolderDataset(root, split="test", stems=["a"]).stems == ["a"]
    with pytest.raises(DataError, match="split.json") as e:
        FolderDataset(root, split="val")
    assert "test, train" in str(e.value) and "meta" not in str(e.value)
    with pytest.raises(DataError, match="split.json"):
        FolderDataset(root, split="meta")


def test_folder_auto_kind(tmp_path):
    m = np.zeros((H, W), np.uint8)
    m[0:10, 0:10] = 200
    m[0:10, 10:20] = 255  # adjacent ids: one blob for "binary", two instances otherwise
    root = make_folder(tmp_path / "d", mask=m)
    assert FolderDataset(root).mask_kind == "binary"
    assert len(FolderDataset(root)[0].instances) == 1
    (root / "classes.json").write_text("{}")
    assert FolderDataset(root).mask_kind == "semantic"
    assert len(FolderDataset(root)[0].instances) == 2
    (root / "instances.json").write_text("{}")
    assert FolderDataset(root).mask_kind == "instance"
    assert FolderDataset(root, mask_kind="binary").mask_kind == "binary"
    with pytest.raises(ValueError):
        FolderDataset(root, mask_kind="nope")


def test_folder_palette_mask(tmp_path):
    m = np.zeros((H, W), np.uint8)
    m[0:10, 0:10] = 1
    m[20:30, 20:30] = 4
    root = make_folder(tmp_path / "d", stems=("a",), split={"test": ["a"]})
    pal = Image.fromarray(m, mode="L").convert("P")  # keeps values as palette indices
    pal.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    pal.save(root / "masks" / "a.png")
    (root / "instances.json").write_text("{}")
    inst = FolderDataset(root)[0].instances
    assert inst.shape == (2, H, W) and inst[0, 5, 5] and inst[1, 25, 25]


def test_fingerprint(tmp_path):
    root = make_folder(tmp_path / "d")
    fp = FolderDataset(root).fingerprint()
    assert len(fp) == 64 and fp == FolderDataset(root).fingerprint()
    assert FolderDataset(root, split="train").fingerprint() != fp
    write_image(root / "images" / "b.png", color=(1, 2, 3))  # different content/size
    m = two_blobs_and_speck()
    m[0:3, 0:3] = 255
    write_mask(root / "masks" / "b.png", m)
    assert FolderDataset(root).fingerprint() != fp


# ----------------------------------------------------------------- bad data


def test_missing_split_json(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "split.json").unlink()
    with pytest.raises(DataError, match="split.json"):
        FolderDataset(root)
    # An explicit stem list (validation carve-outs) does not need split.json.
    assert FolderDataset(root, stems=["c", "a"]).stems == ["c", "a"]


def test_missing_mask_raises_at_construction(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "masks" / "c.png").unlink()
    with pytest.raises(DataError) as e:
        FolderDataset(root)
    assert str(root / "masks" / "c.png") in str(e.value)


def test_missing_image_raises_at_construction(tmp_path):
    root = make_folder(tmp_path / "d")
    (root / "images" / "b.png").unlink()
    with pytest.raises(DataError, match=r"images.*b\.jpg"):
        FolderDataset(root)


def _corrupt(root: Path, what: str) -> Path:
    """Make sample 'b' bad in one way; return the file the error must name."""
    img, msk = root / "images" / "b.png", root / "masks" / "b.png"
    if what == "size":
        write_mask(msk, np.full((H + 2, W), 255, np.uint8))
        return msk
    if what == "empty":
        write_mask(msk, np.zeros((H, W), np.uint8))
        return msk
    if what == "speck_only":  # non-zero but below the min area -> still empty
        m = np.zeros((H, W), np.uint8)
        m[3, 3] = 255
        write_mask(msk, m)
        return msk
    if what == "garbage_image":
        img.write_bytes(b"this is not an image" * 10)
        return img
    if what == "garbage_mask":
        msk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50 + b"IEND")
        return msk
    if what == "zero_byte_mask":
        msk.write_bytes(b"")
        return msk
    if what == "truncated_png_mask":
        data = msk.read_bytes()
        msk.write_bytes(data[: len(data) // 2])
        return msk
    if what == "truncated_jpeg":
        img.unlink()
        jpg = root / "images" / "b.jpg"
        rng = np.random.default_rng(0)  # noise so the file is large enough to cut
        noisy = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        assert cv2.imwrite(str(jpg), noisy)
        data = jpg.read_bytes()
        jpg.write_bytes(data[: int(len(data) * 0.7)])
        return jpg
    raise AssertionError(what)


CONTENT_ERRORS = [
    "size", "empty", "speck_only", "garbage_image", "garbage_mask",
    "zero_byte_mask", "truncated_png_mask", "truncated_jpeg",
]


@pytest.mark.parametrize("what", CONTENT_ERRORS)
def test_content_errors_raise_from_getitem(tmp_path, what):
    root = make_folder(tmp_path / "d")
    bad_file = _corrupt(root, what)
    ds = FolderDataset(root)  # construction only checks existence
    assert ds.stems == ["b", "c"]
    assert ds[1].stem == "c"
    with pytest.raises(DataError) as e:
        ds[0]
    assert str(bad_file) in str(e.value)
    assert e.value.path == str(bad_file)


@pytest.mark.parametrize("what", CONTENT_ERRORS + ["missing_mask"])
def test_skip_bad_warns_and_skips(tmp_path, what):
    root = make_folder(tmp_path / "d")
    if what == "missing_mask":
        bad_file = root / "masks" / "b.png"
        bad_file.unlink()
    else:
        bad_file = _corrupt(root, what)
    with pytest.warns(UserWarning) as rec:
        ds = FolderDataset(root, skip_bad=True)
    assert ds.stems == ["c"] and len(ds) == 1
    assert len(ds.bad) == 1 and ds.bad[0][0] == "b" and str(bad_file) in ds.bad[0][1]
    assert any(str(bad_file) in str(w.message) for w in rec)
    assert ds[0].stem == "c"


def test_skip_bad_clean_dataset_no_warning(tmp_path):
    root = make_folder(tmp_path / "d")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = FolderDataset(root, skip_bad=True)
    assert ds.stems == ["b", "c"] and ds.bad == []


@pytest.mark.parametrize("trailer", [b"\x00\x00\r\n", b"MOTION-PHOTO-TRAILER" * 20])
def test_jpeg_with_data_after_eoi_is_fine(tmp_path, trailer):
    root = make_folder(tmp_path / "d", ext=".jpg")
    p = root / "images" / "b.jpg"
    p.write_bytes(p.read_bytes() + trailer)
    assert FolderDataset(root)[0].image.shape == (H, W, 3)


# ---------------------------------------------------------------- COCO JSON


def _fortran_counts(m: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs starting with zeros)."""
    flat = m.flatten(order="F").astype(np.uint8)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return counts


def make_coco(root: Path, extra_images=(), extra_anns=()) -> Path:
    write_image(root / "images" / "x.jpg")
    write_image(root / "images" / "y.png")
    # COCO polygons use continuous coordinates: this covers pixels x 10..29, y 10..19.
    square = [10, 10, 30, 10, 30, 20, 10, 20]
    rle_mask = np.zeros((H, W), np.uint8)
    rle_mask[30:40, 40:50] = 1
    compressed = mask_utils.encode(np.asfortranarray(rle_mask))
    compressed["counts"] = compressed["counts"].decode()
    crowd = np.zeros((H, W), np.uint8)
    crowd[0:5, 50:60] = 1
    data = {
        "images": [
            {"id": 1, "file_name": "x.jpg", "height": H, "width": W},
            {"id": 2, "file_name": "y.png", "height": H, "width": W},
            *extra_images,
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "segmentation": [square], "iscrowd": 0},
            {"id": 11, "image_id": 1, "segmentation": compressed, "iscrowd": 0},
            {"id": 12, "image_id": 2, "iscrowd": 0,
             "segmentation": {"size": [H, W], "counts": _fortran_counts(rle_mask)}},
            {"id": 13, "image_id": 2, "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": _fortran_counts(crowd)}},
            *extra_anns,
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    path = root / "ann.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_polygon_and_rle(tmp_path):
    ann = make_coco(tmp_path / "coco")
    ds = CocoJsonDataset(ann, tmp_path / "coco" / "images")
    assert ds.stems == ["x", "y"] and len(ds) == 2 and ds.name == "coco"
    s = ds[0]
    assert s.image.shape == (H, W, 3) and s.instances.shape == (2, H, W)
    assert s.mask_path == str(ann)
    poly = s.instances[0]
    assert poly[10:20, 10:30].all() and poly.sum() == 200
    assert np.array_equal(s.instances[1][30:40, 40:50], np.ones((10, 10), bool))
    assert s.instances[1].sum() == 100
    s2 = ds[1]
    assert s2.instances.shape == (1, H, W) and s2.instances[0].sum() == 100  # crowd dropped
    assert CocoJsonDataset(ann, tmp_path / "coco" / "images", include_crowd=True)[1].instances.shape[0] == 2
    assert len(ds.fingerprint()) == 64


def test_coco_min_area_and_empty(tmp_path):
    ann = make_coco(tmp_path / "coco")
    ds = CocoJsonDataset(ann, tmp_path / "coco" / "images", min_area_px=150)
    assert ds[0].instances.shape[0] == 1  # 100-px RLE square dropped
    with pytest.raises(DataError, match="empty mask") as e:
        ds[1]
    assert str(ann) in str(e.value) and "y.png" in str(e.value)


def test_coco_errors(tmp_path):
    root = tmp_path / "coco"
    ann = make_coco(
        root,
        extra_images=[{"id": 3, "file_name": "missing.jpg", "height": H, "width": W}],
    )
    with pytest.raises(DataError, match="missing.jpg"):
        CocoJsonDataset(ann, root / "images")
    with pytest.warns(UserWarning, match="missing.jpg"):
        ds = CocoJsonDataset(ann, root / "images", skip_bad=True)
    assert ds.stems == ["x", "y"] and ds.bad[0][0] == "missing"

    # size mismatch between JSON and image file names the image
    ann = make_coco(root, extra_images=[{"id": 4, "file_name": "z.png", "height": H + 1, "width": W}],
                    extra_anns=[{"id": 40, "image_id": 4, "segmentation": [[1, 1, 9, 1, 9, 9]]}])
    write_image(root / "images" / "z.png")
    ds = CocoJsonDataset(ann, root / "images")
    with pytest.raises(DataError) as e:
        ds[2]
    assert str(root / "images" / "z.png") in str(e.value)

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        CocoJsonDataset(bad, root / "images")
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="bad.json"):
        CocoJsonDataset(bad, root / "images")


def test_open_dataset(tmp_path):
    root = make_folder(tmp_path / "folder")
    ds = open_dataset(root, "train")
    assert isinstance(ds, FolderDataset) and ds.stems == ["a"]
    ds = open_dataset(root, "test", skip_bad=True)
    assert ds.stems == ["b", "c"]
    ann = make_coco(tmp_path / "coco")
    ds = open_dataset(ann, "test", min_area_frac=0.5, mask_kind="auto", skip_bad=True)
    assert isinstance(ds, CocoJsonDataset) and ds[0].instances.shape[0] == 2
    assert ds.image_dir == tmp_path / "coco" / "images"
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "x.jpg")
    write_image(tmp_path / "flat" / "y.png")
    flat_ann = tmp_path / "flat" / "ann.json"
    flat_ann.write_text(ann.read_text())
    assert len(open_dataset(flat_ann, "test")) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="split.json"):
        open_dataset(tmp_path / "empty", "test")
    with pytest.raises(DataError, match="nowhere"):
        open_dataset(tmp_path / "nowhere", "test")


# -------------------------------------------------------------- weak labels


def three_instances() -> np.ndarray:
    inst = np.zeros((3, H, W), bool)
    inst[0, 5:15, 5:25] = True
    inst[1] = disk(H, W, 40, 30, 8)
    inst[2, 0:H, 60:64] = True  # touches the image border
    return inst


def test_boxes_tight():
    inst = three_instances()
    boxes = boxes_from_masks(inst)
    assert boxes.dtype == np.float32 and boxes.shape == (3, 4)
    assert boxes[0].tolist() == [5, 5, 24, 14]
    assert boxes[2].tolist() == [60, 0, 63, H - 1]
    for m, (x0, y0, x1, y1) in zip(inst, boxes.astype(int)):
        ys, xs = np.nonzero(m)
        assert xs.min() == x0 and xs.max() == x1 and ys.min() == y0 and ys.max() == y1
        # Mask touches all four edges and nothing lies outside.
        assert m[y0, x0:x1 + 1].any() and m[y1, x0:x1 + 1].any()
        assert m[y0:y1 + 1, x0].any() and m[y0:y1 + 1, x1].any()
        outside = m.copy()
        outside[y0:y1 + 1, x0:x1 + 1] = False
        assert not outside.any()
    assert boxes_from_masks(np.zeros((1, H, W), bool)).tolist() == [[0, 0, 0, 0]]
    assert boxes_from_masks(np.zeros((0, H, W), bool)).shape == (0, 4)


def test_jitter_bounded_and_ordered():
    rng = np.random.default_rng(0)
    boxes = np.array([[10, 10, 200, 150], [100, 100, 102, 101], [0, 0, 299, 199]], np.float32)
    boxes = np.repeat(boxes, 200, axis=0)
    j = jitter_boxes(boxes, (200, 300), rng, std_frac=0.5, max_px=20.0)
    assert j.dtype == np.float32 and j.shape == boxes.shape
    assert (np.abs(j - boxes) <= 20.0 + 1e-4).all()
    assert (j[:, 0] <= j[:, 2]).all() and (j[:, 1] <= j[:, 3]).all()
    assert (j >= 0).all() and (j[:, [0, 2]] <= 299).all() and (j[:, [1, 3]] <= 199).all()
    assert not np.allclose(j[:200], boxes[:200])  # big box actually moves
    # Noise scales with the side: std 1 px on the 2x1 box, so 5 px is a 5-sigma bound.
    assert np.abs(j[200:400] - boxes[200:400]).max() <= 5.0
    tight = jitter_boxes(boxes, (200, 300), rng, std_frac=0.0)
    assert np.array_equal(tight, boxes)


def test_sample_points_inside_outside():
    m = disk()
    coords, labels = sample_points(m, 5, 5, np.random.default_rng(1))
    assert coords.shape == (10, 2) and coords.dtype == np.float32
    assert labels.dtype == np.int32 and labels.tolist() == [1] * 5 + [0] * 5
    xs, ys = coords[:, 0].astype(int), coords[:, 1].astype(int)
    assert np.array_equal(coords, np.round(coords))
    assert m[ys[:5], xs[:5]].all() and not m[ys[5:], xs[5:]].any()
    assert len({tuple(c) for c in coords[:5]}) == 5  # without replacement


def test_sample_points_small_regions_and_valid():
    m = np.zeros((20, 20), bool)
    m[3, 4] = True  # single pixel: positives repeat (with replacement)
    valid = np.zeros((20, 20), bool)
    valid[10:, 10:] = True
    coords, labels = sample_points(m, 3, 4, np.random.default_rng(0), valid=valid)
    assert (coords[:3] == [4, 3]).all()
    assert (coords[3:] >= 10).all()
    full = np.ones((20, 20), bool)
    coords, labels = sample_points(full, 2, 2, np.random.default_rng(0))
    assert labels.tolist() == [1, 1, -1, -1]  # no background: padding points


def test_coarse_mask_disk():
    m = disk()
    for seed in range(20):
        c = coarse_mask(m, np.random.default_rng(seed))
        assert c.dtype == bool and c.shape == m.shape and c.any()
        iou, _ = iou_f1(c, m)
        assert 0.3 < iou < 0.99


def test_coarse_mask_never_empty():
    thin = np.zeros((50, 50), bool)
    thin[10:40, 25] = True  # erosion would wipe it out
    for seed in range(10):
        c = coarse_mask(thin, np.random.default_rng(seed))
        assert c.any() and (c & thin).any()
    assert not coarse_mask(np.zeros((5, 5), bool), np.random.default_rng(0)).any()


def test_coarse_box_of_polygon():
    sq = np.zeros((64, 64), bool)
    sq[10:31, 20:51] = True
    assert coarse_box_of_polygon(sq).tolist() == [20, 10, 50, 30]
    assert coarse_box_of_polygon(sq).dtype == np.float32
    line = np.zeros((64, 64), bool)
    line[5, 10:40] = True  # degenerate polygon -> tight box
    assert coarse_box_of_polygon(line).tolist() == [10, 5, 39, 5]


def test_derive_weak_labels_kinds():
    inst = three_instances()
    box = derive_weak_labels(inst, "box")
    assert box.kind == "box" and np.array_equal(box.boxes, boxes_from_masks(inst))
    assert box.point_coords is None and box.mask_inputs is None
    jit = derive_weak_labels(inst, "box", seed=1, key="k", box_jitter=0.2)
    assert jit.boxes.shape == (3, 4) and not np.array_equal(jit.boxes, box.boxes)
    pt = derive_weak_labels(inst, "point", key="img")
    assert pt.point_coords.shape == (3, 10, 2) and pt.point_labels.shape == (3, 10)
    for m, c, lab in zip(inst, pt.point_coords.astype(int), pt.point_labels):
        assert (m[c[lab == 1, 1], c[lab == 1, 0]]).all()
        assert not (m[c[lab == 0, 1], c[lab == 0, 0]]).any()
    pt2 = derive_weak_labels(inst, "point", n_points=(2, 0))
    assert pt2.point_labels.tolist() == [[1, 1]] * 3
    co = derive_weak_labels(inst, "coarse")
    assert co.mask_inputs.shape == inst.shape and co.mask_inputs.any(axis=(1, 2)).all()
    cb = derive_weak_labels(inst, "coarse-box")
    assert cb.boxes.shape == (3, 4)
    assert cb.boxes[0].tolist() == [5, 5, 24, 14]
    empty = derive_weak_labels(np.zeros((0, H, W), bool), "point")
    assert empty.point_coords.shape == (0, 10, 2)
    with pytest.raises(ValueError) as e:
        derive_weak_labels(inst, "scribble")
    for k in WEAK_KINDS:
        assert k in str(e.value)


@pytest.mark.parametrize("kind", ["point", "coarse", "box"])
def test_derive_weak_labels_deterministic(kind):
    inst = three_instances()
    kw = {"box_jitter": 0.2} if kind == "box" else {}

    def arrays(wl):
        return [a for a in (wl.boxes, wl.point_coords, wl.point_labels, wl.mask_inputs) if a is not None]

    a = arrays(derive_weak_labels(inst, kind, seed=3, key="img_001", **kw))
    b = arrays(derive_weak_labels(inst, kind, seed=3, key="img_001", **kw))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = arrays(derive_weak_labels(inst, kind, seed=4, key="img_001", **kw))
    d = arrays(derive_weak_labels(inst, kind, seed=3, key="img_002", **kw))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert not all(np.array_equal(x, y) for x, y in zip(a, d))
