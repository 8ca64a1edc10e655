"""Monitoring end to end: a real ``wesam serve`` (sam-micro, a registry with a good and a refused
adapter) scraped by a real Prometheus server (Debian's ``prometheus`` binary, loopback only) that
loads ``k8s/monitoring/rules.yaml``. After traffic that covers a domain request, a cached follow-up
and errors, every metric selector named in the Grafana dashboard and in the rules returns data
through Prometheus's query API, every dashboard query returns a finite value, every rule evaluates
without error, and the adapter-refusal alert fires. The server captures its polyp requests into a
store it cannot open, so the capture metrics have data too, failures included.

The online worker's metrics (``wesam_worker_*``) come from another process (``wesam worker``, not
started here): they are checked against the worker's code instead (the names it defines), and
their alerts by the promtool unit tests (tests/test_k8s.py).

The selectors are parsed out of ``k8s/monitoring/dashboard.json`` and ``rules.yaml``, so a metric
added to either is checked without touching this file. Without the ``prometheus`` binary the
integration test is skipped, unless ``$CI`` is set (CI installs it): then it fails.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import yaml
from service_support import corrupt_weights, encode, make_base, make_image, publish_adapter

from wesam.service.config import ServeConfig
from wesam.service.launch import ServerProcess, free_port

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "k8s" / "monitoring"
DASHBOARD = MONITORING / "dashboard.json"
RULES = MONITORING / "rules.yaml"
# The scrape job is named like the Service (the Prometheus Operator's default job label), and the
# target gets the labels the operator adds in a cluster.
JOB = yaml.safe_load((REPO / "k8s" / "base" / "service.yaml").read_text())["metadata"]["name"]
NAMESPACE = "wesam"
# Series from kube-state-metrics (readiness alerts): a cluster component this test cannot run.
# Listed explicitly, so that any other metric the rules use must have data here.
KUBE_STATE_METRICS = {"kube_deployment_status_replicas_available", "kube_deployment_spec_replicas"}
# The online worker's metric families (adapters/online/worker.py, docs/online.md), exported by
# `wesam worker` on its own port. Listed explicitly: any other metric must have data here.
WORKER_METRICS = {"wesam_worker_rounds_total", "wesam_worker_samples_total", "wesam_worker_round_seconds",
                  "wesam_worker_gate_golden_delta", "wesam_worker_consecutive_rejections", "wesam_worker_drift",
                  "wesam_worker_loss", "wesam_worker_last_publish_timestamp_seconds", "wesam_worker_lease_held",
                  "wesam_worker_active_version"}
WORKER_CODE = REPO / "adapters" / "online"
# Grafana variables as the dashboard would set them for this server.
GRAFANA_VARIABLES = {"namespace": NAMESPACE, "domain": ".*"}
RATE_INTERVAL = "1m"
SCRAPE_INTERVAL_S = 1
BOX = [8.0, 6.0, 50.0, 40.0]


# -- PromQL selectors ------------------------------------------------------------------------------

_TOKENS = re.compile(r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<braces>\{(?:[^{}"'`]|"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)*\})
  | (?P<brackets>\[[^\]]*\])
  | (?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?:ms|[smhdwy])*)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<space>\s+)
  | (?P<other>.)
""", re.VERBOSE)
# Keywords followed by a parenthesised list of label names.
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = _LABEL_LISTS | {"and", "or", "unless", "offset", "bool", "atan2", "inf", "nan", "start", "end"}


def promql_selectors(expr: str) -> list[tuple[str, str]]:
    """The vector selectors of a PromQL expression as (metric name, ``{matchers}`` or ``""``), in
    order; function and aggregation names, keywords, label lists and durations are skipped."""
    tokens = [(kind, text) for m in _TOKENS.finditer(expr) for kind, text in m.groupdict().items()
              if text is not None and kind != "space"]
    found: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "ident":
            word = text.lower()
            if word in _LABEL_LISTS and following[1] == "(":
                i = next(j for j in range(i + 2, len(tokens)) if tokens[j][1] == ")") + 1
                continue
            aggregation = following[1] == "(" or following[1].lower() in ("by", "without")  # sum by (...) (...)
            if word not in _KEYWORDS and not aggregation:
                found.append((text, following[1] if following[0] == "braces" else ""))
        i += 1
    return found


def grafana_query(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced as Grafana would."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", RATE_INTERVAL, expr)
    return re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VARIABLES[m.group(1)], expr)


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    panels = []
    for p in dashboard["panels"]:
        panels += [p] + p.get("panels", [])
    for p in panels:
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query, re.DOTALL)
            out.append((f"variable {v['name']}", m.group(1) if m else query))
    return out


def rule_queries() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [(f"rule {r.get('alert') or r.get('record')}", r["expr"]) for g in rules["groups"] for r in g["rules"]]


