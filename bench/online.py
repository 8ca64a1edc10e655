"""`wesam bench online`: the online worker on replayed Kvasir-SEG traffic, clean and poisoned.

A real `wesam serve` runs with capture on for two domains that both start at the base model
(``v1``: a zero LoRA, identical to the base). The Kvasir-SEG *train* images are replayed as live
traffic, with each image's tight ground-truth boxes as prompts from eight clients, in ``--rounds``
chunks; after each chunk the domain's worker (:class:`~wesam.adapters.online.worker.OnlineWorker`)
runs one round, and the active adapter's Kvasir-SEG *test* mIoU (tight-box prompts, as
``wesam eval``) is measured. Both domains have a golden set: ``--golden`` Kvasir train images that
the replay never sends.

* ``polyp``: the clean stream.
* ``polyp-poisoned``: the same stream plus ``--poison`` (default 30 %) of all traffic from one
  client, cycling through whole-image boxes on Kvasir images, flipped point labels (points on the
  polyp labelled background, points off it labelled foreground) and unrelated COCO images with
  boxes on their objects.

Usage:
    wesam bench online                                             # 400 images, 8 rounds, sam-mini
    wesam bench online --images 16 --rounds 2 --golden 6 --test-images 12 --steps-per-round 3 \\
        --json /tmp/online-smoke.json --no-results                 # a smoke run (minutes on a CPU)
"""

from __future__ import annotations

import argparse
import base64
import json
import pathlib
import random
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

DOMAINS = ("polyp", "polyp-poisoned")
POISON_CLIENT = "mallory"
POISON_KINDS = ("whole_image_box", "flipped_points", "unrelated_image")


def _b64(path: str) -> str:
    return base64.b64encode(pathlib.Path(path).read_bytes()).decode("ascii")


def _publish_identity(model: Any, registry: pathlib.Path, domain: str, rank: int) -> None:
    """v1 of ``domain``: a zero LoRA (B = 0), i.e. exactly the base model, so the domain exists."""
    from wesam.adapters.artifact import save_adapter
    from wesam.adapters.lora import LoraConfig, add_adapter, delete_adapter
    from wesam.adapters.registry import Registry

    add_adapter(model.sam, "identity", LoraConfig(rank=rank))
    reg = Registry(registry)
    with reg.staging(domain) as staged:
        save_adapter(staged, model, "identity", domain=domain,
                     extra={"method": "identity", "note": "zero LoRA: the base model (wesam bench online)"})
    reg.publish(staged, domain, activate=True)
    delete_adapter(model.sam, "identity")


def _write_golden(samples: list[Any], registry: pathlib.Path, domain: str) -> None:
    """REGISTRY/<domain>/golden in the folder layout, copied from the dataset's files."""
    root = registry / domain / "golden"
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for s in samples:
        shutil.copy(s.image_path, root / "images" / pathlib.Path(s.image_path).name)
        shutil.copy(s.mask_path, root / "masks" / pathlib.Path(s.mask_path).name)
    (root / "split.json").write_text(json.dumps({"train": [s.stem for s in samples]}))


def _poison_request(kind: str, honest: Any, unrelated: Any, rng: np.random.Generator) -> dict[str, Any]:
    """One poisoned /segment body (without domain)."""
    from wesam.data.weak import boxes_from_masks, sample_points

    if kind == "whole_image_box":
        h, w = honest.image.shape[:2]
        return {"image": _b64(honest.image_path), "boxes": [[0, 0, w - 1, h - 1]]}
    if kind == "flipped_points":
        coords, labels = sample_points(honest.instances[0], 3, 3, rng)
        keep = labels >= 0
        return {"image": _b64(honest.image_path), "points": coords[keep].tolist(),
                "point_labels": (1 - labels[keep]).tolist()}
    largest = int(np.argmax(unrelated.instances.sum(axis=(1, 2))))
    boxes = boxes_from_masks(unrelated.instances[largest:largest + 1])
    return {"image": _b64(unrelated.image_path), "boxes": boxes.tolist()}


