"""Mask-size drift of an adaptation run: predicted / ground-truth area on the carved validation
split, with no adapter, with the best (selected) adapter and with the last one.

    wesam bench adaptation-drift --work-dir runs/bench-adaptation/kvasir_seg-box-wesam \\
        --data ../shared/data/kvasir_seg --method wesam [--prompt box]

The work directory is one that `wesam adapt` or `wesam bench adaptation` wrote (its
checkpoint.pt holds both adapters); the other flags must match the run's.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch

from wesam.adapters.adapt.trainer import ADAPTER, AdaptationTrainer, AdaptConfig
from wesam.adapters.lora import load_adapter_state, use_adapter
from wesam.data.weak import derive_weak_labels
from wesam.evaluation.evaluate import PromptSpec, predict_instances, prompts_from_weak
from wesam.evaluation.metrics import iou_f1
from wesam.sam.predictor import SamPredictorCore


def area_stats(adapter: AdaptationTrainer, which: str | None) -> dict[str, float]:
    """Per-instance predicted/true area ratios and IoU on ``adapter.val`` with LoRA ``which`` (None = off)."""
    cfg = adapter.cfg
    spec = PromptSpec(cfg.prompt, n_points=cfg.n_points, seed=cfg.seed)  # as the run's own validation
    ratios, ious = [], []
    with use_adapter(adapter.sam, which):
        pred = SamPredictorCore(adapter.sam, adapter.device)
        for s in adapter.val:
            gts = s.instances
            label = derive_weak_labels(gts, spec.kind, seed=spec.seed, key=s.stem, n_points=spec.n_points)
            prompts = prompts_from_weak(label, pred, gts.shape[1:], spec.mask_logit)
            for g, p in zip(gts, predict_instances(pred, s.image, prompts, spec.multimask)):
                ratios.append(p.sum() / max(g.sum(), 1))
                ious.append(iou_f1(p, g)[0])
    r = np.asarray(ratios)
    return {"median_area_ratio": float(np.median(r)), "frac_under_0.8": float(np.mean(r < 0.8)),
            "frac_over_1.25": float(np.mean(r > 1.25)), "instance_miou": float(np.mean(ious))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wesam bench adaptation-drift", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--prompt", default="box")
    p.add_argument("--model", default="sam-mini")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = AdaptConfig(data=args.data, domain="drift", model=args.model, prompt=args.prompt, method=args.method,
                      seed=args.seed, registry=None, skip_bad=True, work_dir=args.work_dir)
    a = AdaptationTrainer(cfg, log=lambda *_: None)
    if not a.ckpt_path.is_file():
        p.error(f"no checkpoint in {args.work_dir}")
    state = torch.load(a.ckpt_path, map_location="cpu", weights_only=True)
    out: dict[str, Any] = {"no adapter": area_stats(a, None)}
    for name, key in (("best", "best_state"), ("last", "adapter")):
        load_adapter_state(a.sam, ADAPTER, state[key])
        out[name] = area_stats(a, ADAPTER)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
