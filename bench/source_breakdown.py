"""Where the source model fails on the held-out synthetic scenes: box-prompt IoU per instance,
grouped by visible area, number of visible pieces (occlusion) and box fill ratio, beside the
IoU ceiling of SAM's 4x-upsampled low-resolution mask grid.

    wesam bench source-breakdown --model sam-mini [--n 100] [--json bench/source_breakdown.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import torch

from wesam.data.weak import boxes_from_masks
from wesam.evaluation.metrics import iou_f1
from wesam.pretrain.synthetic import synthetic_validation_set
from wesam.sam.predictor import Prompts, SamPredictorCore
from wesam.sam.zoo import resolve_model

GROUPS = {
    "visible area (fraction of image)": ("area", [(0, 0.01), (0.01, 0.03), (0.03, 0.1), (0.1, 1.0)]),
    "visible pieces": ("pieces", [(1, 2), (2, 3), (3, 99)]),
    "mask area / box area": ("fill", [(0, 0.3), (0.3, 0.6), (0.6, 1.01)]),
}


def instance_rows(model: str, n: int) -> list[dict[str, float]]:
    sam = resolve_model(model).sam.eval()
    predictor = SamPredictorCore(sam)
    low = sam.prompt_encoder.mask_input_size[0]
    rows = []
    for image, masks in synthetic_validation_set(n, size=sam.image_encoder.img_size):
        boxes = boxes_from_masks(masks).astype(np.float32)
        with torch.no_grad():
            pred = predictor.predict(image, Prompts(boxes=boxes)).masks[:, 0]
        h, w = masks.shape[1:]
        for gt, pm, box in zip(masks, pred, boxes):
            coarse = cv2.resize(gt.astype(np.float32), (low, low), interpolation=cv2.INTER_AREA)
            ceiling = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR) > 0.5
            box_area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
            rows.append({"iou": iou_f1(pm, gt)[0], "ceiling": iou_f1(ceiling, gt)[0], "area": gt.mean(),
                         "pieces": cv2.connectedComponents(gt.astype(np.uint8))[0] - 1,
                         "fill": gt.sum() / max(box_area, 1)})
    return rows


def summarise(rows: list[dict[str, float]]) -> dict[str, list[dict[str, float]]]:
    out = {"all": [{"range": "all", "n": len(rows), "miou": float(np.mean([r["iou"] for r in rows])),
                    "ceiling": float(np.mean([r["ceiling"] for r in rows]))}]}
    for title, (key, ranges) in GROUPS.items():
        out[title] = []
        for lo, hi in ranges:
            sel = [r for r in rows if lo <= r[key] < hi]
            if sel:
                out[title].append({"range": f"{lo}-{hi}", "n": len(sel),
                                   "miou": float(np.mean([r["iou"] for r in sel])),
                                   "ceiling": float(np.mean([r["ceiling"] for r in sel]))})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wesam bench source-breakdown", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sam-mini")
    p.add_argument("--n", type=int, default=100, help="held-out synthetic scenes")
    p.add_argument("--json", default="bench/source_breakdown.json")
    args = p.parse_args(argv)
    table = summarise(instance_rows(args.model, args.n))
    for title, groups in table.items():
        print(title)
        for g in groups:
            print(f"  {g['range']:>10}  n={g['n']:4d}  box mIoU {g['miou']:.3f}  low-res ceiling {g['ceiling']:.3f}")
    Path(args.json).write_text(json.dumps({"model": args.model, "n_scenes": args.n, "groups": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
