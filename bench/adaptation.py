"""The adaptation table: `wesam bench adaptation` (WeSAM ablation, one cell at a time, resumable).

Targets: Kvasir-SEG and CVC-ClinicDB (adapt on train, report on test) and corrupted coco128_seg
(gaussian_noise, motion_blur, fog, jpeg_compression at severity 5). Rows: direct testing, each
weakly supervised method and its ablations, the oracle (same LoRA, ground-truth masks), and
larger-LoRA rows. Model selection uses the validation part carved from the adaptation split
(the `wesam fixed` row publishes the state at the last step instead); test splits are only scored. Each finished cell is saved at once, so the table survives being
stopped and continues where it was.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wesam.adapters.adapt.trainer import AdaptationTrainer, AdaptConfig
from wesam.adapters.lora import DECODER_TARGETS, ENCODER_QV, use_adapter
from wesam.data import FolderDataset
from wesam.data.corruptions import corrupt
from wesam.data.folder import read_image_rgb
from wesam.evaluation.evaluate import PromptSpec, evaluate
from wesam.sam.predictor import SamPredictorCore
from wesam.sam.zoo import resolve_model

from .results import machine, write_section

CORRUPTIONS = ("gaussian_noise", "motion_blur", "fog", "jpeg_compression")


@dataclass(frozen=True)
class Row:
    name: str
    method: str | None  # None = direct testing
    extra: dict[str, Any] = field(default_factory=dict)
    prompts: tuple[str, ...] | None = None  # the prompt kinds the row applies to (None: all)

    @property
    def config(self) -> dict[str, Any]:
        """The row's AdaptConfig options. A row that names no LoRA targets adapts q and v of the
        encoder, as every such row has since the table began: `wesam adapt`'s default now adds the
        mask decoder, and that is the `+dec` rows."""
        return {"lora_targets": ENCODER_QV, **self.extra}

    @property
    def lora(self) -> tuple[int, tuple[str, ...]]:
        """(rank, targets) of the row's LoRA."""
        return (self.config.get("lora_rank", AdaptConfig.lora_rank), tuple(self.config["lora_targets"]))


