"""The paper's scaling sweep: ``python -m pipelines.sweep --spec FILE [--output DIR]``.

Trains every cell of a grid (dataset x model x SE/ME x scale x seed) through the normal
trainer CLI, one subprocess per cell (``python -m trainer.main``, or ``torchrun
--standalone`` when ``launcher.nproc > 1``), so sharding, checkpoints and collapse
monitoring come along, and writes the paper's Table 1 for it. At scale 1 single- and
multi-embedding are the same model: that cell is trained once and stands for both curves.

A spec (YAML; every key checked, see ``SweepSpec``)::

    output: runs/sweep_small
    config: configs/synthetic_me.yaml         # base trainer config (null: trainer defaults)
    datasets: {synthetic: runs/sweep_small/dataset}   # name -> prepared dataset path/URL
    paper_dataset: null                       # criteo | avazu | {our name: criteo|avazu}
    models: [dnn, dcnv2]
    modes: [se, me]
    scales: [1, 2, 4]
    seeds: [0]
    base_dim: {default: 10, nfwfm: 50}
    launcher: {nproc: 1}                      # >1: torchrun --standalone --nproc-per-node N
    overrides: [train.epochs=1]               # trainer --set values for every cell
    per_model_overrides: {dcnv2: [model.cross_layers=2]}
    per_dataset_overrides: {}

The output directory::

    OUT/cells/<cell id>/   the cell's trainer run directory (summary.json, collapse.jsonl, ...)
    OUT/logs/<cell id>.log the cell's trainer output, every attempt appended
    OUT/results.jsonl      one line per cell with every number
    OUT/table.md, table.csv   test AUC and logloss, rows model x SE/ME, columns scales
    OUT/auc_vs_scale.png, ia_vs_scale.png

Rerunning is cheap and safe: a cell whose run directory has a complete ``summary.json`` is
not trained again, an interrupted one resumes from its latest checkpoint (``--resume
auto``), and a failed one is tried again. A failed cell is logged with its log file and the
sweep goes on; the exit status is then 1. Spec errors (exit 2) are found before anything
runs: unknown keys, unknown model names, an empty grid, an override the trainer would
refuse for some cell, or cells whose run directory holds a run of a different config.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from trainer import typed_yaml
from trainer.errors import UserError, run_cli
from trainer.run_dir import RunDir

log = logging.getLogger("sweep")

ROOT = Path(__file__).resolve().parents[1]
MODES = ("se", "me")
# keys every cell sets itself, from the grid: an override may not set them
CELL_KEYS = ("data.path", "model.name", "embedding.mode", "embedding.scale", "embedding.base_dim", "train.seed", "run.dir")
# summary.json keys a finished run always has
SUMMARY_KEYS = ("test_auc", "test_logloss", "val_auc", "best_step")
# config sections that may differ between a cell's run directory and the spec (where it is, how it reports)
VOLATILE_SECTIONS = ("run", "monitoring")
_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


# ---- the spec ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LauncherSpec:
    """How each cell is started.

    ``nproc``: ranks per cell: 1 runs ``python -m trainer.main``, more run ``torchrun
    --standalone --nproc-per-node N`` (one node; ``train.batch_size`` is per rank).
    ``max_restarts``: torchrun's ``--max-restarts`` (a restarted job resumes by itself).
    ``timeout_minutes``: a cell running longer is stopped and counted failed (0: no limit).
    ``parallel``: cells trained at once. On a CUDA host each gets its own ``nproc`` GPUs
    (``CUDA_VISIBLE_DEVICES``), so ``parallel * nproc`` may not exceed the GPUs there:
    ``{nproc: 1, parallel: 8}`` trains eight one-GPU cells side by side on an 8-GPU host.
    """

    nproc: int = 1
    max_restarts: int = 0
    timeout_minutes: float = 0.0
    parallel: int = 1

    def __post_init__(self) -> None:
        for name in ("nproc", "parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or value < 1:
                raise UserError(f"launcher.{name} must be >= 1, got {value}")
        if self.max_restarts < 0 or self.timeout_minutes < 0:
            raise UserError("launcher.max_restarts and launcher.timeout_minutes must be >= 0")


@dataclass(frozen=True)
class SweepSpec:
    """The grid and how to train each cell (see the module docstring for an example).
    Relative paths (output, config, datasets) are from the current directory, as the trainer's."""

    datasets: dict[str, str]  # our name -> prepared dataset (path or fsspec URL, as data.path)
    models: list[str]  # model.name values (trainer.model.interactions.INTERACTIONS)
    output: str = "runs/sweep"
    config: str | None = None  # base trainer config; the cells' --set values go on top
    paper_dataset: str | dict[str, str] | None = None  # which paper column to show beside ours
    modes: list[str] = field(default_factory=lambda: list(MODES))
    scales: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 10])
    seeds: list[int] = field(default_factory=lambda: [0])
    share_1x: bool = True  # SE 1x == ME 1x: train it once for both curves
    base_dim: dict[str, int] = field(default_factory=dict)  # model (or "default") -> embedding.base_dim
    launcher: LauncherSpec = field(default_factory=LauncherSpec)
    overrides: list[str] = field(default_factory=list)
    per_model_overrides: dict[str, list[str]] = field(default_factory=dict)
    per_dataset_overrides: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for axis in ("datasets", "models", "modes", "scales", "seeds"):
            values = list(getattr(self, axis))
            if not values:
                raise UserError(f"the grid is empty: {axis} has no values")
            dupes = sorted({str(v) for v in values if values.count(v) > 1})
            if dupes:
                raise UserError(f"{axis}: repeated value(s) {dupes}")
        for name, path in self.datasets.items():
            if not _NAME.match(name):
                raise UserError(f"datasets: name {name!r} may only use letters, digits, '_' and '.' (it names run directories)")
            if not path:
                raise UserError(f"datasets.{name}: empty path")
        for model in self.models:
            if not isinstance(model, str) or not _NAME.match(model):
                raise UserError(f"models: {model!r} is not a model name")
        bad_modes = [m for m in self.modes if m not in MODES]
        if bad_modes:
            raise UserError(f"modes: {bad_modes} not among {list(MODES)}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.scales):
            raise UserError(f"scales must be positive integers, got {self.scales}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise UserError(f"seeds must be non-negative integers, got {self.seeds}")
        if not self.output or "://" in self.output:
            raise UserError(f"output {self.output!r}: expected a local directory (mount remote storage on a cluster)")
        for key, dim in self.base_dim.items():
            if key != "default" and key not in self.models:
                raise UserError(f"base_dim: {key!r} is neither 'default' nor one of models {self.models}")
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise UserError(f"base_dim.{key}: expected a positive integer, got {dim!r}")
        for section, keys, valid in (
            ("per_model_overrides", self.per_model_overrides, self.models),
            ("per_dataset_overrides", self.per_dataset_overrides, list(self.datasets)),
        ):
            unknown = sorted(set(keys) - set(valid))
            if unknown:
                raise UserError(f"{section}: {unknown} not in the grid ({sorted(valid)})")
        for where, items in self._override_lists():
            for item in items:
                key, sep, _ = str(item).partition("=")
                if not sep or not key.strip():
                    raise UserError(f"{where}: {item!r} is not key=value (e.g. train.epochs=1)")
                if key.strip() in CELL_KEYS:
                    hint = "base_dim" if key.strip() == "embedding.base_dim" else "the grid (datasets, models, modes, scales, seeds, output)"
                    raise UserError(f"{where}: {key.strip()} is set per cell by the sweep; use {hint} instead")
        self.paper_datasets()  # validates

    def _override_lists(self) -> Iterator[tuple[str, list[str]]]:
        yield "overrides", self.overrides
        for model, items in self.per_model_overrides.items():
            yield f"per_model_overrides.{model}", items
        for dataset, items in self.per_dataset_overrides.items():
            yield f"per_dataset_overrides.{dataset}", items

    def paper_datasets(self) -> dict[str, str]:
        """Our dataset name -> the paper's (criteo/avazu), for those shown beside the paper."""
        from pipelines.paper_results import PAPER_DATASETS

        pd = self.paper_dataset
        if pd is None:
            return {}
        if isinstance(pd, str):
            mapping = {name: pd for name in self.datasets}
        elif isinstance(pd, dict):
            unknown = sorted(set(pd) - set(self.datasets))
            if unknown:
                raise UserError(f"paper_dataset: {unknown} not among datasets {sorted(self.datasets)}")
            mapping = {str(k): v for k, v in pd.items() if v is not None}
        else:
            raise UserError(f"paper_dataset: expected null, one of {list(PAPER_DATASETS)} or a mapping, got {pd!r}")
        for name, paper in mapping.items():
            if not isinstance(paper, str) or paper.lower() not in PAPER_DATASETS:
                raise UserError(f"paper_dataset ({name}): {paper!r} is not one of the paper's datasets {list(PAPER_DATASETS)}")
        return {k: v.lower() for k, v in mapping.items()}

    def base_dim_of(self, model: str) -> int | None:
        return self.base_dim.get(model, self.base_dim.get("default"))


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """Read and check a sweep spec (``overrides``: ``key=value`` on top, as the trainer's --set)."""
    return typed_yaml.load(SweepSpec, path, list(overrides))


# ---- cells ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One training run of the grid. ``modes``: the curves it is a point of (both at a shared 1x)."""

    dataset: str
    model: str
    mode: str  # the embedding.mode it trains with
    scale: int
    seed: int
    modes: tuple[str, ...]

    @property
    def id(self) -> str:
        label = f"{self.scale}x" if len(self.modes) > 1 else f"{self.mode}{self.scale}x"
        return f"{self.dataset}-{self.model}-{label}-seed{self.seed}"


def plan_cells(spec: SweepSpec) -> list[Cell]:
    """Every cell of the grid, seeds outermost (a first complete table comes early)."""
    cells = []
    for seed in spec.seeds:
        for dataset in spec.datasets:
            for model in spec.models:
                for scale in spec.scales:
                    if scale == 1 and spec.share_1x:
                        cells.append(Cell(dataset, model, spec.modes[0], 1, seed, tuple(spec.modes)))
                        continue
                    for mode in spec.modes:
                        cells.append(Cell(dataset, model, mode, scale, seed, (mode,)))
    return cells


def select_cells(cells: list[Cell], **only: Sequence[Any] | None) -> list[Cell]:
    """The cells whose dataset/model/mode/scale/seed are among ``only[axis]`` (None: all)."""
    out = []
    for c in cells:
        keep = True
        for axis, values in only.items():
            if values is None:
                continue
            if axis == "modes":
                keep &= any(m in values for m in c.modes)
            else:
                keep &= getattr(c, axis.rstrip("s")) in values
        if keep:
            out.append(c)
    return out


def cell_dir(output: str, cell: Cell) -> str:
    return os.path.join(output, "cells", cell.id)


def cell_log(output: str, cell: Cell) -> str:
    return os.path.join(output, "logs", f"{cell.id}.log")


def _yaml_str(value: str) -> str:
    """``value`` as a --set value that YAML reads back as this string (quoted only when needed)."""
    try:
        if yaml.safe_load(value) == value:
            return value
    except yaml.YAMLError:
        pass
    return "'" + value.replace("'", "''") + "'"


def cell_overrides(spec: SweepSpec, cell: Cell, output: str) -> list[str]:
    """The cell's trainer --set values: the spec's, the dataset's, the model's, then the grid's."""
    sets = [*spec.overrides, *spec.per_dataset_overrides.get(cell.dataset, []), *spec.per_model_overrides.get(cell.model, [])]
    sets += [
        f"data.path={_yaml_str(spec.datasets[cell.dataset])}",
        f"model.name={cell.model}",
        f"embedding.mode={cell.mode}",
        f"embedding.scale={cell.scale}",
    ]
    dim = spec.base_dim_of(cell.model)
    if dim is not None:
        sets.append(f"embedding.base_dim={dim}")
    sets += [f"train.seed={cell.seed}", f"run.dir={_yaml_str(cell_dir(output, cell))}"]
    return sets


def cell_command(spec: SweepSpec, cell: Cell, output: str) -> list[str]:
    """The command line that trains ``cell`` (run from the current directory)."""
    if spec.launcher.nproc == 1:
        cmd = [sys.executable, "-m", "trainer.main"]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(spec.launcher.nproc), "--max-restarts", str(spec.launcher.max_restarts),
            "-m", "trainer.main",
        ]  # fmt: skip
    if spec.config:
        cmd += ["--config", spec.config]
    return cmd + ["--set", *cell_overrides(spec, cell, output), "--resume", "auto"]


def resolve_cell_config(spec: SweepSpec, cell: Cell, output: str) -> dict[str, Any]:
    """The cell's trainer config as the trainer will resolve it (its checks run here, up front)."""
    from trainer.job_config import load_config

    try:
        config = load_config(spec.config, cell_overrides(spec, cell, output))
    except UserError as e:
        raise UserError(f"cell {cell.id}: {e}") from None
    return json.loads(json.dumps(typed_yaml.to_dict(config)))


def read_summary(run_dir: str) -> dict[str, Any] | None:
    """The run's summary.json when it is complete (written at the very end of a run), else None."""
    try:
        summary = json.loads(Path(run_dir, "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and all(k in summary for k in SUMMARY_KEYS) else None


def read_collapse(run_dir: str, step: int | None = None) -> dict[str, Any] | None:
    """Means over fields of one ``collapse.jsonl`` record: the one at ``step`` (the best
    checkpoint, whose test metrics the tables show) when there is one, else the last."""
    record = RunDir(run_dir).read_collapse_record(step)
    if record is None:
        return None
    fields = record["fields"].values()

    def mean(values: list[Any]) -> float | None:
        vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        return sum(vals) / len(vals) if vals else None

    def overall(f: dict[str, Any], key: str, set_key: str) -> float | None:
        v = f.get(key)
        return v if isinstance(v, (int, float)) else mean(f.get(set_key) or [])

    return {
        "collapse_step": record.get("step"),
        "mean_ia": mean([overall(f, "overall_ia", "set_ia") for f in fields]),
        "mean_ia_ratio": mean([overall(f, "overall_ia_ratio", "set_ia_ratio") for f in fields]),
        "mean_set_ia": mean([mean(f.get("set_ia") or []) for f in fields]),
        "mean_diversity": mean([f.get("diversity") for f in fields]),
    }


def _has_checkpoint(run_dir: str) -> bool:
    ckpts = Path(run_dir, "checkpoints")
    return ckpts.is_dir() and any(ckpts.iterdir())


def config_differences(expected: dict[str, Any], found: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (the run and monitoring sections excluded at the top).
    A key the run's config lacks is not a difference: an older trainer wrote it, and a new
    key's default keeps the old behaviour."""
    out = []
    for key in sorted(found):
        if not prefix and key in VOLATILE_SECTIONS:
            continue
        a, b = expected.get(key), found.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {b!r} there, {a!r} in the spec")
    return out


def check_existing(spec: SweepSpec, cells: list[Cell], output: str) -> None:
    """Refuse cells whose run directory holds a run of a different config (the spec changed
    under an existing output): their results would be silently mixed in."""
    stale = []
    for cell in cells:
        expected = resolve_cell_config(spec, cell, output)
        path = Path(cell_dir(output, cell), "config.yaml")
        if not path.exists():
            continue
        try:
            found = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue  # the trainer rewrites it
        diffs = config_differences(expected, json.loads(json.dumps(found)))
        if diffs:
            stale.append(f"{cell.id} ({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''})")
    if stale:
        raise UserError(
            f"{len(stale)} cell(s) under {output}/cells hold a run of a different config than the spec gives them: "
            + ", ".join(stale[:3]) + (", ..." if len(stale) > 3 else "")
            + ". Use another --output, or delete those run directories to retrain them."
        )


# ---- running ----------------------------------------------------------------------------


@dataclass
class Outcome:
    status: str  # done | failed | skipped
    seconds: float | None = None
    error: str | None = None


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _stop(proc: subprocess.Popen) -> None:
    """Stop a cell's whole process group (torchrun and its ranks): SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _last_error(log_path: str) -> str:
    try:
        lines = [line.strip() for line in Path(log_path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("error: ") or "Error:" in line or " ERROR " in line]
    return (errors or lines or ["(empty log)"])[-1][:300]


class CellJob:
    """One cell training in a subprocess (its own process group, so that stopping it takes
    torchrun's ranks along), its output appended to the cell's log."""

    def __init__(self, spec: SweepSpec, cell: Cell, output: str, env: dict[str, str] | None = None):
        self.cell, self.output = cell, output
        self.log_path = cell_log(output, cell)
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        cmd = cell_command(spec, cell, output)
        self.timeout = spec.launcher.timeout_minutes * 60 or None
        self.timeout_minutes = spec.launcher.timeout_minutes
        self.start = time.monotonic()
        with open(self.log_path, "a") as logf:
            logf.write(f"\n=== {_dt.datetime.now().isoformat(timespec='seconds')} sweep: {shlex.join(cmd)}\n")
            logf.flush()
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env={**_child_env(), **(env or {})},
                                         start_new_session=True)  # fmt: skip

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.start

    def poll(self) -> Outcome | None:
        """The outcome once the cell has ended (or overrun its time: then it is stopped), else None."""
        rc = self.proc.poll()
        if rc is None:
            if self.timeout is not None and self.seconds > self.timeout:
                self.stop()
                return Outcome("failed", self.seconds, f"stopped after launcher.timeout_minutes={self.timeout_minutes}")
            return None
        if rc == 0 and read_summary(cell_dir(self.output, self.cell)) is not None:
            return Outcome("done", self.seconds)
        why = f"exit {rc}" if rc != 0 else "exit 0 but no complete summary.json"
        return Outcome("failed", self.seconds, f"{why}: {_last_error(self.log_path)}")

    def stop(self) -> None:
        _stop(self.proc)


def slot_environments(launcher: LauncherSpec) -> list[dict[str, str]]:
    """The environment of each parallel slot: its own GPUs on a CUDA host, nothing on CPU."""
    if launcher.parallel == 1:
        return [{}]
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        gpus = 0
    if gpus == 0:
        return [{} for _ in range(launcher.parallel)]
    need = launcher.parallel * launcher.nproc
    if need > gpus:
        raise UserError(f"launcher.parallel {launcher.parallel} x nproc {launcher.nproc} = {need} GPUs, but this host has {gpus}")
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()] or [str(i) for i in range(gpus)]
    n = launcher.nproc
    return [{"CUDA_VISIBLE_DEVICES": ",".join(visible[k * n : (k + 1) * n])} for k in range(launcher.parallel)]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


@contextlib.contextmanager
def _lock(output: str) -> Iterator[None]:
    """One sweep at a time per output directory."""
    import fcntl

    os.makedirs(output, exist_ok=True)
    f = open(os.path.join(output, ".sweep.lock"), "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise UserError(f"another sweep is running on {output} ({f.read().strip() or 'unknown pid'})") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()


def _raise_on_sigterm() -> None:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, handler)


def collect_records(spec: SweepSpec, cells: list[Cell], output: str, outcomes: dict[str, Outcome]) -> list[dict[str, Any]]:
    """One record per cell of the grid: its numbers from its run directory and how it went."""
    records = []
    for cell in cells:
        run_dir = cell_dir(output, cell)
        summary = read_summary(run_dir)
        outcome = outcomes.get(cell.id)
        status = "done" if summary is not None else ("failed" if outcome and outcome.status == "failed" else "missing")
        record: dict[str, Any] = {
            "id": cell.id,
            "dataset": cell.dataset,
            "model": cell.model,
            "mode": cell.mode,
            "modes": list(cell.modes),
            "scale": cell.scale,
            "seed": cell.seed,
            "status": status,
            "run_dir": run_dir,
            "log": cell_log(output, cell),
            "seconds": outcome.seconds if outcome else None,
            "error": outcome.error if outcome and status == "failed" else None,
        }
        if summary is not None:
            for key in ("test_auc", "test_logloss", "test_calibration", "val_auc", "val_logloss", "best_step", "steps",
                        "epochs_completed", "stopped_early", "train_examples", "train_seconds", "train_examples_per_sec",
                        "world_size", "device", "oracle_test_auc", "oracle_test_logloss"):  # fmt: skip
                record[key] = summary.get(key)
            record.update(read_collapse(run_dir, summary.get("best_step")) or {})
        records.append(record)
    return records


def run_sweep(
    spec: SweepSpec,
    output: str,
    only: dict[str, Sequence[Any] | None] | None = None,
    report: bool = True,
) -> list[dict[str, Any]]:
    """Run the selected cells not yet done, then write the report of the whole grid.
    Returns the records (one per cell of the grid)."""
    from pipelines import sweep_report

    cells = plan_cells(spec)
    todo = select_cells(cells, **(only or {}))
    if not todo:
        raise UserError(f"the grid is empty: no cell of the spec's {len(cells)} matches the selection {only}")
    check_models({c.model for c in todo})
    check_existing(spec, todo, output)  # also runs every cell's config through the trainer's checks
    outcomes: dict[str, Outcome] = {}

    def write() -> list[dict[str, Any]]:
        records = collect_records(spec, cells, output, outcomes)
        if report:
            sweep_report.write_report(spec, output, records)
        return records

    with _lock(output):
        pending = [c for c in todo if read_summary(cell_dir(output, c)) is None]
        for c in todo:
            if c not in pending:
                outcomes[c.id] = Outcome("skipped")
        log.info(
            "sweep: %d cell(s) in the grid, %d selected, %d already done (skipped), %d to train; output %s",
            len(cells), len(todo), len(todo) - len(pending), len(pending), output,
        )  # fmt: skip
        envs = slot_environments(spec.launcher)
        queue = list(pending)
        running: dict[int, tuple[int, CellJob]] = {}  # slot -> (number, job)
        durations: list[float] = []
        started = 0
        try:
            while queue or running:
                while queue and len(running) < len(envs):
                    slot = min(set(range(len(envs))) - set(running))
                    cell = queue.pop(0)
                    started += 1
                    left = len(queue) + 1 + len(running)
                    eta = (f"ETA {_duration(sum(durations) / len(durations) * left / len(envs))} for {left} cell(s)"
                           if durations else "ETA after the first cell")  # fmt: skip
                    how = "resuming from its latest checkpoint" if _has_checkpoint(cell_dir(output, cell)) else "new"
                    where = f" on GPU(s) {envs[slot]['CUDA_VISIBLE_DEVICES']}" if envs[slot] else ""
                    log.info("[%d/%d] start %s (%s)%s; %s", started, len(pending), cell.id, how, where, eta)
                    running[slot] = (started, CellJob(spec, cell, output, envs[slot]))
                time.sleep(0.2)
                for slot, (number, job) in list(running.items()):
                    outcome = job.poll()
                    if outcome is None:
                        continue
                    del running[slot]
                    cell = job.cell
                    outcomes[cell.id] = outcome
                    durations.append(outcome.seconds or 0.0)
                    if outcome.status == "done":
                        s = read_summary(cell_dir(output, cell)) or {}
                        ia = read_collapse(cell_dir(output, cell), s.get("best_step")) or {}
                        log.info(
                            "[%d/%d] done %s in %s: test AUC %.5f, logloss %.5f%s",
                            number, len(pending), cell.id, _duration(outcome.seconds or 0), s["test_auc"], s["test_logloss"],
                            f", mean IA {ia['mean_ia']:.2f}" if ia.get("mean_ia") is not None else "",
                        )  # fmt: skip
                    else:
                        log.error("[%d/%d] FAILED %s after %s: %s; log: %s", number, len(pending), cell.id,
                                  _duration(outcome.seconds or 0), outcome.error, cell_log(output, cell))  # fmt: skip
                    if report:  # the tables so far (the plots at the end)
                        sweep_report.write_tables(spec, output, collect_records(spec, cells, output, outcomes))
        except BaseException:  # Ctrl-C, SIGTERM: take the running cells down with us
            for _, job in running.values():
                job.stop()
            raise
        finally:
            records = write()
    failed = [r for r in records if r["status"] == "failed"]
    done = sum(r["status"] == "done" for r in records)
    log.info("sweep: %d of %d cell(s) done, %d failed; report in %s (table.md, table.csv, auc_vs_scale.png, ia_vs_scale.png, results.jsonl)",
             done, len(records), len(failed), output)  # fmt: skip
    for r in failed:
        log.error("failed: %s: %s; log: %s", r["id"], r["error"], r["log"])
    return records


def check_models(models: set[str]) -> None:
    from trainer.model.interactions import INTERACTIONS

    unknown = sorted(models - set(INTERACTIONS))
    if unknown:
        raise UserError(f"models: unknown model name(s) {unknown}; this trainer has {sorted(INTERACTIONS)}")


# ---- command line -----------------------------------------------------------------------


def _csv(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None

    return parse


def _quiet_libraries() -> None:
    """FBGEMM logs every library it loads through the root logger at INFO: keep the sweep's log readable."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda r: r.levelno >= logging.ERROR or not any(lib in r.pathname for lib in ("/torchrec/", "/fbgemm_gpu/")))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", required=True, help="sweep spec YAML (see configs/sweeps/)")
    p.add_argument("--output", help="output directory (default: the spec's output)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override spec keys: --set seeds=[0,1,2] launcher.nproc=2")  # fmt: skip
    for axis, kind in (("datasets", str), ("models", str), ("modes", str), ("scales", int), ("seeds", int)):
        p.add_argument(f"--{axis}", type=_csv(kind), metavar="A,B", help=f"train only these {axis} of the spec (the report still covers the whole grid)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their commands; train nothing")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the run directories; train nothing")
    args = p.parse_args(argv)
    _quiet_libraries()
    spec = load_spec(args.spec, args.overrides)
    output = args.output or spec.output
    only = {axis: getattr(args, axis) for axis in ("datasets", "models", "modes", "scales", "seeds")}
    for axis, values in only.items():
        extra = sorted(set(values or []) - set(getattr(spec, axis)), key=str)
        if extra:
            raise UserError(f"--{axis}: {extra} not in the spec's {axis} {list(getattr(spec, axis))}")
    if args.report_only:
        from pipelines import sweep_report

        records = collect_records(spec, plan_cells(spec), output, {})
        sweep_report.write_report(spec, output, records)
        print(f"report of {sum(r['status'] == 'done' for r in records)}/{len(records)} done cell(s) written to {output}")
        return
    if args.dry_run:
        cells = select_cells(plan_cells(spec), **only)
        if not cells:
            raise UserError("the grid is empty: no cell matches the selection")
        check_models({c.model for c in cells})
        for c in cells:
            resolve_cell_config(spec, c, output)
            state = "done" if read_summary(cell_dir(output, c)) else ("resume" if _has_checkpoint(cell_dir(output, c)) else "new")
            print(f"{c.id}\t{state}\t{shlex.join(cell_command(spec, c, output))}")
        return
    _raise_on_sigterm()
    records = run_sweep(spec, output, only)
    if any(r["status"] == "failed" for r in records):
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
