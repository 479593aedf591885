"""TensorBoard scalars and experiment tracking of a training run: both optional, both from rank 0.

**TensorBoard** (``monitoring.tensorboard: true``): event files under ``RUN/tensorboard/``
(``tensorboard --logdir RUN/tensorboard``; an fsspec URL such as ``s3://`` works too, through
TensorBoard's own fsspec support), each scalar at the optimizer step of its record:

    train/loss, train/examples_per_sec   every log window (the records of metrics.jsonl)
    val/auc, val/logloss, val/ne         every evaluation
    collapse/ia_ratio/<field>            IA / random IA of the field's embedding (its sets
                                         concatenated), every collapse measurement
    collapse/diversity/<field>           set diversity (fields with several sets)
    test/auc, test/logloss, test/ne      the best checkpoint's test metrics, at the last step

An undefined value (the AUC of a single-class split) is left out. A resumed run hides what a
crashed attempt wrote after the checkpoint it resumes from (the writer's ``purge_step``), as
``metrics.jsonl`` drops those records.

**Experiment tracking** through torchx's tracker API, when torchx launched the job with
trackers configured (a ``[torchx:tracker]`` section in ``.torchxconfig``, which torchx hands
to the job as ``TORCHX_TRACKERS`` and ``TORCHX_TRACKER_<NAME>_CONFIG``): each tracker gets the
resolved config (params), the numbers of ``summary.json`` when the run ends (metrics), and
the run directory's URL. In MLflow (``torchx.tracker.mlflow``, which this project registers
as the tracker ``mlflow``) they are the run's params, metrics (at the last step) and tags
``ctr.run_dir`` / ``ctr.run_id`` / ``ctr.best_checkpoint``; the MLflow run is named after
the torchx job (``TORCHX_JOB_ID``), so a job restarted by torchx carries on in the same run,
and one that fails is marked FAILED. Other trackers get the same as metadata (``param.*``,
``metric.*``, ``ctr.*``) and an artifact ``run_dir``.

Nothing of tensorboard, torchx.tracker or mlflow is imported while they are off. A writer
or tracker that fails costs one warning and is turned off, never the run (as the
Prometheus export).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from trainer import typed_yaml

if TYPE_CHECKING:
    from trainer.job_config import MonitoringConfig, TrainConfig
    from trainer.run_dir import RunDir

log = logging.getLogger("trainer.tracking")

TENSORBOARD_DIR = "tensorboard"  # under the run directory
FLUSH_SECS = 30  # the writer also flushes after every evaluation and collapse measurement
# torchx.tracker.api's environment (named here so that nothing of torchx.tracker loads while it is unset)
ENV_TRACKERS = "TORCHX_TRACKERS"
ENV_JOB_ID = "TORCHX_JOB_ID"
ENV_PARENT_RUN_ID = "TORCHX_PARENT_RUN_ID"
RUN_DIR_TAG = "ctr.run_dir"
EVAL_SCALARS = ("auc", "logloss", "ne")


def _number(value: Any) -> bool:
    """A finite int or float (not a bool, not None, not NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def run_dir_url(run_dir: RunDir) -> str:
    """The run directory as an absolute URL (``file:///...`` for a local path)."""
    return run_dir.fs.unstrip_protocol(run_dir.path)


def config_params(config: TrainConfig) -> dict[str, str]:
    """The resolved config as flat ``section.key -> text`` params: strings as they are, other
    values as JSON (``1e-06``, ``true``, ``[16, 16]``, ``{}``, ``null``)."""
    params: dict[str, str] = {}
    for section, values in typed_yaml.to_dict(config).items():
        items = values.items() if isinstance(values, Mapping) else [("", values)]
        for key, value in items:
            name = f"{section}.{key}" if key else section
            params[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return params


# ---- TensorBoard ---------------------------------------------------------------------------


class TensorBoardLog:
    """Scalars in TensorBoard event files (``torch.utils.tensorboard.SummaryWriter``)."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self._writer: Any = None
        self._failed = False

    def open(self, purge_step: int | None = None) -> None:
        """Start the writer (once). ``purge_step``: hide the events of earlier writers at this
        step and later (what a crashed attempt logged after the checkpoint a run resumes from)."""
        if self._writer is not None or self._failed:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(self.log_dir, purge_step=purge_step, flush_secs=FLUSH_SECS)
        except Exception as e:  # e.g. the tensorboard package missing, or an unwritable directory
            self._fail(e)
            return
        atexit.register(self.close)  # a run that stops on an error keeps what it logged

    def scalars(self, step: int, values: Mapping[str, Any], flush: bool = False) -> None:
        """Add each finite value of ``{tag: value}`` at ``step`` (None and NaN are left out)."""
        self.open()
        if self._writer is None:
            return
        try:
            for tag, value in values.items():
                if _number(value):
                    self._writer.add_scalar(tag, float(value), step)
            if flush:
                self._writer.flush()
        except Exception as e:
            self._fail(e)

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as e:
                self._fail(e)
            self._writer = None

    def _fail(self, error: Exception) -> None:
        log.warning("TensorBoard: cannot write %s (%s: %s); no more TensorBoard scalars in this run",
                    self.log_dir, type(error).__name__, error)
        self._failed = True
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()


# ---- torchx trackers -----------------------------------------------------------------------


@contextlib.contextmanager
def _without_job_id(hide: bool) -> Iterator[None]:
    """``TORCHX_JOB_ID`` unset inside (when ``hide``): torchx's MLflowTracker opens the job's run
    as it is built when the variable is set, and only rank 0 is to open it."""
    saved = os.environ.pop(ENV_JOB_ID, None) if hide else None
    try:
        yield
    finally:
        if saved is not None:
            os.environ[ENV_JOB_ID] = saved


def _is_mlflow(backend: Any) -> bool:
    return type(backend).__module__ == "torchx.tracker.mlflow"


class ExperimentTracker:
    """The run in the torchx trackers the job's environment names (``torchx.tracker.AppRun``)."""

    def __init__(self, app_run: Any, url: str, run_id: str):
        self.app_run = app_run
        self.url = url
        self.run_id = run_id
        self.backends: list[Any] = list(app_run.backends)
        self.finished = False

    @classmethod
    def from_environ(cls, url: str, run_id: str, is_main: bool) -> ExperimentTracker | None:
        """The trackers of ``TORCHX_TRACKERS`` on rank 0; None on the other ranks and when the
        variable is unset (then nothing of torchx.tracker is imported).

        Every rank calls it at the same point: a tracker's set-up may be collective (torchx's
        MLflowTracker sets up on rank 0 first, then the others, behind a barrier). The other
        ranks build theirs without the job id, so that only rank 0 opens the job's run."""
        names = os.environ.get(ENV_TRACKERS, "").strip()
        if not names:
            return None
        try:
            from torchx.tracker.api import AppRun, trackers_from_environ

            with _without_job_id(hide=not is_main):
                backends = list(trackers_from_environ())
        except Exception as e:  # e.g. an entry point that cannot load, a tracking server out of reach
            if is_main:
                log.warning("experiment tracking is off: the trackers %s=%s could not be set up (%s: %s)",
                            ENV_TRACKERS, names, type(e).__name__, e)
            return None
        if not is_main:
            return None
        if not backends:
            log.warning("experiment tracking is off: none of the trackers %s=%s was found (an entry point "
                        "of group torchx.tracker, or a module)", ENV_TRACKERS, names)
            return None
        tracker = cls(AppRun(id=os.environ.get(ENV_JOB_ID) or run_id, backends=backends), url, run_id)
        parent = os.environ.get(ENV_PARENT_RUN_ID)
        if parent:
            tracker._each("record the parent run", lambda b: _add_source(b, tracker.app_run.id, parent))
        atexit.register(tracker._end_unfinished)  # after mlflow's own exit hook, so it runs first
        log.info("experiment tracking: run %s in %s", tracker.app_run.id,
                 ", ".join(type(b).__name__ for b in tracker.backends))
        return tracker

    def start(self, config: TrainConfig) -> None:
        """Record the resolved config and where the run directory is."""
        params = config_params(config)
        tags = {RUN_DIR_TAG: self.url, "ctr.run_id": self.run_id}
        self._each("record the config", lambda b: self._start(b, params, tags))

    def finish(self, summary: Mapping[str, Any]) -> None:
        """Record the summary's numbers and close the run (MLflow: FINISHED)."""
        metrics = {key: float(value) for key, value in summary.items() if _number(value)}
        step = summary.get("steps") if _number(summary.get("steps")) else 0
        best = {"ctr.best_checkpoint": str(summary.get("best_checkpoint", ""))}
        self._each("record the summary", lambda b: self._finish(b, metrics, int(step), best))
        self.finished = True
        self._each("close the run", lambda b: getattr(b, "close", lambda: None)())

    def _start(self, backend: Any, params: dict[str, str], tags: dict[str, str]) -> None:
        run = self.app_run.id
        recorded = backend.metadata(run).get(RUN_DIR_TAG)
        if recorded and recorded != self.url:  # e.g. the cells of a sweep, which share one torchx job
            raise RuntimeError(f"its run {run!r} already records the run directory {recorded}")
        backend.add_metadata(run, **tags)
        if _is_mlflow(backend):
            backend.log_params_flat(run, params)
        else:
            backend.add_metadata(run, **{f"param.{k}": v for k, v in params.items()})
            backend.add_artifact(run, "run_dir", self.url, {"run_id": self.run_id})

    def _finish(self, backend: Any, metrics: dict[str, float], step: int, tags: dict[str, str]) -> None:
        run = self.app_run.id
        backend.add_metadata(run, **tags)
        if _is_mlflow(backend):
            import mlflow

            backend.get_run(run)  # makes it mlflow's active run, which log_metrics writes to
            mlflow.log_metrics(metrics, step=step)
        else:
            backend.add_metadata(run, **{f"metric.{k}": v for k, v in metrics.items()})

    def _each(self, what: str, action: Callable[[Any], None]) -> None:
        """``action`` on every tracker; one that fails is warned about and dropped."""
        for backend in list(self.backends):
            try:
                action(backend)
            except Exception as e:
                log.warning("experiment tracking: %s could not %s (%s: %s); it records nothing more of this run",
                            type(backend).__name__, what, type(e).__name__, e)
                self.backends.remove(backend)

    def _end_unfinished(self) -> None:
        """At exit: a run that did not finish (an error, a refused config) ends FAILED in MLflow."""
        if self.finished:
            return
        mlflow = sys.modules.get("mlflow")
        if mlflow is not None and any(_is_mlflow(b) for b in self.backends):
            with contextlib.suppress(Exception):
                mlflow.end_run(status="FAILED")


def _add_source(backend: Any, run: str, parent: str) -> None:
    try:
        backend.add_source(run, parent)
    except NotImplementedError:  # MLflowTracker has no sources: a tag instead
        backend.add_metadata(run, **{"torchx.parent_run_id": parent})


# ---- both ----------------------------------------------------------------------------------


class RunTracking:
    """What the trainer calls beside each record it writes to the run directory. Built on every
    rank (torchx trackers may set up collectively); records on rank 0 only."""

    def __init__(self, monitoring: MonitoringConfig, run_dir: RunDir, run_id: str, is_main: bool):
        self.tensorboard = TensorBoardLog(run_dir.file(TENSORBOARD_DIR)) if is_main and monitoring.tensorboard else None
        self.tracker = ExperimentTracker.from_environ(run_dir_url(run_dir), run_id, is_main)

    def start(self, config: TrainConfig, step: int) -> None:
        """Training starts (or resumes) after ``step``."""
        if self.tensorboard is not None:
            self.tensorboard.open(purge_step=step + 1)
        if self.tracker is not None:
            self.tracker.start(config)

    def record_train(self, record: Mapping[str, Any]) -> None:
        if self.tensorboard is not None:
            self.tensorboard.scalars(record["step"], {
                "train/loss": record["loss"], "train/examples_per_sec": record["examples_per_sec"],
            })

    def record_validation(self, record: Mapping[str, Any]) -> None:
        if self.tensorboard is not None:
            self.tensorboard.scalars(record["step"], {f"val/{k}": record.get(k) for k in EVAL_SCALARS}, flush=True)

    def record_collapse(self, record: Mapping[str, Any]) -> None:
        """A ``collapse.jsonl`` record: per field, ``overall_ia_ratio`` and ``diversity``."""
        if self.tensorboard is not None:
            values: dict[str, Any] = {}
            for field, f in record["fields"].items():
                values[f"collapse/ia_ratio/{field}"] = f.get("overall_ia_ratio")
                values[f"collapse/diversity/{field}"] = f.get("diversity")
            self.tensorboard.scalars(record["step"], values, flush=True)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """The run's summary (``summary.json``): the test metrics, then close everything."""
        if self.tensorboard is not None:
            step = summary.get("steps") if _number(summary.get("steps")) else 0
            self.tensorboard.scalars(int(step), {f"test/{k}": summary.get(f"test_{k}") for k in EVAL_SCALARS})
            self.tensorboard.close()
        if self.tracker is not None:
            self.tracker.finish(summary)
