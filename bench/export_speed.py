"""ONNX Runtime (CPU) vs PyTorch eager, side by side, for SAM's encoder and decoder graphs.

Both backends run the *same* computation: PyTorch runs ``export.onnx_graphs.EncoderGraph`` /
``DecoderGraph`` (the modules that are traced for export) eagerly, ONNX Runtime runs the exported
graphs, on identical inputs, with the same number of CPU threads. The decoder is timed for a
few prompt counts N (box prompts) with masks upscaled to a 3:4 image of the model's input size.

Usage:
    wesam bench export                                 # sam-mini, exports to a temp dir
    wesam bench export --model vit_b --checkpoint sam_vit_b_01ec64.pth --json out.json
    wesam bench export --onnx exports/sam-mini   # reuse an export (its base encoder)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

# Runnable as a plain script from anywhere: make the repo root importable.
import numpy as np
import torch

from wesam.export.errors import ExportError


def _time(fn: Callable[[], Any], iters: int, warmup: int) -> dict[str, float]:
    """Median and mean wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": statistics.median(samples), "mean_ms": statistics.fmean(samples),
            "min_ms": min(samples)}


def _row(torch_t: dict[str, float], ort_t: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {**extra, "torch": torch_t, "onnxruntime": ort_t,
            "speedup": torch_t["median_ms"] / max(ort_t["median_ms"], 1e-9)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    from wesam.export.bundle import BASE_DOMAIN, export_onnx, read_export
    from wesam.export.common import load_model
    from wesam.export.onnx_graphs import DecoderGraph, EncoderGraph
    from wesam.export.prompts import decoder_feeds
    from wesam.export.runtime import make_session
    from wesam.sam.predictor import Prompts

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    model = load_model(args.model, args.checkpoint)
    with tempfile.TemporaryDirectory(prefix="wesam-bench-") as tmp:
        if args.onnx:
            bundle = read_export(args.onnx)
            if bundle.base_model.get("sha256") != model.sha256:
                raise ExportError(f"{args.onnx} was exported from another model than {args.model}")
        else:
            bundle = export_onnx(model, [], pathlib.Path(tmp) / "onnx", simplify=not args.no_simplify)
        domain = BASE_DOMAIN if BASE_DOMAIN in bundle.domains else bundle.domains[0]
        enc_sess = make_session(bundle.encoder_path(domain), threads=threads)
        dec_sess = make_session(bundle.decoder_path, threads=threads)

        s = model.config.img_size
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.batch, 3, s, s)).astype(np.float32)
        enc = EncoderGraph(model.sam).eval()
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            emb = enc(xt[:1]).numpy()
            encoder = _row(_time(lambda: enc(xt), args.iters, args.warmup),
                           _time(lambda: enc_sess.run(None, {"image": x}), args.iters, args.warmup),
                           batch=args.batch)
            print(f"encoder  batch {args.batch}: torch {encoder['torch']['median_ms']:9.2f} ms   "
                  f"onnxruntime {encoder['onnxruntime']['median_ms']:9.2f} ms   "
                  f"speedup x{encoder['speedup']:.2f}", file=sys.stderr)

            dec = DecoderGraph(model.sam).eval()
            size = (s * 3 // 4, s)
            decoder = []
            for n in args.prompts:
                corners = np.sort(rng.uniform(0, [size[1], size[0]], (n, 2, 2)), axis=1).astype(np.float32)
                feeds = decoder_feeds(emb, Prompts(boxes=corners.reshape(n, 4)), size, s, model.config.low_res_size)
                tfeeds = [torch.from_numpy(np.asarray(feeds[k])) for k in
                          ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input",
                           "orig_im_size")]
                row = _row(_time(lambda: dec(*tfeeds), args.iters, args.warmup),
                           _time(lambda: dec_sess.run(None, feeds), args.iters, args.warmup),
                           prompts=n, image=list(size))
                decoder.append(row)
                print(f"decoder  {n:3d} prompts: torch {row['torch']['median_ms']:9.2f} ms   "
                      f"onnxruntime {row['onnxruntime']['median_ms']:9.2f} ms   speedup x{row['speedup']:.2f}",
                      file=sys.stderr)
    return {
        "model": model.name, "sha256": model.sha256, "img_size": s, "threads": threads,
        "iters": args.iters, "warmup": args.warmup, "torch_version": torch.__version__,
        "onnxruntime_version": ort.__version__, "providers": enc_sess.get_providers(),
        "encoder": encoder, "decoder": decoder,
    }


def _prompt_counts(text: str) -> list[int]:
    try:
        counts = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("--prompts takes comma-separated counts, e.g. 1,16,64") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("prompt counts must be >= 1")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sam-mini", help="zoo name or weights file (default sam-mini)")
    p.add_argument("--checkpoint", help="weights for an official model (vit_b/l/h)")
    p.add_argument("--onnx", help="existing export directory of --model (default: export to a temp dir)")
    p.add_argument("--batch", type=int, default=1, help="encoder batch size (default 1)")
    p.add_argument("--prompts", type=_prompt_counts, default=[1, 16, 64], help="decoder prompt counts")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="CPU threads for both backends (default: PyTorch's)")
    p.add_argument("--no-simplify", action="store_true", help="export without onnxslim")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--no-results", action="store_true", help="do not update bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.iters < 1 or args.batch < 1 or args.warmup < 0:
        p.error("--iters and --batch must be >= 1, --warmup >= 0")

    from wesam.adapters.artifact import AdapterError
    from wesam.sam.zoo import ModelLoadError

    try:
        result = run(args)
    except (ExportError, ModelLoadError, AdapterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(text + "\n")
    print(text)
    if not args.no_results:
        from wesam.bench.results import write_section

        write_section("export", to_markdown(result, "wesam bench export " + " ".join(argv or sys.argv[1:])))
    return 0


def to_markdown(res: dict[str, Any], command: str) -> str:
    from wesam.bench.results import machine

    lines = ["## Export: ONNX Runtime (CPU) vs PyTorch eager", "",
             f"Model `{res['model']}` ({res['img_size']} px), {res['threads']} threads, median of {res['iters']} "
             f"runs after {res['warmup']} warm-up, torch {res['torch_version']}, onnxruntime "
             f"{res['onnxruntime_version']}; measured on {machine()} with `{command}`. Speed-up = PyTorch time / "
             "ONNX Runtime time, both measured in this run.", "",
             "| graph | PyTorch ms | ONNX Runtime ms | speed-up |", "|---|---|---|---|"]
    enc = res["encoder"]
    lines.append(f"| encoder, batch {enc['batch']} | {enc['torch']['median_ms']:.2f} | "
                 f"{enc['onnxruntime']['median_ms']:.2f} | x{enc['speedup']:.2f} |")
    for row in res["decoder"]:
        lines.append(f"| decoder, {row['prompts']} prompts | {row['torch']['median_ms']:.2f} | "
                     f"{row['onnxruntime']['median_ms']:.2f} | x{row['speedup']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
