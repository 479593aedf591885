"""The collapse figures of ``make demo``'s trained model, as a ``CollapseReport`` (tests/data/).

DCNv2, multi-embedding 2 sets of dim 10, one epoch on 800k synthetic rows: a healthy model
whose 39 fields range from 5 ids to about 4.6k, 12 of them with fewer ids than the dimension.
The file keeps every per-field figure the alerts and the dashboard read, without the spectra
and the principal cosines (the report's properties need neither). After ``make demo``,
``python -m tests.demo_collapse`` rewrites it from ``runs/demo/collapse/collapse.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from trainer.collapse.analysis import CollapseReport, FieldCollapse

DEMO_FIGURES = Path(__file__).resolve().parent / "data" / "demo_collapse_fields.json"
DEMO_COLLAPSE = Path(__file__).resolve().parents[1] / "runs" / "demo" / "collapse" / "collapse.json"
KEPT = ("field", "rows", "set_ia", "set_ia_normalized", "set_random_ia", "overall_ia", "overall_ia_normalized",
        "overall_random_ia", "diversity_groups", "mean_diversity", "random_mean_diversity")  # fmt: skip


def demo_report(run: str = "demo") -> CollapseReport:
    """A fresh copy (callers may change its fields) of the demo model's report, labelled ``run``."""
    data = json.loads(DEMO_FIGURES.read_text())
    m, k = data["num_sets"], data["dim"]
    fields = [
        FieldCollapse(num_sets=m, dim=k, set_spectra=[], set_random_spectrum=[], overall_spectrum=None,
                      overall_random_spectrum=[], **f)
        for f in data["fields"]
    ]  # fmt: skip
    return CollapseReport(source="make demo", label=run, fields=fields, num_sets=m, dim=k, step=data["step"],
                          model=data["model"], embedding=data["embedding"])  # fmt: skip


def write_demo_figures(collapse_json: Path = DEMO_COLLAPSE, out: Path = DEMO_FIGURES) -> None:
    """``out`` from the offline collapse report of ``make demo`` (its one report), one line a field."""
    (report,) = json.loads(collapse_json.read_text())["reports"]
    head = {
        "_what": "The per-field collapse figures of `make demo`'s trained model (DCNv2, multi-embedding 2 sets of dim 10, "
                 "800k synthetic rows, one epoch on 2 ranks): runs/demo/collapse/collapse.json without the spectra and "
                 "the principal cosines, written by `python -m tests.demo_collapse`. tests/test_alerts.py checks that "
                 "this healthy model fires no alert.",
        **{key: report[key] for key in ("model", "embedding", "step", "num_sets", "dim")},
    }  # fmt: skip
    lines = [json.dumps({key: f[key] for key in KEPT}) for f in report["fields"]]
    text = json.dumps(head, indent=1)[:-2] + ',\n "fields": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n"
    out.write_text(text)


if __name__ == "__main__":
    write_demo_figures(*map(Path, sys.argv[1:3]))
