"""Pictures of the adaptation table: `wesam bench adaptation-figures`.

Reads the cells `wesam bench adaptation` wrote (JSON) and their checkpoints (its `--work`
folder), and draws, for one target and prompt kind:

- ``adaptation-curves-<target>-<prompt>.png``: validation mIoU over steps of every trained row,
  with direct testing's validation score as the line to beat and the published step marked;
- ``adaptation-grid-<target>-<prompt>.jpg``: test images (evenly spaced over the sorted test
  split, not picked by result) with the ground truth, direct testing's masks and each row's
  adapted masks, the prompt drawn on every panel and the image's mean instance IoU in the title;
- on stdout (JSON): how each row's change against direct testing is spread over all test images
  (images better / worse by more than 0.005 IoU, median and extreme per-image changes).

The adapted weights are the published state of each cell (best on validation, or the last step
for ``select=fixed``), taken from its checkpoint, so the pictures show exactly what the table
scored. matplotlib draws offscreen (Agg); nothing is shown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wesam.adapters.lora import LoraConfig, add_adapter, load_adapter_state, use_adapter
from wesam.data import FolderDataset
from wesam.data.weak import derive_weak_labels
from wesam.evaluation.evaluate import PromptSpec, predict_instances, prompts_from_weak
from wesam.evaluation.metrics import SegmentationMeter
from wesam.sam.predictor import SamPredictorCore
from wesam.sam.zoo import resolve_model

from .adaptation import ROWS, Row, cell_key, cell_work_dir, targets

DEFAULT_ROWS = ("wesam", "wesam+", "oracle")


def published_state(checkpoint: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[dict[str, Any]]]:
    """(config, adapter state the cell published, validation history) of one cell's checkpoint.

    Our own file, read with ``weights_only=True`` like every checkpoint wesam loads."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    cfg = json.loads(state["config"])
    history = json.loads(state["history"])
    chosen = state["adapter"] if cfg.get("select", "best") == "fixed" else (state["best_state"] or state["adapter"])
    return cfg, chosen, history


