"""Write prometheusrule.yaml (Prometheus Operator) from rules.yaml (plain Prometheus rules file).

    python k8s/monitoring/generate_prometheusrule.py           # rewrite prometheusrule.yaml
    python k8s/monitoring/generate_prometheusrule.py --check   # exit 1 if it is out of date

The rule groups are copied as text (indented under ``spec:``), so comments and block scalars stay
as written; ``tests/test_k8s.py`` checks that the file is up to date and that both parse to the
same groups.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules.yaml"
TARGET = HERE / "prometheusrule.yaml"

HEADER = """\
# GENERATED from rules.yaml by generate_prometheusrule.py: edit rules.yaml, then run
#   python k8s/monitoring/generate_prometheusrule.py
# The Prometheus Operator loads PrometheusRules whose labels match the Prometheus resource's
# ruleSelector (kube-prometheus-stack: `release: <helm release>` unless
# prometheus.prometheusSpec.ruleSelectorNilUsesHelmValues=false); see docs/deployment.md.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: wesam
  labels:
    app.kubernetes.io/name: wesam
    app.kubernetes.io/part-of: wesam
    app.kubernetes.io/component: monitoring
spec:
"""


def render(rules_text: str) -> str:
    """The PrometheusRule manifest for a rules file whose only top-level key is ``groups``."""
    lines = rules_text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("groups:")), None)
    if start is None:
        raise ValueError("rules.yaml has no top-level `groups:` key")
    if any(line and not line[0].isspace() and not line.startswith("#") for line in lines[start + 1:]):
        raise ValueError("rules.yaml must have `groups:` as its last top-level key")
    body = ["  " + line if line.strip() else "" for line in lines[start:]]
    return HEADER + "\n".join(body) + "\n"


def main(argv: list[str]) -> int:
    text = render(RULES.read_text())
    if "--check" in argv:
        if not TARGET.is_file() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run python k8s/monitoring/generate_prometheusrule.py",
                  file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
