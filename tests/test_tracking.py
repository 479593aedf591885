"""TensorBoard scalars and experiment tracking (``trainer/tracking.py``), for real.

- A tiny run with ``monitoring.tensorboard: true`` is read back with TensorBoard's own
  ``EventAccumulator``: every tag, one loss value per logged step, the values of
  ``metrics.jsonl`` and ``collapse.jsonl``.
- A default run writes no event file and imports none of tensorboard, mlflow or
  torchx.tracker (``-X importtime``).
- ``torchx run`` of the train component on 2 ranks, with an MLflow tracker configured in
  ``.torchxconfig`` as the README says and a local MLflow file store: read back with
  ``MlflowClient``, one run named after the torchx job, with the config (params), the
  summary (metrics) and the run directory (tag); TensorBoard files from rank 0 only.
- Without training: params are flat text; torchx's fsspec tracker gets the same as metadata
  and an artifact; a tracker that cannot be built, or a job run that already records another
  run directory, costs a warning; a resumed writer hides a crashed attempt's later steps.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest

from tests.helpers import PYTHON, ROOT, TINY, VENV_BIN, Launcher, cli_env, metrics, ok, run, summary, train
from trainer.job_config import MonitoringConfig, load_config
from trainer.run_dir import RunDir
from trainer.tracking import RunTracking, TensorBoardLog, config_params

TRACKER_ENV = ("TORCHX_TRACKERS", "TORCHX_TRACKER_FSSPEC_CONFIG", "TORCHX_TRACKER_MLFLOW_CONFIG", "TORCHX_JOB_ID",
               "TORCHX_PARENT_RUN_ID", "TORCHX_TRACKING_EXPERIMENT_NAME", "TORCHXCONFIG")


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every event file in ``log_dir``, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every value
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def steps(series: list[tuple[int, float]]) -> list[int]:
    return [step for step, _ in series]


# ---- without training ----------------------------------------------------------------------


@pytest.fixture
def no_tracker_env(monkeypatch):
    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def tiny_config(tmp_path: Path, *overrides: str):
    return load_config(None, [f"data.path={tmp_path / 'data'}", *overrides])


def test_config_params_are_flat_text(tmp_path):
    params = config_params(tiny_config(tmp_path, "train.epochs=3", "optim.weight_decay=1e-6"))
    assert params["train.epochs"] == "3" and params["optim.weight_decay"] == "1e-06"
    assert params["model.cin_layers"] == "[16, 16]" and params["sharding.per_table"] == "{}"
    assert params["sharding.storage_cap_bytes"] == "null" and params["monitoring.tensorboard"] == "false"
    assert params["data.path"] == str(tmp_path / "data") and params["monitoring.run_id"] == ""
    assert all(isinstance(v, str) for v in params.values())


def test_off_imports_nothing_and_writes_nothing(tmp_path):
    """The default: every call is a no-op, in a fresh interpreter that then holds none of the packages."""
    code = """
import json, sys
from trainer.job_config import MonitoringConfig, load_config
from trainer.run_dir import RunDir
from trainer.tracking import RunTracking
tracking = RunTracking(MonitoringConfig(), RunDir(sys.argv[1]), "r", is_main=True)
tracking.start(load_config(None, ["data.path=x"]), 0)
tracking.record_train({"step": 1, "loss": 0.5, "examples_per_sec": 10.0})
tracking.record_validation({"step": 1, "auc": 0.7, "logloss": 0.5, "ne": 0.9})
tracking.record_collapse({"step": 1, "fields": {"C1": {"overall_ia_ratio": 0.5, "diversity": 0.3}}})
tracking.finish({"steps": 1, "test_auc": 0.7})
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorboard", "mlflow", "torch")
                        or m.startswith("torchx.tracker"))))
