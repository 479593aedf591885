"""Shared data-layer pieces: atomic outputs, schema validation, split assignment,
the writer, the integer transform, and the environment set-up."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.helpers import ROOT
from trainer.atomic_output import atomic_directory
from trainer.data.schema import DatasetSchema, SparseField, read_schema, write_schema
from trainer.data.splits import TEST, TRAIN, VAL, assign_splits, parse_split
from trainer.data.transforms import criteo_integer_token, log_dense
from trainer.data.writer import DatasetWriter, make_table
from trainer.errors import UserError
from trainer.storage import filesystem


def _write_dataset(root: str, rows_per_split: int = 500) -> DatasetSchema:
    with atomic_directory(root) as tmp:
        writer = DatasetWriter(tmp, files_per_split=3, row_group_rows=128)
        for split in ("train", "val", "test"):
            for start in range(0, rows_per_split, 100):
                n = min(100, rows_per_split - start)
                writer.write(split, make_table(np.zeros(n), {"f": np.arange(n)}, np.ones((n, 2))))
        schema = DatasetSchema("synthetic", [SparseField("f", 100)], ["a", "b"], writer.close())
        write_schema(tmp, schema)
    return schema


@pytest.mark.parametrize("root_kind", ["local", "memory"])
def test_atomic_directory_renames_on_success_and_leaves_nothing_on_failure(tmp_path, root_kind):
    root = str(tmp_path / "ds") if root_kind == "local" else f"memory://{tmp_path.name}/ds"
    fs, path = filesystem(root)
    with pytest.raises(RuntimeError):
        with atomic_directory(root) as tmp:
            DatasetWriter(tmp).write("train", make_table(np.zeros(3), {"f": np.arange(3)}))
            raise RuntimeError("crash mid-write")
    parent = path.rsplit("/", 1)[0]
    leftovers = [p for p in fs.ls(parent, detail=False) if p.rsplit("/", 1)[-1].startswith("ds")] if fs.exists(parent) else []
    assert leftovers == [], "neither the output nor its temporary directory may survive a failure"

    schema = _write_dataset(root)
    assert read_schema(root) == schema
    assert schema.splits["train"].rows == 500
    with pytest.raises(UserError, match="already exists"):
        with atomic_directory(root):
            pass


def test_writer_spreads_rows_over_files_with_bounded_row_groups(tmp_path):
    schema = _write_dataset(str(tmp_path / "ds"))
    train = schema.splits["train"]
    assert len(train.files) == 3
    total = 0
    for rel in train.files:
        meta = pq.ParquetFile(tmp_path / "ds" / rel).metadata
        assert all(meta.row_group(i).num_rows <= 128 + 100 for i in range(meta.num_row_groups))
        total += meta.num_rows
    assert total == train.rows == 500


def test_schema_rejects_malformed_files(tmp_path):
    with pytest.raises(UserError, match="no schema.json"):
        read_schema(str(tmp_path))
    (tmp_path / "schema.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_schema(str(tmp_path))
    good = json.loads(DatasetSchema("x", [SparseField("f", 3)], [], {}).to_json())
    (tmp_path / "schema.json").write_text(json.dumps({**good, "sparse_fields": [{"name": "f"}]}))
    with pytest.raises(UserError, match="malformed schema"):
        read_schema(str(tmp_path))
    (tmp_path / "schema.json").write_text(json.dumps({**good, "splits": {"dev": {"rows": 1, "files": []}}}))
    with pytest.raises(UserError, match="unknown splits"):
        read_schema(str(tmp_path))


def test_split_assignment_is_deterministic_and_proportional():
    rows = np.arange(200_000)
    splits = assign_splits(rows, parse_split("8,1,1"), seed=0)
    assert np.array_equal(splits, assign_splits(rows, parse_split("8,1,1"), seed=0))
    fractions = np.bincount(splits, minlength=3) / len(rows)
    assert abs(fractions[TRAIN] - 0.8) < 0.005 and abs(fractions[VAL] - 0.1) < 0.005 and abs(fractions[TEST] - 0.1) < 0.005
    # a row's split does not depend on which other rows are in the batch
    assert np.array_equal(assign_splits(rows[1000:2000], parse_split("8,1,1"), 0), splits[1000:2000])
    assert (assign_splits(rows, parse_split("8,1,1"), seed=1) != splits).mean() > 0.2
    for bad in ["8,1", "a,b,c", "0,1,1", "-1,1,1"]:
        with pytest.raises(UserError):
            parse_split(bad)


def test_criteo_integer_token_matches_the_paper_recipe():
    values = np.array([-3, -1, 0, 1, 2, 3, 4, 5, 10, 100, 1_618_112])
    expected = [v - 2 if v <= 2 else int(np.floor(np.log(v) ** 2)) for v in values.tolist()]
    assert criteo_integer_token(values).tolist() == expected == [-5, -3, -2, -1, 0, 1, 1, 2, 5, 21, 204]
    dense = log_dense(np.array([[3, -2]]), missing=np.array([[False, False]]))
    np.testing.assert_allclose(dense, [[np.log(4.0), 0.0]], rtol=1e-6)


def test_installed_stack_matches_the_pins_in_pyproject():
    import tomllib

    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ctr"]["accelerator"]
    import torch

    assert torch.__version__.split("+")[0] == pins["torch"]
    assert importlib.metadata.version("torchrec") == pins["torchrec"]
    fbgemm_dist, fbgemm_version = pins["fbgemm_cuda" if torch.cuda.is_available() else "fbgemm_cpu"].split("==")
    assert importlib.metadata.version(fbgemm_dist) == fbgemm_version
    # the CUDA fbgemm must never sit beside the CPU one
    other = pins["fbgemm_cpu" if torch.cuda.is_available() else "fbgemm_cuda"].split("==")[0]
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version(other)


def test_make_setup_is_a_no_op_once_built():
    result = subprocess.run(["make", "-q", "setup"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"make setup would rebuild .venv: {result.stdout}{result.stderr}"


def test_setup_rejects_an_unknown_accelerator():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "setup_env.py"), "/nonexistent-venv"],
        env={"CTR_ACCELERATOR": "tpu", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "CTR_ACCELERATOR" in result.stderr
