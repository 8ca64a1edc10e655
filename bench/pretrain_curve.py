"""Learning curves of `wesam pretrain` runs: `wesam bench pretrain-curve RUN_DIR [RUN_DIR ...]`.

Reads each run's validation history (``history.json``, else the one inside ``checkpoint.pt``)
and the shipped model's (``models/sam-mini/manifest.json``), and writes them side by side into
bench/RESULTS.md (section ``pretrain-curves``): validation only, every ~10 training minutes, so
recipes are compared at equal wall-clock as the source-model issue asks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .results import write_section

COLUMNS = (("synthetic_box", "synthetic box"), ("synthetic_click", "synthetic click"),
           ("coco128_seg_val_box", "coco128 val box"), ("davis2016_val_box", "davis val box"),
           ("camvid_val_box", "camvid val box"), ("inbox_object_logit", "in-box object logit"),
           ("inbox_background_logit", "in-box background logit"), ("score", "selection score"))


def load_history(run: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(validation history, recipe) of a run directory or a shipped model's manifest.json."""
    if run.is_file() and run.name == "manifest.json":
        m = json.loads(run.read_text())
        return m["validation_history"], m["training"].get("recipe", {})
    state: dict[str, Any] = {}
    if (run / "checkpoint.pt").is_file():
        import torch  # the recipe (and, for runs older than history.json, the history) is in it

        state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    if (run / "history.json").is_file():
        history = json.loads((run / "history.json").read_text())
    elif state:
        history = json.loads(state["history"])
    else:
        raise SystemExit(f"error: {run} holds neither history.json nor checkpoint.pt")
    return history, json.loads(state["config"]) if state else {}


def to_markdown(runs: list[tuple[str, list[dict[str, Any]], dict[str, Any]]], notes: str = "") -> str:
    lines = ["## Source model v2: learning curves", "",
             "Validation during `wesam pretrain` (held-out synthetic scenes; parts carved from the natural "
             "train splits, CamVid without stuff classes for runs with `things_only`), every ~10 training "
             "minutes; test splits are not used here. Written by `wesam bench pretrain-curve`."]
    if notes:
        lines += ["", notes]
    for label, history, recipe in runs:
        lines += ["", f"### {label}", ""]
        if recipe:
            keys = ("init_from", "threads", "lr", "max_prompts", "tight_box_frac", "box_jitter_std",
                    "box_jitter_max_px", "inbox_weight", "things_only", "synth_prob", "region_prob",
                    "time_budget_min")
            shown = {k: recipe[k] for k in keys if k in recipe}
            width = (recipe.get("model_config") or {}).get("prompt_embed_dim")
            if width:
                shown["decoder_dim"] = width
            lines += ["recipe: " + ", ".join(f"`{k}={v}`" for k, v in shown.items()), ""]
        lines.append("| minutes | step | " + " | ".join(name for _, name in COLUMNS) + " |")
        lines.append("|---|---|" + "---|" * len(COLUMNS))
        for h in history:
            cells = [f"{h[key]:.3f}" if isinstance(h.get(key), (int, float)) else "–" for key, _ in COLUMNS]
            lines.append(f"| {h['minutes']:.0f} | {h['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wesam bench pretrain-curve", description=__doc__)
    p.add_argument("runs", nargs="+", help="run directories (or a manifest.json), each LABEL=PATH or PATH")
    p.add_argument("--shipped", default="models/sam-mini/manifest.json",
                   help="the shipped model's manifest, shown first ('' to leave out)")
    p.add_argument("--notes", default="", help="a paragraph printed under the heading")
    p.add_argument("--no-results", action="store_true", help="print instead of updating bench/RESULTS.md")
    args = p.parse_args(argv)
    runs = []
    if args.shipped:
        history, recipe = load_history(Path(args.shipped))
        runs.append((f"shipped sam-mini ({args.shipped})", history, recipe))
    for spec in args.runs:
        label, _, path = spec.rpartition("=")
        history, recipe = load_history(Path(path))
        runs.append((label or path, history, recipe))
    md = to_markdown(runs, args.notes)
    if args.no_results:
        print(md)
    else:
        write_section("pretrain-curves", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
