"""The service under concurrent mixed traffic, then a memory soak: `wesam bench load`.

Load phases, one per client count (``--clients``, default 1, 8, 32 and 64), each ``--duration``
seconds: closed-loop clients (each sends its next request when the previous one is answered) with
mixed traffic, drawn per request:

* **new image** (``--new-share``, default 0.5): ``/segment`` with a JPEG file and one box. Images
  cycle through a pool of ``--images`` generated photos, and the server this bench starts holds
  ``--cache-entries`` embeddings, fewer than the pool, so these run the encoder (least recently used
  eviction never keeps a cycled image);
* **cached**: ``/segment`` with the ``image_id`` of one of ``--cached-images`` images embedded before
  the phase, and a random box (no encoder run); a client that gets 404 ``unknown_image_id`` (evicted)
  embeds the image again, as real clients do, and the 404 is counted;
* both spread over ``--domains`` (default ``base`` and the demo adapter's ``polyp``).

Per phase: p50/p95/p99 latency of the successful answers (all, and per traffic kind), their
throughput, every answer counted by HTTP status and error kind, the slowest non-200 answer, and
whether each non-200 answer was wesam's JSON error with a ``Retry-After`` header. Clients honour
``Retry-After`` as a polite client does (``--ignore-retry-after``: they retry at once).

Requests are made with ``wesam.client.AsyncClient`` (one per simulated client, so one connection each;
images as multipart uploads of the file, as the client sends them) with its own retries off
(``max_retries=0``): every answer is counted once, by the HTTP status and ``kind`` of the exception it
raised, and the waiting after a refusal is this bench's. Masks are never decoded.

Soak: ``--soak-requests`` (default 10,000) requests of the same mix from ``--soak-clients`` clients,
while the resident memory (VmRSS in ``/proc``) of every server process is sampled every
``--rss-interval`` seconds; growth = mean RSS over the last tenth of the soak / over the first tenth.

Usage:
    wesam bench load                                    # sam-mini + models/registry, starts its own server
    wesam bench load --duration 5 --soak-requests 300 --no-results     # a smoke run (about a minute)
    wesam bench load --url http://127.0.0.1:3000 --server-pid 1234     # a running server (RSS of its processes)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import pathlib
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .serve import _box, _encoded, _images, _size

NEW, CACHED = "new", "cached"


def _percentiles(samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    arr = np.asarray(samples)
    return {f"p{q}_ms": float(np.percentile(arr, q)) for q in (50, 95, 99)}


@dataclass
class Answer:
    kind: str  # NEW or CACHED
    status: int | str  # HTTP status, or the exception name when no answer came
    error_kind: str | None  # wesam's `kind` of an error answer
    wesam_json: bool  # an error answer in wesam's format ({"error", "kind", "status"})
    retry_after: bool
    ms: float


@dataclass
class Traffic:
    """Pre-encoded payloads and the state the clients share (the new-image cursor, the cached ids)."""

    images: list[bytes]  # JPEG files
    size: tuple[int, int]
    domains: list[str]
    new_share: float
    seed: int
    cached: list[list[Any]] = field(default_factory=list)  # [image_id, domain, JPEG file] per cached image
    _cursor: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def next_new(self) -> tuple[bytes, str]:
        with self._lock:
            i = self._cursor
            self._cursor += 1
        return self.images[i % len(self.images)], self.domains[i % len(self.domains)]

    def body(self, rng: random.Random) -> tuple[str, int, dict[str, Any]]:
        """(traffic kind, index of the cached image or -1, ``AsyncClient.segment`` arguments)."""
        h, w = self.size
        if not self.cached or rng.random() < self.new_share:
            image, domain = self.next_new()
            return NEW, -1, {"image": image, "boxes": [_box(self.size)], "domain": _domain(domain)}
        k = rng.randrange(len(self.cached))
        x0, y0 = rng.uniform(0, w * 0.5), rng.uniform(0, h * 0.5)
        return CACHED, k, {"image_id": self.cached[k][0],
                           "boxes": [[x0, y0, x0 + rng.uniform(8, w * 0.5), y0 + rng.uniform(8, h * 0.5)]]}


def _domain(domain: str) -> str | None:
    """``base`` is sent as no domain at all."""
    return None if domain == "base" else domain


async def _client(url: str, traffic: Traffic, rng: random.Random, stop_at: float | None, budget: list[int],
                  answers: list[Answer], honour_retry_after: bool, timeout: float) -> None:
    """One closed-loop client: until ``stop_at`` (monotonic) or until the shared budget is spent."""
    from wesam.client import AsyncClient, ServiceUnreachable, WesamClientError

    async with AsyncClient(url, timeout=timeout, max_retries=0) as client:
        while True:
            if stop_at is not None and time.monotonic() >= stop_at:
                return
            if stop_at is None:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            kind, index, body = traffic.body(rng)
            t0 = time.perf_counter()
            retry = None
            try:
                try:
                    await client.segment(**body)
                    answers.append(Answer(kind, 200, None, True, False, (time.perf_counter() - t0) * 1000))
                except ServiceUnreachable:
                    raise
                except WesamClientError as e:  # an answer other than 200: its status and wesam's kind
                    if e.status == 404 and index >= 0:
                        # the image_id was evicted: a client sends the image again (counted as the 404 it got)
                        _, domain, image = traffic.cached[index]
                        try:
                            traffic.cached[index][0] = (await client.embed(image, domain=_domain(domain))).image_id
                        except ServiceUnreachable:
                            raise
                        except WesamClientError:
                            pass
                    ms = (time.perf_counter() - t0) * 1000
                    # wesam's format: {"error", "kind", "status"}; e.body is None for any other body
                    wesam_json = e.body is not None and {"error", "kind", "status"} <= set(e.body)
                    retry = e.headers.get("retry-after") if e.headers is not None else None
                    answers.append(Answer(kind, e.status, e.body.get("kind") if e.body else None, wesam_json,
                                          retry is not None, ms))
            except Exception as e:  # no answer at all: counted by exception type (the transport's, e.g. ReadTimeout)
                name = type(e.__cause__ if isinstance(e, ServiceUnreachable) and e.__cause__ else e).__name__
                answers.append(Answer(kind, name, None, False, False, (time.perf_counter() - t0) * 1000))
            if retry is not None and honour_retry_after:
                try:
                    await asyncio.sleep(float(retry))
                except ValueError:
                    pass


def _run_clients(url: str, traffic: Traffic, clients: int, *, duration: float | None = None,
                 requests: int | None = None, seed: int = 0, honour_retry_after: bool = True,
                 timeout: float = 120.0) -> tuple[list[Answer], float]:
    answers: list[Answer] = []
    budget = [requests or 0]

    async def main() -> float:
        stop_at = time.monotonic() + duration if duration is not None else None
        t0 = time.perf_counter()
        await asyncio.gather(*(_client(url, traffic, random.Random(seed * 1000 + k), stop_at, budget, answers,
                                       honour_retry_after, timeout) for k in range(clients)))
        return time.perf_counter() - t0

    wall = asyncio.run(main())
    return answers, wall


def summarise(answers: list[Answer], wall_s: float, clients: int) -> dict[str, Any]:
    ok = [a for a in answers if a.status == 200]
    bad = [a for a in answers if a.status != 200]
    by_answer = collections.Counter(f"{a.status} {a.error_kind or ('ok' if a.status == 200 else '-')}"
                                    for a in answers)
    out: dict[str, Any] = {
        "clients": clients, "wall_s": wall_s, "requests": len(answers), "ok": len(ok),
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else 0.0, **_percentiles([a.ms for a in ok]),
        "by_kind": {k: {"ok": sum(1 for a in ok if a.kind == k), **_percentiles([a.ms for a in ok if a.kind == k])}
                    for k in (NEW, CACHED)},
        "answers": dict(sorted(by_answer.items())),
        "non_200": len(bad),
        "non_200_max_ms": max((a.ms for a in bad), default=None),
        # the overload contract: anything but a 200 is a quick 503 `overloaded` in wesam's format
        "non_200_all_overloaded": all(a.status == 503 and a.error_kind == "overloaded" and a.wesam_json
                                      and a.retry_after for a in bad),
    }
    return out


# -- server memory --------------------------------------------------------------------------------

def server_pids(root: int) -> list[int]:
    """The server's processes: ``root`` (BentoML's arbiter) and every process below it. BentoML's
    process manager starts each worker in a session of its own, so a process group would miss them."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = pathlib.Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # the command name is in parentheses and may hold spaces: fields after the last ')'
        children[int(stat.rsplit(")", 1)[1].split()[1])].append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(children.get(pid, ()))
    return sorted(found)


