"""Kubernetes manifests (``k8s/``): every kustomization renders with ``kubectl kustomize``, every
resource validates against the Kubernetes JSON schemas (``kubernetes-validate``, offline, strict)
or, for the Prometheus Operator's CRDs, against a schema of the fields wesam uses; the wiring
between resources is checked (probes, ports, volumes, configuration, selectors, security), and the
alert rules pass ``promtool check rules`` and their unit tests (``promtool test rules``).

The tools come from Debian (``prometheus`` for promtool, ``kubernetes-client`` or any kubectl on
PATH; ``$KUBECTL`` picks another binary). Without them the tests that need them are skipped,
unless ``$CI`` is set: CI installs them, so there a missing tool is a failure.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml

from wesam.service.config import PREFIX, ServeConfig

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
MONITORING = K8S / "monitoring"

# Kustomizations that must exist (more may be added; all of them are rendered and validated).
EXPECTED_KUSTOMIZATIONS = {
    "base", "overlays/cpu", "overlays/gpu", "overlays/triton", "monitoring",
    "adaptation/job", "adaptation/polyp", "adaptation/datasets", "worker/deployment", "worker/polyp",
}
SERVING_OVERLAYS = ("overlays/cpu", "overlays/gpu")
# The oldest and newest Kubernetes versions whose schemas kubernetes-validate bundles.
K8S_VERSIONS = (kubernetes_validate.utils.all_versions()[0], kubernetes_validate.latest_version())
HASH_SUFFIX = re.compile(r"-[a-z0-9]{10}$")  # kustomize's generated-name suffix
# Volume types the "restricted" Pod Security Standard allows.
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}

Doc = dict[str, Any]


# -- tools ------------------------------------------------------------------------------------------

def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_tool(name: str, env_var: str | None = None, package: str = "") -> str:
    """Path of an external tool: ``$env_var`` if set, else ``name`` on PATH. Missing: skip, or fail
    when ``$CI`` is set (CI installs the tools)."""
    path = os.environ.get(env_var, "") if env_var else ""
    path = shutil.which(path) if path else shutil.which(name)
    if path:
        return path
    reason = f"{name} not found (Debian package {package or name}; apt-get install -y {package or name})"
    if _in_ci():
        pytest.fail(f"{reason}: CI must install it")
    pytest.skip(reason)


def kubectl() -> str:
    return require_tool("kubectl", "KUBECTL", "kubernetes-client")


def promtool() -> str:
    return require_tool("promtool", package="prometheus")


# -- rendering --------------------------------------------------------------------------------------

def kustomizations() -> list[str]:
    """Every folder under k8s/ with a kustomization.yaml, relative to k8s/."""
    return sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml"))


@functools.cache
def _render(rel: str, binary: str) -> tuple[Doc, ...]:
    proc = subprocess.run([binary, "kustomize", str(K8S / rel)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize k8s/{rel} failed:\n{proc.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(proc.stdout) if d)
    assert docs, f"k8s/{rel} rendered nothing"
    return docs


def render(rel: str) -> list[Doc]:
    """The resources of ``k8s/<rel>`` as ``kubectl kustomize`` renders them (a deep copy)."""
    return copy.deepcopy(list(_render(rel, kubectl())))


def base_name(doc: Doc) -> str:
    """The resource name without kustomize's content-hash suffix."""
    name = doc["metadata"]["name"]
    return HASH_SUFFIX.sub("", name) if doc["kind"] in ("ConfigMap", "Secret") else name


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    hits = [d for d in docs if d["kind"] == kind and base_name(d) == name]
    assert len(hits) == 1, f"expected one {kind} {name}, found {[base_name(d) for d in docs if d['kind'] == kind]}"
    return hits[0]


def pod_specs(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    for d in docs:
        if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]


