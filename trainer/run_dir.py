"""The run directory: everything a person or a later job needs about one run.

    RUN/config.yaml      the resolved config (every default filled in)
    RUN/plan.txt         where each set of each field lives (sharding plan)
    RUN/metrics.jsonl    one JSON record per log window and evaluation
    RUN/collapse.jsonl   IA, IA / random IA and set diversity per field, per measurement
    RUN/checkpoints/     DCP checkpoints (latest and best; ``trainer.checkpoint``)
    RUN/summary.json     the outcome (strict JSON: an undefined metric is null, and
                         ``<key>_reason`` says why); RUN/summary.txt the same for people
    RUN/test_predictions.parquet  logit and label of every test row (split order), best checkpoint
    RUN/report.html      the run at a glance (``trainer.run_report``): summary, config, plan and
                         the training curves, self-contained; the curves also as RUN/curves_*.png

``RunDir`` owns this layout both ways: the trainer writes through it (rank 0, each file
under a temporary name and renamed; the JSONL files are appended, and cut back to the
step a run resumes from), and the sweep, the pipeline, export and the benchmarks read
through it. Paths or fsspec URLs.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from fsspec.implementations.local import LocalFileSystem

from trainer import checkpoint, typed_yaml
from trainer.errors import UserError
from trainer.storage import filesystem, join

CONFIG = "config.yaml"
PLAN = "plan.txt"
METRICS = "metrics.jsonl"
COLLAPSE = "collapse.jsonl"
CHECKPOINTS = checkpoint.RUN_CHECKPOINTS
SUMMARY = "summary.json"
SUMMARY_TEXT = "summary.txt"
TEST_PREDICTIONS = "test_predictions.parquet"
REPORT = "report.html"
# keys every finished run's summary.json has (a summary without them is not one of ours)
SUMMARY_KEYS = ("test_auc", "test_logloss", "val_auc", "best_step")


class RunDir:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.path = filesystem(self.url)

    @classmethod
    def of_checkpoint(cls, checkpoint_url: str) -> RunDir | None:
        """The run directory of ``RUN/checkpoints/step-N``; None for a checkpoint elsewhere."""
        parts = checkpoint_url.rstrip("/").rsplit("/", 2)
        return cls(parts[0]) if len(parts) == 3 and parts[1] == CHECKPOINTS else None

    @property
    def checkpoints(self) -> str:
        return join(self.url, CHECKPOINTS)

    @property
    def name(self) -> str:
        """The directory's own name (the default run id)."""
        return posixpath.basename(self.url)

    def file(self, name: str) -> str:
        """The URL of ``name`` in the run directory."""
        return join(self.url, name)

    # ---- writing (rank 0) ---------------------------------------------------------------

    def check_writable(self) -> None:
        """Refuse, before a run builds anything, a ``run.dir`` that is a file and, for local paths,
        one that cannot be created: a file above it, or no write permission (e.g. a read-only
        mount). Other filesystems report a denied write when the directory is first written."""
        if self.fs.isfile(self.path):
            raise UserError(f"run.dir {self.url} is a file, not a directory")
        if not isinstance(self.fs, LocalFileSystem):
            return
        existing = next(p for p in (Path(self.path), *Path(self.path).parents) if p.exists())
        if not existing.is_dir():
            raise UserError(f"run.dir {self.url}: {existing} is a file, not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"run.dir {self.url}: cannot write in {existing} (no permission, or a read-only file system)")

    def create(self) -> None:
        self.fs.makedirs(self.path, exist_ok=True)

    def write_text(self, name: str, text: str) -> None:
        """Write ``name`` atomically (temporary name, then rename)."""
        target = join(self.path, name)
        with self.fs.open(target + ".tmp", "w") as f:
            f.write(text)
        self.fs.mv(target + ".tmp", target)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically (temporary name, then rename), e.g. a PNG of the run report."""
        target = join(self.path, name)
        with self.fs.open(target + ".tmp", "wb") as f:
            f.write(data)
        self.fs.mv(target + ".tmp", target)

    def remove(self, name: str) -> None:
        """Delete ``name`` when it exists (e.g. a report curve that has no records any more)."""
        if self.exists(name):
            self.fs.rm(join(self.path, name))

    def write_config(self, config: Any) -> None:
        self.write_text(CONFIG, yaml.safe_dump(typed_yaml.to_dict(config), sort_keys=False))

    def write_plan(self, text: str) -> None:
        self.write_text(PLAN, text)

    def write_predictions(self, logits: np.ndarray, labels: np.ndarray) -> None:
        """``test_predictions.parquet``: ``logit`` (float32) and ``label`` (int8), one row per scored row."""
        table = pa.table({"logit": pa.array(logits, pa.float32()), "label": pa.array(labels.astype(np.int8))})
        target = join(self.path, TEST_PREDICTIONS)
        with self.fs.open(target + ".tmp", "wb") as f:
            pq.write_table(table, f)
        self.fs.mv(target + ".tmp", target)

    def append_metrics(self, record: dict[str, Any]) -> None:
        self._append_jsonl(METRICS, record)

    def append_collapse(self, record: dict[str, Any]) -> None:
        self._append_jsonl(COLLAPSE, record)

    def drop_records_after(self, step: int) -> None:
        """Rewrite ``metrics.jsonl`` and ``collapse.jsonl`` (atomically) without the records of
        steps after ``step`` and the lines a killed run cut: a run resumed at ``step`` (0: started
        afresh) logs those steps again, and each step must appear once."""
        for name in (METRICS, COLLAPSE):
            text = self.read_text(name)
            if not text:
                continue
            kept = "".join(json.dumps(r) + "\n" for r in _jsonl_records(text) if r.get("step", 0) <= step)
            if kept != text:
                self.write_text(name, kept)

    def _append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        with self.fs.open(join(self.path, name), "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_text(SUMMARY, json.dumps(summary, indent=2) + "\n")
        self.write_text(SUMMARY_TEXT, format_summary(summary, self.url))

    # ---- reading ------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        return self.fs.exists(join(self.path, name))

    def read_text(self, name: str) -> str | None:
        """``name``'s text; None when it does not exist or cannot be read."""
        try:
            with self.fs.open(join(self.path, name), "r") as f:
                return f.read()
        except (OSError, UnicodeDecodeError):
            return None

    def read_summary(self) -> dict[str, Any] | None:
        """The run's ``summary.json`` when the run finished (it is written at the very end),
        else None."""
        try:
            summary = json.loads(self.read_text(SUMMARY) or "")
        except ValueError:
            return None
        return summary if isinstance(summary, dict) and all(k in summary for k in SUMMARY_KEYS) else None

    def read_config(self) -> dict[str, Any] | None:
        """The resolved ``config.yaml`` as plain data (lists, not tuples); None when absent or unreadable."""
        try:
            config = yaml.safe_load(self.read_text(CONFIG) or "")
        except yaml.YAMLError:
            return None
        return json.loads(json.dumps(config)) if isinstance(config, dict) else None

    def read_metrics(self) -> list[dict[str, Any]]:
        """The ``metrics.jsonl`` records (lines cut by a killed run are skipped)."""
        return _jsonl_records(self.read_text(METRICS))

    def read_collapse_records(self) -> list[dict[str, Any]]:
        """Every usable ``collapse.jsonl`` record (one per measurement, with per-field values),
        in file order; lines cut by a killed run are skipped. Empty without the file."""
        return [r for r in _jsonl_records(self.read_text(COLLAPSE)) if isinstance(r.get("fields"), dict) and r["fields"]]

    def read_collapse_record(self, step: int | None = None) -> dict[str, Any] | None:
        """The ``collapse.jsonl`` record at ``step`` (e.g. the best checkpoint's, whose test
        metrics a summary reports) when there is one, else the last; lines cut by a killed
        run are skipped. None when the run has no usable record."""
        records = self.read_collapse_records()
        if not records:
            return None
        return next((r for r in reversed(records) if r.get("step") == step), records[-1])

    def has_checkpoints(self) -> bool:
        """Whether ``checkpoints/`` holds anything (complete or not): a run was started here."""
        path = join(self.path, CHECKPOINTS)
        return self.fs.isdir(path) and bool(self.fs.ls(path, detail=False))

    def checkpoint_list(self) -> list[checkpoint.CheckpointInfo]:
        """The complete checkpoints, oldest first."""
        return checkpoint.list_checkpoints(self.checkpoints)

    def latest_checkpoint(self) -> str | None:
        found = self.checkpoint_list()
        return found[-1].url if found else None

    def best_checkpoint(self) -> str | None:
        """The checkpoint the summary's metrics are from (the best validation AUC) when it
        still exists, else the latest complete one; None without any."""
        best = (self.read_summary() or {}).get("best_checkpoint")
        if best:
            candidate = join(self.checkpoints, posixpath.basename(best.rstrip("/")))
            if checkpoint.is_complete(candidate):
                return candidate
        return self.latest_checkpoint()


def _jsonl_records(text: str | None) -> list[dict[str, Any]]:
    records = []
    for line in (text or "").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def format_summary(s: dict[str, Any], run_url: str) -> str:
    def num(v: Any, fmt: str = ".5f") -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = [
        f"{s['model']} / {s['embedding']} on {s['world_size']} {s['device']} rank(s)",
        f"data: {s['dataset']}",
        "",
        f"test AUC      {num(s['test_auc'])}   (oracle {num(s['oracle_test_auc'])})",
        f"test logloss  {num(s['test_logloss'])}   (oracle {num(s['oracle_test_logloss'])})",
        f"test NE       {num(s.get('test_ne'))}   (logloss / entropy of the base rate; < 1 beats predicting the CTR)",
        f"val AUC       {num(s['val_auc'])}   at step {s['best_step']} (best checkpoint)",
        f"val NE        {num(s.get('val_ne'))}",
        "",
        f"{s['steps']} steps, {s['epochs_completed']} epoch(s) completed"
        + (", stopped early (patience)" if s["stopped_early"] else ""),
        f"{s['train_examples']:,} training examples at {num(s['train_examples_per_sec'], ',.0f')} examples/s",
        "",
        f"run directory: {run_url}  ({REPORT}, {CONFIG}, {PLAN}, {METRICS}, {CHECKPOINTS}/, {SUMMARY})",
    ]
    return "\n".join(lines) + "\n"
