"""The adaptation table's bookkeeping: cells shared by several bench processes, the Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

from wesam.bench.adaptation import claim, release, save_cell, to_markdown


def _cell(row: str, miou: float) -> dict:
    return {"target": "kvasir_seg", "prompt": "box", "row": row, "miou": miou, "f1": miou + 0.1,
            "box_filled_miou": 0.69, "n_images": 10, "steps": 400, "val": None, "seconds": 60.0}


def test_workers_claim_distinct_cells_and_merge_results(tmp_path: Path) -> None:
    out = tmp_path / "adaptation.json"
    assert claim(out, "k1", "a")
    assert not claim(out, "k1", "b")  # taken by a
    assert claim(out, "k1", "a")  # a restarted under its name takes its cell back
    assert claim(out, "k2", "b")
    save_cell(out, "k2", _cell("oracle", 0.75), {"m": 1})
    release(out, "k2")
    save_cell(out, "k1", _cell("direct", 0.65), {"m": 1})
    release(out, "k1")
    cells = json.loads(out.read_text())["cells"]
    assert set(cells) == {"k1", "k2"}  # neither write lost the other's cell
    assert not claim(out, "k1", "b")  # finished cells are never run again


def test_markdown_reports_fraction_of_oracle_gain() -> None:
    cells = {"d": _cell("direct", 0.60), "w": _cell("wesam", 0.63), "o": _cell("oracle", 0.70)}
    md = to_markdown(cells, {"model": "sam-mini", "steps": 400, "seed": 0, "machine": "test", "command": "x"})
    wesam_line = next(line for line in md.splitlines() if line.startswith("| wesam |"))
    assert "+0.0300" in wesam_line and "| 0.30 |" in wesam_line
