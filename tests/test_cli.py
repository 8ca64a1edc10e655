"""The `wesam` command line, run as a real subprocess on tiny generated data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest


def _wesam(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wesam.cli", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=300)


@pytest.fixture()
def tiny_polyps(tmp_path: Path) -> Path:
    """Binary-mask dataset: each image holds one or two filled rectangles."""
    root = tmp_path / "polyps"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    stems = [f"img{i}" for i in range(5)]
    for i, stem in enumerate(stems):
        img = rng.integers(0, 80, (60, 80, 3), dtype=np.uint8)
        mask = np.zeros((60, 80), np.uint8)
        mask[10:30, 15:40] = 255
        if i % 2:
            mask[40:55, 50:75] = 255
        img[mask > 0] = (220, 120, 90)
        cv2.imwrite(str(root / "images" / f"{stem}.jpg"), img[..., ::-1])
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask)
    (root / "split.json").write_text(json.dumps({"train": stems[:2], "test": stems[2:]}))
    return root


@pytest.mark.parametrize("prompt", ["box", "point", "coarse", "coarse-box", "ellipse"])
def test_eval_writes_json(tiny_polyps: Path, tmp_path: Path, prompt: str) -> None:
    out = tmp_path / "out.json"
    r = _wesam("eval", "--model", "sam-micro", "--data", str(tiny_polyps), "--split", "test",
               "--prompt", prompt, "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["n_images"] == 3 and res["n_instances"] == 4
    assert 0.0 <= res["miou"] <= 1.0 and 0.0 <= res["f1"] <= 1.0
    assert res["model"] == "sam-micro" and res["prompt"] == prompt and res["adapter"] is None
    # Rectangles are exactly their tight boxes, so the trivial baseline is perfect.
    assert res["box_filled"]["miou"] == pytest.approx(1.0)
    assert res["ellipse"]["miou"] == pytest.approx(0.79, abs=0.02)  # an ellipse covers pi/4 of its box
    assert "mIoU" in r.stdout and "ellipse in box" in r.stdout


def test_eval_is_deterministic_per_seed(tiny_polyps: Path, tmp_path: Path) -> None:
    runs = []
    for seed, name in ((1, "a"), (1, "b"), (2, "c")):
        out = tmp_path / f"{name}.json"
        r = _wesam("eval", "--model", "sam-micro", "--data", str(tiny_polyps), "--prompt", "point",
                   "--seed", str(seed), "--json", str(out), "--quiet")
        assert r.returncode == 0, r.stderr
        runs.append(json.loads(out.read_text())["miou"])
    assert runs[0] == runs[1]


def test_eval_bad_data_names_the_file(tiny_polyps: Path, tmp_path: Path) -> None:
    (tiny_polyps / "masks" / "img3.png").unlink()
    r = _wesam("eval", "--model", "sam-micro", "--data", str(tiny_polyps), "--quiet")
    assert r.returncode == 2
    assert "img3" in r.stderr
    out = tmp_path / "out.json"
    r = _wesam("eval", "--model", "sam-micro", "--data", str(tiny_polyps), "--skip-bad", "--quiet",
               "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["n_images"] == 2
    assert "img3" in r.stderr  # the skip is reported


def test_eval_unknown_model_and_split(tiny_polyps: Path) -> None:
    r = _wesam("eval", "--model", "vit_q", "--data", str(tiny_polyps))
    assert r.returncode == 2 and "unknown model" in r.stderr
    r = _wesam("eval", "--model", "sam-micro", "--data", str(tiny_polyps), "--split", "val")
    assert r.returncode == 2 and "split" in r.stderr


def test_models_list_and_info() -> None:
    r = _wesam("models", "list", "--json")
    assert r.returncode == 0, r.stderr
    names = {m["name"] for m in json.loads(r.stdout)}
    assert {"vit_b", "vit_l", "vit_h", "sam-mini", "sam-micro"} <= names
    r = _wesam("models", "info", "vit_b")
    info = json.loads(r.stdout)
    assert info["official_sha256"].startswith("ec2df627")
    r = _wesam("models", "info", "nope")
    assert r.returncode != 0 and "unknown model" in r.stderr


def test_errors_map_to_exit_codes_in_one_place() -> None:
    from wesam.adapters.adapt.trainer import AdaptInterrupted
    from wesam.adapters.errors import AdapterError, InvalidAdapterRef
    from wesam.cli import exit_code
    from wesam.data.errors import DataError
    from wesam.errors import ConfigError, WesamError
    from wesam.export.errors import ExportError
    from wesam.sam.zoo import ModelLoadError

    user_errors = [WesamError("x"), ConfigError("x"), ModelLoadError("x"), DataError("f.png", "x"),
                   AdapterError("x"), InvalidAdapterRef("x"), ExportError("x")]
    assert [exit_code(e) for e in user_errors] == [2] * len(user_errors)
    assert exit_code(AdaptInterrupted("stopped")) == 130
    # Historical builtin bases still catch them.
    assert isinstance(ModelLoadError("x"), RuntimeError) and isinstance(DataError("f", "x"), ValueError)


def test_adapters_activate_refuses_a_malformed_version(tmp_path: Path) -> None:
    r = _wesam("adapters", "--registry", str(tmp_path), "activate", "polyp", "vx")
    assert r.returncode == 2 and "invalid version" in r.stderr and "Traceback" not in r.stderr