def named_selectors() -> dict[str, str]:
    """Every selector of the dashboard and the rules (PromQL, Grafana variables replaced) -> where."""
    out: dict[str, str] = {}
    for where, expr in dashboard_queries() + rule_queries():
        for name, matchers in promql_selectors(grafana_query(expr)):
            out.setdefault(name + matchers, where)
    return out


def worker_family(name: str) -> str | None:
    """The worker metric family a series name belongs to (a histogram's ``_bucket``/``_sum``/
    ``_count`` included), or None for any other metric."""
    for family in WORKER_METRICS:
        if name == family or (family.endswith("_seconds") and name in (f"{family}_bucket", f"{family}_sum",
                                                                       f"{family}_count")):
            return family
    return None


def is_worker_expr(expr: str) -> bool:
    return any(name.startswith("wesam_worker_") for name, _ in promql_selectors(grafana_query(expr)))


def test_selector_extraction() -> None:
    expr = ('sum by (namespace, domain) (rate(wesam_requests_total{status=~"5..", x="}{"}[5m]))\n'
            '/ ignoring(le) group_left sum without (pod) (rate(wesam_requests_total[5m] offset 1h)) > 0.05\n'
            'and absent(up{job="wesam"} == 1) unless on (x) namespace:wesam_x:rate5m offset 1h30m\n'
            'or histogram_quantile(0.95, sum(rate(a_bucket[1m])) by (le)) > bool 1e3')
    assert promql_selectors(expr) == [
        ("wesam_requests_total", '{status=~"5..", x="}{"}'), ("wesam_requests_total", ""), ("up", '{job="wesam"}'),
        ("namespace:wesam_x:rate5m", ""), ("a_bucket", "")]
    assert grafana_query('rate(x{namespace=~"$namespace", d=~"${domain}"}[$__rate_interval])') == \
        f'rate(x{{namespace=~"{NAMESPACE}", d=~".*"}}[{RATE_INTERVAL}])'


def test_dashboard_and_rules_cover_the_wesam_metrics() -> None:
    """The dashboard shows request rate and latency per domain, encoder/decoder time, cache, batch
    size and adapters; the rules cover errors, latency, readiness, adapter failures and the cache."""
    dashboard = {name for _, e in dashboard_queries() for name, _ in promql_selectors(grafana_query(e))}
    assert {"wesam_requests_total", "wesam_request_latency_seconds_bucket", "wesam_errors_total",
            "wesam_encoder_seconds_bucket", "wesam_decoder_seconds_bucket", "wesam_batch_size_bucket",
            "wesam_encoder_batch_images_sum", "wesam_batch_adapters_sum", "wesam_cache_hits_total",
            "wesam_cache_misses_total", "wesam_cache_evictions_total", "wesam_cache_bytes", "wesam_cache_entries",
            "wesam_adapter_active_version", "wesam_adapter_loads_total", "wesam_adapter_load_failures_total",
            "up"} <= dashboard
    rules = {name for _, e in rule_queries() for name, _ in promql_selectors(e)}
    assert {"wesam_requests_total", "wesam_request_latency_seconds_bucket", "up",
            "wesam_adapter_load_failures_total", "wesam_cache_hits_total", "wesam_cache_misses_total"} <= rules
    assert KUBE_STATE_METRICS <= rules, "unused entries in KUBE_STATE_METRICS"
    # Online capture (the servers) and the online worker.
    assert {"wesam_capture_total", "wesam_capture_queue_depth", "wesam_worker_rounds_total",
            "wesam_worker_samples_total", "wesam_worker_round_seconds_bucket", "wesam_worker_gate_golden_delta",
            "wesam_worker_consecutive_rejections", "wesam_worker_drift", "wesam_worker_loss",
            "wesam_worker_last_publish_timestamp_seconds", "wesam_worker_lease_held",
            "wesam_worker_active_version"} <= dashboard
    assert {"wesam_capture_total", "wesam_worker_lease_held", "wesam_worker_consecutive_rejections",
            "wesam_worker_rounds_total", "wesam_worker_last_publish_timestamp_seconds",
            "wesam_worker_samples_total"} <= rules


def test_worker_selectors_name_only_worker_metrics() -> None:
    """Every wesam_worker_* name in the dashboard and the rules is one of WORKER_METRICS (a typo
    would otherwise go unnoticed: the live test below does not run a worker)."""
    names = {promql_selectors(s)[0][0] for s in named_selectors()}
    worker = {n for n in names if n.startswith("wesam_worker_")}
    assert worker, "no worker metric in the dashboard or the rules"
    assert {n for n in worker if worker_family(n) is None} == set()
    assert {worker_family(n) for n in worker} == WORKER_METRICS, "WORKER_METRICS lists unused metrics"