# The `+dec` rows: the encoder targets of the row without `+dec`, plus every decoder target. Spelled
# from the parts, not from `wesam adapt`'s default, so that a later default cannot re-key these rows.
DEC_TARGETS = (*ENCODER_QV, *DECODER_TARGETS)
DEC16_TARGETS = ("q", "k", "v", "proj", *DECODER_TARGETS)
ROWS = (
    Row("direct", None),
    Row("self-training", "self-training"),
    Row("anchor", "anchor"),
    Row("wesam", "wesam"),
    # Weak labels as constraints on pseudo-labels: the box clips them (box prompts), the labelled
    # points fix a disk around each point (point prompts).
    Row("wesam +clip", "wesam", {"clip_to_box": True, "respect_points": True}),
    Row("wesam +anchor logit", "wesam", {"anchor_kind": "logit"}),
    Row("wesam +anchor prob", "wesam", {"anchor_kind": "prob"}),
    Row("wesam fixed", "wesam", {"select": "fixed"}),
    # The box's shape as a prior on the labels: 2 * (1 - r^2) of the inscribed ellipse added to the
    # teacher's and anchor's logits (a weight at which a confident model still overrides the prior;
    # `wesam bench pseudo-label-prior` scores the labels per weight), and the control where the prior
    # decides almost everywhere (labels = the ellipse, bar its rim).
    Row("wesam +prior", "wesam", {"clip_to_box": True, "box_prior": 2.0}, prompts=("box",)),
    Row("wesam +ellipse labels", "wesam", {"clip_to_box": True, "box_prior": 1000.0}, prompts=("box",)),
    Row("wesam+", "wesam+"),
    Row("wesam+ +ema", "wesam+", {"ema_decay": 0.99}),
    Row("wesam+ +conf", "wesam+", {"confidence": 1.0}),
    Row("wesam+ +conf q0.2", "wesam+", {"confidence_quantile": 0.2}),
    Row("wesam+ +pairwise", "wesam+", {"pairwise": True}),
    Row("oracle", "oracle"),
    Row("wesam+ r16 q,k,v,proj", "wesam+", {"lora_rank": 16, "lora_targets": ("q", "k", "v", "proj")}),
    Row("oracle r16 q,k,v,proj", "oracle", {"lora_rank": 16, "lora_targets": ("q", "k", "v", "proj")}),
    # The better of the two prior rows on Kvasir-SEG validation (0.766 against 0.752), with the oracle's
    # larger LoRA (rank 16 on q,k,v,proj raised the oracle's ceiling 0.737 -> 0.758 there).
    Row("wesam +ellipse labels r16 q,k,v,proj", "wesam",
        {"clip_to_box": True, "box_prior": 1000.0, "lora_rank": 16, "lora_targets": ("q", "k", "v", "proj")},
        prompts=("box",)),
    # LoRA on the mask decoder as well (rank 4 on the q, k, v and output projections of every
    # decoder attention, besides the encoder's q, v): trained on ellipse labels the encoder-only
    # LoRA plateaus 6 points under them on validation, and the oracle with the larger encoder
    # LoRA ends under the ellipse too; the frozen decoder is the measured limit.
    Row("oracle +dec", "oracle", {"lora_targets": DEC_TARGETS}),
    Row("wesam +ellipse labels +dec", "wesam", {"clip_to_box": True, "box_prior": 1000.0, "lora_targets": DEC_TARGETS},
        prompts=("box",)),
    Row("wesam +prior8 +dec", "wesam", {"clip_to_box": True, "box_prior": 8.0, "lora_targets": DEC_TARGETS},
        prompts=("box",)),
    Row("wesam +dec", "wesam", {"lora_targets": DEC_TARGETS}),
    # Capacity: the +dec weak rows plateau on validation 3-4 points under their labels (0.79 against
    # the ellipse's 0.826 on Kvasir-SEG); a 4x larger LoRA says whether rank is what holds them.
    Row("oracle r16 +dec", "oracle", {"lora_rank": 16, "lora_targets": DEC16_TARGETS}),
    Row("wesam +ellipse labels r16 +dec", "wesam",
        {"clip_to_box": True, "box_prior": 1000.0, "lora_rank": 16, "lora_targets": DEC16_TARGETS}, prompts=("box",)),
    # Point prompts: the ellipse of the positive points' spread as a prior (W = 1, the best point-label
    # weight on the polyp validation parts, `wesam bench pseudo-label-prior`), labelled points respected.
    Row("wesam +point prior +dec", "wesam", {"respect_points": True, "point_prior": 1.0, "lora_targets": DEC_TARGETS},
        prompts=("point",)),
)
# Tables list rows in ROWS order; rows not in ROWS (older JSON) go last.
ROW_ORDER = {r.name: i for i, r in enumerate(ROWS)}


def oracle_row(name: str) -> str:
    """The oracle row with the same LoRA (rank and targets) as row ``name``; "oracle" otherwise."""
    row = next((r for r in ROWS if r.name == name), None)
    if row is not None:
        for r in ROWS:
            if r.method == "oracle" and r.lora == row.lora:
                return r.name
    return "oracle"


def row_rank(name: str) -> int:
    """Sort key of a row name in the tables (ROWS order; unknown names last)."""
    return ROW_ORDER.get(name, len(ROW_ORDER))


DEFAULT_STEPS = AdaptConfig.steps
QUICK_ROWS = ("direct", "self-training", "anchor", "wesam", "wesam+", "oracle")


def corrupted_copy(src: Path, name: str, cache: Path, severity: int = 5) -> Path:
    """A folder dataset equal to ``src`` with every image corrupted (seeded per image)."""
    dst = cache / f"{src.name}-{name}-s{severity}"
    done = dst / ".complete"
    if done.is_file():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("images"))
    (tmp / "images").mkdir()
    import cv2

    for i, img_path in enumerate(sorted((src / "images").iterdir())):
        rgb = corrupt(read_image_rgb(img_path), name, severity, seed=i)
        cv2.imwrite(str(tmp / "images" / (img_path.stem + ".png")), rgb[..., ::-1])
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def targets(data_root: Path, cache: Path, names: list[str]) -> dict[str, Path]:
    out = {}
    for n in names:
        if n in ("kvasir_seg", "cvc_clinicdb"):
            out[n] = data_root / n
        elif n.startswith("coco128-"):
            out[n] = corrupted_copy(data_root / "coco128_seg", n.split("-", 1)[1], cache)
        else:
            raise ValueError(f"unknown target {n!r}")
    return out


# A cell's key in the results JSON: these fields joined by "|" (row names hold no "|").
KEY_FIELDS = ("target", "prompt", "row", "steps", "lr", "seed", "model_sha256")


