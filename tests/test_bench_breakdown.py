"""Grouping of per-instance scores in `wesam bench source-breakdown`."""

from __future__ import annotations

import pytest

from wesam.bench.source_breakdown import summarise


def test_groups_split_instances_by_area_pieces_and_fill() -> None:
    rows = [{"iou": 0.9, "ceiling": 1.0, "area": 0.2, "pieces": 1, "fill": 0.8},
            {"iou": 0.3, "ceiling": 0.9, "area": 0.005, "pieces": 3, "fill": 0.2},
            {"iou": 0.6, "ceiling": 0.95, "area": 0.05, "pieces": 1, "fill": 0.5}]
    t = summarise(rows)
    assert t["all"][0]["miou"] == pytest.approx(0.6) and t["all"][0]["n"] == 3
    pieces = {g["range"]: g for g in t["visible pieces"]}
    assert pieces["1-2"]["miou"] == pytest.approx(0.75) and pieces["3-99"]["n"] == 1
    assert sum(g["n"] for g in t["mask area / box area"]) == 3
    assert "2-3" not in pieces  # empty groups are left out