"""
    proc = ok(run([PYTHON, "-c", code, str(tmp_path / "run")], timeout=60, TORCHX_TRACKERS=""))
    assert json.loads(proc.stdout) == []
    assert not (tmp_path / "run").exists()


def _fsspec_tracker(tmp_path: Path, monkeypatch) -> Path:
    (tmp_path / "tracker").mkdir()
    config = tmp_path / "fsspec.cfg"
    config.write_text(f"protocol=file\nroot_path={tmp_path / 'tracker'}\n")
    monkeypatch.setenv("TORCHX_TRACKERS", "fsspec")
    monkeypatch.setenv("TORCHX_TRACKER_FSSPEC_CONFIG", str(config))
    monkeypatch.setenv("TORCHX_JOB_ID", "local_cwd://torchx/train-x1")
    return config


def test_fsspec_tracker_gets_params_metrics_and_the_run_directory(tmp_path, no_tracker_env):
    from torchx.tracker.backend.fsspec import create

    config = _fsspec_tracker(tmp_path, no_tracker_env)
    run_dir = RunDir(str(tmp_path / "run"))
    assert RunTracking(MonitoringConfig(), run_dir, "run", is_main=False).tracker is None  # rank 0 only
    tracking = RunTracking(MonitoringConfig(), run_dir, "run", is_main=True)
    tracking.start(tiny_config(tmp_path, "train.epochs=3"), 0)
    tracking.finish({"steps": 40, "test_auc": 0.71, "test_ne": 0.93, "val_auc": None, "stopped_early": False,
                     "best_step": 30, "best_checkpoint": str(tmp_path / "run" / "checkpoints" / "step-00000030")})

    stored = create(str(config))
    metadata = stored.metadata("local_cwd://torchx/train-x1")
    assert metadata["param.train.epochs"] == "3" and metadata["param.model.name"] == "dcnv2"
    assert metadata["metric.test_auc"] == 0.71 and metadata["metric.test_ne"] == 0.93 and metadata["metric.best_step"] == 30
    assert "metric.val_auc" not in metadata and "metric.stopped_early" not in metadata  # undefined; not a number
    url = (tmp_path / "run").as_uri()
    assert metadata["ctr.run_dir"] == url and metadata["ctr.run_id"] == "run"
    assert metadata["ctr.best_checkpoint"].endswith("step-00000030")
    assert stored.artifacts("local_cwd://torchx/train-x1")["run_dir"].path == url


def test_a_job_run_that_records_another_run_directory_is_left_alone(tmp_path, no_tracker_env, caplog):
    """One torchx job, two run directories (the cells of a sweep): the second is not mixed in."""
    from torchx.tracker.backend.fsspec import create

    config = _fsspec_tracker(tmp_path, no_tracker_env)
    first = RunTracking(MonitoringConfig(), RunDir(str(tmp_path / "a")), "a", is_main=True)
    first.start(tiny_config(tmp_path), 0)
    caplog.set_level(logging.WARNING, logger="trainer.tracking")
    second = RunTracking(MonitoringConfig(), RunDir(str(tmp_path / "b")), "b", is_main=True)
    second.start(tiny_config(tmp_path, "train.epochs=7"), 0)
    second.finish({"steps": 5, "test_auc": 0.5})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "already records the run directory" in warnings[0] and str(tmp_path / "a") in warnings[0]
    metadata = create(str(config)).metadata("local_cwd://torchx/train-x1")
    assert metadata["ctr.run_dir"] == (tmp_path / "a").as_uri() and metadata["param.train.epochs"] == "10"
    assert "metric.test_auc" not in metadata


def test_a_tracker_that_cannot_be_built_costs_one_warning(tmp_path, no_tracker_env, caplog):
    no_tracker_env.setenv("TORCHX_TRACKERS", "no_such_tracker")
    caplog.set_level(logging.WARNING, logger="trainer.tracking")
    tracking = RunTracking(MonitoringConfig(), RunDir(str(tmp_path / "run")), "run", is_main=True)
    assert tracking.tracker is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "trainer.tracking"]
    assert len(warnings) == 1 and "no_such_tracker" in warnings[0] and "experiment tracking is off" in warnings[0]


@pytest.mark.slow  # imports torch and tensorboard
def test_a_resumed_writer_hides_the_crashed_attempts_later_steps(tmp_path):
    crashed = TensorBoardLog(str(tmp_path))
    crashed.open(purge_step=1)
    for step in (5, 10, 15):  # a checkpoint at 10, then the crash after 15 was logged
        crashed.scalars(step, {"train/loss": step})
    crashed.close()
    resumed = TensorBoardLog(str(tmp_path))
    resumed.open(purge_step=10 + 1)  # RunTracking.start(config, step=10)
    for step in (15, 20):
        resumed.scalars(step, {"train/loss": 100 + step, "val/auc": float("nan")})  # NaN: left out
    resumed.close()
    scalars = read_scalars(tmp_path)
    assert scalars == {"train/loss": [(5, 5.0), (10, 10.0), (15, 115.0), (20, 120.0)]}


def _mlflow_config(conf_dir: Path, store: Path) -> Path:
    """The README's ``.torchxconfig`` tracker sections, for a local MLflow file store."""
    conf_dir.mkdir(exist_ok=True)
    (conf_dir / ".torchxconfig").write_text(
        "[torchx:tracker]\n"
        "mlflow = torchx.tracker.mlflow:create_tracker\n\n"
        "[tracker:mlflow]\n"
        f"config = {conf_dir}\n"
        f"tracking_uri = {store.as_uri()}\n"
        "experiment_name = ctr-test\n"
    )
    return conf_dir / ".torchxconfig"


