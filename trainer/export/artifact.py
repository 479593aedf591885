"""Write a serving artifact from a checkpoint: program, feature spec, model card, manifest.

The steps (``export_artifact``):

1. load the checkpoint into an unsharded model (any world size wrote it);
2. build the feature spec from the training dataset's schema and vocabularies;
3. pack the tables (and quantise them for ``int8``) and ``torch.export`` the program;
4. score the dataset's test split with the exported program (fp32, and int8 beside it:
   an int8 model that loses more than ``max_auc_drop`` AUC is refused);
5. measure collapse (IA) of the exported tables, from the tables already in memory;
6. write everything into a temporary directory, ``MANIFEST.json`` (sha256 of every
   file) last, and rename it into place.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import logging
import math
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from trainer.atomic_output import atomic_directory, check_output
from trainer.collapse.analysis import CollapseReport, analyze_field
from trainer.collapse.gram import field_gram
from trainer.data.schema import DatasetSchema, SparseField, read_schema
from trainer.errors import UserError
from trainer.eval_metrics import auc
from trainer.export import QUANTIZE_MODES, runtime
from trainer.export.feature_spec import build_feature_spec
from trainer.export.model_card import render_model_card
from trainer.export.serving_model import ServingModel, export_program
from trainer.export.trained_model import CheckpointModel, load_checkpoint_model
from trainer.storage import filesystem, join

log = logging.getLogger("trainer.export")

EVAL_BATCH = 8192


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: str
    output: str
    quantize: str = "none"
    dataset: str | None = None  # default: data.path of the run's config.yaml
    max_auc_drop: float = 0.001
    eval_rows: int | None = None  # test rows scored at export (default: all)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_MODES:
            raise UserError(f"--quantize {self.quantize!r}: expected one of {list(QUANTIZE_MODES)}")
        if not (self.max_auc_drop >= 0):
            raise UserError(f"--max-auc-drop {self.max_auc_drop}: expected a non-negative number")
        if self.eval_rows is not None and self.eval_rows < 1:
            raise UserError(f"--eval-rows {self.eval_rows}: expected a positive number")


def serving_ids(batch: pa.RecordBatch, fields: list[SparseField]) -> np.ndarray:
    """The program's ids (N, W) int64 of a prepared batch: a field's ``max_length`` columns,
    a multi-hot field's ids first and -1 after them."""
    columns = []
    for f in fields:
        column = batch.column(f.name)
        if not f.multi_hot:
            columns.append(column.to_numpy().astype(np.int64)[:, None])
            continue
        offsets = column.offsets.to_numpy()
        counts = np.diff(offsets)
        padded = np.full((len(column), f.max_length), -1, dtype=np.int64)
        padded[np.arange(f.max_length) < counts[:, None]] = column.values.to_numpy()[offsets[0] : offsets[-1]]
        columns.append(padded)
    return np.concatenate(columns, axis=1)


def test_split(dataset_url: str, schema: DatasetSchema, limit: int | None) -> tuple[torch.Tensor, np.ndarray]:
    """(ids (N, W) int64 in the program's layout (``serving_ids``), labels (N,)) of the test
    split's first ``limit`` rows."""
    split = schema.splits.get("test")
    if split is None or split.rows == 0:
        raise UserError(f"{dataset_url}: no test rows to check the export on")
    ids, labels, rows = [], [], 0
    for batch in _parquet_batches(dataset_url, split.files, schema.field_names):
        take = batch.num_rows if limit is None else min(batch.num_rows, limit - rows)
        ids.append(serving_ids(batch.slice(0, take), schema.sparse_fields))
        labels.append(batch.column("label").to_numpy()[:take])
        rows += take
        if limit is not None and rows >= limit:
            break
    return torch.from_numpy(np.concatenate(ids).astype(np.int64)), np.concatenate(labels)


def _parquet_batches(dataset_url: str, files: list[str], fields: list[str]) -> Iterator[Any]:
    for name in files:
        fs, path = filesystem(join(dataset_url, name))
        with fs.open(path, "rb") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=1 << 16, columns=[*fields, "label"])


