"""The sweep's spec and its cells: ``SweepSpec`` (with ``LauncherSpec``) read from YAML, the
grid's cells with their run directories, logs, trainer overrides and commands, and the
checks of every cell before anything runs (model names, the trainer config each cell
resolves to, and a run directory that holds a run of another config)."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from pipelines.paper_results import PAPER_DATASETS
from trainer import typed_yaml
from trainer.errors import UserError
from trainer.job_config import MODEL_NAMES, load_config
from trainer.run_dir import RunDir
from trainer.storage import join

MODES = ("se", "me")
# how cells are started: subprocesses of the sweep on this host, or one torchx job per cell
SCHEDULERS = ("subprocess", "local_cwd", "kubernetes")
# the image built from this repository's Dockerfile (pipelines.components.IMAGE; not imported
# here: the sweep's CLI answers --help without torchx)
DEFAULT_IMAGE = "ctr-multiembed:latest"
# keys every cell sets itself, from the grid: an override may not set them
CELL_KEYS = ("data.path", "model.name", "embedding.mode", "embedding.scale", "embedding.base_dim", "train.seed", "run.dir")
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

    ``scheduler``: ``subprocess`` (the above, on this host) or a torchx scheduler
    (``local_cwd``, ``kubernetes``): each cell is then its own torchx job, the ``train``
    component of ``pipelines/components.py`` (``-j 1x{nproc}``), ``parallel`` of them
    submitted at a time, with ``scheduler_args`` as torchx's ``-cfg`` (e.g. ``{namespace:
    ctr, queue: ctr, service_account: ctr-trainer}``), ``image``, and ``cpu``, ``gpu``
    (per cell: ``nproc`` on GPU hosts) and ``memMB`` per cell; ``mounts`` and ``env`` as the
    component's. On a cluster, ``output`` and the datasets must be shared storage (an
    object-store URL, or a path on a volume in ``mounts``).
    """

    nproc: int = 1
    max_restarts: int = 0
    timeout_minutes: float = 0.0
    parallel: int = 1
    scheduler: str = "subprocess"
    scheduler_args: dict[str, str] = field(default_factory=dict)
    image: str = DEFAULT_IMAGE
    cpu: int = 8
    gpu: int = 0
    memMB: int = 16384
    mounts: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("nproc", "parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or value < 1:
                raise UserError(f"launcher.{name} must be >= 1, got {value}")
        if self.max_restarts < 0 or self.timeout_minutes < 0:
            raise UserError("launcher.max_restarts and launcher.timeout_minutes must be >= 0")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"launcher.scheduler {self.scheduler!r}: expected one of {list(SCHEDULERS)}")
        for name in ("cpu", "gpu", "memMB"):
            value = getattr(self, name)
            if isinstance(value, bool) or value < (0 if name == "gpu" else 1):
                raise UserError(f"launcher.{name} must be >= {0 if name == 'gpu' else 1}, got {value}")

    @property
    def torchx(self) -> bool:
        """Whether each cell is a torchx job (not a subprocess of the sweep)."""
        return self.scheduler != "subprocess"


@dataclass(frozen=True)
class SweepSpec:
    """The grid and how to train each cell (see ``pipelines.sweep`` for an example).
    Relative paths (output, config, datasets) are from the current directory, as the trainer's."""

    datasets: dict[str, str]  # our name -> prepared dataset (path or fsspec URL, as data.path)
    models: list[str]  # model.name values (trainer.job_config.MODEL_NAMES)
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
        if not self.output:
            raise UserError("output: the sweep's output directory (or URL) is required")
        check_output(self.launcher, self.output)
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


def is_url(path: str) -> bool:
    return "://" in path


def check_output(launcher: LauncherSpec, output: str) -> None:
    """An object-store URL output needs torchx jobs: the subprocess launcher's cells log into
    local files and the sweep locks a local directory."""
    if is_url(output) and not launcher.torchx:
        raise UserError(
            f"output {output!r}: launcher.scheduler subprocess needs a local directory "
            "(use launcher.scheduler local_cwd or kubernetes for a URL output, or mount the storage)"
        )


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
    """The cell's trainer run directory (a ``RunDir`` URL)."""
    return join(output, "cells", cell.id)


def cell_log(output: str, cell: Cell) -> str:
    """The cell's log file (a subprocess cell's output goes into it; a torchx cell's job log is
    copied into it when the job ends, a path or a URL as the output)."""
    return join(output, "logs", f"{cell.id}.log") if is_url(output) else os.path.join(output, "logs", f"{cell.id}.log")


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


# ---- checks before anything runs ----------------------------------------------------------


def check_models(models: set[str]) -> None:
    """Refuse model names this trainer does not have."""
    unknown = sorted(models - set(MODEL_NAMES))
    if unknown:
        raise UserError(f"models: unknown model name(s) {unknown}; this trainer has {sorted(MODEL_NAMES)}")


def resolve_cell_config(spec: SweepSpec, cell: Cell, output: str) -> dict[str, Any]:
    """The cell's trainer config as the trainer will resolve it (its checks run here, up front)."""
    try:
        config = load_config(spec.config, cell_overrides(spec, cell, output))
    except UserError as e:
        raise UserError(f"cell {cell.id}: {e}") from None
    return json.loads(json.dumps(typed_yaml.to_dict(config)))


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
        found = RunDir(cell_dir(output, cell)).read_config()
        if found is None:
            continue  # no run there yet, or the trainer rewrites it
        diffs = config_differences(expected, found)
        if diffs:
            stale.append(f"{cell.id} ({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''})")
    if stale:
        raise UserError(
            f"{len(stale)} cell(s) under {output}/cells hold a run of a different config than the spec gives them: "
            + ", ".join(stale[:3]) + (", ..." if len(stale) > 3 else "")
            + ". Use another --output, or delete those run directories to retrain them."
        )
