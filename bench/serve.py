"""The HTTP service against the in-process predictor, side by side, in one run.

Measures on one model (``sam-mini`` unless ``--model``):

* full request (new image, one box): p50/p95 latency and sequential throughput of the service
  (the encoded file in a multipart upload, COCO RLE out, as ``wesam.client.Client`` sends and reads
  them; through BentoML's front and model-runtime processes) against ``SamPredictorCore.predict`` on
  the decoded array in this process -> overhead ratio (``--runtime onnx``: against the ONNX Runtime
  predictor of the same exported graphs, so the ratio stays the cost of serving);
* prompt-only request on a cached embedding (``image_id``) against the full request -> speed-up;
* the same full request over the KServe-v2 gRPC endpoint (``wesam.client.GrpcClient``, the JPEG file
  as a BYTES tensor, masks back as a UINT8 tensor) -> its overhead ratio, reported the same way
  (``--no-grpc`` skips it);
* throughput with 1 and with N concurrent clients (``--concurrency``, default 8), new images each,
  so the encoder runs every time and the adaptive batcher can merge requests; the 8-client
  throughput is also compared with the in-process predictor's sequential throughput.

Images are generated (smooth random colour fields, ``--image-size``) and sent as JPEG files
(``--format``); they are encoded before timing. The clients never retry (``max_retries=0``: a refusal
fails the run instead of hiding in a latency) and never decode the masks they are not shown.
The server gets the same torch thread count as the in-process predictor (``--threads``).

Usage:
    wesam bench serve                                  # sam-mini, starts its own server
    wesam bench serve --model path/to/model.safetensors --requests 10 --json out.json --no-results
    wesam bench serve --url http://127.0.0.1:3000      # an already running server of --model
"""

from __future__ import annotations

import argparse
import io
import pathlib
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np


def _percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q)) if samples else float("nan")


def _summary(latencies_ms: list[float], wall_s: float) -> dict[str, float]:
    return {"p50_ms": _percentile(latencies_ms, 50), "p95_ms": _percentile(latencies_ms, 95),
            "mean_ms": statistics.fmean(latencies_ms), "throughput_rps": len(latencies_ms) / wall_s,
            "requests": len(latencies_ms)}


def _timed(fn: Callable[[int], Any], n: int, warmup: int) -> dict[str, float]:
    for i in range(warmup):
        fn(-1 - i)
    samples = []
    t_all = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - t0) * 1000)
    return _summary(samples, time.perf_counter() - t_all)


def _images(count: int, size: tuple[int, int], seed: int) -> list[np.ndarray]:
    """Photo-like images: smooth random colour fields with a little noise (pure noise would make
    every PNG/JPEG incompressible and inflate decode and transfer costs)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (max(h // 32, 2), max(w // 32, 2), 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), dtype=np.int16)
        out.append(np.clip(smooth + rng.integers(-8, 9, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    """The image file a client would send (JPEG at quality 90, or PNG)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
    return buf.getvalue()


