"""Nothing silently wrong, nothing lost: inputs the trainer cannot use are refused with
``error: ...`` and exit 2 (no traceback) before the run directory is touched; undefined
metrics are ``null`` with a reason in ``summary.json``; a resumed run logs each step once.

The CLI runs use the tiny data and model of test_trainer.py (tests.helpers.TINY); the
crafted datasets are copies of ``tiny_dataset`` with one thing changed.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import PYTHON, TINY, metrics, ok, run, summary, train, user_error
from trainer.errors import UserError
from trainer.job_config import load_config


def _copy(dataset: Path, dst: Path) -> Path:
    shutil.copytree(dataset, dst)
    return dst


def _rewrite_split(dataset: Path, split: str, change, **write_options) -> None:
    """Rewrite every parquet file of ``split`` as ``change(table)``."""
    for path in sorted((dataset / split).glob("*.parquet")):
        pq.write_table(change(pq.read_table(path)), path, **write_options)


def _labels(value: int):
    def change(table: pa.Table) -> pa.Table:
        index = table.schema.get_field_index("label")
        return table.set_column(index, "label", pa.array([value] * table.num_rows, pa.int8()))

    return change


def _lower_cardinality(dataset: Path, field_index: int, cardinality: int) -> str:
    schema_path = dataset / "schema.json"
    schema = json.loads(schema_path.read_text())
    field = schema["sparse_fields"][field_index]
    field["cardinality"] = cardinality
    schema_path.write_text(json.dumps(schema, indent=2))
    return field["name"]


# ---- an output that cannot be written ------------------------------------------------------


@pytest.mark.parametrize("where", ["below-a-file", "a-file"])
def test_run_dir_that_is_or_is_below_a_file_is_a_clear_error(where, tiny_dataset, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    run_dir = a_file / "run" if where == "below-a-file" else a_file
    proc = train(f"data.path={tiny_dataset}", f"run.dir={run_dir}")
    user_error(proc, f"run.dir {run_dir}", f"{a_file} is a file, not a directory")
    assert a_file.read_text() == "not a directory\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a mode 0o555 directory (the read-only mount and file cases cover root)")
def test_read_only_run_dir_is_a_clear_error(tiny_dataset, tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        proc = train(f"data.path={tiny_dataset}", f"run.dir={parent / 'run'}")
        user_error(proc, f"run.dir {parent / 'run'}", f"cannot write in {parent}")
        assert not (parent / "run").exists()
    finally:
        parent.chmod(0o755)


def test_read_only_mount_as_run_dir_parent_is_a_clear_error(tiny_dataset, tmp_path):
    """A real read-only file system, which stops root too: a tmpfs mounted read-only in a
    private mount namespace (``unshare -m``), where the container allows one."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare to mount a read-only file system")
    mount, run_dir = tmp_path / "ro", tmp_path / "ro" / "run"
    mount.mkdir()
    cli = shlex.join([PYTHON, "-m", "trainer.main", "--set", *TINY, f"data.path={tiny_dataset}", f"run.dir={run_dir}"])
    proc = run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro none {shlex.quote(str(mount))} || exit 99; exec {cli}"])
    if proc.returncode == 99 or proc.stderr.startswith("unshare:"):
        pytest.skip(f"no private read-only mount here: {proc.stderr.strip()[:200]}")
    user_error(proc, f"run.dir {run_dir}", f"cannot write in {mount}", "read-only file system")


# ---- a config value that is not a finite number -----------------------------------------------


@pytest.mark.parametrize(
    "override",
    ["optim.weight_decay=.nan", "optim.weight_decay=.inf", "optim.embedding_lr=.inf", "optim.dense_lr=.inf",
     "optim.eps=.nan", "optim.eps=-.inf"],
)  # fmt: skip
def test_non_finite_config_values_are_refused_at_load(override):
    key = override.split("=")[0]
    with pytest.raises(UserError, match=rf"{key}: expected a finite number"):
        load_config(None, ["data.path=x", override])


def test_nan_weight_decay_is_a_clear_cli_error(tiny_dataset, tmp_path):
    proc = train(f"data.path={tiny_dataset}", f"run.dir={tmp_path / 'run'}", "optim.weight_decay=.nan")
    user_error(proc, "optim.weight_decay", "finite number", "nan")
    assert not (tmp_path / "run").exists()


# ---- ids beyond a field's cardinality ---------------------------------------------------------


@pytest.mark.slow
def test_ids_beyond_the_cardinality_are_refused_before_the_run_dir_is_written(tiny_dataset, tmp_path):
    data = _copy(tiny_dataset, tmp_path / "data")
    name = _lower_cardinality(data, 3, 5)
    run_dir = tmp_path / "run"
    proc = train(f"data.path={data}", f"run.dir={run_dir}", "train.epochs=1")
    user_error(proc, f"split 'train' has {name} ids", "outside [0, 5)", "schema.json")
    assert not run_dir.exists(), "the run directory was created for a run that was refused"