def container(docs: list[Doc], kind: str, name: str, container_name: str) -> Doc:
    spec = find(docs, kind, name)["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == container_name)


def config_data(docs: list[Doc], name: str) -> dict[str, str]:
    return find(docs, "ConfigMap", name)["data"]


# -- schemas of the Prometheus Operator CRDs (the fields wesam uses, names as in the CRDs) ---------

_DURATION = {"type": "string",
             "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
                   "namespace": {"type": "string"}, "labels": _STR_MAP, "annotations": _STR_MAP},
}
_LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {"matchLabels": _STR_MAP,
                   "matchExpressions": {"type": "array", "items": {
                       "type": "object", "required": ["key", "operator"], "additionalProperties": False,
                       "properties": {"key": {"type": "string"}, "operator": {"type": "string"},
                                      "values": {"type": "array", "items": {"type": "string"}}}}}},
}
SERVICE_MONITOR_SCHEMA: Doc = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": _METADATA,
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "selector": _LABEL_SELECTOR,
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"any": {"type": "boolean"},
                                                     "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "jobLabel": {"type": "string"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer", "minimum": 0},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"port": {"type": "string"}, "targetPort": {"type": ["string", "integer"]},
                                   "path": {"type": "string", "pattern": "^/"},
                                   "scheme": {"enum": ["http", "https"]},
                                   "interval": _DURATION, "scrapeTimeout": _DURATION,
                                   "honorLabels": {"type": "boolean"}, "honorTimestamps": {"type": "boolean"},
                                   "relabelings": {"type": "array", "items": {"type": "object"}},
                                   "metricRelabelings": {"type": "array", "items": {"type": "object"}}}}},
            },
        },
    },
}
_RULE = {
    "type": "object", "required": ["expr"], "additionalProperties": False,
    "properties": {"record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                   "alert": {"type": "string", "minLength": 1},
                   "expr": {"type": ["string", "integer"]}, "for": _DURATION, "keep_firing_for": _DURATION,
                   "labels": _STR_MAP, "annotations": _STR_MAP},
    "oneOf": [{"required": ["record"], "not": {"anyOf": [{"required": ["alert"]}, {"required": ["for"]},
                                                         {"required": ["annotations"]}]}},
              {"required": ["alert"], "not": {"required": ["record"]}}],
}
PROMETHEUS_RULE_SCHEMA: Doc = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
        "metadata": _METADATA,
        "spec": {"type": "object", "required": ["groups"], "additionalProperties": False, "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                "properties": {"name": {"type": "string", "minLength": 1}, "interval": _DURATION,
                               "partial_response_strategy": {"type": "string"},
                               "limit": {"type": "integer"}, "query_offset": _DURATION,
                               "rules": {"type": "array", "minItems": 1, "items": _RULE}}}}}},
    },
}
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA,
               ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE_SCHEMA}


def validate(doc: Doc) -> None:
    """Schema-validate one rendered resource (strict: unknown fields are errors)."""
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    crd = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if crd is not None:
        errors = sorted(jsonschema.Draft202012Validator(crd).iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, f"{where}: " + "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{where}: no Kubernetes {version} schema for {doc['apiVersion']} {doc['kind']}")
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where} (Kubernetes {version}): {str(e).splitlines()[0]}")


# -- rendering and schemas ------------------------------------------------------------------------

def test_expected_kustomizations_exist() -> None:
    assert EXPECTED_KUSTOMIZATIONS <= set(kustomizations())


@pytest.mark.parametrize("rel", kustomizations())
def test_kustomization_renders_and_validates(rel: str) -> None:
    docs = render(rel)
    for doc in docs:
        validate(doc)
        assert doc["metadata"].get("namespace") == "wesam" or doc["kind"] == "Namespace", \
            f"{doc['kind']}/{doc['metadata']['name']} in k8s/{rel} has no namespace"


