"""Region scenes (natural textures in random smooth shapes): validity, determinism, that the
object pixels really come from the texture images, and their place in the pretraining mixture."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wesam.pretrain.regions import MAX_OBJECTS, region_scene
from wesam.pretrain.sources import SourceImage
from wesam.pretrain.synthetic import MIN_VISIBLE_FRACTION
from wesam.pretrain.trainer import DataMixture, PretrainConfig


def _pool() -> list[np.ndarray]:
    """Two flat-coloured 'natural' images: every pixel of a scene must come from one of them."""
    red = np.zeros((120, 160, 3), np.uint8)
    red[..., 0] = 200
    blue = np.zeros((90, 200, 3), np.uint8)
    blue[..., 2] = 180
    return [red, blue]


def test_masks_are_exclusive_visible_and_seeded() -> None:
    pool = _pool()
    for i in range(40):
        image, masks = region_scene(np.random.default_rng([7, i]), pool)
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        assert masks.dtype == bool and 1 <= len(masks) <= MAX_OBJECTS and masks.shape[1:] == (256, 256)
        assert masks.sum(axis=0).max() <= 1
        assert masks.reshape(len(masks), -1).sum(axis=1).min() >= MIN_VISIBLE_FRACTION * 256 * 256
        again = region_scene(np.random.default_rng([7, i]), pool)
        assert np.array_equal(again[0], image) and np.array_equal(again[1], masks)


def test_objects_differ_from_their_surroundings_when_the_textures_do() -> None:
    # With two single-colour images, an object drawn from the other image than the background
    # must be that image's colour well inside it (shading and noise aside).
    pool = _pool()
    seen_contrast = 0
    for i in range(40):
        image, masks = region_scene(np.random.default_rng([11, i]), pool)
        background = ~masks.any(0)
        if background.sum() < 1000:
            continue
        bg_red = image[background][:, 0].mean() > image[background][:, 2].mean()
        for m in masks:
            inner = m.copy()
            for _ in range(4):  # away from the feathered edge
                inner[1:-1, 1:-1] &= inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
            if inner.sum() < 50:
                continue
            obj_red = image[inner][:, 0].mean() > image[inner][:, 2].mean()
            seen_contrast += int(obj_red != bg_red)
    assert seen_contrast >= 5


def test_mixture_draws_region_scenes_at_their_share() -> None:
    rng = np.random.default_rng(0)
    images = [SourceImage(f"s{i}", rng.integers(0, 255, (100, 140, 3), dtype=np.uint8),
                          np.pad(np.ones((1, 30, 30), bool), ((0, 0), (20, 50), (30, 80))))
              for i in range(4)]
    cfg = PretrainConfig(data_root=None, synth_prob=0.2, region_prob=0.5, paste_prob=0.0)
    mix = DataMixture(cfg, {"coco128_seg": images})
    sources = [mix.sample(step, j)[2] for step in range(30) for j in range(4)]
    share = sources.count("regions") / len(sources)
    assert 0.35 < share < 0.65
    assert {"synthetic", "coco128_seg", "regions"} == set(sources)


def test_sigterm_checkpoints_and_stops(tmp_path: Path) -> None:
    """`kill` of a background run (where SIGINT is ignored) saves a checkpoint a rerun resumes."""
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\n"
        "from wesam.pretrain.trainer import PretrainConfig, Pretrainer\n"
        "from wesam.sam.zoo import SAM_MICRO\n"
        f"cfg = PretrainConfig(out_dir={str(tmp_path / 'run')!r}, data_root=None, steps=100000, "
        "time_budget_min=None, batch_size=1, max_prompts=1, warmup_steps=1, n_synth_val=2, threads=1, "
        "model_config=SAM_MICRO, eval_every_min=1e9, ckpt_every_min=1e9)\n"
        "try:\n"
        "    Pretrainer(cfg, log=lambda m: print(m, flush=True)).run()\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n")
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    ckpt = tmp_path / "run" / "checkpoint.pt"
    try:
        deadline = time.monotonic() + 300
        # Wait for training to be under way: the progress bar counts a first finished step.
        while not re.search(r"[1-9]\d*step", log.read_text()):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        assert not ckpt.exists()
        proc.send_signal(signal.SIGINT)  # ignored, as for `nohup ... &`
        time.sleep(1.0)
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 130, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ckpt.is_file()
