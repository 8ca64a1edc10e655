"""Quality of the source model: `wesam bench source`.

Held-out synthetic scenes (box and single click), natural-image test splits (box) and the
"direct testing" rows on the shifted polyp targets (box, point, coarse). Every row stands beside
the two floors drawn from the tight box (the box filled, and the ellipse inscribed in it), and
every dataset also gets the "ellipse" prompt: that ellipse given as a mask prompt, which a model
should improve on rather than spoil. Test splits are used for this report only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from wesam.data import FolderDataset
from wesam.evaluation.evaluate import PromptSpec, evaluate
from wesam.pretrain.sources import SourceImage
from wesam.pretrain.synthetic import synthetic_validation_set
from wesam.sam.predictor import SamPredictorCore
from wesam.sam.zoo import resolve_model

from .results import machine, write_section

NATURAL = ("coco128_seg", "davis2016", "camvid")
TARGETS = ("kvasir_seg", "cvc_clinicdb")


def run(model_ref: str, data_root: Path, n_synthetic: int = 200, seed: int = 0,
        quick: bool = False) -> dict[str, Any]:
    model = resolve_model(model_ref)
    pred = SamPredictorCore(model.sam)
    out: dict[str, Any] = {"model": model.name, "model_sha256": model.sha256, "machine": machine(), "rows": []}
    t0 = time.time()

    def row(dataset: str, prompt: str, res: dict[str, Any]) -> None:
        out["rows"].append({"dataset": dataset, "prompt": prompt, "miou": res["miou"], "f1": res["f1"],
                            "box_filled_miou": res["box_filled"]["miou"], "ellipse_miou": res["ellipse"]["miou"],
                            "n_images": res["n_images"], "n_instances": res["n_instances"]})
        print(f"{dataset:<16} {prompt:<10} mIoU {res['miou']:.4f}  box-filled {res['box_filled']['miou']:.4f}"
              f"  ellipse {res['ellipse']['miou']:.4f}", flush=True)

    synth = [SourceImage(f"synval{i:04d}", im, m)
             for i, (im, m) in enumerate(synthetic_validation_set(n=n_synthetic))]
    row("synthetic", "box", evaluate(pred, synth, PromptSpec("box", seed=seed)))
    row("synthetic", "click", evaluate(pred, synth, PromptSpec("point", n_points=(1, 0), seed=seed)))
    if not quick:
        row("synthetic", "ellipse", evaluate(pred, synth, PromptSpec("ellipse", seed=seed)))
    for name in NATURAL:
        if (data_root / name).is_dir():
            ds = FolderDataset(data_root / name, "test", skip_bad=True)
            for prompt in ("box",) if quick else ("box", "ellipse"):
                row(name, prompt, evaluate(pred, ds, PromptSpec(prompt, seed=seed)))
    prompts = ("box",) if quick else ("box", "point", "coarse", "ellipse")
    for name in TARGETS:
        if not (data_root / name).is_dir():
            continue
        ds = FolderDataset(data_root / name, "test")
        for prompt in prompts:
            row(name, prompt, evaluate(pred, ds, PromptSpec(prompt, seed=seed)))
    out["seconds"] = round(time.time() - t0, 1)
    return out


def to_markdown(res: dict[str, Any], command: str) -> str:
    lines = [
        "## Source model (direct testing)",
        "",
        f"Model `{res['model']}` (sha256 `{(res['model_sha256'] or '')[:16]}…`), measured on {res['machine']} "
        f"in {res['seconds']} s with `{command}`. mIoU = mean over images of the mean instance IoU; "
        "\"box filled\" predicts each tight box filled as the mask and \"ellipse\" the ellipse inscribed "
        "in it (both computed in the same run): a model below the ellipse has learnt nothing a box does "
        "not already say. Points: 5 positive + 5 negative per instance; click: one positive point (best "
        "of 3 masks); coarse: a degraded mask through SAM's mask-prompt input; ellipse (prompt): the "
        "inscribed ellipse through the mask-prompt input.",
        "",
        "| dataset (split) | prompt | mIoU | F1 | box filled | ellipse | Δ vs ellipse | images | instances |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        split = "held-out" if r["dataset"] == "synthetic" else "test"
        ell = r.get("ellipse_miou")
        ell_cells = f"{ell:.4f} | {r['miou'] - ell:+.4f}" if ell is not None else "– | –"
        lines.append(f"| {r['dataset']} ({split}) | {r['prompt']} | {r['miou']:.4f} | {r['f1']:.4f} | "
                     f"{r['box_filled_miou']:.4f} | {ell_cells} | {r['n_images']} | {r['n_instances']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wesam bench source", description=__doc__)
    p.add_argument("--model", default="sam-mini")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--synthetic", type=int, default=200, help="held-out synthetic scenes")
    p.add_argument("--quick", action="store_true", help="box prompts only on the targets")
    p.add_argument("--json", default="bench/source_model.json")
    p.add_argument("--no-results", action="store_true", help="do not update bench/RESULTS.md")
    args = p.parse_args(argv)
    res = run(args.model, Path(args.data_root), args.synthetic, quick=args.quick)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    if not args.no_results:
        cmd = "wesam bench source --model " + args.model + (" --quick" if args.quick else "")
        write_section("source", to_markdown(res, cmd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
