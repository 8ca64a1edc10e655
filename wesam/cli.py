"""The `wesam` command line. Subcommands import their layer lazily so `wesam --help` is fast."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from . import __version__

DEFAULT_DATA_ROOT = "../shared/data"


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _write_json(path: str | None, obj: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2) + "\n")


# -- models -----------------------------------------------------------------------------------------

def cmd_models(args: argparse.Namespace) -> int:
    from adapters.zoo import ZOO, describe

    if args.models_cmd == "info":
        key = args.name
        spec = ZOO.get(key) or next((s for s in ZOO.values() if key in s.aliases), None)
        if spec is None:
            raise SystemExit(f"error: unknown model {key!r}; known: {', '.join(ZOO)}")
        _print_json(describe(spec))
        return 0
    rows = [describe(s) for s in ZOO.values()]
    if args.json:
        _print_json(rows)
        return 0
    print(f"{'name':<10} {'input':>6} {'encoder params':>15} {'available':>10}  description")
    for r in rows:
        enc = r["parameters"]["image_encoder"]
        print(f"{r['name']:<10} {r['config']['img_size']:>6} {enc:>15,} {'yes' if r['available'] else 'no':>10}  "
              f"{r['description']}")
    return 0


# -- eval -------------------------------------------------------------------------------------------

def _parse_points(text: str) -> tuple[int, int]:
    try:
        pos, neg = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("--points takes POS,NEG, e.g. 5,5 or 1,0")
    if pos < 1 or neg < 0:
        raise argparse.ArgumentTypeError("--points needs at least one positive point")
    return pos, neg


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from adapters.data import DataError, open_dataset
    from adapters.evaluate import PromptSpec, evaluate
    from adapters.predictor import SamPredictorCore
    from adapters.zoo import ModelLoadError, resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        spec = PromptSpec(args.prompt, n_points=args.points, seed=args.seed)
        model = resolve_model(args.model, args.checkpoint)
        ds = open_dataset(args.data, args.split, skip_bad=args.skip_bad, min_area_frac=args.min_area_frac)
    except (ModelLoadError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    samples: Any = ds
    if args.limit:
        samples = [ds[i] for i in range(min(args.limit, len(ds)))]
    predictor = SamPredictorCore(model.sam, device=args.device)
    try:
        res = evaluate(predictor, samples, spec,
                       progress=lambda it: tqdm(it, total=len(samples), desc=f"eval {Path(args.data).name}",
                                                unit="img", disable=args.quiet))
    except DataError as e:
        print(f"error: {e} (use --skip-bad to skip bad samples)", file=sys.stderr)
        return 2
    out = {
        "miou": res["miou"],
        "f1": res["f1"],
        "n_images": res["n_images"],
        "n_instances": res["n_instances"],
        "model": model.name,
        "model_sha256": model.sha256,
        "adapter": None,
        "prompt": args.prompt,
        "points": list(args.points) if args.prompt == "point" else None,
        "seed": args.seed,
        "data": str(args.data),
        "split": args.split,
        "n_empty_both": res["n_empty_both"],
        "box_filled": {"miou": res["box_filled"]["miou"], "f1": res["box_filled"]["f1"]},
    }
    if not args.quiet:
        print(f"\n{'':<22}{'mIoU':>8}{'F1':>8}")
        print(f"{model.name + ' (' + args.prompt + ')':<22}{out['miou']:>8.4f}{out['f1']:>8.4f}")
        print(f"{'box filled (baseline)':<22}{out['box_filled']['miou']:>8.4f}{out['box_filled']['f1']:>8.4f}")
        print(f"{out['n_images']} images, {out['n_instances']} instances")
    _write_json(args.json, out)
    return 0


# -- pretrain ---------------------------------------------------------------------------------------

def cmd_pretrain(args: argparse.Namespace) -> int:
    from adapters.pretrain.trainer import PretrainConfig, Pretrainer, ship

    if args.ship_only:
        manifest = ship(args.out, args.ship)
        _print_json({k: manifest[k] for k in ("name", "sha256", "bytes")})
        return 0
    cfg = PretrainConfig(out_dir=args.out, data_root=args.data_root, seed=args.seed, steps=args.steps,
                         time_budget_min=args.time_budget, batch_size=args.batch_size, lr=args.lr,
                         eval_every_min=args.eval_every, threads=args.threads)
    if args.synthetic_only:
        cfg.data_root = None
    trainer = Pretrainer(cfg)
    summary = trainer.run(resume=args.resume)
    if args.ship:
        manifest = ship(args.out, args.ship)
        summary["shipped"] = {"path": str(Path(args.ship) / manifest["file"]), "sha256": manifest["sha256"]}
    _print_json(summary)
    return 0


# -- parser -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wesam", description=__doc__)
    p.add_argument("--version", action="version", version=f"wesam {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list or describe the model zoo")
    msub = m.add_subparsers(dest="models_cmd")
    ml = msub.add_parser("list", help="list models")
    ml.add_argument("--json", action="store_true")
    mi = msub.add_parser("info", help="describe one model")
    mi.add_argument("name")
    m.set_defaults(func=cmd_models, models_cmd="list", json=False)

    e = sub.add_parser("eval", help="prompted evaluation (mIoU, F1) on a dataset")
    e.add_argument("--model", default="sam-mini", help="zoo name or weights file (default: sam-mini)")
    e.add_argument("--checkpoint", help="weights for an official model (vit_b/l/h)")
    e.add_argument("--data", required=True, help="dataset folder (images/, masks/, split.json) or COCO json")
    e.add_argument("--split", default="test")
    e.add_argument("--prompt", default="box", choices=["box", "point", "coarse", "coarse-box"])
    e.add_argument("--points", type=_parse_points, default=(5, 5), metavar="POS,NEG",
                   help="points per instance for --prompt point (default 5,5 as in WeSAM)")
    e.add_argument("--seed", type=int, default=0, help="seed of the weak-label derivation")
    e.add_argument("--json", help="write the result JSON here")
    e.add_argument("--skip-bad", action="store_true", help="skip unreadable or inconsistent samples")
    e.add_argument("--min-area-frac", type=float, default=0.001,
                   help="minimum connected-component area of binary masks, as a fraction of the image")
    e.add_argument("--limit", type=int, help="evaluate only the first N images")
    e.add_argument("--device", default="cpu")
    e.add_argument("--threads", type=int)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("pretrain", help="train the sam-mini source model from scratch")
    t.add_argument("--out", default="runs/pretrain-sam-mini", help="run directory (checkpoints, best weights)")
    t.add_argument("--data-root", default=DEFAULT_DATA_ROOT,
                   help="folder with coco128_seg, davis2016, camvid (train splits are used)")
    t.add_argument("--synthetic-only", action="store_true", help="train on procedural scenes only")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, help="stop after this many optimiser steps")
    t.add_argument("--time-budget", type=float, default=100.0, help="minutes of training (default 100)")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=4e-4)
    t.add_argument("--eval-every", type=float, default=12.0, help="minutes between validations")
    t.add_argument("--threads", type=int)
    t.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing checkpoint")
    t.add_argument("--ship", metavar="DIR", help="after training, write fp16 weights + manifest to DIR "
                                                 "(models/sam-mini ships the embedded default)")
    t.add_argument("--ship-only", action="store_true", help="only ship the best weights of --out to --ship")
    t.set_defaults(func=cmd_pretrain)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
