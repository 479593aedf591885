"""``trainer.run_dir.RunDir`` written and read back, in process, on a local path and on
``memory://``: the summary, metrics (appended, a line cut by a killed run, cut back to a
resume step), collapse records, and the latest and best checkpoints."""

from __future__ import annotations

import json
import uuid

import pytest

from trainer import checkpoint
from trainer.run_dir import COLLAPSE, METRICS, SUMMARY, SUMMARY_KEYS, SUMMARY_TEXT, RunDir
from trainer.storage import filesystem, join

SUMMARY_RECORD = {
    "model": "dcnv2", "embedding": "me 2x10", "world_size": 2, "device": "cpu", "dataset": "data/tiny",
    "test_auc": 0.7412, "oracle_test_auc": 0.8, "test_logloss": 0.45, "oracle_test_logloss": 0.4, "test_ne": None,
    "val_auc": 0.74, "val_ne": 0.9, "best_step": 10, "steps": 15, "epochs_completed": 1, "stopped_early": False,
    "train_examples": 30_000, "train_examples_per_sec": 1234.5,
}  # fmt: skip


@pytest.fixture(params=["local", "memory"])
def run_dir(request, tmp_path):
    """A fresh run directory (created, empty) on the local disk or on ``memory://``."""
    if request.param == "local":
        run = RunDir(str(tmp_path / "run"))
        run.create()
        yield run
        return
    root = f"memory://run-dir-{uuid.uuid4().hex[:8]}"
    run = RunDir(f"{root}/run")
    run.create()
    try:
        yield run
    finally:
        run.fs.rm(filesystem(root)[1], recursive=True)


def _commit_checkpoint(run: RunDir, step: int, complete: bool = True) -> str:
    """A checkpoint directory of ``run`` as a save leaves it: DCP's index, and ``meta.json``
    (the commit marker) only when ``complete``."""
    url = join(run.checkpoints, checkpoint.checkpoint_name(step))
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)
    fs.pipe(join(path, checkpoint.DCP_METADATA), b"index")
    if complete:
        fs.pipe(join(path, checkpoint.META), json.dumps(checkpoint.seal({"step": step})).encode())
    return url


def test_summary_round_trip(run_dir):
    assert run_dir.read_summary() is None  # not finished yet
    run_dir.write_summary(SUMMARY_RECORD)
    assert run_dir.read_summary() == SUMMARY_RECORD
    text = run_dir.read_text(SUMMARY_TEXT)
    assert run_dir.url in text and f"{SUMMARY_RECORD['test_auc']:.5f}" in text and "test NE       n/a" in text
    run_dir.write_text(SUMMARY, json.dumps({k: v for k, v in SUMMARY_RECORD.items() if k != SUMMARY_KEYS[0]}))
    assert run_dir.read_summary() is None  # a summary without one of the keys is not a finished run's
    run_dir.write_text(SUMMARY, '{"test_auc": 0.7')  # cut short
    assert run_dir.read_summary() is None
    assert not run_dir.exists(SUMMARY + ".tmp")  # written under a temporary name, then renamed


def test_metrics_and_collapse_records_append_and_cut_back(run_dir):
    for step in (5, 10, 15):
        run_dir.append_metrics({"step": step, "loss": 1.0 / step})
        run_dir.append_collapse({"step": step, "fields": {"C1": {"ia": step / 100}}})
    run_dir.append_collapse({"step": 16, "fields": {}})  # no per-field values: not a usable record
    with run_dir.fs.open(join(run_dir.path, METRICS), "a") as f:
        f.write('{"step": 20, "lo')  # the line a killed run cut
    assert [r["step"] for r in run_dir.read_metrics()] == [5, 10, 15]
    assert [r["step"] for r in run_dir.read_collapse_records()] == [5, 10, 15]
    assert run_dir.read_collapse_record(10)["fields"]["C1"]["ia"] == 10 / 100
    assert run_dir.read_collapse_record(7)["step"] == 15  # no record at that step: the last

    run_dir.drop_records_after(10)  # a run resumed from step 10 logs 15 again
    assert [r["step"] for r in run_dir.read_metrics()] == [5, 10]
    assert [r["step"] for r in run_dir.read_collapse_records()] == [5, 10]
    assert [json.loads(line)["step"] for line in run_dir.read_text(METRICS).splitlines()] == [5, 10]  # no cut line
    run_dir.append_metrics({"step": 15, "loss": 0.5})
    assert [r["step"] for r in run_dir.read_metrics()] == [5, 10, 15]

    run_dir.drop_records_after(0)  # started afresh
    assert run_dir.read_metrics() == [] and run_dir.read_collapse_record() is None
    assert run_dir.read_text(COLLAPSE) == ""


def test_latest_and_best_checkpoint(run_dir):
    assert run_dir.latest_checkpoint() is None and run_dir.best_checkpoint() is None
    assert not run_dir.has_checkpoints()
    _commit_checkpoint(run_dir, 20, complete=False)  # a save that did not finish
    assert run_dir.has_checkpoints() and run_dir.latest_checkpoint() is None

    first, second = _commit_checkpoint(run_dir, 5), _commit_checkpoint(run_dir, 10)
    assert [c.step for c in run_dir.checkpoint_list()] == [5, 10]
    assert run_dir.latest_checkpoint() == second
    assert run_dir.best_checkpoint() == second  # no summary: the latest
    assert RunDir.of_checkpoint(second).url == run_dir.url

    # the summary names the best by its path when written (the run directory may have moved since)
    run_dir.write_summary({**SUMMARY_RECORD, "best_checkpoint": f"/elsewhere/checkpoints/{checkpoint.checkpoint_name(5)}"})
    assert run_dir.best_checkpoint() == first
    run_dir.fs.rm(filesystem(first)[1], recursive=True)  # e.g. pruned
    assert run_dir.best_checkpoint() == second