class _Evaluator:
    """Kvasir test mIoU (tight-box prompts) of a domain's active adapter, in this process."""

    def __init__(self, model: Any, registry: pathlib.Path, test: list[Any], device: str) -> None:
        from wesam.adapters.registry import Registry

        self.model = model
        self.registry = Registry(registry)
        self.test = test
        self.device = device

    def __call__(self, domain: str) -> float:
        from wesam.adapters.artifact import attach_adapter
        from wesam.adapters.lora import delete_adapter, set_adapter
        from wesam.adapters.ref import AdapterRef
        from wesam.evaluation.evaluate import PromptSpec, evaluate
        from wesam.sam.predictor import SamPredictorCore

        version = self.registry.active_version(domain)
        name = attach_adapter(self.model, self.registry.resolve(AdapterRef(domain, version)), "measured")
        set_adapter(self.model.sam, name)
        try:
            return float(evaluate(SamPredictorCore(self.model.sam, self.device), self.test, PromptSpec("box"))["miou"])
        finally:
            set_adapter(self.model.sam, None)
            delete_adapter(self.model.sam, name)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import torch

    from wesam.adapters.online import open_store
    from wesam.adapters.online.worker import OnlineWorker, WorkerConfig
    from wesam.data import open_dataset
    from wesam.data.weak import boxes_from_masks
    from wesam.sam.zoo import resolve_model
    from wesam.service.config import ServeConfig
    from wesam.service.launch import ServerProcess

    if args.threads:
        torch.set_num_threads(args.threads)
    data = pathlib.Path(args.data_root)
    train = open_dataset(data / "kvasir_seg", "train")
    test_ds = open_dataset(data / "kvasir_seg", "test")
    coco = open_dataset(data / "coco128_seg", "train", skip_bad=True)
    order = list(range(len(train)))
    random.Random(args.seed).shuffle(order)
    if args.golden + args.images > len(order):
        raise ValueError(f"--golden {args.golden} + --images {args.images} > {len(order)} Kvasir train images")
    golden = [train[i] for i in order[:args.golden]]
    replay = [train[i] for i in order[args.golden:args.golden + args.images]]  # disjoint from the golden set
    n_test = min(args.test_images or len(test_ds), len(test_ds))
    test = [test_ds[i] for i in range(n_test)]
    unrelated = [coco[i] for i in range(min(len(coco), 32))]

    work = pathlib.Path(args.work_dir or tempfile.mkdtemp(prefix="wesam-bench-online-")).resolve()
    registry, db = work / "registry", work / "samples.db"
    base = resolve_model(args.model, args.checkpoint)
    for domain in DOMAINS:
        _publish_identity(base, registry, domain, args.lora_rank)
        _write_golden(golden, registry, domain)
    model_ref = str(pathlib.Path(args.model).resolve()) if pathlib.Path(args.model).is_file() else args.model
    config = ServeConfig(model=model_ref, checkpoint=args.checkpoint, registry=str(registry), device=args.device,
                         threads=args.threads, grpc_port=None, poll_seconds=1.0, capture_store=str(db),
                         capture_domains=DOMAINS, capture_rate=1.0, capture_domain_cap=0, capture_client_cap=0,
                         capture_queue=512, capture_format="jpeg")
    evaluate = _Evaluator(resolve_model(args.model, args.checkpoint), registry, test, args.device)
    chunks = np.array_split(np.arange(len(replay)), args.rounds)
    rng = np.random.default_rng(args.seed)
    result: dict[str, Any] = {"model": base.name, "model_sha256": base.sha256, "images": len(replay),
                              "rounds": args.rounds, "golden": len(golden), "test_images": n_test,
                              "poison_fraction": args.poison, "steps_per_round": args.steps_per_round,
                              "batch_size": args.batch_size, "clients": args.clients, "device": args.device,
                              "torch_threads": torch.get_num_threads(), "work_dir": str(work)}
    print(f"starting the server ({work})", file=sys.stderr)
    server = ServerProcess(config, extra_env={"OMP_NUM_THREADS": str(args.threads or 1)})
    try:
        server.start(timeout=args.start_timeout)
        with httpx.Client(base_url=server.url, timeout=300) as client, open_store(str(db)) as store:
            for domain in DOMAINS:
                poisoned = domain != "polyp"
                wcfg = WorkerConfig(domain=domain, registry=str(registry), model=model_ref, checkpoint=args.checkpoint,
                                    device=args.device, min_samples=1, min_train=min(4, args.batch_size),
                                    steps_per_round=args.steps_per_round, batch_size=args.batch_size,
                                    seed=args.seed, progress=not args.no_progress, interval=0.0)
                curve: list[dict[str, Any]] = []
                start = evaluate(domain)
                print(f"{domain}: start test mIoU {start:.4f}", file=sys.stderr)
                sent = 0
                with OnlineWorker(wcfg, store, base=resolve_model(args.model, args.checkpoint),
                                  report=lambda r: None) as worker:
                    for r, chunk in enumerate(chunks, start=1):
                        bodies: list[tuple[str, dict[str, Any]]] = []
                        for k in chunk:
                            s = replay[int(k)]
                            body = {"image": _b64(s.image_path), "boxes": boxes_from_masks(s.instances).tolist()}
                            bodies.append((f"client-{int(k) % args.clients}", body))
                        if poisoned:
                            n_poison = int(round(len(chunk) * args.poison / (1.0 - args.poison)))
                            for j in range(n_poison):
                                kind = POISON_KINDS[(sent + j) % len(POISON_KINDS)]
                                body = _poison_request(kind, replay[int(rng.choice(chunk))],
                                                       unrelated[int(rng.integers(len(unrelated)))], rng)
                                bodies.append((POISON_CLIENT, body))
                            random.Random(args.seed + r).shuffle(bodies)
                        for j, (who, body) in enumerate(bodies):
                            rid = f"{domain}-r{r}-{j}"
                            resp = client.post("/segment", json={**body, "domain": domain},
                                               headers={"X-Request-Id": rid, "X-Wesam-Client": who})
                            if resp.status_code != 200:
                                raise RuntimeError(f"/segment answered {resp.status_code}: {resp.text[:300]}")
                        sent += len(bodies)
                        deadline = time.monotonic() + 60
                        while store.count(domain) < sent and time.monotonic() < deadline:
                            time.sleep(0.2)  # the capture thread writes off the request path
                        stored = store.count(domain)
                        rep = worker.run_round()
                        miou = evaluate(domain)
                        gate = rep.get("gate") or {}
                        row = {"round": r, "requests": len(bodies), "stored": stored, "outcome": rep["outcome"],
                               "active": worker.registry.active_version(domain), "test_miou": round(miou, 4),
                               "golden_delta": gate.get("golden_delta"), "failed_checks": gate.get("failed"),
                               "samples": rep.get("samples"), "loss": rep.get("loss"), "drift": rep.get("drift"),
                               "seconds": rep.get("seconds")}
                        curve.append(row)
                        print(f"{domain} round {r}: {rep['outcome']}, active v{row['active']}, test mIoU "
                              f"{miou:.4f}, samples {rep.get('samples')}", file=sys.stderr)
                mious = [row["test_miou"] for row in curve]
                key = "poisoned" if poisoned else "clean"
                result[key] = {"domain": domain, "start_miou": round(start, 4), "final_miou": mious[-1],
                               "worst_miou": min(mious), "best_miou": max(mious),
                               "published": sum(row["outcome"] == "published" for row in curve), "curve": curve}
    finally:
        server.cleanup()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    result["start_miou"] = result["clean"]["start_miou"]
    result["final_miou"] = result["clean"]["final_miou"]
    result["poisoned_start_miou"] = result["poisoned"]["start_miou"]
    result["poisoned_worst_miou"] = result["poisoned"]["worst_miou"]
    result["poisoned_final_miou"] = result["poisoned"]["final_miou"]
    from wesam.bench.results import machine

    result["machine"] = machine()
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"### Online self-training ({result['model']}, Kvasir-SEG replay)",
        "",
        f"`wesam bench online` on {result['machine']}: {result['images']} Kvasir-SEG train images replayed "
        f"through `wesam serve` (tight-box prompts, {result['clients']} clients) in {result['rounds']} rounds of "
        f"{result['steps_per_round']} steps (batch {result['batch_size']}); golden set {result['golden']} other "
        f"train images; test mIoU on {result['test_images']} Kvasir-SEG test images (tight boxes). Poisoned: "
        f"{result['poison_fraction']:.0%} of the traffic from one client (whole-image boxes, flipped point "
        f"labels, COCO images).",
        "",
        "| stream | start mIoU | final mIoU | worst mIoU | versions published |",
        "|---|---:|---:|---:|---:|",
    ]
    for key in ("clean", "poisoned"):
        r = result[key]
        lines.append(f"| {key} | {r['start_miou']:.4f} | {r['final_miou']:.4f} | {r['worst_miou']:.4f} | "
                     f"{r['published']} |")
    lines += ["", "| stream | round | outcome | active | test mIoU | golden delta |", "|---|---:|---|---:|---:|---:|"]
    for key in ("clean", "poisoned"):
        for row in result[key]["curve"]:
            delta = row["golden_delta"]
            lines.append(f"| {key} | {row['round']} | {row['outcome']} | v{row['active']} | {row['test_miou']:.4f} | "
                         + ("-" if delta is None else f"{delta:+.4f}") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wesam bench online", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="../shared/data", help="folder with kvasir_seg and coco128_seg")
    p.add_argument("--model", default="sam-mini")
    p.add_argument("--checkpoint", help="weights for an official model (vit_b/l/h)")
    p.add_argument("--images", type=int, default=400, help="Kvasir train images replayed (default 400)")
    p.add_argument("--rounds", type=int, default=8, help="chunks of the replay; one worker round after each")
    p.add_argument("--golden", type=int, default=20, help="Kvasir train images in the golden set (not replayed)")
    p.add_argument("--test-images", type=int, default=0, help="Kvasir test images measured (default: all 120)")
    p.add_argument("--poison", type=float, default=0.3, help="share of the poisoned stream from the poisoner")
    p.add_argument("--clients", type=int, default=8, help="honest clients")
    p.add_argument("--steps-per-round", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=4, help="rank of the starting (zero) adapter")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads for the worker, the evaluation and the server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", help="keep the registry and the store here (default: a temporary folder)")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", default="bench/online.json", help="write the results here (default bench/online.json)")
    p.add_argument("--no-results", action="store_true", help="do not update bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.images < args.rounds or args.rounds < 1 or args.golden < 1 or not 0 <= args.poison < 1:
        p.error("need --images >= --rounds >= 1, --golden >= 1 and 0 <= --poison < 1")

    from wesam.errors import WesamError

    try:
        result = run(args)
    except (WesamError, RuntimeError, TimeoutError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from wesam.bench.results import report

    report("online", markdown(result), result, args.json, update_results=not args.no_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
