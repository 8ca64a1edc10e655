"""`wesam bench pseudo-label-prior`: the quality of box-prompted pseudo-labels with the ellipse prior."""

from __future__ import annotations

import json

import numpy as np
import pytest
from adapt_support import make_adapt_setup
from wesam.adapters.adapt.data import load_adaptation_data
from wesam.bench.pseudo_label_prior import (
    main,
    point_label_quality,
    points_ellipse_masks,
    prior_label_quality,
)

from wesam.evaluation.evaluate import PromptSpec, evaluate
from wesam.sam.predictor import SamPredictorCore
from wesam.sam.zoo import resolve_model


def test_prior_label_quality_spans_model_to_ellipse(tmp_path) -> None:
    _, root, model_path = make_adapt_setup(tmp_path, n_images=12, n_train=12)
    _, val, _ = load_adaptation_data(root, "train", "box", val_fraction=0.5)
    predictor = SamPredictorCore(resolve_model(str(model_path)).sam)
    res = prior_label_quality(predictor, val, [0.0, 1e6])
    assert set(res) == {"W=0", "W=1e+06", "unclipped", "ellipse"}
    floors = evaluate(predictor, val, PromptSpec("box"))
    # the prior alone is the ellipse floor, scored the same way as `wesam eval` scores it
    assert res["ellipse"] == pytest.approx(floors["ellipse"]["miou"], abs=1e-9)
    # an overwhelming prior is the ellipse (up to its rim, where 1 - r^2 is ~0)
    assert res["W=1e+06"] == pytest.approx(res["ellipse"], abs=0.02)
    # the model alone, unclipped, is what `wesam eval` reports for direct testing
    assert res["unclipped"] == pytest.approx(floors["miou"], abs=1e-9)

    # point labels: the model's masks are what `wesam eval --prompt point` scores on the same images
    _, val_pts, _ = load_adaptation_data(root, "train", "point", val_fraction=0.5)
    pts = point_label_quality(predictor, val_pts, [0.0, 1e6])
    assert set(pts) == {"model", "W=1e+06", "points ellipse"}
    assert pts["model"] == pytest.approx(evaluate(predictor, val_pts, PromptSpec("point"))["miou"], abs=1e-9)
    assert 0.0 <= pts["points ellipse"] <= 1.0
    # an overwhelming point prior is the points' ellipse (up to its rim)
    assert pts["W=1e+06"] == pytest.approx(pts["points ellipse"], abs=0.02)

    out = tmp_path / "prior.json"
    assert main(["--data", str(root), "--model", str(model_path), "--weights", "0", "2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    cell = doc["results"][root.name]
    assert cell["box"]["n_images"] >= 1 and {"W=0", "W=2", "ellipse"} <= set(cell["box"])
    assert {"model", "W=2", "points ellipse"} <= set(cell["point"])
    # a later run of one prompt kind keeps the other's cells
    assert main(["--data", str(root), "--model", str(model_path), "--weights", "1", "--prompts", "point",
                 "--json", str(out)]) == 0
    cell = json.loads(out.read_text())["results"][root.name]
    assert {"W=0", "W=2", "ellipse"} <= set(cell["box"]) and "W=1" in cell["point"] and "W=2" not in cell["point"]
    with pytest.raises(SystemExit):
        main(["--data", str(root), "--model", str(model_path), "--weights", "-1", "--json", str(out)])


def test_points_ellipse_recovers_an_ellipse_from_uniform_points() -> None:
    h, w = 120, 160
    yy, xx = np.mgrid[0:h, 0:w]
    truth = ((xx - 80) / 40.0) ** 2 + ((yy - 60) / 20.0) ** 2 <= 1.0
    rng = np.random.default_rng(0)
    inside = np.flatnonzero(truth)
    idx = rng.choice(inside, 400, replace=False)
    coords = np.stack([idx % w, idx // w], 1)[None].astype(np.float32)
    labels = np.ones((1, 400), np.int32)
    labels[0, -3:] = 0  # negatives are ignored
    est = points_ellipse_masks(coords, labels, (h, w))[0]
    assert (est & truth).sum() / (est | truth).sum() > 0.9
    assert not points_ellipse_masks(coords, np.zeros_like(labels), (h, w)).any()  # no positives: empty