def cell_key(target: str, prompt: str, row: str, steps: int, lr: float, seed: int, model_sha256: str | None) -> str:
    return f"{target}|{prompt}|{row}|{steps}|{lr:g}|{seed}|{model_sha256}"


def key_fields(key: str) -> dict[str, str]:
    """The fields of a cell key, by name (see KEY_FIELDS)."""
    return dict(zip(KEY_FIELDS, key.split("|")))


def cell_work_dir(work: Path, target: str, prompt: str, row: Row, steps: int, seed: int, lr: float,
                  model_sha256: str | None) -> Path:
    """Checkpoints of one cell: everything that makes a cell distinct is in the name, so cells of
    another seed or base model never resume each other's runs."""
    return work / (f"{target}-{prompt}-{row.name.replace(' ', '_')}-{steps}-lr{lr:g}-seed{seed}-"
                   f"{(model_sha256 or 'random')[:12]}")


def run_cell(model: str, data: Path, target: str, prompt: str, row: Row, steps: int, seed: int,
             work: Path, lr: float = AdaptConfig.lr) -> dict[str, Any]:
    t0 = time.time()
    spec = PromptSpec(prompt, seed=seed)
    test = FolderDataset(data, "test", skip_bad=True)
    speed = None
    base = resolve_model(model)
    if row.method is None:
        res = evaluate(SamPredictorCore(base.sam), test, spec)
        steps_done = 0
        val = None
    else:
        cfg = AdaptConfig(data=str(data), domain=target.replace("_", "-"), model=model, prompt=prompt,
                          method=row.method, steps=steps, lr=lr, seed=seed, registry=None, skip_bad=True,
                          work_dir=str(cell_work_dir(work, target, prompt, row, steps, seed, lr, base.sha256)),
                          **row.config)
        a = AdaptationTrainer(cfg, log=lambda *_: None, model=base)
        summary = a.run(publish=False)
        with use_adapter(a.sam, "train"):
            res = evaluate(SamPredictorCore(a.sam), test, spec)
        steps_done = summary["steps"]
        val = {"before": summary["val_before"], "after": summary["val_after"],
               "selected_step": summary["selected_step"],
               # the validation curve, for `wesam bench adaptation-figures` and readers of the JSON
               "curve": [[h["step"], h["val_miou"]] for h in a.history]}
        speed = summary["speed"]
    return {"target": target, "prompt": prompt, "row": row.name, "miou": res["miou"], "f1": res["f1"],
            "box_filled_miou": res["box_filled"]["miou"], "ellipse_miou": res["ellipse"]["miou"],
            "n_images": res["n_images"], "steps": steps_done,
            "val": val, "speed": speed, "seconds": round(time.time() - t0, 1)}


# Below half a point of oracle gain the ratio only measures noise (a 0.00004 gain once printed as
# "9372.95" of the oracle), so the tables print "-" instead.
MIN_ORACLE_GAIN = 0.005


def oracle_share(gain: float, oracle_gain: float) -> str:
    """The "of oracle" cell: ``gain / oracle_gain`` to two decimals, or "-" when the oracle gained
    less than :data:`MIN_ORACLE_GAIN` (in either direction) and the ratio means nothing."""
    if abs(oracle_gain) < MIN_ORACLE_GAIN:
        return "-"
    return f"{gain / oracle_gain:.2f}"