@pytest.mark.slow  # imports torch and mlflow
@pytest.mark.filterwarnings("ignore:The filesystem tracking backend:FutureWarning")
def test_an_mlflow_run_that_does_not_finish_ends_failed(tmp_path, no_tracker_env):
    """Outside torchx (no job id) the MLflow run is named after the run id; a run that stops
    before its summary (an error) ends FAILED, not FINISHED as mlflow's own exit hook has it."""
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    _mlflow_config(tmp_path / "torchx", store)
    no_tracker_env.setenv("TORCHX_TRACKERS", "mlflow")
    no_tracker_env.setenv("TORCHX_TRACKER_MLFLOW_CONFIG", str(tmp_path / "torchx"))
    tracking = RunTracking(MonitoringConfig(), RunDir(str(tmp_path / "run")), "my-run", is_main=True)
    tracking.start(tiny_config(tmp_path, "train.epochs=2"), 0)
    tracking.tracker._end_unfinished()  # what the exit hook does after an error
    client = MlflowClient(store.as_uri())
    (mlrun,) = client.search_runs([client.get_experiment_by_name("ctr-test").experiment_id])
    assert (mlrun.info.run_name, mlrun.info.status) == ("my-run", "FAILED")
    assert mlrun.data.params["train.epochs"] == "2" and mlrun.data.metrics == {}


# ---- trainings -----------------------------------------------------------------------------


def _torchx_mlflow(tmp_path: Path, dataset: Path) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """``torchx run`` of the train component, 1x2, with the README's tracker configuration."""
    store = tmp_path / "mlruns"
    config = _mlflow_config(tmp_path / "torchx", store)
    run_dir = tmp_path / "run"
    cmd = [str(VENV_BIN / "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}",
           "pipelines/components.py:train", "--config", "configs/synthetic_me.yaml", "--data", str(dataset),
           "--run_dir", str(run_dir), "-j", "1x2", *TINY, "train.epochs=1", "monitoring.tensorboard=true"]
    env = cli_env(TORCHXCONFIG=str(config))
    for name in TRACKER_ENV[:-1]:  # unset, not empty: torchx reads TORCHX_TRACKERS="" as a tracker named ""
        env.pop(name, None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, run_dir, store


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dataset):
    root = tmp_path_factory.mktemp("tracking")
    launcher = Launcher()
    common = [f"data.path={tiny_dataset}", "train.epochs=1"]
    launcher.submit("tensorboard", train, *common, f"run.dir={root / 'tensorboard'}", "monitoring.tensorboard=true",
                    "train.eval_every_steps=10", "monitoring.collapse_every_steps=5", TORCHX_TRACKERS="")
    launcher.submit("off", train, *common, f"run.dir={root / 'off'}", "train.max_steps=5", TORCHX_TRACKERS="",
                    PYTHONPROFILEIMPORTTIME="1")
    (root / "mlflow").mkdir()
    launcher.submit("mlflow", _torchx_mlflow, root / "mlflow", tiny_dataset)
    launcher.root = root
    yield launcher
    launcher.close()


@pytest.mark.slow
def test_tensorboard_has_every_scalar_of_the_run(runs):
    ok(runs.result("tensorboard"))
    run_dir = runs.root / "tensorboard"
    records = metrics(run_dir)
    train_records = [r for r in records if r["kind"] == "train"]
    val_records = [r for r in records if r["kind"] == "val"]
    collapse = [json.loads(line) for line in (run_dir / "collapse.jsonl").read_text().splitlines() if line.strip()]
    fields = sorted(collapse[0]["fields"])
    assert len(train_records) >= 3 and len(val_records) >= 2 and len(collapse) >= 3  # the cadences above

    scalars = read_scalars(run_dir / "tensorboard")
    expected = {"train/loss", "train/examples_per_sec", "val/auc", "val/logloss", "val/ne",
                "test/auc", "test/logloss", "test/ne"}
    expected |= {f"collapse/ia_ratio/{f}" for f in fields} | {f"collapse/diversity/{f}" for f in fields}
    assert set(scalars) == expected, sorted(set(scalars) ^ expected)
    # one value per logged step, the value of metrics.jsonl (TensorBoard stores float32)
    assert steps(scalars["train/loss"]) == [r["step"] for r in train_records]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in train_records], rel=1e-6)
    for key in ("auc", "logloss", "ne"):
        assert scalars[f"val/{key}"] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in val_records]
    field = fields[0]
    assert scalars[f"collapse/ia_ratio/{field}"] == [
        (c["step"], pytest.approx(c["fields"][field]["overall_ia_ratio"], rel=1e-6)) for c in collapse]
    result = summary(run_dir)
    assert scalars["test/auc"] == [(result["steps"], pytest.approx(result["test_auc"], rel=1e-6))]


