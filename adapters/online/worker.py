"""`wesam worker`: online WeSAM self-training of one domain's adapter on captured requests.

One worker per domain (:class:`~.lease.DomainLease` on ``REGISTRY/<domain>/.worker.lock``). A
round (:meth:`OnlineWorker.run_round`):

1. reads the operator controls (:func:`~.control.read_control`); a frozen domain skips the round
   (outcome ``frozen``);
2. reads the domain's samples captured since the worker's cursor; fewer than ``min_samples`` new
   ones: outcome ``waiting`` (the cursor stays, samples accumulate);
3. decides every sample (:mod:`.filtering`: ``filtered:<reason>``, ``holdout``, ``capped``,
   ``used``) and trains ``steps_per_round`` WeSAM steps on the used ones, starting from the active
   adapter (the base model when the domain has none), with an EMA teacher, the weak labels
   applied to the pseudo-labels (``clip_to_box``, ``respect_points``) and a pull towards the
   pinned adapter that grows with the drift from it. A non-finite loss aborts the round
   (``aborted``);
4. gates the candidate against the active adapter (:mod:`.gate`) and publishes it as a new
   immutable version with its lineage (``published``), or does not (``rejected``). After
   ``reset_after`` consecutive rejected or aborted rounds, training restarts from the pinned
   adapter instead of the active one (that round's outcome is ``reset``) until a publish.

The cursor, counters and the reset state live in ``REGISTRY/<domain>/.worker-state.json``
(replaced atomically), so a restarted worker continues where the last one stopped; the samples
of a published round are never trained on again (the state is committed together with the
publish, see :meth:`OnlineWorker._commit`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from wesam.errors import WesamError
from wesam.sam.zoo import LoadedModel, resolve_model

from ..adapt import DEFAULT_LR, METHODS
from ..adapt.trainer import ADAPTER, AdaptationTrainer, AdaptConfig, AdapterState, NonFiniteLoss
from ..artifact import WEIGHTS_FILE, save_adapter, verify_artifact
from ..errors import AdapterError
from ..lora import ENCODER_QV, add_adapter, load_adapter_state
from ..ref import AdapterRef
from ..registry import Registry, _write_atomic
from .control import DomainControl, read_control
from .filtering import Candidate, FilterConfig, Selection, SelectionConfig, UnusableSample, prepare, select
from .gate import GOLDEN_DIR, GateConfig, GateInputs, load_golden, run_gate
from .lease import DomainLease, LeaseLost
from .metrics import worker_metrics
from .store import CapturedSample, SampleStore, time_ms

STATE_FILE = ".worker-state.json"
STATE_VERSION = 1
STAGING_PREFIX = ".staging-"
STALE_STAGING_S = 3600.0
ACTIVE = "active"  # name of the active adapter on the trainer's model while gating
# Test-only hook (tests/test_online_worker.py): seconds to sleep after the new version is fully
# written to its staging directory, before the last checks and the rename, so a test can kill -9
# the worker mid-publish or change the registry meanwhile. Never set it in production.
PUBLISH_DELAY_ENV = "WESAM_WORKER_TEST_PUBLISH_DELAY_S"


class WorkerError(WesamError, RuntimeError):
    """The worker cannot run a round: an unusable pinned or active adapter, a bad configuration."""

    kind = "worker"


@dataclass
class WorkerConfig:
    """Everything a worker needs; the defaults are the documented ones (docs/online.md)."""

    domain: str
    registry: str
    model: str = "sam-mini"
    checkpoint: str | None = None
    device: str = "cpu"
    # rounds
    min_samples: int = 32  # new samples needed before a round trains
    max_samples: int = 512  # at most this many new samples per round
    min_train: int = 4  # fewer training samples after filtering: nothing to train (outcome waiting)
    steps_per_round: int = 50
    batch_size: int = 4
    lr: float = DEFAULT_LR
    warmup_steps: int = 5
    method: str = "wesam"
    lora_rank: int = 4  # only when the domain has no adapter yet (else the active adapter's config)
    # Also only for a domain's first adapter. Encoder-only, unlike `wesam adapt`'s default: the
    # worker's pull and gate were tuned on encoder adapters. An active adapter with decoder targets
    # keeps them (tests/test_online_worker.py::test_a_decoder_adapter_is_trained_as_it_is).
    lora_targets: tuple[str, ...] = ENCODER_QV
    ema_decay: float | None = 0.99
    clip_to_box: bool = True
    respect_points: bool = True
    pull: float = 10.0
    drift_scale: float = 0.1
    reset_after: int = 3
    seed: int = 0
    interval: float = 60.0  # seconds between rounds that found nothing to do
    holdout_keep: int = 64  # held-out samples remembered across rounds for the gate's label-free checks
    filters: FilterConfig = field(default_factory=FilterConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    progress: bool = True  # tqdm bar over each round's steps (stderr)

    def __post_init__(self) -> None:
        AdapterRef(self.domain)
        if self.method not in METHODS or self.method == "oracle":
            raise WorkerError(f"method must be one of {', '.join(m for m in METHODS if m != 'oracle')} "
                              f"(oracle needs ground truth), got {self.method!r}", kind="invalid_argument")
        for name in ("min_samples", "max_samples", "min_train", "steps_per_round", "batch_size", "reset_after"):
            if getattr(self, name) < 1:
                raise WorkerError(f"{name} must be >= 1, got {getattr(self, name)}", kind="invalid_argument")
        if self.max_samples < self.min_samples:
            raise WorkerError("max_samples must be >= min_samples", kind="invalid_argument")
        if self.interval < 0 or self.holdout_keep < 0:
            raise WorkerError("interval and holdout_keep must be >= 0", kind="invalid_argument")

    def adapt_config(self, round_no: int) -> AdaptConfig:
        """The trainer's configuration for round ``round_no`` (data comes in memory)."""
        return AdaptConfig(data="<captured samples>", domain=self.domain, model=self.model, checkpoint=self.checkpoint,
                           method=self.method, registry=None, steps=self.steps_per_round, batch_size=self.batch_size,
                           lr=self.lr, warmup_steps=self.warmup_steps, lora_rank=self.lora_rank,
                           lora_targets=self.lora_targets,
                           seed=self.seed + round_no, device=self.device, eval_every=self.steps_per_round + 1,
                           val_fraction=0.0, ema_decay=self.ema_decay, clip_to_box=self.clip_to_box,
                           respect_points=self.respect_points, select="fixed", pull=self.pull,
                           drift_scale=self.drift_scale)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WorkerState:
    """What a worker keeps between rounds and restarts (``REGISTRY/<domain>/.worker-state.json``)."""

    round: int = 0  # rounds that consumed samples
    cursor: float | None = None  # read samples filed at >= this (unix s); None: from the start
    cursor_seen: list[str] = field(default_factory=list)  # consumed ids that may still be filed >= cursor
    consecutive_rejections: int = 0  # rejected or aborted rounds since the last publish
    start_from: str = "active"  # "active", or "pinned" after a reset (until the next publish)
    first_active: int | None = None  # the version active when the worker first started (the default pin)
    initialised: bool = False
    holdout: list[str] = field(default_factory=list)  # recent held-out request ids, oldest first
    samples: dict[str, int] = field(default_factory=dict)  # decision -> count, all rounds
    outcomes: dict[str, int] = field(default_factory=dict)  # outcome -> count, all rounds
    last_publish: dict[str, Any] | None = None  # {"version", "time"}
    pending: dict[str, Any] | None = None  # {"run": id, "state": the state to commit if that run published}

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerState:
        if data.get("version") != STATE_VERSION:
            raise WorkerError(f"worker state version {data.get('version')!r} is not {STATE_VERSION}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json_line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class OnlineWorker:
    """The self-training worker of one domain. Use as a context manager (it holds the lease)::

        with OnlineWorker(config, store) as worker:
            worker.run(rounds=10)

    ``store`` is an open :class:`SampleStore`; ``base`` an already loaded base model (default:
    ``config.model``); ``report`` receives each round's report (default: one JSON line on stdout).
    """

    def __init__(self, config: WorkerConfig, store: SampleStore, *, base: LoadedModel | None = None,
                 log: Callable[[str], None] = _stderr, report: Callable[[dict[str, Any]], None] | None = None
                 ) -> None:
        self.cfg = config
        self.domain = config.domain
        self.store = store
        self.registry = Registry(config.registry)
        self.domain_dir = self.registry.root / self.domain
        self.log = log
        self.report = report or (lambda r: print(_json_line(r), flush=True))
        self.lease = DomainLease(self.registry.root, self.domain)
        self.metrics = worker_metrics()
        self._base = base
        self._golden: tuple[float, list] | None = None  # (split.json mtime, samples)
        self.state = WorkerState()

    # -- lifecycle
    def start(self) -> OnlineWorker:
        """Take the domain's lease (:class:`~.lease.LeaseHeld` if another worker has it), clean
        stale staging directories, load the state and the base model."""
        self.lease.acquire()
        self.metrics.lease_held.labels(self.domain).set(1)
        try:
            self._clean_staging()
            self.state = self._load_state()
            if not self.state.initialised:
                # The default pin: what was active when the worker first ran on this domain.
                self.state.first_active = self.registry.active_version(self.domain)
                self.state.initialised = True
                self._save_state(self.state)
            if self._base is None:
                self._base = resolve_model(self.cfg.model, self.cfg.checkpoint)
            self.metrics.active_version.labels(self.domain).set(self.registry.active_version(self.domain) or 0)
            self.metrics.consecutive_rejections.labels(self.domain).set(self.state.consecutive_rejections)
            last = self.state.last_publish or {}
            self.metrics.last_publish.labels(self.domain).set(last.get("time") or 0)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        self.lease.release()
        self.metrics.lease_held.labels(self.domain).set(0)

    def __enter__(self) -> OnlineWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, rounds: int | None = None, *, interval: float | None = None) -> list[dict[str, Any]]:
        """Run ``rounds`` rounds of any outcome (None: forever) and return their reports. Sleeps
        ``interval`` seconds after a round that found nothing to do (waiting, frozen) or failed;
        a round that trained is followed by the next at once (samples may be queued). Store or
        registry errors are logged and retried after the interval; losing the lease ends the run."""
        interval = self.cfg.interval if interval is None else interval
        out: list[dict[str, Any]] = []
        while rounds is None or len(out) < rounds:
            try:
                rep = self.run_round()
            except LeaseLost:
                raise
            except (WesamError, OSError) as e:  # an unreachable store, a full disk: retried
                if rounds == 1:
                    raise
                self.log(f"worker {self.domain}: round failed: {e}")
                self.metrics.rounds.labels(self.domain, "error").inc()
                rep = {"time": _now_iso(), "domain": self.domain, "outcome": "error", "error": str(e),
                       "kind": getattr(e, "kind", type(e).__name__)}
                self.report(rep)
            out.append(rep)
            if (rounds is None or len(out) < rounds) and rep["outcome"] in ("waiting", "frozen", "error"):
                time.sleep(interval)
        return out

    # -- state
    @property
    def state_path(self) -> Path:
        return self.domain_dir / STATE_FILE

    def _load_state(self) -> WorkerState:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return WorkerState()
        except (OSError, json.JSONDecodeError) as e:
            raise WorkerError(f"cannot read the worker state {self.state_path}: {e}; fix or delete it "
                              "(deleting it re-reads every stored sample)") from None
        state = WorkerState.from_json(data)
        if state.pending:
            run = state.pending.get("run")
            version = self._published_run(run)
            if version is not None:
                # Killed between the rename of the new version and the state commit: the version is
                # there, so the round happened; commit what it would have written.
                self.log(f"worker {self.domain}: committing the state of round {run} (published as v{version})")
                state = WorkerState.from_json({"version": STATE_VERSION, **state.pending["state"]})
                state.pending = None
                state.last_publish = {**(state.last_publish or {}), "version": version}
            else:  # killed before the rename: the round did not happen
                state.pending = None
            self._save_state(state)
        return state

    def _published_run(self, run: str | None) -> int | None:
        """The version whose lineage names round ``run``, or None."""
        if not run:
            return None
        for v in reversed(self.registry.versions(self.domain)):
            try:
                lineage = self.registry.lineage(self.domain, v) or {}
            except AdapterError:
                continue
            if lineage.get("run") == run:
                return v
        return None

    def _save_state(self, state: WorkerState) -> None:
        self.domain_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.state_path, json.dumps(state.to_json(), indent=1, sort_keys=True) + "\n")

    def _clean_staging(self) -> None:
        """Remove staging directories of this domain older than an hour (left by killed writers;
        younger ones may belong to a writer that is still running, e.g. `wesam adapt`)."""
        if not self.domain_dir.is_dir():
            return
        now = time.time()
        for d in self.domain_dir.glob(f"{STAGING_PREFIX}*"):
            try:
                if d.is_dir() and now - d.stat().st_mtime > STALE_STAGING_S:
                    shutil.rmtree(d, ignore_errors=True)
                    self.log(f"worker {self.domain}: removed stale {d.name}")
            except FileNotFoundError:
                pass

    # -- samples
    def _read_new(self) -> tuple[list[CapturedSample], Callable[[int], tuple[float | None, list[str]]]]:
        """New samples since the cursor (at most ``max_samples``) and a function giving the cursor
        after consuming the first ``n`` of them.

        The store files a sample at max(its created ms, the domain's newest filed ms), oldest first,
        and does not expose that filed time. Along the returned order, the running maximum of
        ``created`` is a lower bound of each sample's filed time, so after consuming up to sample k
        every unconsumed sample (later in the order, or not yet arrived) is filed at >= that bound:
        it is the next cursor. Consumed samples filed at or after it are read again next time and
        skipped by id: the ids of every row up to k are kept (``cursor_seen``).
        """
        st = self.state
        seen = set(st.cursor_seen)
        rows = self.store.samples(self.domain, since=st.cursor, limit=self.cfg.max_samples + len(seen))
        fresh_idx = [i for i, s in enumerate(rows) if s.request_id not in seen][:self.cfg.max_samples]
        fresh = [rows[i] for i in fresh_idx]

        def cursor_after(n: int) -> tuple[float | None, list[str]]:
            if n == 0:
                return st.cursor, list(st.cursor_seen)
            last = fresh_idx[n - 1]
            bound = max(time_ms(s.created) for s in rows[:last + 1])
            if st.cursor is not None:
                bound = max(bound, time_ms(st.cursor))
            return bound / 1000.0, [s.request_id for s in rows[:last + 1]]

        return fresh, cursor_after

    def _gate_holdout(self, current: list[Candidate]) -> tuple[list[Candidate], list[str]]:
        """This round's held-out samples plus remembered earlier ones still in the store (deleted
        samples drop out), newest ``holdout_keep``; and the ids to remember."""
        keep = self.cfg.holdout_keep
        if keep == 0:
            return current, []
        current_ids = {c.request_id for c in current}
        room = max(keep - len(current), 0)
        earlier_ids = [i for i in self.state.holdout if i not in current_ids][-room:] if room else []
        earlier: list[Candidate] = []
        for rid in earlier_ids:
            s = self.store.get(rid)
            if s is None:  # deleted (a client's data-deletion request, retention)
                continue
            try:
                earlier.append(prepare(s, self.cfg.filters))
            except UnusableSample:
                continue
        pool = earlier + current
        return pool, [c.request_id for c in pool][-keep:]

    def golden(self) -> list | None:
        """The domain's golden set (re-read when its split.json changes), or None."""
        split = self.domain_dir / GOLDEN_DIR / "split.json"
        try:
            mtime = split.stat().st_mtime
        except FileNotFoundError:
            self._golden = None
            return None
        if self._golden is None or self._golden[0] != mtime:
            self._golden = (mtime, load_golden(self.registry.root, self.domain) or [])
        return self._golden[1] or None

    # -- adapters
    def _adapter(self, version: int | None) -> AdapterState | None:
        """(LoRA config, tensors) of ``domain@v<version>``, verified against the base; None: the base."""
        if version is None:
            return None
        from safetensors.torch import load_file

        art = self.registry.resolve(AdapterRef(self.domain, version))
        check = verify_artifact(art, self._base)
        if not check["ok"]:
            raise WorkerError(f"cannot train from {art.ref}: " + "; ".join(check["problems"]))
        return art.lora, load_file(str(art.path / WEIGHTS_FILE))

    def _pinned(self, control: DomainControl) -> int | None:
        return control.pinned if control.pinned is not None else self.state.first_active

    # -- a round
    def run_round(self) -> dict[str, Any]:
        """One round; returns its report (also passed to ``report`` and counted in the metrics)."""
        m, d = self.metrics, self.domain
        t0 = time.monotonic()
        self.lease.check()
        control = read_control(self.registry, d)
        active = self.registry.active_version(d)
        m.active_version.labels(d).set(active or 0)
        rep: dict[str, Any] = {"time": _now_iso(), "domain": d, "round": self.state.round + 1,
                               "active": None if active is None else str(AdapterRef(d, active))}
        if control.frozen:
            return self._finish(rep, "frozen", t0, reason=control.reason)
        fresh, cursor_after = self._read_new()
        rep["new_samples"] = len(fresh)
        if len(fresh) < self.cfg.min_samples:
            return self._finish(rep, "waiting", t0, reason=f"{len(fresh)} new samples < min_samples "
                                                           f"{self.cfg.min_samples}")
        sel = select(fresh, self.cfg.filters, self.cfg.selection)
        counts = sel.counts()
        rep["samples"] = counts
        if sel.prompts_filtered:
            rep["prompts_filtered"] = dict(sorted(sel.prompts_filtered.items()))
        new_state = copy.deepcopy(self.state)
        new_state.round += 1
        new_state.cursor, new_state.cursor_seen = cursor_after(len(fresh))
        for k, v in counts.items():
            new_state.samples[k] = new_state.samples.get(k, 0) + v
            m.samples.labels(d, k).inc(v)
        holdout, new_state.holdout = self._gate_holdout(sel.holdout)
        if len(sel.train) < self.cfg.min_train:
            # The samples are consumed (decided); too few were usable to train on.
            self.state = new_state
            return self._finish(rep, "waiting", t0, commit=True,
                                reason=f"{len(sel.train)} usable training samples < min_train {self.cfg.min_train}")

        pinned = self._pinned(control)
        start = active if self.state.start_from == "active" else pinned
        rep.update(start=None if start is None else str(AdapterRef(d, start)),
                   pinned=None if pinned is None else str(AdapterRef(d, pinned)))
        loaded: dict[int | None, AdapterState | None] = {}

        def adapter(version: int | None) -> AdapterState | None:
            if version not in loaded:
                loaded[version] = self._adapter(version)
            return loaded[version]

        trainer = AdaptationTrainer(
            self.cfg.adapt_config(new_state.round), log=lambda *_: None,
            data=([c.sample for c in sel.train], [], _fingerprint(sel.train)),
            model=copy.deepcopy(self._base), init=adapter(start), pin=adapter(pinned))
        losses: list[float] = []
        try:
            self._train(trainer, new_state.round, losses)
        except NonFiniteLoss as e:
            rep["error"] = str(e)
            rep["loss"] = None
            return self._fail(rep, new_state, "aborted", t0)
        drift = trainer.drift()
        rep["loss"] = round(sum(losses) / len(losses), 6)
        rep["drift"] = None if drift is None else round(drift, 6)
        m.loss.labels(d).set(rep["loss"])
        if drift is not None:
            m.drift.labels(d).set(drift)

        if active is not None:  # the gate's reference: the version serving now
            active_cfg, tensors = adapter(active)
            add_adapter(trainer.sam, ACTIVE, active_cfg)
            load_adapter_state(trainer.sam, ACTIVE, tensors)
        golden = self.golden()
        self.log(f"worker {d}: round {new_state.round}: gate ({len(golden or [])} golden images, "
                 f"{len(holdout)} held-out samples)")
        gate = run_gate(GateInputs(trainer.sam, ADAPTER, ACTIVE if active is not None else None, golden, holdout,
                                   drift, self.cfg.device), self.cfg.gate)
        rep["gate"] = _gate_summary(gate)
        if gate.get("golden"):
            m.golden_delta.labels(d).set(gate["golden"]["delta"] or 0.0)
        if not gate["pass"]:
            return self._fail(rep, new_state, "rejected", t0)
        return self._publish(rep, new_state, trainer, gate, sel, active, start, pinned, t0)

    def _train(self, trainer: AdaptationTrainer, round_no: int, losses: list[float]) -> None:
        from tqdm import tqdm

        bar = tqdm(range(self.cfg.steps_per_round), desc=f"{self.domain} round {round_no}", unit="step",
                   disable=not self.cfg.progress, file=sys.stderr, dynamic_ncols=True, leave=False)
        self.log(f"worker {self.domain}: round {round_no}: training {self.cfg.steps_per_round} steps on "
                 f"{len(trainer.train)} samples")
        try:
            for _ in bar:
                terms = trainer.train_step()
                losses.append(terms["loss"])
                bar.set_postfix({k: f"{terms[k]:.3f}" for k in ("loss", "drift") if k in terms}, refresh=False)
        finally:
            bar.close()

    def _fail(self, rep: dict[str, Any], new_state: WorkerState, outcome: str, t0: float, *,
              count: bool = True) -> dict[str, Any]:
        """A rejected or aborted round: consume its samples and (``count``) count it towards a reset."""
        if count:
            new_state.consecutive_rejections += 1
        if count and new_state.consecutive_rejections % self.cfg.reset_after == 0:
            rep["reset"] = {"after": outcome, "consecutive": new_state.consecutive_rejections}
            new_state.start_from = "pinned"
            self.log(f"worker {self.domain}: {new_state.consecutive_rejections} rounds without a publish: the next "
                     "rounds start from the pinned adapter")
            outcome = "reset"
        self.state = new_state
        return self._finish(rep, outcome, t0, commit=True)

    def _publish(self, rep: dict[str, Any], new_state: WorkerState, trainer: AdaptationTrainer, gate: dict[str, Any],
                 sel: Selection, active: int | None, start: int | None, pinned: int | None, t0: float
                 ) -> dict[str, Any]:
        d = self.domain
        ids = sorted(c.request_id for c in sel.train)
        created = [c.captured.created for c in sel.train]
        run = uuid.uuid4().hex
        ref = lambda v: None if v is None else str(AdapterRef(d, v))
        lineage = {
            "parent": ref(start), "replaces": ref(active), "pinned": ref(pinned),
            "samples": {"count": len(ids), "fingerprint": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
                        "first": min(created), "last": max(created), "holdout": len(sel.holdout),
                        "clients": len({c.captured.client for c in sel.train})},
            "gate": gate, "round": new_state.round, "run": run,
            "worker": {"host": socket.gethostname(), "pid": os.getpid()},
        }
        golden = gate.get("golden")
        extra = {
            "method": "online-wesam", "prompt": "captured",
            "data": {"source": "captured samples", "fingerprint": lineage["samples"]["fingerprint"],
                     "n_train": len(ids), "n_val": 0},
            "steps": self.cfg.steps_per_round, "seed": self.cfg.seed + new_state.round,
            "metrics": {"before": {"miou": golden["active_miou"], "n_images": golden["n_images"]} if golden else None,
                        "after": {"miou": golden["candidate_miou"], "n_images": golden["n_images"]} if golden else None,
                        "measured_on": "golden set" if golden else "held-out captured samples (label-free)",
                        "gate": rep["gate"]},
            "lineage": lineage,
            "config": {k: v for k, v in self.cfg.to_json().items() if k not in ("registry",)},
        }
        now = time.time()
        try:
            with self.registry.staging(d) as staged:
                save_adapter(staged, trainer.base, ADAPTER, domain=d, extra=extra)
                delay = float(os.environ.get(PUBLISH_DELAY_ENV) or 0)
                if delay > 0:
                    self.log(f"worker {d}: test hook: sleeping {delay:g}s before the rename of {staged.name}")
                    time.sleep(delay)
                # Last checks before the version becomes visible: still ours, not frozen meanwhile,
                # and the active version is still the one the gate compared with (an operator
                # rollback during the round must not be overwritten).
                try:
                    self.lease.check()
                except LeaseLost:
                    self.metrics.lease_held.labels(d).set(0)
                    raise
                now_control = read_control(self.registry, d)
                now_active = self.registry.active_version(d)
                if now_control.frozen or now_active != active:
                    why = "frozen" if now_control.frozen else f"the active version changed to {ref(now_active)}"
                    raise _Abort(f"not published: {why} during the round")
                # Commit with the publish: the state this round leads to is written first, pending
                # on the run id that the new version's lineage carries (see _load_state).
                new_state.consecutive_rejections = 0
                new_state.start_from = "active"
                new_state.last_publish = {"version": None, "time": now, "run": run}
                pending = copy.deepcopy(self.state)
                pending.pending = {"run": run,
                                   "state": {k: v for k, v in new_state.to_json().items() if k != "version"}}
                self._save_state(pending)
        except _Abort as e:  # the staging directory is gone; the samples are consumed
            rep["error"] = str(e)
            self.log(f"worker {d}: {e}")
            return self._fail(rep, new_state, "aborted", t0, count=False)
        try:
            art = self.registry.publish(staged, d, activate=True)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        new_state.last_publish = {"version": art.version, "time": now, "run": run}
        new_state.pending = None
        self.state = new_state
        self.metrics.last_publish.labels(d).set(now)
        self.metrics.active_version.labels(d).set(art.version)
        rep["published"] = str(art.ref)
        self.log(f"worker {d}: published {art.ref} (parent {lineage['parent'] or 'base'})")
        return self._finish(rep, "published", t0, commit=True)

    def _finish(self, rep: dict[str, Any], outcome: str, t0: float, *, commit: bool = False,
                reason: str | None = None) -> dict[str, Any]:
        d = self.domain
        rep["outcome"] = outcome
        if reason:
            rep["reason"] = reason
        seconds = time.monotonic() - t0
        rep["seconds"] = round(seconds, 2)
        self.state.outcomes[outcome] = self.state.outcomes.get(outcome, 0) + 1
        if commit:
            self._save_state(self.state)
        self.metrics.rounds.labels(d, outcome).inc()
        if outcome not in ("waiting", "frozen"):
            self.metrics.round_seconds.labels(d).observe(seconds)
        self.metrics.consecutive_rejections.labels(d).set(self.state.consecutive_rejections)
        self.report(rep)
        return rep


class _Abort(WesamError):
    """A publish refused at the last moment (frozen or rolled back meanwhile): the round aborts."""

    kind = "worker"


def _fingerprint(cands: list[Candidate]) -> str:
    return hashlib.sha256("\n".join(sorted(c.request_id for c in cands)).encode()).hexdigest()


def _gate_summary(gate: dict[str, Any]) -> dict[str, Any]:
    """The gate report without its bulky parts: pass, failed checks, golden delta and bound."""
    golden = gate.get("golden") or {}
    return {"pass": gate["pass"], "failed": gate.get("failed", []), "strict": gate.get("strict"),
            "golden_delta": golden.get("delta"), "golden_ci_low": golden.get("ci_low"),
            "holdout": gate.get("holdout")}