def _box(size: tuple[int, int]) -> list[float]:
    h, w = size
    return [w * 0.25, h * 0.25, w * 0.75, h * 0.75]


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from wesam.client import Client
    from wesam.sam.predictor import Prompts, SamPredictorCore
    from wesam.sam.zoo import resolve_model
    from wesam.service.config import ServeConfig
    from wesam.service.launch import ServerProcess, free_port

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    model = resolve_model(args.model, args.checkpoint)
    size = args.image_size
    n, warm, conc = args.requests, args.warmup, args.concurrency
    # Fresh images for every measured request of every phase: a repeated image would hit the cache.
    # in-process, full, cached (1), gRPC, one client, `conc` clients
    # + capture off / on, interleaved (2 n + 2 warm)
    pool = _images(6 * n + 5 * warm + 1 + conc * _per_client(n, conc), size, args.seed)
    payloads = [_encoded(im, args.format) for im in pool]
    box = _box(size)
    cursor = iter(range(len(pool)))

    onnx_cache = None
    if args.runtime == "onnx":
        # The same runtime in process as in the server (one export, shared through the cache folder),
        # so the overhead ratio measures serving, not the difference between ONNX Runtime and PyTorch.
        import tempfile

        from wesam.service.runtime import OnnxRuntime

        onnx_cache = tempfile.mkdtemp(prefix="wesam-bench-onnx-")
        predictor: Any = OnnxRuntime(model, onnx_cache, threads=threads).base
    else:
        predictor = SamPredictorCore(model.sam, args.device)
    prompts = Prompts(boxes=np.asarray([box], np.float32))
    inproc_images = [pool[next(cursor)] for _ in range(n + warm)]
    print(f"in-process: {n} requests on {model.name} ({threads} torch threads)", file=sys.stderr)
    inproc = _timed(lambda i: predictor.predict(inproc_images[i], prompts), n, warm)

    config = ServeConfig(model=str(pathlib.Path(args.model).resolve()) if pathlib.Path(args.model).is_file()
                         else args.model, checkpoint=args.checkpoint, registry=args.registry, runtime=args.runtime,
                         device=args.device, threads=threads, workers=args.workers, cache_mb=args.cache_mb,
                         onnx_cache=onnx_cache,
                         grpc_port=None if args.no_grpc else free_port(), poll_seconds=0)
    server = None
    if args.url:
        url, grpc_url = args.url.rstrip("/"), (None if args.no_grpc else args.grpc_url)
    else:
        print(f"starting the server ({args.workers} worker(s), runtime {args.runtime})", file=sys.stderr)
        server = ServerProcess(config).start(timeout=args.start_timeout)
        url, grpc_url = server.url, server.grpc_url
    try:
        # Any answer but a 200 raises (WesamClientError): main() reports it and fails the run.
        with Client(url, timeout=300, max_retries=0) as client:
            full_ids = [next(cursor) for _ in range(n + warm)]
            print(f"service, full requests: {n}", file=sys.stderr)
            full = _timed(lambda i: client.segment(payloads[full_ids[i]], boxes=[box]), n, warm)

            image_id = client.segment(payloads[next(cursor)], boxes=[box]).image_id
            rng = np.random.default_rng(args.seed + 1)
            boxes = [[float(v) for v in sorted(rng.uniform(0, size[1], 2))] for _ in range(n + warm)]
            print(f"service, cached prompt-only requests: {n}", file=sys.stderr)
            cached = _timed(lambda i: client.segment(image_id=image_id,
                                                     boxes=[[boxes[i][0], box[1], boxes[i][1], box[3]]]), n, warm)

            grpc_full = None
            if grpc_url:
                grpc_ids = [next(cursor) for _ in range(n + warm)]
                files = [payloads[i] for i in grpc_ids]
                print(f"service, gRPC full requests: {n}", file=sys.stderr)
                grpc_full = _timed(_grpc_segment(grpc_url, files, box), n, warm)

            def throughput(clients: int) -> dict[str, float]:
                per_client = _per_client(n, clients)
                ids = [[next(cursor) for _ in range(per_client)] for _ in range(clients)]
                latencies: list[float] = []

                def worker(k: int) -> list[float]:
                    out = []
                    with Client(url, timeout=300, max_retries=0) as c:  # a connection pool per client
                        for idx in ids[k]:
                            t0 = time.perf_counter()
                            c.segment(payloads[idx], boxes=[box])
                            out.append((time.perf_counter() - t0) * 1000)
                    return out

                t0 = time.perf_counter()
                with ThreadPoolExecutor(clients) as ex:
                    for lat in ex.map(worker, range(clients)):
                        latencies.extend(lat)
                return {**_summary(latencies, time.perf_counter() - t0), "clients": clients}

            print(f"service, throughput with 1 and {conc} clients", file=sys.stderr)
            one = throughput(1)
            before = _batch_totals(client.metrics())
            many = throughput(conc)
            after = _batch_totals(client.metrics())

            capture = None
            if not args.no_capture and server is not None:
                capture = _capture_rows(config, args, client, [payloads[next(cursor)] for _ in range(2 * (n + warm))],
                                        box, n, warm)
    finally:
        if server is not None:
            server.cleanup()
    # encoder batches of the concurrent phase alone (the sequential rows are all batches of one)
    batch_sum, batch_count = after[0] - before[0], after[1] - before[1]
    return {
        "model": model.name, "model_sha256": model.sha256, "img_size": model.config.img_size,
        "image_size": list(size), "image_format": args.format, "threads": threads, "device": args.device,
        "runtime": args.runtime,
        "in_process_predictor": type(predictor).__name__,
        "front_workers": args.workers, "requests": n, "warmup": warm,
        "in_process": inproc, "service_full": full, "service_cached": cached,
        "overhead_ratio": full["p50_ms"] / inproc["p50_ms"],
        "cached_speedup": full["p50_ms"] / cached["p50_ms"],
        "grpc_full": grpc_full,
        "grpc_overhead_ratio": grpc_full["p50_ms"] / inproc["p50_ms"] if grpc_full else None,
        "throughput_1_client": one, f"throughput_{conc}_clients": many,
        "concurrency_speedup": many["throughput_rps"] / one["throughput_rps"],
        "throughput_vs_in_process": many["throughput_rps"] / inproc["throughput_rps"],
        "mean_runtime_batch": batch_sum / batch_count if batch_count else None,
        "capture": capture,
        "torch_version": torch.__version__,
    }