def test_ids_beyond_the_cardinality_without_parquet_statistics_are_refused_when_read(tiny_dataset, tmp_path):
    """No footer statistics to check up front: the loader refuses the ids as it decodes them."""
    from trainer.data.loader import CTRDataLoader, LoaderConfig

    data = _copy(tiny_dataset, tmp_path / "data")
    _rewrite_split(data, "val", lambda table: table, write_statistics=False)
    name = _lower_cardinality(data, 3, 5)
    loader = CTRDataLoader(str(data), "val", LoaderConfig(batch_size=256, shuffle=False))
    with pytest.raises(UserError, match=rf"split 'val' has {name} ids in \[\d+, \d+\], outside \[0, 5\)"):
        list(loader)
    assert loader.column_range(name) is None, "the footers were to have no statistics"


# ---- single-class splits -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_class_run(tiny_dataset, tmp_path_factory):
    """One epoch on data whose train labels are all 1 and val and test labels all 0."""
    root = tmp_path_factory.mktemp("single-class")
    data = _copy(tiny_dataset, root / "data")
    _rewrite_split(data, "train", _labels(1))
    _rewrite_split(data, "val", _labels(0))
    _rewrite_split(data, "test", _labels(0))
    run_dir = root / "run"
    return run_dir, ok(train(f"data.path={data}", f"run.dir={run_dir}", "train.epochs=1"))


@pytest.mark.slow
def test_single_class_splits_are_warned_about_at_start(single_class_run):
    _, proc = single_class_run
    start = proc.stderr[: proc.stderr.index("training:")]  # before the first step
    assert "every label of the train split is 1: training learns nothing useful" in start, start[-3000:]
    assert "every label of the val split is 0: validation AUC is undefined" in start
    assert "every label of the test split is 0: test AUC is undefined" in start


@pytest.mark.slow
def test_summary_is_strict_json_with_null_and_a_reason_for_undefined_metrics(single_class_run):
    run_dir, _ = single_class_run

    def no_nan(constant: str):
        raise AssertionError(f"summary.json holds a bare {constant}: not valid JSON")

    s = json.loads((run_dir / "summary.json").read_text(), parse_constant=no_nan)
    assert s["val_auc"] is None and "single-class val split" in s["val_auc_reason"]
    assert s["test_auc"] is None and "single-class test split" in s["test_auc_reason"]
    assert s["test_calibration"] is None and "no positive label in the test split" in s["test_calibration_reason"]
    assert s["test_logloss"] is not None and "test_logloss_reason" not in s
    for split in ("val", "test"):  # NE divides by the entropy of the base rate, 0 on a single class
        assert s[f"{split}_ne"] is None and f"single-class {split} split" in s[f"{split}_ne_reason"]
        assert "NE undefined" in s[f"{split}_ne_reason"]
    text = (run_dir / "summary.txt").read_text()
    assert "test AUC      n/a" in text and "test NE       n/a" in text and "val NE        n/a" in text


# ---- metrics.jsonl after a crash and a resume ----------------------------------------------------


@pytest.mark.slow
def test_resumed_run_logs_each_step_once(tiny_dataset, tmp_path):
    """Killed after step 11 of 19 (train records up to step 10 and collapse records at 5 and 10
    written, the latest checkpoint is step 8), then resumed: the crashed attempt's records after
    step 8 are dropped, not repeated. A resume with another embedding optimizer is refused first."""
    run_dir = tmp_path / "run"
    args = [f"data.path={tiny_dataset}", f"run.dir={run_dir}", "train.epochs=1", "train.checkpoint_every_steps=4",
            "monitoring.collapse_every_steps=5"]  # fmt: skip
    crashed = train(*args, CTR_FAIL_AT_STEP="11", CTR_FAIL_RANK="0")
    assert crashed.returncode == 17, crashed.stderr[-3000:]
    assert max(r["step"] for r in metrics(run_dir)) == 10, "the crash must leave records after the checkpoint"
    # the checkpoint's optimizer state belongs to its embedding optimizer: another one is refused, nothing written
    before = metrics(run_dir)
    user_error(train(*args, "optim.embedding=adagrad", resume="auto"), "optim.embedding=rowwise_adagrad",
               "optim.embedding=adagrad", "step-00000008")  # fmt: skip
    assert metrics(run_dir) == before

    proc = ok(train(*args, resume="auto"))
    assert f"resumed from {run_dir}/checkpoints/step-00000008" in proc.stderr
    records = metrics(run_dir)
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and 10 in steps, f"train steps repeated or lost: {steps}"
    assert [r["step"] for r in records if r["kind"] == "val"] == [summary(run_dir)["steps"]]
    collapse = [json.loads(line)["step"] for line in (run_dir / "collapse.jsonl").read_text().splitlines()]
    assert collapse == [5, 10, 15, summary(run_dir)["steps"]], f"collapse.jsonl steps repeated or lost: {collapse}"
