"""``wesam export ...``: merged weights, ONNX graphs, parity check, TensorRT engines, Triton repository.

Wire into the main parser with ``add_export_parser(sub)``; standalone: ``python -m wesam.export.cli``.
Every handler returns an exit code: 0 success, 1 a check that ran and failed, 2 a user error
(printed as ``error: ...`` on stderr). Results are JSON on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import DEFAULT_MIN_IOU, DEFAULT_OPSET

DEFAULT_MODEL = "sam-mini"
DESCRIPTION = """Export a model (optionally with LoRA adapters) for deployment:

  merged    one safetensors file, adapter merged (loads in wesam and segment_anything)
  onnx      encoder graph per domain + a shared prompt-encoder/mask-decoder graph, and a
            decoder graph of its own for each adapter with mask-decoder LoRA targets
  check     ONNX Runtime vs PyTorch parity on generated images and prompts
  tensorrt  TensorRT engines from an ONNX export (needs TensorRT and an NVIDIA GPU)
  triton    Triton model repository from an ONNX export

See docs/export.md for graph signatures and layouts."""


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the errors a user can fix (bad model, adapter, directory, hash) into exit code 2."""

    def run(args: argparse.Namespace) -> int:
        from .common import USER_ERRORS

        try:
            return func(args)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    run.__name__ = func.__name__
    run.__doc__ = func.__doc__
    return run


# -- handlers ---------------------------------------------------------------------------------------

@_guarded
def cmd_merged(args: argparse.Namespace) -> int:
    from .common import load_model, open_adapter
    from .merged import export_merged

    art = open_adapter(args.adapter, args.registry)
    model = load_model(args.model, args.checkpoint)
    manifest = export_merged(model, art, args.out, dtype=args.dtype, filename=args.filename)
    _print_json({"file": str(Path(args.out) / manifest["file"]), "sha256": manifest["sha256"],
                 "name": manifest["name"], "dtype": manifest["dtype"], "base_model": manifest["base_model"],
                 "adapter": manifest["adapter"]["ref"], "manifest": str(Path(args.out) / "merged.json")})
    return 0


@_guarded
def cmd_onnx(args: argparse.Namespace) -> int:
    from .bundle import export_onnx, graph_files
    from .common import load_model, open_adapter

    arts = [open_adapter(ref, args.registry) for ref in args.adapter or []]
    model = load_model(args.model, args.checkpoint)
    bundle = export_onnx(model, arts, args.out, include_base=not args.no_base, opset=args.opset,
                         simplify=not args.no_simplify)
    m = bundle.manifest
    summary = {"dir": str(bundle.root), "domains": bundle.domains, "opset": m["opset"],
               "base_model": {k: m["base_model"][k] for k in ("name", "sha256")},
               "adapters": {d: e["adapter"]["ref"] for d, e in m["encoders"].items() if e["adapter"]},
               "files": sorted(graph_files(m))}
    if bundle.decoders:  # only then: the output for encoder-only adapters stays as it was
        summary["decoders"] = {d: g["file"] for d, g in bundle.decoders.items()}
    _print_json(summary)
    return 0


@_guarded
def cmd_check(args: argparse.Namespace) -> int:
    from .bundle import read_export
    from .check import check_export, load_reference_model

    bundle = read_export(args.dir)
    model = load_reference_model(bundle, args.model, args.checkpoint)
    report = check_export(bundle, model, domains=args.domain, min_iou=args.min_iou, seed=args.seed,
                          threads=args.threads)
    if args.json:
        from .common import write_json

        write_json(Path(args.json), report)
    shown = report if args.cases else {k: v for k, v in report.items() if k != "cases"}
    _print_json(shown)
    return 0 if report["ok"] else 1


@_guarded
def cmd_tensorrt(args: argparse.Namespace) -> int:
    from .bundle import read_export
    from .tensorrt import ProfileLimits, build_engines

    bundle = read_export(args.dir)
    limits = ProfileLimits(max_batch=args.max_batch, max_prompts=args.max_prompts, max_points=args.max_points,
                           max_image_side=args.max_image_side)
    out = args.out or str(Path(args.dir) / "tensorrt")
    manifest = build_engines(bundle, out, domains=args.domain, precision=args.precision, limits=limits,
                             workspace_gib=args.workspace_gib)
    _print_json({"dir": out, "device": manifest["device"], "tensorrt_version": manifest["tensorrt_version"],
                 "engines": {k: {"file": v["file"], "precision": v["precision"]} for k, v in manifest["engines"].items()}})
    return 0


@_guarded
def cmd_triton(args: argparse.Namespace) -> int:
    from .bundle import read_export
    from .triton import build_repository

    bundle = read_export(args.dir)
    manifest = build_repository(bundle, args.out, domains=args.domain, max_batch_size=args.max_batch,
                                queue_delay_us=args.queue_delay_us, instance_kind=args.instance_kind,
                                encoder_instances=args.encoder_instances, decoder_instances=args.decoder_instances)
    _print_json({"repository": args.out, "models": manifest["models"], "domains": manifest["domains"]})
    return 0