def score(program: torch.nn.Module, ids: torch.Tensor) -> np.ndarray:
    """Probabilities (N,) of the exported program on ids (N, W), in batches."""
    with torch.no_grad():
        return torch.cat([program(ids[i : i + EVAL_BATCH]) for i in range(0, len(ids), EVAL_BATCH)]).numpy()


def probability_logloss(p: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
    y = labels.astype(np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def collapse_of(loaded: CheckpointModel) -> CollapseReport:
    """The collapse metrics of the loaded model's tables (the offline monitor's numbers,
    without reading the checkpoint a second time)."""
    arch = loaded.model.sparse_arch
    bags = arch.embedding_bag_collection.embedding_bags
    tables = arch.table_names()
    embedding = loaded.meta["identity"]["embedding"]
    column_groups = embedding["scale"] if arch.num_sets == 1 and embedding["scale"] > 1 else None  # as analyze_checkpoint
    with torch.no_grad():
        fields = [
            analyze_field(
                field_gram([bags[tables[(m, name)]].weight for m in range(arch.num_sets)], dim=arch.dim, field=name),
                column_groups=column_groups,
            )
            for name in arch.field_names
        ]
    return CollapseReport(
        source=loaded.url, label=loaded.url, fields=fields, num_sets=arch.num_sets, dim=arch.dim, step=loaded.step, embedding=embedding
    )


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("torch", "torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu", "torchx", "pyarrow"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def export_artifact(config: ExportConfig) -> dict[str, Any]:
    """Export ``config.checkpoint`` to ``config.output``; returns the model card."""
    # before the work, not after: writable, and new or an artifact this tool may replace
    check_output(config.output, config.overwrite, marker=runtime.MANIFEST, what="exported model")
    started = time.monotonic()
    loaded = load_checkpoint_model(config.checkpoint)
    log.info("loaded %s (step %s) into an unsharded model", loaded.url, loaded.step)
    dataset_url = config.dataset or loaded.dataset
    if not dataset_url:
        raise UserError(f"which dataset was {loaded.url} trained on? its run has no config.yaml: pass --dataset")
    schema = read_schema(dataset_url)
    identity_fields = [[f.name, f.cardinality] for f in schema.sparse_fields]
    if identity_fields != loaded.meta["identity"]["fields"]:
        raise UserError(
            f"checkpoint {loaded.url} was trained on other fields or vocabularies than {dataset_url} holds "
            "(another dataset, or one preprocessed again): export with the dataset it was trained on (--dataset)"
        )
    spec, vocab_files = build_feature_spec(dataset_url, schema, loaded.model.sparse_arch.field_names)
    collapse = collapse_of(loaded)

    serving = ServingModel.from_model(loaded.model, [f.max_length for f in schema.sparse_fields])
    ids, labels = test_split(dataset_url, schema, config.eval_rows)
    fp32_program = export_program(serving)
    fp32_scores = score(fp32_program.module(), ids)
    evaluation = {"rows": int(len(labels)), "fp32_auc": auc(fp32_scores, labels), "fp32_logloss": probability_logloss(fp32_scores, labels)}
    program, served = fp32_program, serving
    if config.quantize == "int8":
        served = serving.int8()
        program = export_program(served)
        int8_scores = score(program.module(), ids)
        evaluation |= {
            "int8_auc": auc(int8_scores, labels),
            "int8_logloss": probability_logloss(int8_scores, labels),
            "int8_max_abs_diff": float(np.abs(int8_scores - fp32_scores).max()),
        }
        evaluation["auc_change"] = evaluation["int8_auc"] - evaluation["fp32_auc"]
        log.info(
            "int8 tables: test AUC %.5f (fp32 %.5f, change %+.5f), tables %.1f MiB (fp32 %.1f MiB)",
            evaluation["int8_auc"], evaluation["fp32_auc"], evaluation["auc_change"],
            served.table_bytes() / 2**20, serving.table_bytes() / 2**20,
        )
        if evaluation["auc_change"] < -config.max_auc_drop:
            raise UserError(
                f"int8 quantisation loses {-evaluation['auc_change']:.5f} test AUC (> --max-auc-drop "
                f"{config.max_auc_drop}): nothing written; export fp32, or raise --max-auc-drop knowingly"
            )

    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    files: dict[str, bytes] = {runtime.PROGRAM: buffer.getvalue(), **vocab_files}
    files[runtime.FEATURE_SPEC] = _json(spec)
    files[runtime.RUNTIME] = Path(runtime.__file__).read_bytes()
    card = model_card(config, loaded, dataset_url, schema, spec, evaluation, served, serving, collapse, files)
    files["model_card.json"] = _json(card)
    files["model_card.md"] = render_model_card(card).encode()
    manifest = {
        "format": runtime.ARTIFACT_FORMAT,
        "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in sorted(files.items())},
    }
    with atomic_directory(config.output, overwrite=config.overwrite, marker=runtime.MANIFEST, what="exported model") as tmp:
        tmp_fs, tmp_path = filesystem(tmp)
        for name, data in files.items():
            if "/" in name:
                tmp_fs.makedirs(join(tmp_path, name.rsplit("/", 1)[0]), exist_ok=True)
            with tmp_fs.open(join(tmp_path, name), "wb") as f:
                f.write(data)
        with tmp_fs.open(join(tmp_path, runtime.MANIFEST), "wb") as f:
            f.write(_json(manifest))
    log.info("exported %s in %.1fs", config.output, time.monotonic() - started)
    return card


def model_card(
    config: ExportConfig,
    loaded: CheckpointModel,
    dataset_url: str,
    schema: DatasetSchema,
    spec: dict[str, Any],
    evaluation: dict[str, Any],
    served: ServingModel,
    fp32: ServingModel,
    collapse: Any,
    files: dict[str, bytes],
) -> dict[str, Any]:
    identity = loaded.meta["identity"]
    summary = loaded.summary or {}
    trained = {k: summary.get(k) for k in ("val_auc", "val_logloss", "test_auc", "test_logloss", "best_step")} if loaded.is_best else None
    collapse_summary = collapse.summary()
    return {
        "format": runtime.ARTIFACT_FORMAT,
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "checkpoint": loaded.url,
            "step": loaded.step,
            "world_size": (loaded.meta.get("progress") or {}).get("world_size"),
            "run_dir": loaded.run_dir,
        },
        "model": identity["model"],
        "embedding": identity["embedding"] | {"num_sets": served.num_sets, "dim": served.dim},
        "training_config": loaded.train_config,
        "inputs": {
            "ids": (
                f"(B, {served.width}) int64, column f = the id of field f (feature_spec.json)"
                if served.width == served.num_fields
                else f"(B, {served.width}) int64: each field's max_length columns in field order, "
                "a multi-hot field's ids and -1 for no id (feature_spec.json)"
            ),
            "fields": [f["name"] for f in spec["fields"]],
            "max_lengths": served.max_lengths,
            "poolings": served.poolings,
        },
        "output": "(B,) float32 click probability",
        "quantization": {
            "mode": config.quantize,
            "table_bytes": served.table_bytes(),
            "fp32_table_bytes": fp32.table_bytes(),
            "program_bytes": len(files[runtime.PROGRAM]),
        },
        "data": {
            "dataset": schema.dataset,
            "path": dataset_url,
            "fields": identity["fields"],
            "sparse_fields": [dataclasses.asdict(f) for f in schema.sparse_fields],
            "dense_fields": schema.dense_fields,
            "split_rows": {name: s.rows for name, s in schema.splits.items()},
            "recipe": schema.recipe,
        },
        "metrics": {
            "trainer": trained,
            "trainer_note": None if loaded.is_best else "the run's summary metrics belong to another checkpoint (or there is no summary)",
            "export_test": evaluation,
        },
        "collapse": {
            "mean_ia": collapse_summary["mean_overall_ia"],
            "mean_ia_normalized": collapse_summary["mean_overall_ia_normalized"],
            "mean_diversity": None if math.isnan(collapse_summary["mean_diversity"]) else collapse_summary["mean_diversity"],
            "fields": {f.field: {"ia": f.overall_ia, "ia_normalized": f.overall_ia_normalized} for f in collapse.fields},
        },
        "versions": versions(),
    }


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, default=_default) + "\n").encode()


def _default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
