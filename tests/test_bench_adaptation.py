"""The adaptation table's bookkeeping: cells shared by several bench processes, the Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


def test_v2_rows_are_valid_configs_and_the_table_shows_speed() -> None:
    from wesam.adapters.adapt.trainer import AdaptConfig
    from wesam.bench.adaptation import ROWS

    rows = {r.name: r for r in ROWS}
    assert rows["wesam"].extra == {}  # the faithful row stays
    # ... on the encoder's q and v, although `wesam adapt`'s default now adds the decoder
    assert rows["wesam"].lora == (4, ("q", "v")) and rows["oracle"].config["lora_targets"] == ("q", "v")
    assert rows["wesam +dec"].lora == (4, AdaptConfig.lora_targets)
    assert rows["wesam +clip"].extra == {"clip_to_box": True, "respect_points": True}
    assert rows["wesam+ +conf q0.2"].extra == {"confidence_quantile": 0.2}
    assert rows["wesam +anchor logit"].extra == {"anchor_kind": "logit"}
    assert rows["wesam +anchor prob"].extra == {"anchor_kind": "prob"}
    assert rows["wesam fixed"].extra == {"select": "fixed"}
    # box-prior rows run on box cells only: the trainer refuses a box prior without boxes
    for name in ("wesam +prior", "wesam +ellipse labels", "wesam +ellipse labels r16 q,k,v,proj"):
        assert rows[name].prompts == ("box",) and rows[name].extra["box_prior"] > 0
        with pytest.raises(ValueError, match="box prompts"):
            AdaptConfig(data="d", domain="x", method=rows[name].method, prompt="point", **rows[name].extra)
    # the point-prior row runs on point cells only, for the same reason
    assert rows["wesam +point prior +dec"].prompts == ("point",)
    with pytest.raises(ValueError, match="point prompts"):
        AdaptConfig(data="d", domain="x", method="wesam", prompt="box", **rows["wesam +point prior +dec"].extra)
    names = set()
    for r in ROWS:
        if r.method is not None:
            prompt = (r.prompts or ("box",))[0]
            names.add(AdaptConfig(data="d", domain="x", method=r.method, prompt=prompt, **r.config).run_name)
    assert len(names) == len([r for r in ROWS if r.method is not None])  # distinct default work dirs

    fast = _cell("wesam fixed", 0.62)
    fast["speed"] = {"steps": 400, "steps_per_s": 0.5, "share": {"encoder_forward": 0.3, "encoder_backward": 0.4,
                                                                  "decoder_forward": 0.1, "decoder_backward": 0.1,
                                                                  "rest": 0.1}}
    md = to_markdown({"d": _cell("direct", 0.60), "f": fast}, {"model": "m", "steps": 400, "seed": 0, "machine": "t"})
    line = next(x for x in md.splitlines() if x.startswith("| wesam fixed |"))
    assert line.endswith("| 0.500 | 70% |")
    assert next(x for x in md.splitlines() if x.startswith("| direct |")).endswith("| - | - |")


def test_seed_summary_gives_mean_and_spread_over_seeds(tmp_path: Path) -> None:
    from wesam.bench.adaptation import ROWS, cell_work_dir, seeds_markdown

    meta = {"model": "sam-mini", "model_sha256": "ab" * 32, "steps": 400, "lr": 1e-4}
    one_seed = {"kvasir_seg|box|wesam|400|0.0001|0|x": _cell("wesam", 0.70)}
    assert seeds_markdown(one_seed, meta) is None  # nothing to summarise with one seed
    cells = {}
    for seed, (d, w, o) in enumerate([(0.60, 0.64, 0.70), (0.60, 0.66, 0.72), (0.60, 0.65, 0.71)]):
        for row, v in (("direct", d), ("wesam", w), ("oracle", o)):
            cells[f"kvasir_seg|box|{row}|400|0.0001|{seed}|x"] = {**_cell(row, v), "ellipse_miou": 0.79}
    md = seeds_markdown(cells, meta)
    line = next(x for x in md.splitlines() if x.startswith("| wesam |"))
    assert "| 0,1,2 | 0.6500 ± 0.0100 | +0.0500 | 0.45 |" in line  # (0.65-0.60)/(0.71-0.60)
    assert "ellipse 0.7900" in md

    # Cells differing only in seed or base weights never share checkpoints.
    row = next(r for r in ROWS if r.name == "wesam+ +conf q0.2")
    dirs = {cell_work_dir(tmp_path, "kvasir_seg", "box", row, 400, s, 1e-4, sha)
            for s in (0, 1) for sha in ("a" * 64, "b" * 64)}
    assert len(dirs) == 4 and all(" " not in d.name for d in dirs)


def test_corrupted_coco128_rows_are_averaged_over_the_corruptions_measured() -> None:
    cells = {}
    for target, (d, w) in {"coco128-fog": (0.48, 0.50), "coco128-motion_blur": (0.50, 0.54)}.items():
        for row, v in (("direct", d), ("wesam", w)):
            cells[f"{target}|{row}"] = {**_cell(row, v), "target": target, "box_filled_miou": 0.56, "ellipse_miou": 0.60}
    cells["partial"] = {**_cell("oracle", 0.9), "target": "coco128-fog"}  # not on every corruption: left out
    md = to_markdown(cells, {"model": "m", "steps": 400, "seed": 0, "machine": "t"})
    assert "### coco128, box prompts: mean over 2 corruptions (box filled 0.5600, ellipse 0.6000)" in md
    summary = md.split("mean over 2 corruptions")[1]
    assert "| wesam | 0.5200 | +0.0300 | 0.5000 / 0.5400 |" in summary  # fog, motion_blur in name order
    assert "| oracle |" not in summary
    assert "mean over" not in to_markdown({"d": _cell("direct", 0.6)}, {"model": "m", "steps": 400, "seed": 0, "machine": "t"})


def test_results_sections_keep_seed_0_and_give_other_lengths_their_own() -> None:
    from wesam.bench.adaptation import cell_key, results_sections

    sha = "ab" * 32
    cells = {}
    for seed, w in ((0, 0.64), (2, 0.66)):
        for row, v in (("direct", 0.60), ("wesam", w)):
            cells[cell_key("kvasir_seg", "box", row, 400, 1e-4, seed, sha)] = _cell(row, v)
    cells[cell_key("kvasir_seg", "box", "oracle", 2000, 1e-4, 0, sha)] = _cell("oracle", 0.78)
    cells[cell_key("kvasir_seg", "box", "oracle", 400, 1e-4, 0, "cd" * 32)] = _cell("oracle", 0.99)  # other base
    meta = {"model": "sam-mini", "model_sha256": sha, "steps": 400, "lr": 1e-4, "seed": 2, "machine": "t"}
    out = results_sections(cells, meta)
    assert set(out) == {"adaptation", "adaptation-seeds"}
    wesam = next(x for x in out["adaptation"].splitlines() if x.startswith("| wesam |"))
    assert "0.6400" in wesam  # seed 0's table, though seed 2 ran last
    assert "seed 0" in out["adaptation"] and "0.99" not in out["adaptation"] and "| oracle |" not in out["adaptation"]
    long = results_sections(cells, {**meta, "steps": 2000, "seed": 0})
    assert set(long) == {"adaptation-2000-steps"} and "| oracle |" in long["adaptation-2000-steps"]
    # direct testing trains nothing: the 400-step run's direct cell is the baseline of the longer run
    oracle = next(x for x in long["adaptation-2000-steps"].splitlines() if x.startswith("| oracle |"))
    assert "+0.1800" in oracle and "nan" not in long["adaptation-2000-steps"]
    assert long["adaptation-2000-steps"].count("| direct |") == 1
    # another learning rate: its own section (it used to replace the default table), direct as baseline
    cells[cell_key("kvasir_seg", "box", "wesam", 400, 3e-4, 0, sha)] = _cell("wesam", 0.70)
    assert set(results_sections(cells, meta)) == {"adaptation", "adaptation-seeds"}
    fast = results_sections(cells, {**meta, "lr": 3e-4, "seed": 0})
    assert set(fast) == {"adaptation-lr0.0003"}
    wesam = next(x for x in fast["adaptation-lr0.0003"].splitlines() if x.startswith("| wesam |"))
    assert "0.7000" in wesam and "+0.1000" in wesam


def test_of_oracle_compares_with_the_oracle_of_the_same_lora() -> None:
    from wesam.bench.adaptation import cell_key, oracle_row, results_sections

    assert oracle_row("wesam +ellipse labels +dec") == "oracle +dec" and oracle_row("wesam") == "oracle"
    assert oracle_row("wesam +ellipse labels r16 q,k,v,proj") == "oracle r16 q,k,v,proj"
    sha = "ab" * 32
    cells = {}
    for seed in (0, 1):
        for row, v in (("direct", 0.60), ("oracle", 0.70), ("oracle +dec", 0.80), ("wesam +ellipse labels +dec", 0.75)):
            cells[cell_key("kvasir_seg", "box", row, 400, 1e-4, seed, sha)] = _cell(row, v)
    meta = {"model": "sam-mini", "model_sha256": sha, "steps": 400, "lr": 1e-4, "seed": 0, "machine": "t"}
    out = results_sections(cells, meta)
    for section in ("adaptation", "adaptation-seeds"):
        line = next(x for x in out[section].splitlines() if x.startswith("| wesam +ellipse labels +dec |"))
        assert "| 0.75 |" in line and "| 1.50 |" not in line, (section, line)  # 0.15 / 0.20, not 0.15 / 0.10


def test_of_oracle_is_blank_when_the_oracle_gained_nothing() -> None:
    from wesam.bench.adaptation import cell_key, results_sections

    sha = "cd" * 32
    cells = {}
    for seed in (0, 1):
        # The oracle gains 0.00004: a ratio over that is noise (it once printed "9372.95").
        for row, v in (("direct", 0.49700), ("oracle", 0.49704), ("wesam +ellipse labels", 0.50140)):
            cells[cell_key("coco128-fog", "box", row, 400, 1e-4, seed, sha)] = _cell(row, v)
    meta = {"model": "sam-mini", "model_sha256": sha, "steps": 400, "lr": 1e-4, "seed": 0, "machine": "t"}
    out = results_sections(cells, meta)
    for section in ("adaptation", "adaptation-seeds"):
        line = next(x for x in out[section].splitlines() if x.startswith("| wesam +ellipse labels |"))
        assert "+0.0044" in line and line.split("|")[5].strip() == "-", (section, line)