def _capture_rows(config: Any, args: argparse.Namespace, off_client: Any, payloads: list[bytes], box: list[float],
                  n: int, warm: int) -> dict[str, Any]:
    """Full requests to the server without capture and to a second one that captures every request
    (base domain, rate 1, no caps, into SQLite), alternated request by request so that both see the
    same machine state: the capture thread's encoding and writing run between requests."""
    import dataclasses
    import tempfile

    from wesam.client import Client
    from wesam.service.launch import ServerProcess, free_port

    with tempfile.TemporaryDirectory(prefix="wesam-bench-capture-") as tmp:
        store = str(pathlib.Path(tmp) / "samples.db")
        on_config = dataclasses.replace(config, grpc_port=None if config.grpc_port is None else free_port(),
                                        capture_store=store, capture_domains=("base",), capture_rate=1.0,
                                        capture_domain_cap=0, capture_client_cap=0, admin_token="wesam-bench")
        print(f"service, capture off / on (alternating): {n} each", file=sys.stderr)
        on_server = ServerProcess(on_config).start(timeout=args.start_timeout)
        try:
            with Client(on_server.url, admin_token="wesam-bench", timeout=300, max_retries=0) as on_client:
                lat: dict[str, list[float]] = {"off": [], "on": []}
                t_start = time.perf_counter()
                for i in range(n + warm):
                    for key, c, payload in (("off", off_client, payloads[2 * i]), ("on", on_client, payloads[2 * i + 1])):
                        t0 = time.perf_counter()
                        c.segment(payload, boxes=[box])
                        if i >= warm:
                            lat[key].append((time.perf_counter() - t0) * 1000)
                wall = time.perf_counter() - t_start
                time.sleep(1.0)  # let the capture thread write what it still holds
                stats = on_client.capture_stats()
        finally:
            on_server.cleanup()
    off, on = _summary(lat["off"], wall / 2), _summary(lat["on"], wall / 2)
    return {"off": off, "on": on, "p50_ratio": on["p50_ms"] / off["p50_ms"], "store_stats": stats}