@pytest.mark.slow
def test_default_run_writes_no_event_file_and_imports_neither(runs):
    proc = ok(runs.result("off"))
    run_dir = runs.root / "off"
    assert (run_dir / "summary.json").exists() and not (run_dir / "tensorboard").exists()
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert any(name == "torchrec" for name in imported)  # the import log is there
    heavy = [name for name in imported if name.split(".")[0] in ("tensorboard", "mlflow") or name.startswith("torchx.tracker")]
    assert heavy == []


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The filesystem tracking backend:FutureWarning")
def test_torchx_mlflow_tracker_records_config_metrics_and_run_directory(runs):
    from mlflow.tracking import MlflowClient

    proc, run_dir, store = runs.result("mlflow")
    ok(proc)
    assert "trainer.tracking: experiment tracking: run local_cwd://torchx/train-" in proc.stderr
    assert "WARNING trainer.tracking" not in proc.stderr
    result = summary(run_dir)
    assert result["world_size"] == 2

    client = MlflowClient(store.as_uri())
    experiment = client.get_experiment_by_name("ctr-test")  # .torchxconfig's, not dist.ddp's "default-experiment"
    assert experiment is not None
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == 1, [r.info.run_name for r in found]  # rank 1 opened none
    mlrun = found[0]
    assert mlrun.info.run_name.startswith("local_cwd://torchx/train-") and mlrun.info.status == "FINISHED"
    params = mlrun.data.params
    assert params["run.dir"] == str(run_dir) and params["model.hidden"] == "16" and params["train.epochs"] == "1"
    assert params["embedding.mode"] == "me" and params["monitoring.tensorboard"] == "true"
    got = mlrun.data.metrics
    for key in ("test_auc", "test_logloss", "test_ne", "val_auc", "val_logloss", "val_ne", "best_step"):
        assert got[key] == pytest.approx(result[key]), key
    assert client.get_metric_history(mlrun.info.run_id, "test_auc")[0].step == result["steps"]
    tags = mlrun.data.tags
    assert tags["ctr.run_dir"] == run_dir.as_uri() and tags["ctr.run_id"] == "run"
    assert tags["ctr.best_checkpoint"] == result["best_checkpoint"]

    event_files = list((run_dir / "tensorboard").iterdir())
    assert len(event_files) == 1, event_files  # rank 0 only
    assert steps(read_scalars(run_dir / "tensorboard")["train/loss"]) == [
        r["step"] for r in metrics(run_dir) if r["kind"] == "train"]
