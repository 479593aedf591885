"""Generate ``prometheusrule.yaml`` (the Prometheus Operator CRD) from ``rules.yaml``.

    python deploy/prometheus/render_prometheusrule.py          # rewrite it
    python deploy/prometheus/render_prometheusrule.py --check  # exit 1 if it is stale

``rules.yaml`` is the one source of truth: plain Prometheus loads it, promtool
tests it, and the CRD carries exactly its groups.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
HEADER = "# Generated from rules.yaml by render_prometheusrule.py: edit rules.yaml, then rerun.\n"


def render(rules_path: Path = HERE / "rules.yaml") -> str:
    groups = yaml.safe_load(rules_path.read_text())["groups"]
    crd = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "ctr-embedding-collapse",
            "labels": {"app.kubernetes.io/part-of": "ctr-multiembed", "role": "alert-rules"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.safe_dump(crd, sort_keys=False, width=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="fail if prometheusrule.yaml differs from rules.yaml")
    target = HERE / "prometheusrule.yaml"
    text = render()
    if p.parse_args().check:
        if not target.exists() or target.read_text() != text:
            sys.exit(f"{target} is stale: run python {Path(__file__).name}")
        return
    target.write_text(text)


if __name__ == "__main__":
    main()