def _per_client(n: int, clients: int) -> int:
    """Requests per client of a throughput row: ``n`` in all, at least 5 each with several clients,
    so the ramp-up (the first batch holds whoever arrived first) does not dominate the row."""
    return n if clients == 1 else max(n // clients, 5)


def _batch_totals(metrics: str) -> tuple[float, float]:
    """(sum, count) of the ``wesam_batch_size`` histogram in a /metrics scrape."""
    total = count = 0.0
    for line in metrics.splitlines():
        if line.startswith("wesam_batch_size_sum"):
            total += float(line.split()[-1])
        elif line.startswith("wesam_batch_size_count"):
            count += float(line.split()[-1])
    return total, count


def _grpc_segment(url: str, files: list[bytes], box: list[float]) -> Callable[[int], Any]:
    """A full gRPC request per call: the encoded file as a BYTES tensor, one box (masks back as the
    UINT8 tensor, not converted: nothing looks at them)."""
    from wesam.client import GrpcClient

    client = GrpcClient(url, timeout=300, max_retries=0)
    return lambda i: client.segment(files[i], boxes=[box])


def markdown(result: dict[str, Any], concurrency: int) -> str:
    from wesam.bench.results import machine

    many = result[f"throughput_{concurrency}_clients"]
    rows = [
        (f"in-process `{result.get('in_process_predictor', 'SamPredictorCore')}.predict` (new image, 1 box)",
         result["in_process"]),
        ("service `/segment`, new image, 1 box", result["service_full"]),
        ("service `/segment`, cached `image_id`, 1 box", result["service_cached"]),
        *((("gRPC `ModelInfer`, new image (file as BYTES), 1 box", result["grpc_full"]),)
          if result.get("grpc_full") else ()),
        ("service, 1 client, new images", result["throughput_1_client"]),
        (f"service, {concurrency} clients, new images", many),
    ]
    lines = [
        f"### Serving ({result['model']}, {result['image_size'][0]}x{result['image_size'][1]} "
        f"{result['image_format'].upper()} images, "
        f"{result['runtime']} runtime)",
        "",
        f"`wesam bench serve` on {machine()}; {result['threads']} torch thread(s) on both sides, "
        f"{result['front_workers']} worker(s), {result['requests']} requests per row.",
        "",
        "| what | p50 ms | p95 ms | req/s |",
        "|---|---:|---:|---:|",
    ]
    cap = result.get("capture")
    if cap:
        rows += [("service `/segment`, new image, capture off (alternating with the next row)", cap["off"]),
                 ("service `/segment`, new image, capture on (every request stored, SQLite)", cap["on"])]
    lines += [f"| {name} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['throughput_rps']:.1f} |" for name, r in rows]
    batch = result["mean_runtime_batch"]
    lines += [
        "",
        f"Service overhead (p50 service / p50 in-process): x{result['overhead_ratio']:.2f}"
        + (f" (gRPC: x{result['grpc_overhead_ratio']:.2f})" if result.get("grpc_overhead_ratio") else "") + ". "
        f"Cached prompt-only speed-up (p50 full / p50 cached): x{result['cached_speedup']:.2f}. "
        f"Throughput {concurrency} clients / 1 client: x{result['concurrency_speedup']:.2f}"
        + (f" (mean encoder batch {batch:.2f} requests)" if batch else "")
        + f"; {concurrency} clients / in-process sequential: x{result['throughput_vs_in_process']:.2f}."
        + (f" Capture on / off (p50): x{cap['p50_ratio']:.3f}." if cap else ""),
    ]
    return "\n".join(lines)


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError("--image-size takes HxW, e.g. 480x640") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError("--image-size must be positive")
    return h, w


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wesam bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sam-mini", help="zoo name or weights file (default sam-mini)")
    p.add_argument("--checkpoint", help="weights for an official model (vit_b/l/h)")
    p.add_argument("--registry", help="adapter registry for the server (not needed: requests use the base model)")
    p.add_argument("--runtime", default="torch", choices=["torch", "onnx"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=30, help="measured requests per row (default 30)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients for the throughput row")
    p.add_argument("--image-size", type=_size, default=(480, 640), help="HxW of the generated images")
    p.add_argument("--format", default="jpeg", choices=["jpeg", "png"], help="how images are sent (jpeg, q90)")
    p.add_argument("--threads", type=int, help="torch threads for both sides (default: torch's)")
    p.add_argument("--workers", type=int, default=1, help="HTTP workers (default 1: one process holds the model)")
    p.add_argument("--cache-mb", type=float, default=512.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", help="benchmark this running server (of --model) instead of starting one")
    p.add_argument("--grpc-url", help="with --url: its gRPC endpoint (host:port) for the gRPC row")
    p.add_argument("--no-grpc", action="store_true", help="skip the gRPC row")
    p.add_argument("--no-capture", action="store_true",
                   help="skip the capture off/on rows (a second server that stores every request)")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--json", default="bench/serve.json", help="write the results here (default bench/serve.json)")
    p.add_argument("--no-results", action="store_true", help="do not update bench/RESULTS.md")
    args = p.parse_args(argv)
    if args.requests < 1 or args.warmup < 0 or args.concurrency < 2:
        p.error("--requests must be >= 1, --warmup >= 0, --concurrency >= 2")

    from wesam.client import WesamClientError
    from wesam.sam.zoo import ModelLoadError

    try:
        result = run(args)
    except (ModelLoadError, RuntimeError, TimeoutError, OSError, WesamClientError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from wesam.bench.results import report

    report("serve", markdown(result, args.concurrency), result, args.json, update_results=not args.no_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
