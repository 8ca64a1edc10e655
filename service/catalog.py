"""What the registry says about each version of a domain, for operators (``GET /adapters/{domain}/versions``).

Read-only and public like ``GET /adapters``: it shows the fields of each version's ``adapter.json``
an operator compares versions by (how and when it was made, its recorded metrics, its lineage), and
leaves out what only describes the machine that made it (data paths, the training config, the online
worker's host and pid).
"""

from __future__ import annotations

from typing import Any

from wesam.adapters.artifact import WEIGHTS_FILE
from wesam.adapters.errors import AdapterError
from wesam.adapters.ref import AdapterRef
from wesam.adapters.registry import Registry

# adapter.json fields shown as they are (`wesam adapt` and the online worker write them).
PLAIN_FIELDS = ("created", "method", "prompt", "steps", "seed", "train_seconds", "code_version")
# The lineage fields an operator follows (the online worker writes more: run id, host, pid, sample
# fingerprints); the same choice as `wesam adapters lineage`.
LINEAGE_FIELDS = ("parent", "replaces", "pinned", "round")


def describe_version(registry: Registry, domain: str, version: int) -> dict[str, Any]:
    """One version's row; a version whose adapter.json cannot be read gets ``error`` instead."""
    ref = AdapterRef(domain, version)
    row: dict[str, Any] = {"version": version, "adapter": str(ref)}
    try:
        meta = registry.resolve(ref).meta
    except (AdapterError, OSError, ValueError) as e:
        return {**row, "error": f"{type(e).__name__}: {e}"}
    row.update({k: meta.get(k) for k in PLAIN_FIELDS})
    row["base_model"] = (meta.get("base_model") or {}).get("name")
    row["weights_sha256"] = (meta.get("files") or {}).get(WEIGHTS_FILE)
    lora = meta.get("lora") or {}
    row["lora"] = {"rank": lora.get("rank"), "targets": lora.get("targets")} if isinstance(lora, dict) else None
    metrics = meta.get("metrics")
    row["metrics"] = metrics if isinstance(metrics, dict) else None
    row["lineage"] = _lineage(meta.get("lineage"))
    return row


def _lineage(lineage: Any) -> dict[str, Any] | None:
    if not isinstance(lineage, dict):
        return None  # made by `wesam adapt`: a root of the lineage
    out: dict[str, Any] = {k: lineage.get(k) for k in LINEAGE_FIELDS}
    samples, gate = lineage.get("samples"), lineage.get("gate")
    out["samples"] = samples.get("count") if isinstance(samples, dict) else None
    out["gate"] = gate.get("pass") if isinstance(gate, dict) else None
    return out


def describe_versions(registry: Registry, domain: str) -> list[dict[str, Any]]:
    """Every version of ``domain``, oldest first."""
    return [describe_version(registry, domain, v) for v in registry.versions(domain)]
