"""The collapse figures of ``make demo``'s trained model, as a ``CollapseReport`` (tests/data/).

DCNv2, multi-embedding 2 sets of dim 10, one epoch on 800k synthetic rows: a healthy model
whose 39 fields range from 5 ids to 4604, 12 of them with fewer ids than the dimension. The
file keeps every per-field figure the alerts and the dashboard read, without the spectra and
the principal cosines (the report's properties need neither).
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.collapse.analysis import CollapseReport, FieldCollapse

DEMO_FIGURES = Path(__file__).resolve().parent / "data" / "demo_collapse_fields.json"


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