def test_validators_reject_mistakes() -> None:
    """The schema checks above can fail: a misspelt field and a wrong type are refused."""
    deployment = find(render("overlays/cpu"), "Deployment", "wesam")
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(pytest.fail.Exception, match="paht"):
        validate(bad)
    bad = copy.deepcopy(deployment)
    bad["spec"]["replicas"] = "two"
    with pytest.raises(pytest.fail.Exception):
        validate(bad)
    docs = render("monitoring")
    monitor = copy.deepcopy(find(docs, "ServiceMonitor", "wesam"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(AssertionError, match="intervall"):
        validate(monitor)
    rule = copy.deepcopy(find(docs, "PrometheusRule", "wesam"))
    rule["spec"]["groups"][1]["rules"][0]["for"] = "10 minutes"
    with pytest.raises(AssertionError, match="for"):
        validate(rule)


def test_no_secret_values_and_the_expected_deployments() -> None:
    """The manifests reference Secrets (admin token, capture store) but never contain one; the
    Deployments are the server, the optional Triton and the online workers (template and polyp), and
    nothing autoscales a worker."""
    deployments = set()
    for rel in kustomizations():
        for doc in render(rel):
            assert doc["kind"] != "Secret", f"k8s/{rel} contains a Secret"
            if doc["kind"] == "Deployment":
                deployments.add(doc["metadata"]["name"])
            if doc["kind"] == "HorizontalPodAutoscaler":
                assert not doc["spec"]["scaleTargetRef"]["name"].startswith("wesam-worker"), rel
    assert deployments == {"wesam", "wesam-triton", "wesam-worker", "wesam-worker-polyp"}


# -- the serving Deployment -----------------------------------------------------------------------

@pytest.mark.parametrize("rel", SERVING_OVERLAYS)
def test_probes_ports_and_service(rel: str) -> None:
    docs = render(rel)
    c = container(docs, "Deployment", "wesam", "wesam")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 3000, "grpc": 8001}
    for probe, path in (("startupProbe", "/livez"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        assert c[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    cfg = config_data(docs, "wesam-config")
    assert int(cfg[PREFIX + "GRPC_PORT"]) == ports["grpc"] and cfg[PREFIX + "GRPC_HOST"] == "0.0.0.0"

    service = find(docs, "Service", "wesam")
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == \
        {("http", 3000, "http"), ("grpc", 8001, "grpc")}
    deployment = find(docs, "Deployment", "wesam")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pdb = find(docs, "PodDisruptionBudget", "wesam")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = find(docs, "HorizontalPodAutoscaler", "wesam")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "wesam"}
    assert hpa["spec"]["minReplicas"] >= 2  # with the PDB, a drain never takes the last replica


@pytest.mark.parametrize("rel", SERVING_OVERLAYS)
def test_configuration_comes_from_the_configmap_and_the_secret(rel: str) -> None:
    docs = render(rel)
    c = container(docs, "Deployment", "wesam", "wesam")
    config = find(docs, "ConfigMap", "wesam-config")
    assert c["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]  # the hashed name
    data = config["data"]
    fields = {PREFIX + name.upper() for name in ServeConfig.__dataclass_fields__}
    assert set(data) <= fields, f"unknown variables: {set(data) - fields}"
    assert PREFIX + "ADMIN_TOKEN" not in data
    ServeConfig.from_env(data)  # every value parses (ConfigError otherwise)
    token = next(e for e in c["env"] if e["name"] == PREFIX + "ADMIN_TOKEN")
    assert token["valueFrom"] == {"secretKeyRef": {"name": "wesam-admin-token", "key": "token"}}
    plain = {e["name"] for e in c["env"] if "value" in e}
    assert not any(n.startswith(PREFIX) for n in plain), "WESAM_SERVE_* belong in the ConfigMap"


@pytest.mark.parametrize("rel", SERVING_OVERLAYS)
def test_registry_volume_and_writable_dirs(rel: str) -> None:
    docs = render(rel)
    spec = find(docs, "Deployment", "wesam")["spec"]["template"]["spec"]
    c = container(docs, "Deployment", "wesam", "wesam")
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    data = config_data(docs, "wesam-config")

    registry = mounts[data[PREFIX + "REGISTRY"]]
    assert not registry.get("readOnly"), "the admin API writes routing.json"
    claim = volumes[registry["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = find(docs, "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    # Read-only root filesystem: every directory BentoML and wesam write to is an emptyDir.
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e.get("value") for e in c["env"]}
    writable = [env["BENTOML_HOME"], "/tmp", data[PREFIX + "ONNX_CACHE"]]  # multiproc dir: $BENTOML_HOME/...
    for path in writable:
        assert path in mounts, f"{path} is not mounted"
        assert "emptyDir" in volumes[mounts[path]["name"]], f"{path} is not an emptyDir"
    assert not env["BENTOML_HOME"].startswith("/home/bentoml"), "would hide the Bento in /home/bentoml/bento"


def test_gpu_and_cpu_overlays_differ_where_they_should() -> None:
    cpu, gpu = render("overlays/cpu"), render("overlays/gpu")
    c_cpu = container(cpu, "Deployment", "wesam", "wesam")
    c_gpu = container(gpu, "Deployment", "wesam", "wesam")
    assert "nvidia.com/gpu" not in c_cpu["resources"].get("limits", {})
    assert c_gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    gpu_spec = find(gpu, "Deployment", "wesam")["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_spec["tolerations"]
    assert "tolerations" not in find(cpu, "Deployment", "wesam")["spec"]["template"]["spec"]
    assert config_data(cpu, "wesam-config")[PREFIX + "DEVICE"] == "cpu"
    assert config_data(gpu, "wesam-config")[PREFIX + "DEVICE"] == "cuda"
    # The overlays change values, not the wiring: same volumes, probes and token reference.
    for key in ("volumeMounts", "startupProbe", "readinessProbe", "livenessProbe", "ports", "args"):
        assert c_cpu[key] == c_gpu[key], key
    assert c_cpu["image"] == c_gpu["image"] != "wesam:latest"


@pytest.mark.parametrize("rel", sorted(EXPECTED_KUSTOMIZATIONS))
def test_pods_meet_the_restricted_pod_security_standard(rel: str) -> None:
    for where, spec in pod_specs(render(rel)):
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser", 1) != 0, where
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), f"{where}: {key}"
        for v in spec.get("volumes", []):
            assert set(v) - {"name"} <= RESTRICTED_VOLUME_TYPES, f"{where}: volume {v['name']}"
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}"
            assert not sc.get("capabilities", {}).get("add"), f"{where}/{c['name']}"
            assert not sc.get("privileged"), f"{where}/{c['name']}"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}"
            assert all("hostPort" not in p for p in c.get("ports", [])), f"{where}/{c['name']}"
            assert "memory" in c["resources"]["limits"] and "cpu" in c["resources"]["requests"], f"{where}/{c['name']}"


# -- adaptation Job and Triton ---------------------------------------------------------------------

def test_adaptation_job_per_domain() -> None:
    base = render("overlays/cpu")
    registry_claim = find(base, "PersistentVolumeClaim", "wesam-registry")["metadata"]["name"]
    docs = render("adaptation/polyp")
    job = find(docs, "Job", "wesam-adapt-polyp")
    spec = job["spec"]["template"]["spec"]
    c = next(c for c in spec["containers"] if c["name"] == "adapt")
    params = find(docs, "ConfigMap", "wesam-adapt-params-polyp")
    assert c["envFrom"] == [{"configMapRef": {"name": params["metadata"]["name"]}}]
    assert params["data"]["WESAM_ADAPT_DOMAIN"] == "polyp"
    assert params["data"]["WESAM_ADAPT_DATA"].startswith("/data/")

    argv = c["command"] + c["args"]
    assert argv[:4] == ["python", "-m", "wesam.cli", "adapt"]
    flags = dict(a.split("=", 1) for a in c["args"][1:])
    assert flags["--domain"] == "$(WESAM_ADAPT_DOMAIN)" and flags["--data"] == "$(WESAM_ADAPT_DATA)"
    assert flags["--registry"] == "/registry"
    referenced = set(re.findall(r"\$\((\w+)\)", " ".join(c["args"])))
    assert referenced <= set(params["data"]), f"undefined: {referenced - set(params['data'])}"
    # With the variables expanded as Kubernetes does, `wesam adapt` accepts the command line.
    from wesam.cli import build_parser
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: params["data"][m.group(1)], a) for a in c["args"]]
    args = build_parser().parse_args(expanded)
    assert (args.domain, args.registry, args.prompt) == ("polyp", "/registry", "box")

    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert volumes[mounts["/registry"]["name"]]["persistentVolumeClaim"]["claimName"] == registry_claim
    assert not mounts["/registry"].get("readOnly")
    data_claim = volumes[mounts["/data"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert mounts["/data"]["readOnly"] is True
    find(render("adaptation/datasets"), "PersistentVolumeClaim", data_claim)
    assert "emptyDir" in volumes[mounts["/work"]["name"]] and flags["--work-dir"].startswith("/work/")
    assert spec["restartPolicy"] == "OnFailure"


def test_adaptation_gpu_patch_applies(tmp_path: Path) -> None:
    """The GPU patch that k8s/adaptation/polyp ships commented out works once enabled as documented."""
    shutil.copytree(K8S / "adaptation", tmp_path / "adaptation")
    kustomization = tmp_path / "adaptation" / "polyp" / "kustomization.yaml"
    text = kustomization.read_text()
    enabled = text.replace("# patchesStrategicMerge:\n#   - gpu.yaml", "patchesStrategicMerge:\n  - gpu.yaml")
    assert enabled != text, "the commented-out patch is gone from k8s/adaptation/polyp/kustomization.yaml"
    kustomization.write_text(enabled)
    proc = subprocess.run([kubectl(), "kustomize", str(kustomization.parent)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    job = find(docs, "Job", "wesam-adapt-polyp")
    validate(job)
    spec = job["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["resources"]["requests"]["cpu"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    unpatched = container(render("adaptation/polyp"), "Job", "wesam-adapt-polyp", "adapt")
    assert c["volumeMounts"] == unpatched["volumeMounts"]


# -- online worker ---------------------------------------------------------------------------------

WORKER = ("Deployment", "wesam-worker-polyp", "worker")


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """``$(VAR)`` replaced as Kubernetes does from the container's environment."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def test_online_worker_is_one_pod_per_domain_on_the_servers_registry_and_store() -> None:
    serving = render("overlays/cpu")
    docs = render("worker/polyp")
    deployment = find(docs, "Deployment", "wesam-worker-polyp")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}  # never two at once
    pod = spec["template"]["spec"]
    c = container(docs, *WORKER)
    server = container(serving, "Deployment", "wesam", "wesam")
    assert c["image"] == server["image"] != "wesam:latest"  # same code and embedded model as the servers

    params = find(docs, "ConfigMap", "wesam-worker-params-polyp")
    assert c["envFrom"] == [{"configMapRef": {"name": params["metadata"]["name"]}}]
    assert params["data"]["WESAM_WORKER_DOMAIN"] == "polyp"
    assert params["data"]["WESAM_WORKER_MODEL"] == config_data(serving, "wesam-config")[PREFIX + "MODEL"]
    assert c["command"] == ["python", "-m", "wesam.cli"] and c["args"][0] == "worker"
    referenced = set(re.findall(r"\$\((\w+)\)", " ".join(c["args"])))
    assert referenced <= set(params["data"]), f"undefined: {referenced - set(params['data'])}"
    flags = dict(a.split("=", 1) for a in _expand(c["args"][1:], params["data"]))
    assert flags["--domain"] == "polyp" and flags["--registry"] == "/registry"

    # The capture store: the Secret the servers read (required here, optional for the servers).
    store = next(e for e in c["env"] if e["name"] == PREFIX + "CAPTURE_STORE")["valueFrom"]["secretKeyRef"]
    served = next(e for e in server["env"] if e["name"] == PREFIX + "CAPTURE_STORE")["valueFrom"]["secretKeyRef"]
    assert (store["name"], store["key"]) == (served["name"], served["key"]) == ("wesam-capture-store", "url")
    assert served.get("optional") is True and not store.get("optional")
    assert not any(PREFIX + "CAPTURE_STORE" in a for a in c["args"]), "a URL with a password in argv"

    # The registry volume of the servers, writable (the worker publishes and takes its lease there).
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    registry = mounts[flags["--registry"]]
    assert not registry.get("readOnly")
    server_spec = find(serving, "Deployment", "wesam")["spec"]["template"]["spec"]
    server_claim = next(v for v in server_spec["volumes"] if v["name"] == "registry")["persistentVolumeClaim"]
    assert volumes[registry["name"]]["persistentVolumeClaim"] == server_claim
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]

    # Metrics on 9465, the port the probes use and the Service exposes.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 9465} and flags["--metrics-port"] == "9465"
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe
    assert "readinessProbe" not in c  # nothing sends the worker traffic
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    service = find(docs, "Service", "wesam-worker-polyp")
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [("metrics", 9465, "metrics")]
    # ...and that the server's Service does not select (the worker serves no requests).
    assert not find(serving, "Service", "wesam")["spec"]["selector"].items() <= pod_labels.items()


def test_worker_command_line_parses() -> None:
    """With the variables expanded, `wesam worker` accepts the Deployment's command line."""
    from wesam.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "worker" not in commands:
        pytest.skip("`wesam worker` is not in this checkout yet (adapters/online/worker.py)")
    docs = render("worker/polyp")
    c = container(docs, *WORKER)
    env = dict(find(docs, "ConfigMap", "wesam-worker-params-polyp")["data"])
    args = parser.parse_args(_expand(c["args"], env))
    assert (args.domain, args.registry) == ("polyp", "/registry")


def test_worker_overlays_of_two_domains_do_not_share_pods(tmp_path: Path) -> None:
    """A copy of k8s/worker/polyp for another domain, made as documented, selects only its own pods."""
    shutil.copytree(K8S / "worker", tmp_path / "worker")
    text = (K8S / "worker" / "polyp" / "kustomization.yaml").read_text()
    skin = tmp_path / "worker" / "skin"
    skin.mkdir()
    (skin / "kustomization.yaml").write_text(text.replace("polyp", "skin"))
    rendered = {}
    for domain in ("polyp", "skin"):
        proc = subprocess.run([kubectl(), "kustomize", str(tmp_path / "worker" / domain)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        rendered[domain] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    polyp = find(rendered["polyp"], "Deployment", "wesam-worker-polyp")
    skin_deployment = find(rendered["skin"], "Deployment", "wesam-worker-skin")
    assert find(rendered["skin"], "ConfigMap", "wesam-worker-params-skin")["data"]["WESAM_WORKER_DOMAIN"] == "skin"
    skin_pods = skin_deployment["spec"]["template"]["metadata"]["labels"]
    assert not polyp["spec"]["selector"]["matchLabels"].items() <= skin_pods.items()
    polyp_service = find(rendered["polyp"], "Service", "wesam-worker-polyp")
    assert not polyp_service["spec"]["selector"].items() <= skin_pods.items()


def test_triton_overlay_serves_the_exported_repository() -> None:
    docs = render("overlays/triton")
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "PersistentVolumeClaim"}
    c = container(docs, "Deployment", "wesam-triton", "triton")
    assert c["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert c["command"] == ["tritonserver"]
    repo = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--model-repository="))
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == repo)
    spec = find(docs, "Deployment", "wesam-triton")["spec"]["template"]["spec"]
    claim = next(v for v in spec["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"]["claimName"]
    find(docs, "PersistentVolumeClaim", claim)
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    service = find(docs, "Service", "wesam-triton")
    assert {p["port"] for p in service["spec"]["ports"]} == {8000, 8001, 8002}
    # Not selected by the wesam Service or ServiceMonitor.
    pod_labels = find(docs, "Deployment", "wesam-triton")["spec"]["template"]["metadata"]["labels"]
    wesam_selector = find(render("overlays/cpu"), "Service", "wesam")["spec"]["selector"]
    assert not wesam_selector.items() <= pod_labels.items()


# -- monitoring ------------------------------------------------------------------------------------

def test_servicemonitor_selects_the_service() -> None:
    monitor = find(render("monitoring"), "ServiceMonitor", "wesam")
    service = find(render("overlays/cpu"), "Service", "wesam")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    # The rules select job="wesam": without jobLabel the operator sets job to the Service name.
    assert "jobLabel" not in monitor["spec"] and service["metadata"]["name"] == "wesam"
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= \
        find(render("worker/polyp"), "Service", "wesam-worker-polyp")["metadata"]["labels"].items()


def test_worker_servicemonitor_selects_the_worker_services() -> None:
    monitor = find(render("monitoring"), "ServiceMonitor", "wesam-worker")
    service = find(render("worker/polyp"), "Service", "wesam-worker-polyp")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("metrics", "/metrics")]
    assert {p["name"] for p in service["spec"]["ports"]} == {"metrics"}
    # The server's Service is not a worker target.
    server = find(render("overlays/cpu"), "Service", "wesam")
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= server["metadata"]["labels"].items()


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location("generate_prometheusrule", MONITORING / "generate_prometheusrule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prometheusrule_is_generated_from_rules_file() -> None:
    rules = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    committed = (MONITORING / "prometheusrule.yaml").read_text()
    assert _load_generator().render((MONITORING / "rules.yaml").read_text()) == committed, \
        "prometheusrule.yaml is out of date: run python k8s/monitoring/generate_prometheusrule.py"
    assert yaml.safe_load(committed)["spec"]["groups"] == rules["groups"]
    rendered = find(render("monitoring"), "PrometheusRule", "wesam")
    assert rendered["spec"]["groups"] == rules["groups"]
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert {"WesamHighErrorRate", "WesamHighLatencyP95", "WesamReplicasUnavailable", "WesamAdapterLoadFailed",
            "WesamCacheHitRateCollapse", "WesamCaptureLosingSamples", "WesamWorkerDown", "WesamWorkerNoLease",
            "WesamWorkerGateRejecting", "WesamWorkerRoundsAborted", "WesamWorkerNotPublishing"} <= alerts


def test_generator_notices_drift(tmp_path: Path) -> None:
    module = _load_generator()
    edited = (MONITORING / "rules.yaml").read_text().replace("> 0.05", "> 0.07", 1)
    assert module.render(edited) != (MONITORING / "prometheusrule.yaml").read_text()
    with pytest.raises(ValueError):
        module.render("groups: []\nextra: 1\n")


def test_promtool_checks_and_unit_tests_pass() -> None:
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", str(MONITORING / "rules.yaml")],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([tool, "test", "rules", "rules_test.yaml"], cwd=MONITORING,
                          capture_output=True, text=True, timeout=300)
    assert unit.returncode == 0, unit.stdout + unit.stderr


@pytest.mark.parametrize("old, new, alert", [
    ("> 2.5", "> 10", "WesamHighLatencyP95"),
    ("(wesam_worker_consecutive_rejections) >= 3", "(wesam_worker_consecutive_rejections) >= 4",
     "WesamWorkerGateRejecting"),
    ("(max_over_time(wesam_worker_lease_held[1h])) == 1", "(max_over_time(wesam_worker_lease_held[1h])) == 2",
     "WesamWorkerNoLease"),
])
def test_promtool_unit_tests_can_fail(tmp_path: Path, old: str, new: str, alert: str) -> None:
    """A wrong threshold makes the unit tests fail: they test the rules, not just their syntax."""
    tool = promtool()
    rules = (MONITORING / "rules.yaml").read_text()
    assert rules.count(old) == 1, old
    (tmp_path / "rules.yaml").write_text(rules.replace(old, new))
    (tmp_path / "rules_test.yaml").write_text((MONITORING / "rules_test.yaml").read_text())
    unit = subprocess.run([tool, "test", "rules", "rules_test.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert unit.returncode != 0 and alert in unit.stdout + unit.stderr


def test_every_alert_has_unit_tests_that_fire_it_and_keep_it_quiet() -> None:
    rules = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    cases = [c for t in yaml.safe_load((MONITORING / "rules_test.yaml").read_text())["tests"]
             for c in t.get("alert_rule_test", [])]
    fired = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert alerts - fired == set(), "alerts never shown to fire"
    assert alerts - quiet == set(), "alerts never shown to stay quiet"


def test_dashboard_configmap_for_the_grafana_sidecar() -> None:
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    cm = find(render("monitoring"), "ConfigMap", "wesam-grafana-dashboard")
    assert cm["metadata"]["name"] == "wesam-grafana-dashboard"  # no hash suffix: edits replace it
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (key, text), = cm["data"].items()
    assert key.endswith(".json") and json.loads(text) == dashboard

    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids, panels = set(), []
    for p in dashboard["panels"]:
        panels += [p] + p.get("panels", [])
    for p in panels:
        assert p["id"] not in ids, f"duplicate panel id {p['id']}"
        ids.add(p["id"])
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"].strip() for t in p["targets"]), p["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("by domain", "latency", "encoder", "decoder", "cache", "batch", "adapter", "capture", "worker",
                  "lease", "gate"):
        assert topic in titles, topic


# -- documentation ---------------------------------------------------------------------------------

def test_deployment_doc_points_at_existing_files() -> None:
    doc = (REPO / "docs" / "deployment.md").read_text()
    paths = set(re.findall(r"\bk8s/[\w./-]*\w", doc))
    assert {"k8s/overlays/cpu", "k8s/overlays/gpu", "k8s/overlays/triton", "k8s/monitoring",
            "k8s/adaptation/polyp", "k8s/worker/polyp"} <= paths
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"docs/deployment.md names missing paths: {missing}"
    for needle in ("bentoml build", "bentoml containerize", "kubectl create secret generic wesam-admin-token",
                   "wesam adapters activate", "/adapters/polyp/activate",
                   "kubectl create secret generic wesam-capture-store", "adapters --registry /registry rollback polyp",
                   "strategy: Recreate"):
        assert needle in doc, needle
