"""The `wesam` command line. Subcommands import their layer lazily so `wesam --help` is fast."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from wesam.service.config import PREFIX as SERVE_ENV_PREFIX  # stdlib-only module: keeps --help fast

from .errors import WesamError

# wesam.adapters.lora.TARGETS and DEFAULT_ADAPT_TARGETS, spelled out so that `wesam --help` does
# not import torch (tests/test_lora_decoder.py checks they agree).
LORA_TARGET_CHOICES = ("q", "k", "v", "proj", "mlp1", "mlp2", "dec_q", "dec_k", "dec_v", "dec_out")
DEFAULT_LORA_TARGETS = ("q", "v", "dec_q", "dec_k", "dec_v", "dec_out")
from .version import __version__

DEFAULT_DATA_ROOT = "../shared/data"

# The one place where wesam's errors become exit codes: 2 for anything the user can fix (bad
# input, missing file, wrong model, refused adapter), 130 for a job stopped with Ctrl-C, 75
# (EX_TEMPFAIL, "try again later") for an online worker whose domain lease is held by another
# worker or was lost: a supervisor that restarts it gets the lease once the other one is gone.
EXIT_CODES: dict[str, int] = {"interrupted": 130, "lease_held": 75, "lease_lost": 75,
                              "worker": 2, "non_finite_loss": 2}
EXIT_USER_ERROR = 2


def exit_code(error: WesamError) -> int:
    return EXIT_CODES.get(error.kind, EXIT_USER_ERROR)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _write_json(path: str | None, obj: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2) + "\n")


# -- models -----------------------------------------------------------------------------------------

def cmd_models(args: argparse.Namespace) -> int:
    from wesam.sam.zoo import ZOO, describe

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

    from wesam.data import DataError, open_dataset
    from wesam.evaluation.evaluate import PromptSpec, evaluate
    from wesam.sam.predictor import SamPredictorCore
    from wesam.sam.zoo import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)

    adapter_ref = None
    try:
        spec = PromptSpec(args.prompt, n_points=args.points, seed=args.seed)
        model = resolve_model(args.model, args.checkpoint)
        if args.adapter:
            adapter_ref = _attach(model, args.adapter, args.registry)
        ds = open_dataset(args.data, args.split, skip_bad=args.skip_bad, min_area_frac=args.min_area_frac)
    except ValueError as e:
        if isinstance(e, WesamError):
            raise
        raise WesamError(str(e), kind="invalid_argument") from e
    samples: Any = ds
    if args.limit:
        samples = [ds[i] for i in range(min(args.limit, len(ds)))]
    predictor = SamPredictorCore(model.sam, device=args.device)
    try:
        res = evaluate(predictor, samples, spec,
                       progress=lambda it: tqdm(it, total=len(samples), desc=f"eval {Path(args.data).name}",
                                                unit="img", disable=args.quiet))
    except DataError as e:
        raise DataError(e.path, f"{e.reason} (use --skip-bad to skip bad samples)") from None
    out = {
        "miou": res["miou"],
        "f1": res["f1"],
        "n_images": res["n_images"],
        "n_instances": res["n_instances"],
        "model": model.name,
        "model_sha256": model.sha256,
        "adapter": adapter_ref,
        "prompt": args.prompt,
        "points": list(args.points) if args.prompt == "point" else None,
        "seed": args.seed,
        "data": str(args.data),
        "split": args.split,
        "n_empty_both": res["n_empty_both"],
        "box_filled": {"miou": res["box_filled"]["miou"], "f1": res["box_filled"]["f1"]},
        "ellipse": {"miou": res["ellipse"]["miou"], "f1": res["ellipse"]["f1"]},
    }
    if not args.quiet:
        print(f"\n{'':<22}{'mIoU':>8}{'F1':>8}")
        label = f"{model.name}{'+' + adapter_ref if adapter_ref else ''} ({args.prompt})"
        print(f"{label:<22}{out['miou']:>8.4f}{out['f1']:>8.4f}")
        print(f"{'box filled (baseline)':<22}{out['box_filled']['miou']:>8.4f}{out['box_filled']['f1']:>8.4f}")
        print(f"{'ellipse in box (floor)':<22}{out['ellipse']['miou']:>8.4f}{out['ellipse']['f1']:>8.4f}")
        print(f"{out['n_images']} images, {out['n_instances']} instances")
    _write_json(args.json, out)
    return 0


def _open_artifact(ref: str, registry: str | None):
    """An adapter directory, or DOMAIN[@vN] looked up in the registry."""
    from wesam.adapters.artifact import AdapterError, read_artifact
    from wesam.adapters.registry import Registry

    if Path(ref).is_dir():
        return read_artifact(ref)
    if registry is None:
        raise AdapterError(f"{ref!r} is not an adapter directory; pass --registry DIR to look it up")
    return Registry(registry).resolve(ref)


def _attach(model: Any, ref: str, registry: str | None) -> str:
    """Load an adapter into the model and make it active; returns its reference."""
    from wesam.adapters.artifact import attach_adapter
    from wesam.adapters.lora import set_adapter

    art = _open_artifact(ref, registry)
    name = attach_adapter(model, art)
    set_adapter(model.sam, name)
    return str(art.ref)


# -- adapters ---------------------------------------------------------------------------------------

def cmd_adapters(args: argparse.Namespace) -> int:
    from wesam.adapters.artifact import verify_artifact
    from wesam.adapters.online.control import read_control
    from wesam.adapters.ref import AdapterRef
    from wesam.adapters.registry import Registry
    from wesam.sam.zoo import resolve_model

    reg = Registry(args.registry)
    if args.adapters_cmd in ADAPTER_CONTROL_CMDS:
        return _adapters_control(args, reg)
    if args.adapters_cmd == "list":
        rows = []
        for domain in reg.domains():
            active = reg.active_version(domain)
            control = read_control(reg, domain)  # the online worker's pin and freeze (docs/online.md)
            for v in reg.versions(domain):
                ref = AdapterRef(domain, v)
                meta = reg.resolve(ref).meta
                lineage = meta.get("lineage") if isinstance(meta.get("lineage"), dict) else {}
                rows.append({"adapter": str(ref), "active": v == active,
                             "base_model": meta["base_model"].get("name"), "method": meta.get("method"),
                             "prompt": meta.get("prompt"), "created": meta.get("created"),
                             # the worker writes "after": null when it had no golden set to measure on
                             "miou_after": ((meta.get("metrics") or {}).get("after") or {}).get("miou"),
                             "pinned": control.pinned == v, "frozen": control.frozen,
                             "parent": lineage.get("parent")})
        if args.json:
            _print_json(rows)
        elif not rows:
            print(f"no adapters in {reg.root}")
        else:
            for r in rows:
                miou = f"{r['miou_after']:.4f}" if isinstance(r["miou_after"], float) else "-"
                flags = "".join(f" [{k}]" for k in ("pinned", "frozen") if r[k])
                print(f"{'*' if r['active'] else ' '} {r['adapter']:<24} base={r['base_model']:<10} "
                      f"method={r['method']} prompt={r['prompt']} mIoU={miou} {r['created']}{flags}")
        return 0
    if args.adapters_cmd == "show":
        _print_json(_open_artifact(args.ref, args.registry).meta)
        return 0
    if args.adapters_cmd == "verify":
        art = _open_artifact(args.ref, args.registry)
        base = None
        if not args.no_base:
            base = resolve_model(args.model or art.meta["base_model"]["name"], args.checkpoint)
        report = verify_artifact(art, base)
        _print_json(report)
        return 0 if report["ok"] else 1
    if args.adapters_cmd == "activate":
        ref = AdapterRef.of(AdapterRef.parse(args.domain).domain, args.version)
        reg.activate(ref.domain, ref.version)
        print(f"{ref.domain} -> {ref.version_dir}")
        return 0
    raise SystemExit("usage: wesam adapters list|show|verify|activate|pin|unpin|freeze|unfreeze|rollback|lineage")


# The online worker's operator controls (wesam.adapters.online.control, docs/online.md).
ADAPTER_CONTROL_CMDS = ("pin", "unpin", "freeze", "unfreeze", "rollback", "lineage")


def _adapters_control(args: argparse.Namespace, reg: Any) -> int:
    """``wesam adapters pin|unpin|freeze|unfreeze|rollback|lineage``."""
    from wesam.adapters.online import control
    from wesam.adapters.ref import AdapterRef

    ref = AdapterRef.parse(args.domain)
    domain = ref.domain
    if args.adapters_cmd == "lineage":
        state = control.read_control(reg, domain)
        active = reg.active_version(domain)
        chain = control.lineage_chain(reg, domain, ref.version)
        out = {"domain": domain, "active": active, "pinned": state.pinned, "frozen": state.frozen,
               "reason": state.reason, "chain": chain}
        if args.json:
            _print_json(out)
            return 0
        status = [f"active v{active}", f"pinned v{state.pinned}" if state.pinned else "not pinned",
                  f"frozen ({state.reason})" if state.frozen and state.reason else
                  "frozen" if state.frozen else "not frozen"]
        print(f"{domain}: " + ", ".join(status))
        for row in chain:
            if row.get("missing"):
                print(f"  v{row['version']:<4} (no longer in the registry)")
                continue
            gate = {True: "pass", False: "FAIL", None: "-"}.get(row["gate"], str(row["gate"]))
            origin = (f"parent={row['parent'] or '-'} samples={row['samples'] if row['samples'] is not None else '-'} "
                      f"gate={gate} round={row['round'] if row['round'] is not None else '-'}"
                      if row["parent"] is not None or row["samples"] is not None or row["gate"] is not None
                      else "root (no lineage)")
            print(f"{'*' if row['version'] == active else ' '} v{row['version']:<4} {row['created'] or '-':<26} "
                  f"method={row['method'] or '-':<8} {origin}")
        return 0
    if ref.version is not None:
        raise WesamError(f"give the domain without a version ({domain!r}), not {args.domain!r}",
                         kind="invalid_argument")
    if args.adapters_cmd == "pin":
        pinned = AdapterRef.of(domain, args.version)
        state = control.pin(reg, domain, pinned.version)
        print(f"{domain}: the worker anchors to and resets to {pinned.version_dir}")
    elif args.adapters_cmd == "unpin":
        state = control.unpin(reg, domain)
        print(f"{domain}: not pinned (the worker anchors to the version active when it starts)")
    elif args.adapters_cmd == "freeze":
        state = control.freeze(reg, domain, args.reason)
        print(f"{domain}: frozen" + (f" ({state.reason})" if state.reason else "")
              + "; the worker skips its rounds and publishes nothing")
    elif args.adapters_cmd == "unfreeze":
        state = control.unfreeze(reg, domain)
        print(f"{domain}: unfrozen; the worker resumes its rounds")
    else:  # rollback
        before = reg.active_version(domain)
        version = control.rollback(reg, domain, freeze=not args.no_freeze, reason=args.reason)
        state = control.read_control(reg, domain)
        print(f"{domain}: v{before} -> v{version}"
              + ("; frozen (wesam adapters unfreeze " + domain + " to let the worker publish again)"
                 if state.frozen else ""))
    return 0


# -- adapt ------------------------------------------------------------------------------------------

def cmd_adapt(args: argparse.Namespace) -> int:
    import os

    import torch
    import torch.distributed as dist

    from wesam.adapters.adapt.trainer import AdaptationTrainer, AdaptConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        cfg = AdaptConfig(
            data=args.data, domain=args.domain, model=args.model, checkpoint=args.checkpoint, split=args.split,
            prompt=args.prompt, method=args.method, registry=args.registry, steps=args.steps,
            batch_size=args.batch_size, lr=args.lr, lora_rank=args.lora_rank, lora_targets=tuple(args.lora_targets),
            lora_alpha=args.lora_alpha, seed=args.seed, device=args.device, eval_every=args.eval_every,
            n_points=args.points, ema_decay=args.ema_decay, confidence=args.confidence, pairwise=args.pairwise,
            clip_to_box=args.clip_to_box, clip_margin=args.clip_margin, respect_points=args.respect_points,
            point_radius=args.point_radius, confidence_quantile=args.confidence_quantile,
            box_prior=args.box_prior, point_prior=args.point_prior,
            anchor_kind=args.anchor_kind, anchor_clip=args.anchor_clip, select=args.select,
            grad_checkpointing=args.grad_checkpointing, work_dir=args.work_dir,
            limit=args.limit, skip_bad=args.skip_bad, val_fraction=args.val_fraction)
        trainer = AdaptationTrainer(cfg)
        summary = trainer.run(resume=args.resume, publish=not args.no_publish)
    except (ValueError, RuntimeError) as e:
        if isinstance(e, WesamError):
            raise
        # A configuration the trainer refuses (e.g. a prompt kind the data cannot give).
        raise WesamError(str(e), kind="invalid_argument") from e
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if summary:
        _print_json(summary)
        _write_json(args.json, summary)
    return 0


# -- pretrain ---------------------------------------------------------------------------------------

def cmd_pretrain(args: argparse.Namespace) -> int:
    from wesam.pretrain.trainer import PretrainConfig, Pretrainer, sam_mini_config, ship

    if args.ship_only:
        manifest = ship(args.out, args.ship)
        _print_json({k: manifest[k] for k in ("name", "sha256", "bytes")})
        return 0
    cfg = PretrainConfig(out_dir=args.out, data_root=args.data_root, seed=args.seed, steps=args.steps,
                         time_budget_min=args.time_budget, batch_size=args.batch_size, lr=args.lr,
                         eval_every_min=args.eval_every, threads=args.threads, max_prompts=args.max_prompts,
                         warmup_steps=args.warmup_steps, tight_box_frac=args.tight_box_frac,
                         box_jitter_std=args.box_jitter_std, box_jitter_max_px=args.box_jitter_max_px,
                         inbox_weight=args.inbox_weight, things_only=args.things_only, init_from=args.init_from,
                         synth_prob=args.synthetic_prob, region_prob=args.region_prob, device=args.device,
                         model_config=sam_mini_config(args.decoder_dim))
    if args.synthetic_only:
        cfg.data_root = None
    trainer = Pretrainer(cfg)
    summary = trainer.run(resume=args.resume)
    if args.ship:
        manifest = ship(args.out, args.ship)
        summary["shipped"] = {"path": str(Path(args.ship) / manifest["file"]), "sha256": manifest["sha256"]}
    _print_json(summary)
    return 0


# -- capture ----------------------------------------------------------------------------------------

CAPTURE_STORE_ENV = f"{SERVE_ENV_PREFIX}CAPTURE_STORE"  # the store `wesam serve` captures into


def cmd_capture(args: argparse.Namespace) -> int:
    """Operate on a captured-sample store directly (no server needed)."""
    import os

    from wesam.adapters.online import open_store

    url = args.store or os.environ.get(CAPTURE_STORE_ENV)
    if not url:
        raise WesamError(f"give --store URL (or set ${CAPTURE_STORE_ENV})", kind="invalid_argument")
    code = 0
    with open_store(url, create=False) as store:
        if args.capture_cmd == "stats":
            domains = {}
            for domain in store.domains():
                clients = store.client_counts(domain)
                row: dict[str, Any] = {"samples": sum(clients.values()), "clients": len(clients)}
                if args.clients:
                    row["per_client"] = dict(sorted(clients.items()))
                domains[domain] = row
            out: dict[str, Any] = {"store": store.location, "total": sum(r["samples"] for r in domains.values()),
                                   "domains": domains}
            text = [f"{store.location}: {out['total']} samples"]
            for domain, row in domains.items():
                text.append(f"  {domain:<24} {row['samples']:>8} samples  {row['clients']:>6} clients")
                for client, n in row.get("per_client", {}).items():
                    text.append(f"    {client:<40} {n:>8}")
        elif args.capture_cmd == "delete":
            deleted = [rid for rid in args.request_ids if store.delete(rid)]
            missing = [rid for rid in args.request_ids if rid not in deleted]
            out = {"store": store.location, "deleted": deleted, "missing": missing}
            text = [f"deleted {len(deleted)} samples" + (f"; not found: {', '.join(missing)}" if missing else "")]
            code = 1 if missing else 0
        elif args.capture_cmd == "delete-client":
            n = store.delete_client(args.domain, args.client)
            out = {"store": store.location, "domain": args.domain, "client": args.client, "deleted": n}
            text = [f"deleted {n} samples of {args.client} in {args.domain}"]
        else:  # purge
            if args.max_age_s is None and args.max_per_domain is None:
                raise WesamError("purge needs --max-age-s and/or --max-per-domain", kind="invalid_argument")
            n = store.purge(max_age_s=args.max_age_s, max_per_domain=args.max_per_domain)
            out = {"store": store.location, "removed": n}
            text = [f"removed {n} samples"]
    if args.json:
        _print_json(out)
    else:
        print("\n".join(text))
    return code


# -- bench ------------------------------------------------------------------------------------------

BENCHES = {"source": "wesam.bench.source_model", "source-breakdown": "wesam.bench.source_breakdown",
           "adaptation": "wesam.bench.adaptation", "adaptation-drift": "wesam.bench.adaptation_drift",
           "adaptation-figures": "wesam.bench.adaptation_figures",
           "pseudo-label-prior": "wesam.bench.pseudo_label_prior",
           "serve": "wesam.bench.serve", "load": "wesam.bench.load", "export": "wesam.bench.export_speed",
           "pretrain-curve": "wesam.bench.pretrain_curve", "online": "wesam.bench.online",
           "adapt-vitb": "wesam.bench.adapt_vitb"}


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(BENCHES[args.name])
    return module.main(args.rest)


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
    e.add_argument("--adapter", help="adapter directory, or DOMAIN[@vN] in --registry (newest if no @vN)")
    e.add_argument("--registry", help="adapter registry directory")
    e.add_argument("--split", default="test")
    e.add_argument("--prompt", default="box", choices=["box", "point", "coarse", "coarse-box", "ellipse"],
                   help="weak prompt per instance; ellipse: the tight box's inscribed ellipse as a mask prompt")
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

    a = sub.add_parser("adapters", help="list, inspect, verify and activate adapter versions; control the "
                                        "online worker (pin, freeze, rollback, lineage)")
    a.add_argument("--registry", default="registry", help="adapter registry directory (default ./registry)")
    asub = a.add_subparsers(dest="adapters_cmd", required=True)
    al = asub.add_parser("list")
    al.add_argument("--json", action="store_true")
    ash = asub.add_parser("show")
    ash.add_argument("ref", help="adapter directory or DOMAIN[@vN]")
    av = asub.add_parser("verify", help="re-hash files and check the base model hash")
    av.add_argument("ref")
    av.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    av.add_argument("--checkpoint")
    av.add_argument("--no-base", action="store_true", help="only re-hash the files")
    aa = asub.add_parser("activate", help="route a domain to a version (roll forward or back)")
    aa.add_argument("domain")
    aa.add_argument("version", help="vN")
    # The online worker's controls, in REGISTRY/<domain>/control.json (docs/online.md).
    ap = asub.add_parser("pin", help="anchor the online worker of a domain to a version (it resets to it)")
    ap.add_argument("domain")
    ap.add_argument("version", help="vN")
    aup = asub.add_parser("unpin", help="anchor the worker to the version active when it starts")
    aup.add_argument("domain")
    af = asub.add_parser("freeze", help="stop the worker's rounds and publications for a domain")
    af.add_argument("domain")
    af.add_argument("--reason", help="why (shown by list, lineage and the worker's logs)")
    auf = asub.add_parser("unfreeze", help="let the worker run and publish again")
    auf.add_argument("domain")
    ar = asub.add_parser("rollback", help="activate the active version's lineage parent (else the previous "
                                          "version) and freeze the domain")
    ar.add_argument("domain")
    ar.add_argument("--no-freeze", action="store_true",
                    help="do not freeze: the worker may publish a new version at its next round")
    ar.add_argument("--reason", help="the freeze's reason (default: rolled back from vM to vN)")
    ali = asub.add_parser("lineage", help="the active version's ancestry: parents, samples, gate results")
    ali.add_argument("domain", help="DOMAIN, or DOMAIN@vN to start from vN")
    ali.add_argument("--json", action="store_true")
    for sp in (al, ash, av, aa, ap, aup, af, auf, ar, ali):  # also accept --registry after the subcommand
        sp.add_argument("--registry", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    a.set_defaults(func=cmd_adapters)

    from wesam.adapters.adapt import DEFAULT_LR, DEFAULT_METHOD, METHODS

    d = sub.add_parser("adapt", help="weakly supervised LoRA adaptation to a target domain (WeSAM)")
    d.add_argument("--model", default="sam-mini")
    d.add_argument("--checkpoint", help="weights for an official model (vit_b/l/h)")
    d.add_argument("--data", required=True, help="target-domain dataset folder")
    d.add_argument("--split", default="train", help="adaptation split (a validation part is carved from it)")
    d.add_argument("--prompt", default="box", choices=["box", "point", "coarse", "coarse-box"])
    d.add_argument("--points", type=_parse_points, default=(5, 5), metavar="POS,NEG")
    d.add_argument("--domain", required=True, help="domain name, e.g. polyp")
    d.add_argument("--registry", default="registry", help="adapter registry directory (default ./registry)")
    d.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS)
    d.add_argument("--steps", type=int, default=400)
    d.add_argument("--batch-size", type=int, default=4)
    d.add_argument("--lr", type=float, default=DEFAULT_LR)
    d.add_argument("--lora-rank", type=int, default=4)
    d.add_argument("--lora-alpha", type=float, help="scale = alpha / rank (default: scale 1, as WeSAM)")
    d.add_argument("--lora-targets", nargs="+", default=list(DEFAULT_LORA_TARGETS),
                   choices=list(LORA_TARGET_CHOICES),
                   help="encoder targets (q k v proj mlp1 mlp2) and mask-decoder targets (dec_q dec_k dec_v dec_out); "
                        f"default: {' '.join(DEFAULT_LORA_TARGETS)} (`q v` alone is the encoder-only WeSAM reference); "
                        "an adapter with decoder targets is served with its own decoder")
    d.add_argument("--ema-decay", type=float, help="use an EMA teacher with this decay (ablation)")
    d.add_argument("--confidence", type=float, help="ignore pseudo-label pixels with |logit| below this")
    d.add_argument("--pairwise", action="store_true",
                   help="wesam+ with boxes: add BoxInst's colour-affinity pairwise term")
    d.add_argument("--clip-to-box", action="store_true",
                   help="box prompts: pseudo-label and anchor-label pixels outside the box (dilated by "
                        "--clip-margin) are background")
    d.add_argument("--clip-margin", type=int, default=2, help="box dilation in px at the model's input frame")
    d.add_argument("--box-prior", type=float, metavar="W",
                   help="box prompts: add W * (1 - r^2) of each box's inscribed ellipse to the teacher's and "
                        "anchor's logits before they become labels (a shape prior where the model is unsure)")
    d.add_argument("--point-prior", type=float, metavar="W",
                   help="point prompts: add W * (1 - m^2/4) of the ellipse two standard deviations around each "
                        "instance's positive points (m: Mahalanobis distance) to the teacher's and anchor's logits")
    d.add_argument("--respect-points", action="store_true",
                   help="point prompts: pseudo-labels and anchor labels take each labelled point's label "
                        "in a disk of --point-radius px")
    d.add_argument("--point-radius", type=int, default=2, help="disk radius in px at the model's input frame")
    d.add_argument("--confidence-quantile", type=float, metavar="Q",
                   help="ignore the Q fraction of in-box pixels with the smallest |teacher logit| (per image)")
    d.add_argument("--anchor-kind", default="dice", choices=["dice", "logit", "prob"],
                   help="anchor term: dice against the anchor's hard masks (reference), clamped smooth-L1 on "
                        "logits, or MSE on probabilities")
    d.add_argument("--anchor-clip", type=float, default=4.0, help="logit range of --anchor-kind logit")
    d.add_argument("--select", default="best", choices=["best", "fixed"],
                   help="publish the best state on validation, or the state at exactly --steps")
    d.add_argument("--grad-checkpointing", default="auto", choices=["auto", "on", "off"],
                   help="recompute the image encoder's blocks in the backward pass instead of keeping their "
                        "activations: less memory, one more encoder forward per pass with gradient (auto: on "
                        "for 1024 px models such as vit_b, off for sam-mini)")
    d.add_argument("--eval-every", type=int, default=50, help="steps between validations")
    d.add_argument("--val-fraction", type=float, default=0.12)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu", help="cpu or cuda")
    d.add_argument("--threads", type=int)
    d.add_argument("--work-dir", help="checkpoints (default runs/adapt/<run name>)")
    d.add_argument("--no-resume", dest="resume", action="store_false")
    d.add_argument("--no-publish", action="store_true", help="train and report, but do not publish")
    d.add_argument("--limit", type=int, help="use only the first N images of the split")
    d.add_argument("--skip-bad", action="store_true")
    d.add_argument("--json", help="write the run summary here")
    d.set_defaults(func=cmd_adapt)

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
    t.add_argument("--eval-every", type=float, default=10.0, help="minutes between validations")
    t.add_argument("--max-prompts", type=int, default=8, help="instances prompted per image and step")
    t.add_argument("--warmup-steps", type=int, default=250)
    t.add_argument("--tight-box-frac", type=float, default=0.5,
                   help="share of box prompts given as the exact box (the rest get SAM-scale jitter)")
    t.add_argument("--box-jitter-std", type=float, default=0.05, help="box noise std as a fraction of the side")
    t.add_argument("--box-jitter-max-px", type=float, default=5.0, help="box noise cap in input-frame pixels")
    t.add_argument("--inbox-weight", type=float, default=0.0,
                   help="weight of the balanced object/background loss inside box prompts (0 disables)")
    t.add_argument("--synthetic-prob", type=float, default=0.35,
                   help="share of procedural scenes in a batch (pretrain/synthetic.py)")
    t.add_argument("--region-prob", type=float, default=0.0,
                   help="share of region scenes: random smooth shapes of natural texture laid on natural "
                        "images (pretrain/regions.py); the rest of a batch is natural images")
    t.add_argument("--with-stuff", dest="things_only", action="store_false",
                   help="keep semantic stuff classes (road, sky, ...) as training instances")
    t.add_argument("--decoder-dim", type=int, default=256,
                   help="width of the prompt encoder and mask decoder (SAM: 256; 128 makes steps ~2x cheaper)")
    t.add_argument("--init-from", metavar="MODEL",
                   help="warm start from these weights (zoo name or file) of the same architecture")
    t.add_argument("--threads", type=int)
    t.add_argument("--device", default="cpu",
                   help="train on cpu or cuda[:N] (the data pipeline stays on the CPU); a run may resume "
                        "on another device")
    t.add_argument("--no-resume", dest="resume", action="store_false", help="ignore an existing checkpoint")
    t.add_argument("--ship", metavar="DIR", help="after training, write fp16 weights + manifest to DIR "
                                                 "(models/sam-mini ships the embedded default)")
    t.add_argument("--ship-only", action="store_true", help="only ship the best weights of --out to --ship")
    t.set_defaults(func=cmd_pretrain)
    c = sub.add_parser("capture", help="inspect and delete captured samples, apply retention (no server needed)",
                       description="Work directly on a captured-sample store (docs/online.md). While a server "
                                   "captures, prefer its admin API for deletions: it also cancels samples still "
                                   "queued in the server.")
    csub = c.add_subparsers(dest="capture_cmd", required=True)
    cs = csub.add_parser("stats", help="samples and clients per domain")
    cs.add_argument("--clients", action="store_true", help="also list the number of samples of every client")
    cd = csub.add_parser("delete", help="delete the samples of these request ids (exit 1 if one is not found)")
    cd.add_argument("request_ids", nargs="+", metavar="REQUEST_ID")
    cc = csub.add_parser("delete-client", help="delete every sample of a client in a domain")
    cc.add_argument("domain")
    cc.add_argument("client")
    cp = csub.add_parser("purge", help="apply retention: drop samples older than --max-age-s, then each "
                                       "domain's oldest beyond --max-per-domain")
    cp.add_argument("--max-age-s", type=float, metavar="SECONDS")
    cp.add_argument("--max-per-domain", type=int, metavar="N")
    for sp in (cs, cd, cc, cp):
        sp.add_argument("--store", metavar="URL", help=f"SQLite path, sqlite:///abs/path.db or "
                                                       f"redis://host:port/db (default: ${CAPTURE_STORE_ENV})")
        sp.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=cmd_capture)

    from wesam.export.cli import add_export_parser
    from wesam.service.cli import add_serve_parser

    add_export_parser(sub)
    add_serve_parser(sub)

    from wesam.adapters.online.cli import add_worker_parser

    add_worker_parser(sub)

    b = sub.add_parser("bench", help="benchmarks; each writes JSON and updates bench/RESULTS.md",
                       description="wesam bench NAME [options]; `wesam bench NAME --help` lists the options")
    b.add_argument("name", choices=sorted(BENCHES))
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except WesamError as e:
        print(f"\n{e}" if e.kind == "interrupted" else f"error: {e}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_CODES["interrupted"]


if __name__ == "__main__":
    sys.exit(main())