def to_markdown(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["## Adaptation (WeSAM ablation)", "",
             f"Base `{meta['model']}`, {meta['steps']} steps of batch 4 per cell at lr {meta.get('lr', 3e-4):g}, LoRA rank 4 on q,v unless the row "
             f"says otherwise, seed {meta['seed']}; measured on {meta['machine']} with "
             f"`wesam bench adaptation --steps {meta['steps']} --lr {meta.get('lr', 3e-4):g} --seed {meta['seed']}` "
             f"(`--targets`, `--prompts` and `--rows` pick cells; {meta.get('threads', '?')} torch thread(s) per cell). "
             "Adapt on the train split (model selection on a validation part carved from it), score on the test "
             "split. \"of oracle\" = (method − direct) / (oracle − direct), oracle with the same LoRA configuration "
             "and steps (\"-\" where the oracle gained under half a point); \"steps/s\" = training steps per second (validation excluded), \"enc\" = the "
             "share of step time in the image encoder's forward + backward (the full split is in the JSON).", ""]
    cells = list(results.values())
    for target in dict.fromkeys(c["target"] for c in cells):
        for prompt in dict.fromkeys(c["prompt"] for c in cells if c["target"] == target):
            rows = {c["row"]: c for c in sorted((c for c in cells if c["target"] == target and c["prompt"] == prompt),
                                                key=lambda c: row_rank(c["row"]))}
            direct = rows.get("direct")
            lines += [f"### {target}, {prompt} prompts", "",
                      "| row | mIoU | F1 | Δ vs direct | of oracle | box filled | ellipse | minutes | steps/s | enc |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for name, c in rows.items():
                delta = c["miou"] - direct["miou"] if direct else float("nan")
                oracle = rows.get(oracle_row(name))
                frac = "-"
                if direct and oracle and name != "direct":
                    frac = oracle_share(c["miou"] - direct["miou"], oracle["miou"] - direct["miou"])
                sp = c.get("speed") or {}
                rate = f"{sp['steps_per_s']:.3f}" if sp.get("steps") else "-"
                enc = (f"{sp['share']['encoder_forward'] + sp['share']['encoder_backward']:.0%}"
                       if sp.get("steps") else "-")
                ellipse = f"{c['ellipse_miou']:.4f}" if c.get("ellipse_miou") is not None else "-"
                lines.append(f"| {name} | {c['miou']:.4f} | {c['f1']:.4f} | {delta:+.4f} | {frac} | "
                             f"{c['box_filled_miou']:.4f} | {ellipse} | {c['seconds'] / 60:.1f} | {rate} | {enc} |")
            lines.append("")
    lines += corruption_average_markdown(cells)
    return "\n".join(lines)


def corruption_average_markdown(cells: list[dict[str, Any]]) -> list[str]:
    """Per prompt, each row's mIoU averaged over the corrupted coco128 targets (the issue's
    criterion is the average over the 4 corruptions); only rows measured on every corruption
    present, so an average never mixes a partial set. Empty when no corrupted target was run."""
    lines: list[str] = []
    corrupted = [c for c in cells if c["target"].startswith("coco128-")]
    for prompt in dict.fromkeys(c["prompt"] for c in corrupted):
        here = [c for c in corrupted if c["prompt"] == prompt]
        names = sorted(dict.fromkeys(c["target"] for c in here))
        by_row: dict[str, dict[str, dict[str, Any]]] = {}
        for c in here:
            by_row.setdefault(c["row"], {})[c["target"]] = c
        complete = {r: cs for r, cs in by_row.items() if len(cs) == len(names)}
        if not complete:
            continue
        mean = {r: float(np.mean([cs[t]["miou"] for t in names])) for r, cs in complete.items()}
        direct = mean.get("direct")
        first = next(iter(complete.values()))
        floors = (f"box filled {np.mean([first[t]['box_filled_miou'] for t in names]):.4f}"
                  + (f", ellipse {np.mean([first[t]['ellipse_miou'] for t in names]):.4f}"
                     if all(first[t].get("ellipse_miou") is not None for t in names) else ""))
        lines += [f"### coco128, {prompt} prompts: mean over {len(names)} corruptions ({floors})", "",
                  f"Corruptions: {', '.join(t.split('-', 1)[1] for t in names)} (severity 5); rows measured on all of them.", "",
                  "| row | mIoU (mean) | Δ vs direct | per corruption |", "|---|---|---|---|"]
        for r in sorted(complete, key=row_rank):
            delta = f"{mean[r] - direct:+.4f}" if direct is not None else "-"
            per = " / ".join(f"{complete[r][t]['miou']:.4f}" for t in names)
            lines.append(f"| {r} | {mean[r]:.4f} | {delta} | {per} |")
        lines.append("")
    return lines


def seeds_markdown(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str | None:
    """Rows run with several seeds (same base, steps and lr): mean ± sample std over seeds, the
    gain over direct testing's mean, and the fraction of the oracle's mean gain. None when no
    row has two seeds yet."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for key, c in results.items():
        groups.setdefault((c["target"], c["prompt"], c["row"]), []).append({**c, "seed": int(key_fields(key)["seed"])})
    if not any(len(v) > 1 for v in groups.values()):
        return None
    lines = ["## Adaptation over seeds", "",
             f"Base `{meta['model']}` (sha256 `{meta['model_sha256'][:16]}…`), {meta['steps']} steps at lr "
             f"{meta['lr']:g}; each row run once per seed with `wesam bench adaptation --seed S` (the seed draws the "
             "validation carve, the batches and the prompts' points); test splits. mIoU as mean ± sample standard "
             "deviation over the seeds listed; Δ and \"of oracle\" use the means; \"of oracle\" compares with the oracle "
             "of the row's LoRA configuration (rank and targets) over its own seeds.", ""]
    for target, prompt in dict.fromkeys((t, p) for t, p, _ in groups):
        rows = sorted(((r, cs) for (t, p, r), cs in groups.items() if (t, p) == (target, prompt)),
                      key=lambda rc: row_rank(rc[0]))
        means = {r: float(np.mean([c["miou"] for c in cs])) for r, cs in rows}
        direct = means.get("direct")
        first = rows[0][1][0]
        ellipse = f"{first['ellipse_miou']:.4f}" if first.get("ellipse_miou") is not None else "-"
        lines += [f"### {target}, {prompt} prompts (box filled {first['box_filled_miou']:.4f}, ellipse {ellipse})", "",
                  "| row | seeds | mIoU mean ± std | Δ vs direct | of oracle |", "|---|---|---|---|---|"]
        for r, cs in rows:
            oracle = means.get(oracle_row(r))
            vals = [c["miou"] for c in cs]
            std = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
            delta = f"{means[r] - direct:+.4f}" if direct is not None else "-"
            frac = (oracle_share(means[r] - direct, oracle - direct)
                    if direct is not None and oracle is not None and r != "direct" else "-")
            seeds = ",".join(str(c["seed"]) for c in sorted(cs, key=lambda c: c["seed"]))
            spread = f" ± {std:.4f}" if len(vals) > 1 else ""
            lines.append(f"| {r} | {seeds} | {means[r]:.4f}{spread} | {delta} | {frac} |")
        lines.append("")
    return "\n".join(lines)


def section_suffix(steps: int, lr: float) -> str:
    """"" for the default run; "-2000-steps", "-lr0.0003", ... for others, so a run of another length
    or learning rate gets its own RESULTS.md sections instead of replacing the default table."""
    return ("" if steps == DEFAULT_STEPS else f"-{steps}-steps") + ("" if lr == AdaptConfig.lr else f"-lr{lr:g}")


def results_sections(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> dict[str, str]:
    """bench/RESULTS.md sections for the cells of ``meta``'s steps, lr and base: the table of one seed
    (seed 0 where it ran, so a later seed's run does not replace the reference table; else meta's
    seed) and, once a row has two seeds, the over-seeds summary. Runs of the default length write
    ``adaptation`` and ``adaptation-seeds``; other lengths and learning rates get their own sections
    beside them (:func:`section_suffix`)."""
    same = {"steps": str(meta["steps"]), "lr": f"{meta['lr']:g}", "model_sha256": str(meta["model_sha256"])}
    over_seeds = {k: v for k, v in results.items() if all(key_fields(k)[f] == want for f, want in same.items())}
    # Direct testing trains nothing, so its cell of any run length or lr is this run's baseline too.
    def cell_of(k: str, c: dict[str, Any]) -> tuple[str, str, str]:
        return c["target"], c["prompt"], key_fields(k)["seed"]

    missing = ({cell_of(k, c) for k, c in over_seeds.items()}
               - {cell_of(k, c) for k, c in over_seeds.items() if c["row"] == "direct"})
    for k, c in results.items():
        f = key_fields(k)
        if c["row"] == "direct" and cell_of(k, c) in missing and f["model_sha256"] == same["model_sha256"]:
            over_seeds[k] = c
            missing.discard(cell_of(k, c))
    seeds = {key_fields(k)["seed"] for k in over_seeds}
    table_seed = "0" if "0" in seeds else str(meta["seed"])
    current = {k: v for k, v in over_seeds.items() if key_fields(k)["seed"] == table_seed}
    suffix = section_suffix(meta["steps"], meta["lr"])
    out = {}
    if current:
        out[f"adaptation{suffix}"] = to_markdown(current, {**meta, "seed": int(table_seed)})
    seeds_md = seeds_markdown(over_seeds, meta)
    if seeds_md:
        out[f"adaptation-seeds{suffix}"] = seeds_md
    return out


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock beside ``path``: several bench processes may share one results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _load_cells(path: Path) -> dict[str, dict[str, Any]]:
    return json.loads(path.read_text()).get("cells", {}) if path.is_file() else {}


def save_cell(path: Path, key: str, cell: dict[str, Any], meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Add one finished cell to the JSON file, keeping cells other processes wrote meanwhile."""
    with _locked(path):
        cells = _load_cells(path)
        cells[key] = cell
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"meta": meta, "cells": cells}, indent=2) + "\n")
        tmp.replace(path)
        return cells


