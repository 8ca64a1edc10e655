"""The `wesam worker` command (registered by wesam.cli): one domain's online self-training worker.

Round reports go to stdout as JSON lines, progress and log lines to stderr. Exit codes come from
wesam.cli: 75 when another worker holds the domain's lease (or this one lost it), 2 for a bad
configuration, 130 on Ctrl-C or SIGTERM (the round in progress publishes nothing).
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

from wesam.errors import WesamError

from ..adapt import DEFAULT_METHOD, METHODS

# The variable `wesam serve` captures into (wesam.service.config.PREFIX + "CAPTURE_STORE"; spelled
# out here because the adapters layer does not import the service).
CAPTURE_STORE_ENV = "WESAM_SERVE_CAPTURE_STORE"
DEFAULT_METRICS_PORT = 9465


def add_worker_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``worker`` to the subcommands ``sub`` of the wesam parser.

    Imports nothing heavy (``wesam --help`` stays fast): options left out are None here and take
    the defaults of :class:`~.worker.WorkerConfig`, :class:`~.filtering.FilterConfig`,
    :class:`~.filtering.SelectionConfig` and :class:`~.gate.GateConfig` (docs/online.md lists them).
    """
    p = sub.add_parser("worker", help="online self-training of one domain's adapter on captured requests",
                       description="Self-train DOMAIN's adapter on the requests the service captured "
                                   "(docs/online.md): rounds of WeSAM training from the active adapter, "
                                   "a gate against the active adapter, publish with lineage. Options "
                                   "not given take the defaults listed in docs/online.md.")
    p.add_argument("--domain", required=True)
    p.add_argument("--registry", default="registry", help="adapter registry directory (default ./registry)")
    p.add_argument("--store", metavar="URL", help=f"sample store: SQLite path, sqlite:///abs/path.db or "
                                                  f"redis://host:port/db (default: ${CAPTURE_STORE_ENV})")
    p.add_argument("--model", help="the base model the servers run, zoo name or file (default sam-mini)")
    p.add_argument("--checkpoint", help="weights for an official model (vit_b/l/h)")
    p.add_argument("--device", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--threads", type=int, help="torch threads")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--rounds", type=int, metavar="N", help="run N rounds of any outcome, then exit "
                                                              "(default: forever)")
    how.add_argument("--once", action="store_true", help="run one round and exit (errors exit non-zero)")
    p.add_argument("--interval", type=float, metavar="S", help="seconds to wait after a round with nothing to do")
    p.add_argument("--min-samples", type=int, metavar="N", help="new samples needed for a round")
    p.add_argument("--max-samples", type=int, metavar="N", help="at most this many new samples per round")
    p.add_argument("--min-train", type=int, metavar="N", help="training samples needed after filtering")
    p.add_argument("--steps-per-round", type=int, metavar="K")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--method", choices=[m for m in METHODS if m != "oracle"], help=f"default {DEFAULT_METHOD}")
    p.add_argument("--ema-decay", type=float, help="EMA teacher decay (0: no EMA teacher)")
    p.add_argument("--no-clip-to-box", dest="clip_to_box", action="store_false", default=None)
    p.add_argument("--no-respect-points", dest="respect_points", action="store_false", default=None)
    p.add_argument("--pull", type=float, help="weight of the pull towards the pinned adapter (0: off)")
    p.add_argument("--drift-scale", type=float, help="drift at which the pull's weight has doubled")
    p.add_argument("--reset-after", type=int, metavar="N",
                   help="consecutive rejected/aborted rounds before training restarts from the pinned adapter")
    p.add_argument("--holdout-fraction", type=float)
    p.add_argument("--max-client-share", type=float,
                   help="largest share of a round's training samples one client may give (1: no cap)")
    p.add_argument("--min-score", type=float, help="drop prompts whose served predicted IoU is below this")
    p.add_argument("--margin", type=float, help="golden-set non-inferiority margin (mIoU)")
    p.add_argument("--resamples", type=int, help="bootstrap resamples of the golden-set check")
    p.add_argument("--max-drift", type=float,
                   help="refuse candidates farther than this from the pinned adapter (relative; 0: no cap)")
    p.add_argument("--seed", type=int)
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                   help=f"serve Prometheus metrics on this port (default {DEFAULT_METRICS_PORT}; 0: off)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.set_defaults(func=cmd_worker)
    return p


def _given(args: argparse.Namespace, *names: str, rename: dict[str, str] | None = None) -> dict[str, Any]:
    """The options among ``names`` that were given (not None), keyed by field name."""
    rename = rename or {}
    return {rename.get(n, n): getattr(args, n) for n in names if getattr(args, n) is not None}


def worker_config(args: argparse.Namespace) -> Any:
    """The :class:`~.worker.WorkerConfig` of parsed ``wesam worker`` options."""
    import dataclasses

    from .filtering import FilterConfig, SelectionConfig
    from .gate import GateConfig
    from .worker import WorkerConfig, WorkerError

    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        gate = _given(args, "margin", "resamples", "max_drift")
        if gate.get("max_drift") == 0:
            gate["max_drift"] = None
        kw = _given(args, "model", "checkpoint", "interval", "min_samples", "max_samples", "min_train",
                    "steps_per_round", "batch_size", "lr", "method", "ema_decay", "clip_to_box", "respect_points",
                    "pull", "drift_scale", "reset_after", "seed", "progress")
        if kw.get("ema_decay") == 0:
            kw["ema_decay"] = None
        return WorkerConfig(
            domain=args.domain, registry=args.registry, **kw, **({"device": device} if device else {}),
            filters=dataclasses.replace(FilterConfig(), **_given(args, "min_score")),
            selection=dataclasses.replace(SelectionConfig(), **_given(args, "holdout_fraction", "max_client_share")),
            gate=dataclasses.replace(GateConfig(), **gate))
    except ValueError as e:
        if isinstance(e, WesamError):  # e.g. an invalid domain name
            raise
        raise WorkerError(str(e), kind="invalid_argument") from e


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds the round: nothing is published, the lease is released


def cmd_worker(args: argparse.Namespace) -> int:
    """``wesam worker``."""
    import torch

    from .metrics import serve_metrics
    from .store import open_store
    from .worker import OnlineWorker, WorkerError

    url = args.store or os.environ.get(CAPTURE_STORE_ENV)
    if not url:
        raise WorkerError(f"give --store URL (or set ${CAPTURE_STORE_ENV})", kind="invalid_argument")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = worker_config(args)
    signal.signal(signal.SIGTERM, _sigterm)
    rounds = 1 if args.once else args.rounds
    with open_store(url, create=False) as store:
        serve_metrics(args.metrics_port)
        with OnlineWorker(cfg, store) as worker:
            worker.log(f"worker {cfg.domain}: lease {worker.lease.path}, store {store.location}, model "
                       f"{cfg.model}, device {cfg.device}")
            worker.run(rounds)
    return 0
