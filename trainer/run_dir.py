"""The run directory: everything a person or a later job needs about one run.

    RUN/config.yaml      the resolved config (every default filled in)
    RUN/plan.txt         where each set of each field lives (sharding plan)
    RUN/metrics.jsonl    one JSON record per log window and evaluation
    RUN/collapse.jsonl   IA, IA / random IA and set diversity per field, per measurement
    RUN/checkpoints/     DCP checkpoints (latest and best)
    RUN/summary.json     the outcome; RUN/summary.txt the same for people
    RUN/test_predictions.parquet  logit and label of every test row (split order), best checkpoint

Files are written by rank 0, each under a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from trainer import configlib
from trainer.data.storage import filesystem, join


class RunDir:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.path = filesystem(self.url)

    @property
    def checkpoints(self) -> str:
        return join(self.url, "checkpoints")

    def create(self) -> None:
        self.fs.makedirs(self.path, exist_ok=True)

    def write_text(self, name: str, text: str) -> None:
        """Write ``name`` atomically (temporary name, then rename)."""
        target = join(self.path, name)
        with self.fs.open(target + ".tmp", "w") as f:
            f.write(text)
        self.fs.mv(target + ".tmp", target)

    def write_predictions(self, name: str, logits: np.ndarray, labels: np.ndarray) -> None:
        """``name``: a parquet file of ``logit`` (float32) and ``label`` (int8), one row per scored row."""
        table = pa.table({"logit": pa.array(logits, pa.float32()), "label": pa.array(labels.astype(np.int8))})
        target = join(self.path, name)
        with self.fs.open(target + ".tmp", "wb") as f:
            pq.write_table(table, f)
        self.fs.mv(target + ".tmp", target)

    def write_config(self, config: Any) -> None:
        self.write_text("config.yaml", yaml.safe_dump(configlib.to_dict(config), sort_keys=False))

    def append_metrics(self, record: dict[str, Any]) -> None:
        self.append_jsonl("metrics.jsonl", record)

    def append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        with self.fs.open(join(self.path, name), "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_text("summary.json", json.dumps(summary, indent=2) + "\n")
        self.write_text("summary.txt", format_summary(summary, self.url))


def read_collapse_record(run_url: str, step: int | None = None) -> dict[str, Any] | None:
    """The ``collapse.jsonl`` record at ``step`` (e.g. the best checkpoint's, whose test
    metrics a summary reports) when there is one, else the last; lines cut by a killed run
    are skipped. None when the run has no usable record."""
    fs, path = filesystem(join(run_url, "collapse.jsonl"))
    try:
        with fs.open(path, "r") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    records = [r for r in records if isinstance(r, dict) and isinstance(r.get("fields"), dict) and r["fields"]]
    if not records:
        return None
    return next((r for r in reversed(records) if r.get("step") == step), records[-1])


def format_summary(s: dict[str, Any], run_url: str) -> str:
    def num(v: Any, fmt: str = ".5f") -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = [
        f"{s['model']} / {s['embedding']} on {s['world_size']} {s['device']} rank(s)",
        f"data: {s['dataset']}",
        "",
        f"test AUC      {num(s['test_auc'])}   (oracle {num(s['oracle_test_auc'])})",
        f"test logloss  {num(s['test_logloss'])}   (oracle {num(s['oracle_test_logloss'])})",
        f"val AUC       {num(s['val_auc'])}   at step {s['best_step']} (best checkpoint)",
        "",
        f"{s['steps']} steps, {s['epochs_completed']} epoch(s) completed"
        + (", stopped early (patience)" if s["stopped_early"] else ""),
        f"{s['train_examples']:,} training examples at {num(s['train_examples_per_sec'], ',.0f')} examples/s",
        "",
        f"run directory: {run_url}  (config.yaml, plan.txt, metrics.jsonl, checkpoints/, summary.json)",
    ]
    return "\n".join(lines) + "\n"