def _claims_path(path: Path) -> Path:
    return path.with_name(path.name + ".claims")


def _read_claims(path: Path) -> dict[str, str]:
    claims_path = _claims_path(path)
    return json.loads(claims_path.read_text()) if claims_path.is_file() else {}


def claim(path: Path, key: str, owner: str) -> bool:
    """Mark a cell as being computed so a second bench process skips it; False if already taken."""
    with _locked(path):
        claims = _read_claims(path)
        if key in _load_cells(path) or claims.get(key, owner) != owner:
            return False
        claims[key] = owner
        _claims_path(path).write_text(json.dumps(claims, indent=2) + "\n")
        return True


def release(path: Path, key: str) -> None:
    with _locked(path):
        claims = _read_claims(path)
        claims.pop(key, None)
        _claims_path(path).write_text(json.dumps(claims, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wesam bench adaptation", description=__doc__)
    p.add_argument("--model", default="sam-mini")
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--targets", nargs="+",
                   default=["kvasir_seg", "cvc_clinicdb"] + [f"coco128-{c}" for c in CORRUPTIONS])
    p.add_argument("--prompts", nargs="+", default=["box", "point"])
    p.add_argument("--rows", nargs="+", default=[r.name for r in ROWS])
    p.add_argument("--quick", action="store_true", help="Kvasir-SEG, box prompts, the main rows")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--lr", type=float, default=AdaptConfig.lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/bench-adaptation", help="checkpoints and corrupted data cache")
    p.add_argument("--json", default="bench/adaptation.json")
    p.add_argument("--no-results", action="store_true")
    p.add_argument("--tables-only", action="store_true",
                   help="run no cell: rewrite the bench/RESULTS.md sections of --steps/--lr from --json")
    p.add_argument("--worker", default="main",
                   help="name of this process when several share --json (give each its own): each takes "
                        "unclaimed cells, and a restarted worker takes back the cells it had claimed")
    args = p.parse_args(argv)
    if args.quick:
        args.targets, args.prompts, args.rows = ["kvasir_seg"], ["box"], list(QUICK_ROWS)
    rows = {r.name: r for r in ROWS}
    unknown = [r for r in args.rows if r not in rows]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(rows)}")
    work = Path(args.work)
    out_path = Path(args.json)
    model = resolve_model(args.model)
    meta = {"model": model.name, "model_sha256": model.sha256, "steps": args.steps, "lr": args.lr, "seed": args.seed,
            "machine": machine(), "threads": torch.get_num_threads()}
    paths = {} if args.tables_only else targets(Path(args.data_root), work / "data", args.targets)
    for target, data in paths.items():
        for prompt in args.prompts:
            for name in args.rows:
                if rows[name].prompts is not None and prompt not in rows[name].prompts:
                    continue
                key = cell_key(target, prompt, name, args.steps, args.lr, args.seed, model.sha256)
                if not claim(out_path, key, args.worker):
                    continue
                print(f"[{time.strftime('%H:%M:%S')}] {target} {prompt} {name} ...", flush=True)
                try:
                    cell = run_cell(args.model, data, target, prompt, rows[name], args.steps, args.seed, work, args.lr)
                finally:
                    release(out_path, key)
                results = save_cell(out_path, key, cell, meta)
                print(f"    mIoU {cell['miou']:.4f} (box filled {cell['box_filled_miou']:.4f}) "
                      f"in {cell['seconds'] / 60:.1f} min", flush=True)
                if not args.no_results:
                    _write_results(results, meta, out_path)
    if args.tables_only:
        # The figures were measured by the runs that wrote the JSON: their machine and threads, not this process's.
        stored = json.loads(out_path.read_text()).get("meta", {}) if out_path.is_file() else {}
        meta.update({k: stored[k] for k in ("machine", "threads") if k in stored})
        _write_results(_load_cells(out_path), meta, out_path)
    return 0


def _write_results(results: dict[str, dict[str, Any]], meta: dict[str, Any], out_path: Path) -> None:
    with _locked(out_path):
        for name, markdown in results_sections(results, meta).items():
            write_section(name, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
