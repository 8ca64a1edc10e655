"""Our batched predictor must reproduce segment_anything.SamPredictor exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from wesam.sam.predictor import Prompts, SamPredictorCore
from wesam.sam.zoo import resolve_model


@pytest.fixture(scope="module")
def models():
    m = resolve_model("sam-micro", seed=7)
    # Random init leaves logits near 0; sharpen the decoder so thresholded masks are non-trivial.
    with torch.no_grad():
        for p in m.sam.mask_decoder.output_hypernetworks_mlps.parameters():
            p.mul_(8.0)
    return SamPredictorCore(m.sam), SamPredictor(m.sam)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (90, 130, 3), dtype=np.uint8)
    img[20:60, 30:90] = (200, 40, 40)
    return img


def _reference(sam_pred: SamPredictor, image, **kw):
    sam_pred.set_image(image)
    return sam_pred.predict(**kw)


@pytest.mark.parametrize("multimask", [False, True])
def test_box_prompts_match_sampredictor(models, image, multimask) -> None:
    ours, ref = models
    boxes = np.array([[30, 20, 90, 60], [5, 5, 40, 80], [60, 10, 125, 85]], dtype=np.float32)
    pred = ours.predict(image, Prompts(boxes=boxes), multimask=multimask, return_logits=True)
    for i, box in enumerate(boxes):
        logits, scores, low = _reference(ref, image, box=box, multimask_output=multimask, return_logits=True)
        # Batching prompts changes float summation order only.
        np.testing.assert_allclose(pred.masks[i], logits, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(pred.scores[i], scores, atol=1e-5)
        np.testing.assert_allclose(pred.low_res_logits[i], low, atol=1e-4, rtol=1e-4)
        ref_masks, _, _ = _reference(ref, image, box=box, multimask_output=multimask)
        single = ours.predict(image, Prompts(boxes=box[None]), multimask=multimask).masks[0]
        assert np.array_equal(single, ref_masks)
        assert ref_masks.any() and not ref_masks.all()


def test_point_and_mixed_prompts_match(models, image) -> None:
    ours, ref = models
    coords = np.array([[[50, 40], [10, 10]], [[100, 70], [60, 30]]], dtype=np.float32)
    labels = np.array([[1, 0], [1, 1]])
    boxes = np.array([[30, 20, 90, 60], [50, 5, 120, 88]], dtype=np.float32)
    pred = ours.predict(image, Prompts(point_coords=coords, point_labels=labels, boxes=boxes), return_logits=True)
    for i in range(2):
        logits, scores, _ = _reference(ref, image, point_coords=coords[i], point_labels=labels[i], box=boxes[i],
                                       multimask_output=False, return_logits=True)
        np.testing.assert_allclose(pred.masks[i], logits, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(pred.scores[i], scores, atol=1e-5)


def test_mask_input_matches(models, image) -> None:
    ours, ref = models
    t = ours.transform
    gt = np.zeros(image.shape[:2], bool)
    gt[20:60, 30:90] = True
    mask_in = t.mask_to_prompt(gt[None], image.shape[:2])
    assert mask_in.shape == (1, 1, 32, 32)  # 4x the 8x8 embedding grid of sam-micro
    pred = ours.predict(image, Prompts(point_coords=[[60, 40]], point_labels=[1], mask_inputs=mask_in),
                        return_logits=True)
    logits, _, _ = _reference(ref, image, point_coords=np.array([[60, 40]]), point_labels=np.array([1]),
                              mask_input=mask_in[0], multimask_output=False, return_logits=True)
    np.testing.assert_allclose(pred.masks[0], logits, atol=1e-5)


def test_batched_encoder_matches_single(models, image) -> None:
    ours, _ = models
    other = np.ascontiguousarray(image[::-1, :100])
    a, b = ours.encode_batch([image, other])
    torch.testing.assert_close(a.features, ours.encode(image).features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.features, ours.encode(other).features, atol=1e-5, rtol=1e-5)
    assert b.original_size == (90, 100)


def test_best_picks_highest_score(models, image) -> None:
    ours, _ = models
    pred = ours.predict(image, Prompts(point_coords=[[[50, 40]], [[20, 70]]], point_labels=[[1], [1]]),
                        multimask=True)
    best = pred.best()
    assert best.masks.shape == (2, 1, 90, 130)
    for i in range(2):
        j = pred.scores[i].argmax()
        assert np.array_equal(best.masks[i, 0], pred.masks[i, j])


def test_prompt_validation() -> None:
    with pytest.raises(ValueError, match="no prompt"):
        Prompts()
    with pytest.raises(ValueError, match="point_labels"):
        Prompts(point_coords=[[1, 2]])
    with pytest.raises(ValueError, match="disagree"):
        Prompts(boxes=[[0, 0, 1, 1], [0, 0, 2, 2]], point_coords=[[[1, 1]]], point_labels=[[1]])


def test_image_validation(models) -> None:
    ours, _ = models
    with pytest.raises(ValueError, match="uint8 RGB"):
        ours.encode(np.zeros((10, 10), np.uint8))
