"""``wesam serve``: run the BentoML HTTP service (and the KServe-v2 gRPC endpoint) for a model.

The command turns its flags into ``WESAM_SERVE_*`` variables (flags win over variables already
set) and runs ``bentoml serve wesam.service.service:Segmenter`` with them, so ``bentoml serve`` and
containers built from ``bentofile.yaml`` configure the same way. The gRPC endpoint runs inside the
model-runtime process (see ``service/grpc_server.py``), so one command starts both.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from wesam import version as wesam_version_module

from .config import PREFIX, RUNTIMES, ConfigError, ServeConfig

# BentoML imports the service from its working directory: the folder holding the `wesam` package
# that is imported here (the repository for an editable install, site-packages otherwise).
PACKAGE_ROOT = Path(wesam_version_module.__file__).resolve().parents[1]
SERVICE = "wesam.service.service:Segmenter"


def add_serve_parser(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser(
        "serve", help="serve the model and its domain adapters over HTTP (BentoML) and gRPC (KServe v2)",
        description="Serve SAM with per-domain LoRA adapters. Flags override WESAM_SERVE_* environment "
                    "variables; see docs/serving.md. The admin token is read from WESAM_SERVE_ADMIN_TOKEN or "
                    "--admin-token-file, never from the command line.")
    p.add_argument("--model", help=f"zoo name or weights file (default: ${PREFIX}MODEL or sam-mini)")
    p.add_argument("--checkpoint", help="weights for an official model (vit_b/l/h)")
    p.add_argument("--registry", help=f"adapter registry directory (default: ${PREFIX}REGISTRY or ./registry)")
    p.add_argument("--runtime", choices=RUNTIMES, help="torch (default) or onnx (graphs exported on first use)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--host", default=os.environ.get("BENTOML_HOST", "127.0.0.1"),
                   help="address to bind (default 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--port", type=int, default=int(os.environ.get("BENTOML_PORT", 3000)), help="HTTP port (3000)")
    p.add_argument("--grpc-port", type=int, help="KServe v2 gRPC port (default 8001)")
    p.add_argument("--no-grpc", action="store_true", help="do not start the gRPC endpoint")
    p.add_argument("--workers", type=int, help="HTTP front worker processes (default 1)")
    p.add_argument("--threads", type=int, help="torch threads in the model runtime")
    p.add_argument("--cache-mb", type=float, help="embedding cache size in MiB (default 512)")
    p.add_argument("--max-queue", type=int,
                   help="requests that may wait for the model, per lane (new images, prompt-only); more are "
                        "answered 503 overloaded with Retry-After at once (default 32)")
    p.add_argument("--merged", nargs="+", metavar="DOMAIN", help="hot domains served from merged model copies")
    p.add_argument("--fallback-domain", help="serve unknown domains with this domain (or 'base') instead of 404")
    p.add_argument("--onnx-cache", help="where --runtime onnx keeps exported graphs")
    p.add_argument("--admin-token-file", help="file holding the admin token (enables the adapter admin API)")
    p.add_argument("--capture-store", metavar="URL",
                   help="capture served requests for online self-training into this sample store (SQLite path, "
                        "sqlite:///abs/path.db or redis://host:port/db); off by default, see docs/online.md")
    p.add_argument("--capture-domains", nargs="+", metavar="DOMAIN",
                   help="domains whose requests are captured ('base': requests without a domain); none by default")
    p.add_argument("--capture-rate", type=float, help="share of eligible requests captured, in [0, 1] (default 1)")
    p.add_argument("--development", action="store_true", help="BentoML development mode (one process)")
    p.set_defaults(func=cmd_serve)


def config_from_args(args: argparse.Namespace, env: dict[str, str] | None = None) -> ServeConfig:
    """``ServeConfig`` from the environment, overridden by the flags; paths made absolute (workers
    run in another working directory)."""
    config = ServeConfig.from_env(os.environ if env is None else env)
    over: dict[str, Any] = {}
    for flag, name in (("model", "model"), ("checkpoint", "checkpoint"), ("registry", "registry"),
                       ("runtime", "runtime"), ("device", "device"), ("workers", "workers"),
                       ("threads", "threads"), ("cache_mb", "cache_mb"), ("max_queue", "max_queue"),
                       ("fallback_domain", "fallback_domain"),
                       ("onnx_cache", "onnx_cache"), ("grpc_port", "grpc_port"),
                       ("capture_store", "capture_store"), ("capture_rate", "capture_rate")):
        value = getattr(args, flag, None)
        if value is not None:
            over[name] = value
    if getattr(args, "merged", None):
        over["merged_domains"] = tuple(args.merged)
    if getattr(args, "capture_domains", None):
        over["capture_domains"] = tuple(args.capture_domains)
    if getattr(args, "admin_token_file", None):
        try:
            token = Path(args.admin_token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read --admin-token-file: {e}") from None
        if not token:
            raise ConfigError(f"{args.admin_token_file} is empty")
        over["admin_token"] = token
    if PREFIX + "GRPC_HOST" not in (os.environ if env is None else env) and getattr(args, "host", None):
        over["grpc_host"] = args.host  # gRPC listens where HTTP does unless configured apart
    if getattr(args, "no_grpc", False):
        over["grpc_port"] = None
    elif over.get("grpc_port", config.grpc_port) is None:
        over["grpc_port"] = 8001
    config = dataclasses.replace(config, **over)
    paths = {}
    for name in ("checkpoint", "registry", "onnx_cache"):
        value = getattr(config, name)
        if value:
            paths[name] = str(Path(value).expanduser().resolve())
    if config.model and Path(config.model).expanduser().is_file():
        paths["model"] = str(Path(config.model).expanduser().resolve())
    if config.capture_store and "://" not in config.capture_store:  # a SQLite file given as a plain path
        paths["capture_store"] = str(Path(config.capture_store).expanduser().resolve())
    return dataclasses.replace(config, **paths)


def check_model(config: ServeConfig) -> None:
    """Fail fast (before starting servers) when the weights cannot be found; no weights are read."""
    from wesam.sam.zoo import CHECKPOINT_DIR_ENV, ZOO, ModelLoadError, models_dir

    spec = next((s for s in ZOO.values() if config.model == s.name or config.model in s.aliases), None)
    if spec is None:
        if not Path(config.model).is_file():
            raise ModelLoadError(f"unknown model {config.model!r}: not a zoo name ({', '.join(ZOO)}) and not an "
                                 "existing file")
        return
    if config.checkpoint:
        if not Path(config.checkpoint).is_file():
            raise ModelLoadError(f"checkpoint not found: {config.checkpoint}")
        return
    if spec.embedded and not (models_dir() / spec.embedded).is_file():
        raise ModelLoadError(f"{spec.name} weights not found at {models_dir() / spec.embedded}; train them with "
                             "`wesam pretrain` or set $WESAM_MODELS_DIR")
    if spec.official_filename:
        d = os.environ.get(CHECKPOINT_DIR_ENV)
        if not d or not (Path(d) / spec.official_filename).is_file():
            raise ModelLoadError(f"{spec.name} needs its official checkpoint {spec.official_filename}: pass "
                                 f"--checkpoint PATH or put the file in ${CHECKPOINT_DIR_ENV}")


def serve_command(config: ServeConfig, host: str, port: int,
                  development: bool = False) -> tuple[list[str], dict[str, str]]:
    """The ``bentoml serve`` command line and environment for ``config``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    env.update(config.to_env())
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")  # no usage analytics calls from a serving host
    cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port),
           "--working-dir", str(PACKAGE_ROOT)]
    if development:
        cmd.append("--development")
    return cmd, env


def cmd_serve(args: argparse.Namespace) -> int:
    from wesam.sam.zoo import ModelLoadError

    try:
        config = config_from_args(args)
        check_model(config)
        if not 0 < args.port < 65536:
            raise ConfigError(f"--port must be a TCP port, got {args.port}")
        if config.grpc_port is not None and config.grpc_port == args.port:
            raise ConfigError("--grpc-port and --port must differ")
    except (ConfigError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd, env = serve_command(config, args.host, args.port, args.development)
    grpc = f", gRPC on {config.grpc_host}:{config.grpc_port}" if config.grpc_port else ""
    print(f"serving {config.model} (registry {config.registry}, runtime {config.runtime}) on "
          f"http://{args.host}:{args.port}{grpc}", file=sys.stderr)
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # The terminal sent SIGINT to the whole process group; give BentoML time to stop its workers.
        try:
            return proc.wait(timeout=30) or 130
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wesam")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