def draw_curves(curves: dict[str, list[tuple[int, float]]], direct_val: float | None,
                selected: dict[str, int], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name, pts in curves.items():
        steps, vals = zip(*pts)
        line, = ax.plot(steps, vals, marker="o", markersize=3, label=name)
        if name in selected:
            sel = dict(pts).get(selected[name])
            if sel is not None:
                ax.plot([selected[name]], [sel], marker="*", markersize=12, color=line.get_color())
    if direct_val is not None:
        ax.axhline(direct_val, color="grey", linestyle="--", linewidth=1, label="direct (no adapter)")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation mIoU")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def _overlay(ax: Any, image: np.ndarray, masks: np.ndarray, colour: tuple[float, float, float],
             label: Any, title: str) -> None:
    import matplotlib.patches as patches

    shown = image.astype(np.float32) / 255.0
    if len(masks):
        union = masks.any(0)
        shown[union] = 0.55 * shown[union] + 0.45 * np.asarray(colour)
    ax.imshow(shown)
    if label.boxes is not None:
        for x0, y0, x1, y1 in label.boxes:
            ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=1.2))
    if label.point_coords is not None:
        for pts, lab in zip(label.point_coords, label.point_labels):
            ax.scatter(pts[:, 0], pts[:, 1], c=["lime" if v else "red" for v in lab], s=8)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def draw_grid(panels: list[dict[str, Any]], columns: list[str], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = [(0.1, 0.8, 0.2), (0.95, 0.45, 0.1), (0.15, 0.45, 0.95), (0.75, 0.2, 0.85), (0.9, 0.15, 0.2)]
    fig, axes = plt.subplots(len(panels), len(columns), figsize=(2.3 * len(columns), 2.0 * len(panels)), dpi=90,
                             squeeze=False)
    for r, p in enumerate(panels):
        for c, name in enumerate(columns):
            masks = p["masks"][name]
            caption = name if name == "ground truth" else f"{name}: {p['iou'][name]:.2f}"
            _overlay(axes[r][c], p["image"], masks, colours[c % len(colours)], p["label"], caption)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, pil_kwargs={"quality": 85} if out.suffix.lower() in (".jpg", ".jpeg") else None)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wesam bench adaptation-figures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sam-mini")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--target", default="kvasir_seg")
    p.add_argument("--prompt", default="box")
    p.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=6, help="test images in the grid")
    p.add_argument("--work", default="runs/bench-adaptation", help="the --work folder of `wesam bench adaptation`")
    p.add_argument("--json", default="bench/adaptation.json")
    p.add_argument("--out", default="docs/figures")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = {r.name: r for r in ROWS}
    unknown = [r for r in args.rows if r not in rows or rows[r].method is None]
    if unknown:
        p.error(f"not trained rows: {unknown}")
    model = resolve_model(args.model)
    cells = json.loads(Path(args.json).read_text()).get("cells", {}) if Path(args.json).is_file() else {}
    work = Path(args.work)

    sam = model.sam.eval()
    curves: dict[str, list[tuple[int, float]]] = {}
    selected: dict[str, int] = {}
    direct_val = None
    for name in args.rows:
        row: Row = rows[name]
        ckpt = cell_work_dir(work, args.target, args.prompt, row, args.steps, args.seed, args.lr, model.sha256) \
            / "checkpoint.pt"
        if not ckpt.is_file():
            p.error(f"{name}: no checkpoint {ckpt}; run `wesam bench adaptation --targets {args.target} --prompts "
                    f"{args.prompt} --rows '{name}' --seed {args.seed}` first (same --work)")
        cfg, state, history = published_state(ckpt)
        add_adapter(sam, name, LoraConfig(rank=cfg["lora_rank"], alpha=cfg["lora_alpha"],
                                          targets=tuple(cfg["lora_targets"])))
        load_adapter_state(sam, name, state)
        cell = cells.get(cell_key(args.target, args.prompt, name, args.steps, args.lr, args.seed, model.sha256))
        val = (cell or {}).get("val") or {}
        if val.get("before"):
            direct_val = val["before"]["miou"]
        curves[name] = ([(0, direct_val)] if direct_val is not None else []) + \
            [(h["step"], h["val_miou"]) for h in history]
        if val.get("selected_step") is not None:
            selected[name] = int(val["selected_step"])

    args_desc = f"{args.target}, {args.prompt} prompts, {args.steps} steps, seed {args.seed}"
    out = Path(args.out)
    curves_png = out / f"adaptation-curves-{args.target}-{args.prompt}.png"
    draw_curves(curves, direct_val, selected, f"Validation mIoU while adapting\n({args_desc}; * = published state)",
                curves_png)

    data = targets(Path(args.data_root), work / "data", [args.target])[args.target]
    test = FolderDataset(data, "test", skip_bad=True)
    picks = np.linspace(0, len(test) - 1, min(args.images, len(test))).round().astype(int)
    spec = PromptSpec(args.prompt, seed=args.seed)
    predictor = SamPredictorCore(sam)
    columns = ["ground truth", "direct", *args.rows]
    wanted = {int(x) for x in picks}
    panels = []
    # The project's own metric (as `wesam eval`): each meter keeps its per-image mean instance IoU.
    meters = {name: SegmentationMeter() for name in ["direct", *args.rows]}
    # Every test image is scored (not only the pictured ones), so that the report can say how the
    # gain is spread: a mean can hide an adapter that fixes a few failures and nudges most images down.
    with torch.inference_mode():
        for i in range(len(test)):
            s = test[i]
            label = derive_weak_labels(s.instances, spec.kind, seed=spec.seed, key=s.stem, n_points=spec.n_points)
            prompts = prompts_from_weak(label, predictor, s.instances.shape[1:], spec.mask_logit)
            masks, ious = {"ground truth": s.instances}, {}
            for name in ["direct", *args.rows]:
                with use_adapter(sam, None if name == "direct" else name):
                    masks[name] = predict_instances(predictor, s.image, prompts, spec.multimask)
                ious[name] = meters[name].add_image(masks[name], s.instances)[0]
            if i in wanted:
                panels.append({"stem": s.stem, "image": s.image, "label": label, "masks": masks, "iou": ious})
    grid_png = out / f"adaptation-grid-{args.target}-{args.prompt}.jpg"  # photographs: JPEG is ~5x smaller
    draw_grid(panels, columns, f"{args_desc}: evenly spaced test images, mean instance IoU per panel", grid_png)
    direct = np.asarray(meters["direct"].image_iou)
    spread = {}
    for name in args.rows:
        delta = np.asarray(meters[name].image_iou) - direct
        spread[name] = {"miou": round(meters[name].summary()["miou"], 4), "better": int((delta > 0.005).sum()),
                        "worse": int((delta < -0.005).sum()), "within_0.005": int((abs(delta) <= 0.005).sum()),
                        "median_delta": round(float(np.median(delta)), 4),
                        "mean_delta": round(float(np.mean(delta)), 4),
                        "largest_gain": round(float(delta.max()), 4), "largest_loss": round(float(delta.min()), 4)}
    print(json.dumps({"curves": str(curves_png), "grid": str(grid_png), "rows": args.rows,
                      "images": [p["stem"] for p in panels],
                      "direct_miou": round(float(direct.mean()), 4), "per_image_vs_direct": spread}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