def test_worker_defines_the_metrics_the_dashboard_and_rules_use() -> None:
    """The worker's code registers every family of WORKER_METRICS (by name, as prometheus_client
    takes it: counters with or without their ``_total``)."""
    worker = WORKER_CODE / "worker.py"
    if not worker.is_file():
        pytest.skip(f"{worker.relative_to(REPO)} is not in this checkout yet")
    code = "\n".join(f.read_text() for f in sorted(WORKER_CODE.glob("*.py")))
    literals = set(re.findall(r"""["'](wesam_worker_\w+)["']""", code))
    missing = {m for m in WORKER_METRICS if m not in literals and m.removesuffix("_total") not in literals}
    assert not missing, f"metrics the dashboard/rules use but the worker does not define: {sorted(missing)}"


# -- the running stack -----------------------------------------------------------------------------

def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def prometheus_binary() -> str:
    path = shutil.which(os.environ.get("PROMETHEUS", "prometheus"))
    if path:
        return path
    reason = "prometheus not found (Debian package prometheus; apt-get install -y prometheus)"
    if _in_ci():
        pytest.fail(f"{reason}: CI must install it")
    pytest.skip(reason)


class Prometheus:
    """A Prometheus server on loopback with its data in a temporary folder; stopped by ``stop``."""

    def __init__(self, binary: str, root: Path, target: str) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "scrape_timeout": f"{SCRAPE_INTERVAL_S}s",
                       "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{
                "job_name": JOB, "metrics_path": "/metrics",
                "static_configs": [{"targets": [target],
                                    "labels": {"namespace": NAMESPACE, "pod": "wesam-test", "service": JOB}}],
            }],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = root / "prometheus.log"
        self.cmd = [binary, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"prometheus not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:]) if self.log_path.exists() else ""

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; raises on a query error (bad PromQL, many-to-many matching, ...)."""
        r = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{promql}: {body.get('error', r.text)}"
        assert body["data"]["resultType"] == "vector", promql
        return body["data"]["result"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None


@dataclass
class Stack:
    server: ServerProcess
    prometheus: Prometheus
    client: httpx.Client


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    binary = prometheus_binary()
    root = tmp_path_factory.mktemp("monitoring")
    base = make_base(root)
    registry = root / "registry"
    publish_adapter(base, registry, "polyp", seed=1)  # polyp v1: served
    publish_adapter(base, registry, "skin", seed=2)  # skin v1: refused at startup (tampered)
    corrupt_weights(registry, "skin", 1)
    # Capture polyp into a store that cannot be opened (its folder would be a regular file): the
    # capture metrics get data, the `error` outcome included, and serving goes on regardless.
    (root / "not-a-folder").write_text("")
    config = ServeConfig(model=str(base), registry=str(registry), threads=1, workers=1, grpc_port=free_port(),
                         poll_seconds=1, cache_mb=64, capture_store=str(root / "not-a-folder" / "samples.db"),
                         capture_domains=("polyp",))
    server = ServerProcess(config, bentoml_home=root / "bentoml", extra_env={"OMP_NUM_THREADS": "1"})
    prometheus = Prometheus(binary, root, f"127.0.0.1:{server.port}")
    try:
        server.start(timeout=300)
        prometheus.start()
        with httpx.Client(base_url=server.url, timeout=120) as client:
            yield Stack(server, prometheus, client)
    finally:
        prometheus.stop()
        server.cleanup()


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Call ``check`` until it returns without an AssertionError; re-raise the last one at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} after {timeout:.0f}s: {e}") from None
        time.sleep(SCRAPE_INTERVAL_S / 2)


def send_traffic(client: httpx.Client, seed: int) -> None:
    """A domain request with a new image, cached follow-ups, a base-model embed and two errors."""
    image = base64.b64encode(encode(make_image(seed=seed))).decode()
    r = client.post("/segment", json={"image": image, "domain": "polyp", "boxes": [BOX]})
    assert r.status_code == 200 and r.json()["adapter"] == "polyp@v1" and not r.json()["cached"], r.text
    follow = client.post("/segment", json={"image_id": r.json()["image_id"], "points": [[20, 15]], "point_labels": [1]})
    assert follow.status_code == 200 and follow.json()["cached"], follow.text
    again = client.post("/segment", json={"image": image, "domain": "polyp", "boxes": [BOX], "multimask": True})
    assert again.status_code == 200 and again.json()["cached"], again.text
    embed = client.post("/embed", json={"image": image})
    assert embed.status_code == 200 and embed.json()["adapter"] == "base", embed.text
    bad = client.post("/segment", json={"image": base64.b64encode(b"not an image").decode(), "boxes": [BOX]})
    assert bad.status_code == 400 and bad.json()["kind"] == "invalid_image", bad.text
    refused = client.post("/segment", json={"image": image, "domain": "skin", "boxes": [BOX]})
    assert refused.status_code == 503 and refused.json()["kind"] == "adapter_unavailable", refused.text


def _finite(result: list[dict[str, Any]]) -> list[float]:
    return [float(s["value"][1]) for s in result if math.isfinite(float(s["value"][1]))]


def test_every_dashboard_and_rule_metric_has_data(stack: Stack) -> None:
    prom = stack.prometheus
    wait_for(lambda: _assert(prom.query(f'up{{job="{JOB}"}} == 1')), 60, "the server was not scraped")

    # Two rounds of traffic with a scrape in between, so that rates over the window are non-zero.
    send_traffic(stack.client, seed=1)
    wait_for(lambda: _assert(prom.query('wesam_requests_total{domain="polyp", status="200"}')), 60,
             "the first requests were not scraped")
    send_traffic(stack.client, seed=2)
    wait_for(lambda: _assert(sum(_finite(prom.query('sum(rate(wesam_encoder_seconds_count[1m]))'))) > 0), 60,
             "no encoder rate")

    # The traffic is what the dashboard and the alerts are about.
    statuses = {s["metric"]["status"] for s in prom.query("wesam_requests_total")}
    assert {"200", "400", "503"} <= statuses
    assert {s["metric"]["kind"] for s in prom.query("wesam_errors_total")} >= {"invalid_image", "adapter_unavailable"}
    assert sum(_finite(prom.query("wesam_cache_hits_total"))) >= 4

    # Capture ran: the polyp requests that carried their image failed to reach the store.
    def capture_counted() -> None:
        outcomes = {s["metric"]["outcome"] for s in prom.query('wesam_capture_total{domain="polyp"}')}
        assert {"error", "unsupported"} <= outcomes, outcomes

    wait_for(capture_counted, 60, "capture outcomes not scraped")

    # Every selector named in the dashboard and the rules has data (kube-state-metrics and the
    # worker's metrics aside).
    selectors = named_selectors()
    assert len(selectors) >= 20, selectors
    kube = {s for s in selectors if promql_selectors(s)[0][0] in KUBE_STATE_METRICS}
    assert {promql_selectors(s)[0][0] for s in kube} == KUBE_STATE_METRICS
    external = kube | {s for s in selectors if worker_family(promql_selectors(s)[0][0])}

    def all_selectors_have_data() -> None:
        empty = [f"{s} ({where})" for s, where in selectors.items() if s not in external and not prom.query(s)]
        assert not empty, "no data for " + ", ".join(empty)

    wait_for(all_selectors_have_data, 60, "selectors without data")

    # Every dashboard query, as Grafana sends it, has a finite value.
    def dashboard_has_values() -> None:
        empty = [where for where, expr in dashboard_queries()
                 if not is_worker_expr(expr) and not _finite(prom.query(grafana_query(expr)))]
        assert not empty, "no finite value for " + ", ".join(empty)

    wait_for(dashboard_has_values, 60, "dashboard queries without values")
    names = httpx.get(prom.url + "/api/v1/label/namespace/values", params={"match[]": "wesam_requests_total"}).json()
    assert names["data"] == [NAMESPACE]  # the $namespace variable's options

    # Every rule was loaded and evaluates without error on the real series.
    def rules_evaluated() -> None:
        groups = httpx.get(prom.url + "/api/v1/rules").json()["data"]["groups"]
        loaded = {r["name"] for g in groups for r in g["rules"]}
        assert loaded == {where.split(" ", 1)[1] for where, _ in rule_queries()}
        for g in groups:
            for r in g["rules"]:
                assert r["health"] == "ok", f"{r['name']}: {r.get('lastError')}"
                assert not r["lastEvaluation"].startswith("0001-"), f"{r['name']} not evaluated yet"

    wait_for(rules_evaluated, 60, "rules not evaluated")
    for where, expr in rule_queries():
        prom.query(expr)  # raises on evaluation errors

    # The refused skin v1 (a counter that appeared at 1) fires WesamAdapterLoadFailed.
    firing = wait_for(lambda: _assert(prom.query(
        'ALERTS{alertname="WesamAdapterLoadFailed", alertstate="firing"}')), 60, "WesamAdapterLoadFailed not firing")
    assert {(a["metric"]["domain"], a["metric"]["version"]) for a in firing} == {("skin", "1")}
    # ...and nothing else is firing on this healthy-but-for-skin server.
    others = [a["metric"]["alertname"] for a in prom.query('ALERTS{alertstate="firing"}')
              if a["metric"]["alertname"] != "WesamAdapterLoadFailed"]
    assert not others, others


def _assert(value: Any) -> Any:
    """``value`` if truthy, else an AssertionError (for ``wait_for``)."""
    assert value, value
    return value