def process_name(pid: int) -> str:
    try:
        cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return str(pid)
    if "--service-name" in cmd:
        return cmd.split("--service-name", 1)[1].split()[0] + (
            f"#{cmd.split('--worker-id', 1)[1].split()[0]}" if "--worker-id" in cmd else "")
    return "arbiter" if "bentoml serve" in cmd else cmd[:40]


def rss_kib(pid: int) -> int | None:
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler:
    """Samples the VmRSS of the server's processes on a thread until stopped."""

    def __init__(self, root_pid: int, interval_s: float) -> None:
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[str, int]]] = []  # (seconds since start, name -> KiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        t0 = time.monotonic()
        while True:
            row = {}
            for pid in server_pids(self.root_pid):
                kib = rss_kib(pid)
                if kib:
                    row[f"{process_name(pid)}[{pid}]"] = kib
            self.samples.append((time.monotonic() - t0, row))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, Any]:
        if len(self.samples) < 2:
            return {"samples": len(self.samples), "growth_pct": None}
        tenth = max(1, len(self.samples) // 10)
        first, last = self.samples[:tenth], self.samples[-tenth:]

        def mean_mib(rows: list[tuple[float, dict[str, int]]], name: str | None = None) -> float:
            vals = [sum(r.values()) if name is None else r.get(name, 0) for _, r in rows]
            return float(np.mean(vals)) / 1024

        names = sorted({n for _, r in self.samples for n in r})
        total_first, total_last = mean_mib(first), mean_mib(last)
        return {
            "samples": len(self.samples), "interval_s": self.interval_s,
            "first_tenth_mib": total_first, "last_tenth_mib": total_last,
            "growth_pct": (total_last / total_first - 1) * 100 if total_first else None,
            "max_mib": max(sum(r.values()) for _, r in self.samples) / 1024,
            "per_process": {n: {"first_tenth_mib": mean_mib(first, n), "last_tenth_mib": mean_mib(last, n)}
                            for n in names},
        }


# -- the run --------------------------------------------------------------------------------------

def _embed_cached(url: str, traffic: Traffic, count: int, pool: list[bytes]) -> None:
    """Embed ``count`` images (spread over the domains) whose ids the cached traffic uses; any answer
    but a 200 raises (``WesamClientError``) and fails the run."""
    from wesam.client import Client

    with Client(url, timeout=300, max_retries=0) as client:
        for i in range(count):
            domain = traffic.domains[i % len(traffic.domains)]
            traffic.cached.append([client.embed(pool[i], domain=_domain(domain)).image_id, domain, pool[i]])


def _server_state(url: str) -> dict[str, Any]:
    """The server's cache and queue counters (``GET /adapters``), for reading the figures."""
    from wesam.client import Client, WesamClientError

    try:
        with Client(url, timeout=60, max_retries=0) as client:
            status = client.adapters()
    except WesamClientError:
        return {}
    return {"cache": status.get("cache"), "queue": status.get("queue")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from wesam.sam.zoo import models_dir, resolve_model
    from wesam.service.config import ServeConfig
    from wesam.service.launch import ServerProcess

    model = resolve_model(args.model, args.checkpoint)
    grid = model.config.img_size // 16
    embedding_bytes = 256 * grid * grid * 4  # SAM's neck output: 256 channels on a (img_size/16)^2 grid, float32
    n_pool = args.images + args.cached_images
    print(f"generating {n_pool} {args.image_size[0]}x{args.image_size[1]} JPEG images", file=sys.stderr)
    pool = [_encoded(im, "jpeg") for im in _images(n_pool, args.image_size, args.seed)]
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    traffic = Traffic(pool[args.cached_images:], args.image_size, domains, args.new_share, args.seed)

    registry = args.registry
    if registry is None and any(d != "base" for d in domains) and (models_dir() / "registry").is_dir():
        registry = str(models_dir() / "registry")
    cache_mb = embedding_bytes * args.cache_entries / (1024 * 1024)
    config = ServeConfig(model=str(pathlib.Path(args.model).resolve()) if pathlib.Path(args.model).is_file()
                         else args.model, checkpoint=args.checkpoint, registry=registry, runtime=args.runtime,
                         device=args.device, threads=args.threads, workers=args.workers, cache_mb=cache_mb,
                         max_queue=args.max_queue, grpc_port=None, poll_seconds=0)
    server = None
    if args.url:
        url, server_pid = args.url.rstrip("/"), args.server_pid
    else:
        print(f"starting the server ({args.workers} worker(s), cache {args.cache_entries} embeddings = "
              f"{cache_mb:.1f} MiB, queue bound {args.max_queue})", file=sys.stderr)
        server = ServerProcess(config).start(timeout=args.start_timeout)
        url, server_pid = server.url, server.proc.pid  # type: ignore[union-attr]
    phases = []
    try:
        _embed_cached(url, traffic, args.cached_images, pool)
        _run_clients(url, traffic, 2, requests=args.warmup, seed=args.seed)  # warm-up, not reported
        honour = not args.ignore_retry_after
        for clients in args.clients:
            print(f"load: {clients} client(s) for {args.duration:g} s", file=sys.stderr)
            answers, wall = _run_clients(url, traffic, clients, duration=args.duration, seed=args.seed + clients,
                                         honour_retry_after=honour)
            phases.append(summarise(answers, wall, clients))
            p = phases[-1]
            print(f"  {p['ok']}/{p['requests']} ok, {p['throughput_rps']:.1f} req/s, p50 {p['p50_ms'] or 0:.0f} ms, "
                  f"p99 {p['p99_ms'] or 0:.0f} ms, answers {p['answers']}", file=sys.stderr)
        soak: dict[str, Any] = {}
        if args.soak_requests > 0:
            print(f"soak: {args.soak_requests} requests from {args.soak_clients} clients", file=sys.stderr)
            sampler = RssSampler(server_pid, args.rss_interval) if server_pid else None
            with sampler if sampler is not None else contextlib.nullcontext():
                answers, wall = _run_clients(url, traffic, args.soak_clients, requests=args.soak_requests,
                                             seed=args.seed + 7, honour_retry_after=honour)
            soak = {**summarise(answers, wall, args.soak_clients),
                    "rss": sampler.report() if sampler is not None else None}
            rss = soak["rss"]
            if rss and rss.get("growth_pct") is not None:
                print(f"  RSS {rss['first_tenth_mib']:.0f} -> {rss['last_tenth_mib']:.0f} MiB "
                      f"({rss['growth_pct']:+.1f} %)", file=sys.stderr)
        server_state = _server_state(url)
    finally:
        if server is not None:
            server.cleanup()
    import torch

    from wesam.bench.results import machine

    return {
        "model": model.name, "model_sha256": model.sha256, "img_size": model.config.img_size,
        "image_size": list(args.image_size), "domains": domains, "new_share": args.new_share,
        "images": args.images, "cached_images": args.cached_images, "cache_entries": args.cache_entries,
        "workers": args.workers, "threads": args.threads, "max_queue": args.max_queue, "runtime": args.runtime,
        "device": args.device, "duration_s": args.duration, "honour_retry_after": not args.ignore_retry_after,
        "url": args.url, "phases": phases, "soak": soak, "server": server_state, "machine": machine(),
        "torch_version": torch.__version__,
    }


def _answers_text(answers: dict[str, int]) -> str:
    bad = {k: v for k, v in answers.items() if not k.startswith("200 ")}
    return ", ".join(f"{v}× {k}" for k, v in bad.items()) or "none"


def markdown(result: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    lines = [
        f"### Load and soak ({result['model']}, {result['image_size'][0]}x{result['image_size'][1]} JPEG, "
        f"{result['runtime']} runtime)",
        "",
        f"`wesam bench load` on {result['machine']}; {result['workers']} worker(s), "
        f"{result['threads'] or 'default'} torch thread(s), queue bound {result['max_queue']} per lane. Closed-loop "
        f"clients, {result['duration_s']:g} s per row; traffic {result['new_share']:.0%} new images (encoder "
        f"runs) and {1 - result['new_share']:.0%} prompt-only requests on {result['cached_images']} cached "
        f"`image_id`s, over domains {', '.join(result['domains'])}; clients "
        f"{'honour' if result['honour_retry_after'] else 'ignore'} `Retry-After`. Latencies of 200 answers.",
        "",
        "| clients | requests | 200 | req/s | p50 ms | p95 ms | p99 ms | new p50 | cached p50 | other answers "
        "| slowest non-200 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for p in result["phases"]:
        lines.append(f"| {p['clients']} | {p['requests']} | {p['ok']} | {p['throughput_rps']:.1f} | "
                     f"{ms(p['p50_ms'])} | {ms(p['p95_ms'])} | {ms(p['p99_ms'])} | {ms(p['by_kind'][NEW]['p50_ms'])} | "
                     f"{ms(p['by_kind'][CACHED]['p50_ms'])} | {_answers_text(p['answers'])} | "
                     f"{ms(p['non_200_max_ms'])} |")
    soak = result.get("soak") or {}
    if soak:
        rss = soak.get("rss") or {}
        lines += ["", f"Soak: {soak['requests']} requests from {soak['clients']} clients in {soak['wall_s']:.0f} s "
                      f"({soak['throughput_rps']:.1f} req/s, p99 {ms(soak['p99_ms'])} ms; other answers: "
                      f"{_answers_text(soak['answers'])})."]
        if rss.get("growth_pct") is not None:
            lines[-1] += (f" Server RSS (all processes, {rss['samples']} samples): first tenth "
                          f"{rss['first_tenth_mib']:.0f} MiB, last tenth {rss['last_tenth_mib']:.0f} MiB "
                          f"({rss['growth_pct']:+.1f} %).")
    return "\n".join(lines)


def _counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("--clients takes comma-separated counts, e.g. 1,8,32,64") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("--clients needs counts >= 1")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wesam bench load", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sam-mini", help="zoo name or weights file (default sam-mini)")
    p.add_argument("--checkpoint", help="weights for an official model (vit_b/l/h)")
    p.add_argument("--registry", help="adapter registry (default: the demo registry models/registry when "
                                      "--domains names an adapter domain)")
    p.add_argument("--domains", default="base,polyp", help="domains the traffic is spread over (default base,polyp)")
    p.add_argument("--runtime", default="torch", choices=["torch", "onnx"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server (default 2)")
    p.add_argument("--workers", type=int, default=1, help="HTTP workers of the server (default 1: one process)")
    p.add_argument("--max-queue", type=int, default=32, help="the server's queue bound per lane (default 32)")
    p.add_argument("--clients", type=_counts, default=[1, 8, 32, 64], help="client counts, one phase each")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per load phase (default 30)")
    p.add_argument("--new-share", type=float, default=0.5, help="share of requests with a new image (default 0.5)")
    p.add_argument("--images", type=int, default=128, help="distinct images the new-image requests cycle through")
    p.add_argument("--cached-images", type=int, default=8, help="embedded images the prompt-only requests use")
    p.add_argument("--cache-entries", type=int, default=120,
                   help="embeddings the server's cache holds: fewer than --images, so the cycled new images always "
                        "miss, and enough that the cached images are not evicted between their uses")
    p.add_argument("--image-size", type=_size, default=(480, 640), help="HxW of the generated images")
    p.add_argument("--soak-requests", type=int, default=10_000, help="requests of the soak (0: no soak)")
    p.add_argument("--soak-clients", type=int, default=8, help="concurrent clients of the soak (default 8)")
    p.add_argument("--rss-interval", type=float, default=0.5, help="seconds between RSS samples")
    p.add_argument("--warmup", type=int, default=10, help="requests before the first phase, not reported")
    p.add_argument("--ignore-retry-after", action="store_true", help="clients retry at once after a 503")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", help="load this running server (of --model) instead of starting one")
    p.add_argument("--server-pid", type=int, help="with --url: the server's main process (its workers are found "
                                                  "below it), for the RSS samples")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--json", default=str(pathlib.Path(__file__).resolve().parent / "load.json"),
                   help="write the results here (default bench/load.json)")
    p.add_argument("--no-results", action="store_true", help="do not update bench/RESULTS.md")
    args = p.parse_args(argv)
    if (args.duration <= 0 or args.soak_requests < 0 or args.soak_clients < 1 or args.images < 1
            or args.cached_images < 0 or not 0 <= args.new_share <= 1 or args.max_queue < 1):
        p.error("--duration must be > 0, --soak-requests >= 0, --soak-clients/--images/--max-queue >= 1, "
                "--cached-images >= 0, --new-share in [0, 1]")
    if args.cached_images == 0 and args.new_share < 1:
        p.error("prompt-only traffic needs --cached-images >= 1 (or --new-share 1)")
    if not args.url and not args.cached_images < args.cache_entries < args.images:
        p.error("--cache-entries must be above --cached-images and below --images (new images must miss the cache)")

    from wesam.client import WesamClientError
    from wesam.sam.zoo import ModelLoadError

    try:
        result = run(args)
    except (ModelLoadError, RuntimeError, TimeoutError, OSError, WesamClientError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from wesam.bench.results import report

    report("load", markdown(result), result, args.json, update_results=not args.no_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
