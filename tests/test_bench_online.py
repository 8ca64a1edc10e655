"""`wesam bench online` end to end at toy size: a real server with capture on, a real worker, the gate,
both streams (clean and poisoned), the JSON report. Generated data of the benchmark's layout (a
Kvasir-like binary-mask set and a COCO-like instance set) and the tiny sam-micro model; what it checks
is the plumbing and the report's shape, not the quality figures (those need ../shared and sam-mini)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from wesam.bench.online import main as bench_online
from wesam.sam.zoo import resolve_model, save_safetensors


def _folder(root: Path, stems: list[str], split: dict[str, list[str]], draw) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(len(stems))
    for i, stem in enumerate(stems):
        img = rng.integers(60, 120, (48, 64, 3), dtype=np.uint8)
        mask = draw(i, img)
        cv2.imwrite(str(root / "images" / f"{stem}.jpg"), img[..., ::-1])
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask)
    (root / "split.json").write_text(json.dumps(split))


def _polyp(i: int, img: np.ndarray) -> np.ndarray:
    mask = np.zeros(img.shape[:2], np.uint8)
    cv2.ellipse(mask, (22 + i % 20, 24), (11, 8), 0, 0, 360, 255, -1)
    img[mask > 0] = (200, 90, 80)
    return mask


def _things(i: int, img: np.ndarray) -> np.ndarray:
    mask = np.zeros(img.shape[:2], np.uint8)
    cv2.rectangle(mask, (4, 4), (24, 30), 1, -1)
    cv2.circle(mask, (45, 30), 9, 2, -1)
    img[mask == 1] = (40, 200, 40)
    img[mask == 2] = (30, 30, 220)
    return mask


def test_bench_online_runs_both_streams_at_toy_size(tmp_path: Path) -> None:
    data = tmp_path / "data"
    polyps = [f"p{i:02d}" for i in range(16)]
    _folder(data / "kvasir_seg", polyps, {"train": polyps[:12], "test": polyps[12:]}, _polyp)
    things = [f"c{i}" for i in range(4)]
    _folder(data / "coco128_seg", things, {"train": things, "test": []}, _things)
    (data / "coco128_seg" / "instances.json").write_text(json.dumps(
        {s: {"instance_ids": [1, 2], "visible_ids": [1, 2]} for s in things}))
    model = resolve_model("sam-micro", seed=0)
    weights = tmp_path / "micro.safetensors"
    save_safetensors(model.sam, weights, name="sam-micro", config=model.config)
    out = tmp_path / "online.json"
    rc = bench_online(["--data-root", str(data), "--model", str(weights), "--images", "8", "--rounds", "2",
                       "--golden", "2", "--test-images", "2", "--clients", "2", "--steps-per-round", "2",
                       "--batch-size", "2", "--threads", "1", "--no-progress", "--json", str(out), "--no-results",
                       "--work-dir", str(tmp_path / "work")])
    assert rc == 0
    result = json.loads(out.read_text())
    for stream in ("clean", "poisoned"):
        r = result[stream]
        assert len(r["curve"]) == 2 and [row["round"] for row in r["curve"]] == [1, 2]
        for key in ("start_miou", "final_miou", "worst_miou"):
            assert 0.0 <= r[key] <= 1.0
        for row in r["curve"]:
            assert row["stored"] > 0  # the server captured the round's requests
            # a round either trained and went through the gate, or had too few reliable samples
            assert row["outcome"] in ("published", "rejected", "reset", "waiting"), row
    assert result["images"] == 8 and result["golden"] == 2 and result["test_images"] == 2
