"""`wesam bench adaptation-figures`: the pictures are drawn from the cells the table really ran
(their checkpoints and validation curves), on a tiny generated polyp set with sam-micro."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from adapt_support import make_adapt_setup

from wesam.bench import adaptation, adaptation_figures


def test_figures_show_the_published_states_of_the_table(tmp_path: Path) -> None:
    tmp, root, model = make_adapt_setup(tmp_path, n_images=14, n_train=10)
    data_root = tmp / "data"
    data_root.mkdir()
    (data_root / "kvasir_seg").symlink_to(root, target_is_directory=True)
    common = ["--model", str(model), "--data-root", str(data_root), "--steps", "2", "--seed", "0",
              "--work", str(tmp / "work"), "--json", str(tmp / "cells.json")]
    assert adaptation.main([*common, "--targets", "kvasir_seg", "--prompts", "box", "--rows", "direct",
                            "self-training", "oracle", "--no-results"]) == 0
    cells = json.loads((tmp / "cells.json").read_text())["cells"]
    trained = next(c for c in cells.values() if c["row"] == "self-training")
    assert [step for step, _ in trained["val"]["curve"]] == [2]  # validated at the last step (eval_every 50)

    out = tmp / "figures"
    assert adaptation_figures.main([*common, "--target", "kvasir_seg",
                                    "--prompt", "box", "--rows", "self-training", "oracle", "--images", "3",
                                    "--out", str(out), "--threads", "1"]) == 0
    from PIL import Image

    for name in ("adaptation-curves-kvasir_seg-box.png", "adaptation-grid-kvasir_seg-box.jpg"):
        im = np.asarray(Image.open(out / name).convert("L"))
        assert im.shape[0] > 100 and im.std() > 5, name  # a drawn picture, not a blank canvas

    # A row the table has not run is refused with the command that runs it.
    with pytest.raises(SystemExit):
        adaptation_figures.main([*common, "--rows", "wesam+", "--out", str(out)])


def test_published_state_follows_the_selection_rule(tmp_path: Path) -> None:
    import torch

    best = {"a": torch.ones(1)}
    last = {"a": torch.zeros(1)}
    for select, want in (("best", best), ("fixed", last)):
        ckpt = tmp_path / f"{select}.pt"
        torch.save({"config": json.dumps({"select": select}), "history": "[]", "adapter": last,
                    "best_state": best}, ckpt)
        _, state, _ = adaptation_figures.published_state(ckpt)
        assert torch.equal(state["a"], want["a"])
    # Panels are scored with the project's metric: one image, one instance, IoU 1/2.
    from wesam.evaluation.metrics import SegmentationMeter

    iou, _ = SegmentationMeter().add_image(np.array([[[1, 1], [0, 0]]], bool), np.array([[[1, 0], [0, 0]]], bool))
    assert iou == 0.5