# -- parser -----------------------------------------------------------------------------------------

def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_model(p: argparse.ArgumentParser, help_default: str) -> None:
    p.add_argument("--model", default=None if help_default == "recorded" else DEFAULT_MODEL,
                   help=f"zoo name or weights file (default: {help_default})")
    p.add_argument("--checkpoint", help="weights for an official model (vit_b/l/h)")


def add_export_parser(subparsers: "argparse._SubParsersAction") -> None:
    """Register ``export`` and its subcommands on a ``parser.add_subparsers(...)`` object."""
    e = subparsers.add_parser("export", help="export merged weights, ONNX, TensorRT engines, a Triton repository",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    esub = e.add_subparsers(dest="export_cmd", required=True, metavar="{merged,onnx,check,tensorrt,triton}")

    m = esub.add_parser("merged", help="one safetensors file with a LoRA adapter merged into the model")
    _add_model(m, DEFAULT_MODEL)
    m.add_argument("--adapter", required=True, help="adapter directory, or DOMAIN[@vN] in --registry")
    m.add_argument("--registry", help="adapter registry directory")
    m.add_argument("--out", required=True, help="output directory (weights file + merged.json)")
    m.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="stored dtype (default fp32)")
    m.add_argument("--filename", help="weights file name (default <model>_<domain>_v<N>.safetensors)")
    m.set_defaults(func=cmd_merged)

    o = esub.add_parser("onnx", help="encoder graph per domain + prompt/mask decoder graph(s): a shared one, "
                                     "and its own for each adapter that adapts the mask decoder")
    _add_model(o, DEFAULT_MODEL)
    o.add_argument("--adapter", action="append", metavar="REF",
                   help="adapter directory or DOMAIN[@vN] (repeat for several domains)")
    o.add_argument("--registry", help="adapter registry directory")
    o.add_argument("--out", required=True, help="export directory (replaced atomically if it is an export)")
    o.add_argument("--no-base", action="store_true", help="do not export the base encoder (domain 'base')")
    o.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    o.add_argument("--no-simplify", action="store_true", help="skip onnxslim simplification")
    o.set_defaults(func=cmd_onnx)

    c = esub.add_parser("check", help="ONNX Runtime vs PyTorch on generated images and prompts")
    c.add_argument("dir", help="ONNX export directory")
    _add_model(c, "recorded")
    c.add_argument("--domain", action="append", help="check only this domain (repeatable; default all)")
    c.add_argument("--min-iou", type=float, default=DEFAULT_MIN_IOU,
                   help=f"required mask IoU per case (default {DEFAULT_MIN_IOU})")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=_positive, help="CPU threads for PyTorch and ONNX Runtime")
    c.add_argument("--cases", action="store_true", help="print every case (failing cases are always printed)")
    c.add_argument("--json", help="also write the full report (with cases) here")
    c.set_defaults(func=cmd_check)

    t = esub.add_parser("tensorrt", help="TensorRT engines from an ONNX export (NVIDIA GPU + TensorRT)")
    t.add_argument("dir", help="ONNX export directory")
    t.add_argument("--out", help="engine directory (default DIR/tensorrt)")
    t.add_argument("--domain", action="append",
                   help="build only this domain's encoder, and its own decoder if its adapter adapts the mask "
                        "decoder (repeatable; the shared decoder is always built)")
    t.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    t.add_argument("--max-batch", type=_positive, default=8, help="largest encoder batch (default 8)")
    t.add_argument("--max-prompts", type=_positive, default=64, help="largest N prompts per decoder call")
    t.add_argument("--max-points", type=_positive, default=8,
                   help="largest K tokens per prompt, box corners and padding included (default 8)")
    t.add_argument("--max-image-side", type=_positive, default=4096, help="largest original image side")
    t.add_argument("--workspace-gib", type=float, default=4.0, help="builder workspace (default 4 GiB)")
    t.set_defaults(func=cmd_tensorrt)

    r = esub.add_parser("triton", help="Triton model repository (encoders, decoders, ensembles)")
    r.add_argument("dir", help="ONNX export directory")
    r.add_argument("--out", required=True, help="repository directory (replaced atomically if it is one)")
    r.add_argument("--domain", action="append", help="include only this domain (repeatable; default all)")
    r.add_argument("--max-batch", type=_positive, default=8, help="encoder max_batch_size (default 8)")
    r.add_argument("--queue-delay-us", type=int, default=2000,
                   help="encoder dynamic batching max_queue_delay_microseconds (default 2000)")
    r.add_argument("--instance-kind", default="auto", choices=["auto", "gpu", "cpu"],
                   help="instance_group kind (default auto: GPU when the server has one)")
    r.add_argument("--encoder-instances", type=_positive, default=1)
    r.add_argument("--decoder-instances", type=_positive, default=2)
    r.set_defaults(func=cmd_triton)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m wesam.export.cli export onnx ...``."""
    parser = argparse.ArgumentParser(prog="wesam")
    sub = parser.add_subparsers(dest="command", required=True)
    add_export_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
