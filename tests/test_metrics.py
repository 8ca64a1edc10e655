"""Tests for adapters.metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wesam.evaluation.metrics import SegmentationMeter, box_filled_masks, iou_f1


def square(h: int, w: int, y0: int, x0: int, size: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y0 + size, x0:x0 + size] = True
    return m


def test_iou_f1_hand_computed():
    # Two 3x3 squares in 4x4 overlapping in a 2x2 block: TP=4, FP=5, FN=5.
    pred = square(4, 4, 0, 0, 3)
    gt = square(4, 4, 1, 1, 3)
    iou, f1 = iou_f1(pred, gt)
    assert iou == pytest.approx(4 / 14)
    assert f1 == pytest.approx(8 / 18)
    # 2x2 prediction fully inside a 4x4 gt: TP=4, FN=12.
    iou, f1 = iou_f1(square(4, 4, 1, 1, 2), np.ones((4, 4), bool))
    assert (iou, f1) == pytest.approx((4 / 16, 8 / 20))


def test_iou_f1_edge_cases():
    empty = np.zeros((4, 4), bool)
    assert iou_f1(empty, empty) == (1.0, 1.0)
    assert iou_f1(square(4, 4, 0, 0, 2), empty) == (0.0, 0.0)
    assert iou_f1(empty, square(4, 4, 0, 0, 2)) == (0.0, 0.0)
    assert iou_f1(np.ones((4, 4), np.uint8), np.ones((4, 4), bool)) == (1.0, 1.0)
    with pytest.raises(ValueError):
        iou_f1(empty, np.zeros((4, 5), bool))
    with pytest.raises(ValueError):
        iou_f1(np.zeros((4, 4), np.float32), empty)  # must threshold first


def test_meter_imagewise_average():
    # Image A: one instance with IoU 1. Image B: three instances with IoU 0.
    # Image-wise mIoU = (1 + 0) / 2 = 0.5; pooling all instances would give 1/4.
    a = square(8, 8, 0, 0, 4)[None]
    b_gt = np.stack([square(8, 8, 0, 0, 2), square(8, 8, 4, 4, 2), square(8, 8, 0, 5, 2)])
    b_pred = np.stack([square(8, 8, 5, 0, 2), square(8, 8, 0, 3, 1), np.zeros((8, 8), bool)])
    meter = SegmentationMeter()
    assert meter.add_image(a, a) == (1.0, 1.0)
    assert meter.add_image(b_pred, b_gt) == (0.0, 0.0)
    s = meter.summary()
    assert s["miou"] == pytest.approx(0.5) and s["f1"] == pytest.approx(0.5)
    assert s["n_images"] == 2 and s["n_instances"] == 4 and s["n_empty_both"] == 0


def test_meter_mixed_values_and_empty_both():
    # Image 1: IoUs 4/14 and 1 (both empty) -> mean (4/14 + 1) / 2.
    p1 = np.stack([square(4, 4, 0, 0, 3), np.zeros((4, 4), bool)])
    g1 = np.stack([square(4, 4, 1, 1, 3), np.zeros((4, 4), bool)])
    # Image 2: IoU 4/16.
    p2 = square(4, 4, 1, 1, 2)[None]
    g2 = np.ones((1, 4, 4), bool)
    meter = SegmentationMeter()
    meter.add_image(p1, g1)
    meter.add_image(p2, g2)
    s = meter.summary()
    img1_iou, img2_iou = (4 / 14 + 1) / 2, 4 / 16
    img1_f1, img2_f1 = (8 / 18 + 1) / 2, 8 / 20
    assert s["miou"] == pytest.approx((img1_iou + img2_iou) / 2)
    assert s["f1"] == pytest.approx((img1_f1 + img2_f1) / 2)
    assert s["n_empty_both"] == 1 and s["n_instances"] == 3
    assert meter.image_iou == pytest.approx([img1_iou, img2_iou])


def test_meter_errors_and_empty_summary():
    meter = SegmentationMeter()
    s = meter.summary()
    assert math.isnan(s["miou"]) and s["n_images"] == 0
    with pytest.raises(ValueError):
        meter.add_image(np.zeros((2, 4, 4), bool), np.zeros((1, 4, 4), bool))
    with pytest.raises(ValueError):
        meter.add_image(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5), bool))
    with pytest.raises(ValueError):
        meter.add_image(np.zeros((4, 4), bool), np.zeros((4, 4), bool))
    with pytest.raises(ValueError):
        meter.add_image(np.zeros((0, 4, 4), bool), np.zeros((0, 4, 4), bool))
    assert meter.summary()["n_images"] == 0


def test_box_filled_masks():
    boxes = np.array(
        [
            [1, 2, 3, 2],        # inclusive: columns 1..3 of row 2
            [0.6, 0.4, 1.4, 1.6],  # rounds to [1, 0, 1, 2]
            [-5, -5, 100, 100],  # clipped to the whole image
            [10, 10, 20, 20],    # fully outside -> empty
        ],
        np.float32,
    )
    m = box_filled_masks(boxes, (4, 5))
    assert m.shape == (4, 4, 5) and m.dtype == bool
    expect0 = np.zeros((4, 5), bool)
    expect0[2, 1:4] = True
    assert np.array_equal(m[0], expect0)
    expect1 = np.zeros((4, 5), bool)
    expect1[0:3, 1] = True
    assert np.array_equal(m[1], expect1)
    assert m[2].all()
    assert not m[3].any()
    assert box_filled_masks(np.zeros((0, 4)), (4, 5)).shape == (0, 4, 5)


def test_box_filled_roundtrip_with_tight_boxes():
    from wesam.data import boxes_from_masks

    gt = np.stack([square(16, 16, 2, 3, 5), square(16, 16, 9, 9, 7)])
    pred = box_filled_masks(boxes_from_masks(gt), (16, 16))
    assert np.array_equal(pred, gt)  # squares are their own boxes
    meter = SegmentationMeter()
    meter.add_image(pred, gt)
    assert meter.summary()["miou"] == 1.0


def test_inscribed_ellipse_floor():
    from wesam.data.weak import boxes_from_masks, derive_weak_labels, inscribed_ellipse_masks

    # A 9x5 box (x 2..10, y 3..7): centre (6, 5), semi-axes 4.5 and 2.5.
    ell = inscribed_ellipse_masks(np.array([[2, 3, 10, 7]]), (12, 14))[0]
    assert ell[5, 2] and ell[5, 10] and ell[3, 6] and ell[7, 6]  # the four extreme pixels
    assert not ell[3, 2] and not ell[7, 10] and not ell[:3].any() and not ell[:, 11:].any()
    assert abs(ell.sum() - math.pi * 4.5 * 2.5) < 4
    # An elliptic object scores ~1 against its own box's ellipse, a box only pi/4.
    gt = inscribed_ellipse_masks(np.array([[4, 4, 40, 30]]), (48, 48))
    m = SegmentationMeter()
    m.add_image(inscribed_ellipse_masks(boxes_from_masks(gt), (48, 48)), gt)
    assert m.summary()["miou"] == 1.0
    assert derive_weak_labels(gt, "ellipse").mask_inputs.tolist() == gt.tolist()
